-- Service identification (docs/protocol.md, "Identification").
--
-- A scan identifies what answers on its open ports unless created with
-- identify = false; a host answering on more than port_threshold of the
-- scan's ports (0: no limit) is a SYN proxy or tarpit, reported as such.
ALTER TABLE scans ADD COLUMN identify boolean NOT NULL DEFAULT true;
ALTER TABLE scans ADD COLUMN port_threshold integer NOT NULL DEFAULT 100 CHECK (port_threshold >= 0);

-- What answered (portfleet_core::Service as JSON), written with the result
-- by the agent that found it; NULL when the scan did not identify.
ALTER TABLE results ADD COLUMN service jsonb;
-- Set on every open port of an address that answered on more than the
-- scan's port_threshold ports.
ALTER TABLE results ADD COLUMN host_answers_everything boolean NOT NULL DEFAULT false;
