-- Fleet-wide politeness (docs/security.md): probes per second that one
-- target address, and one /24 (IPv6: /64), may receive from all running
-- scans together. 0 means no cap. One row, shared by every controller.
CREATE TABLE rate_caps (
    id         boolean PRIMARY KEY DEFAULT true CHECK (id),
    per_host   integer NOT NULL DEFAULT 0 CHECK (per_host >= 0),
    per_block  integer NOT NULL DEFAULT 0 CHECK (per_block >= 0),
    updated_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO rate_caps DEFAULT VALUES;

-- The scope rules' version, bumped with every change in the same
-- transaction. A scan is stored only if the version it was checked against
-- is still current (read FOR SHARE in the storing transaction), so no scan
-- checked against old rules lands after a change's sweep of active scans.
CREATE TABLE policy_state (
    id      boolean PRIMARY KEY DEFAULT true CHECK (id),
    version bigint NOT NULL DEFAULT 0
);
INSERT INTO policy_state DEFAULT VALUES;
