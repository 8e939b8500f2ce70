-- Network memory (docs/inventory.md): the current state of every port any
-- scan found open, per-address summaries, and the changes between scans.
--
-- Folded from committed results by one controller at a time (an advisory
-- lock), batch by batch, so the ingest path does not pay for it; closures
-- are decided when a scan ends, from its shards' checkpoints.

CREATE TABLE inventory_ports (
    ip              inet NOT NULL,
    protocol        text NOT NULL DEFAULT 'tcp' CHECK (protocol IN ('tcp')),
    port            integer NOT NULL CHECK (port BETWEEN 1 AND 65535),
    state           text NOT NULL CHECK (state IN ('open', 'closed', 'filtered')),
    first_open_at   timestamptz NOT NULL,
    last_open_at    timestamptz NOT NULL,
    -- The scan that last saw it open, and the last one that probed it.
    open_scan_id    uuid NOT NULL,
    last_probed_at  timestamptz NOT NULL,
    last_scan_id    uuid NOT NULL,
    changed_at      timestamptz NOT NULL,
    service         jsonb,
    PRIMARY KEY (ip, port, protocol)
);
CREATE INDEX inventory_ports_open_idx ON inventory_ports (port, ip) WHERE state = 'open';

CREATE TABLE inventory_hosts (
    ip             inet PRIMARY KEY,
    hostnames      text[] NOT NULL DEFAULT '{}',
    target_groups  text[] NOT NULL DEFAULT '{}',
    open_ports     integer NOT NULL DEFAULT 0,
    first_seen_at  timestamptz NOT NULL,
    last_seen_at   timestamptz NOT NULL
);
CREATE INDEX inventory_hosts_seen_idx ON inventory_hosts (last_seen_at);

-- Newest first is id order, descending.
CREATE TABLE inventory_changes (
    id                bigserial PRIMARY KEY,
    kind              text NOT NULL CHECK (kind IN ('opened', 'closed', 'service_changed')),
    ip                inet NOT NULL,
    protocol          text NOT NULL DEFAULT 'tcp',
    port              integer NOT NULL,
    at                timestamptz NOT NULL,
    scan_id           uuid NOT NULL,
    previous_scan_id  uuid,
    target_group      text NOT NULL DEFAULT '',
    hostname          text,
    service_before    jsonb,
    service_after     jsonb
);
CREATE INDEX inventory_changes_ip_idx ON inventory_changes (ip, id);
CREATE INDEX inventory_changes_scan_idx ON inventory_changes (scan_id, id);

-- How many of each shard's result batches are folded into the inventory.
-- Apart from shards so that folding never waits on an ingesting lease's
-- row lock, nor makes it wait.
CREATE TABLE inventory_cursors (
    shard_id  bigint PRIMARY KEY REFERENCES shards (id) ON DELETE CASCADE,
    batches   integer NOT NULL
);

-- Set once a finished scan's closures are decided and its scan.changes
-- event written; until then it is folded.
ALTER TABLE scans ADD COLUMN inventoried boolean NOT NULL DEFAULT false;
-- How far deciding a finished scan's closures has got (one page per
-- transaction): the address range, and the last (ip, port) done in it.
ALTER TABLE scans ADD COLUMN close_range integer NOT NULL DEFAULT 0;
ALTER TABLE scans ADD COLUMN close_ip inet;
ALTER TABLE scans ADD COLUMN close_port integer;
CREATE INDEX scans_uninventoried_idx ON scans (id) WHERE NOT inventoried;
-- Deleted scans vanish from the API at once; the pruner removes their rows
-- in small batches.
ALTER TABLE scans ADD COLUMN deleted_at timestamptz;
CREATE INDEX scans_deleted_idx ON scans (deleted_at) WHERE deleted_at IS NOT NULL;
CREATE INDEX scans_finished_idx ON scans (finished_at) WHERE deleted_at IS NULL AND finished_at IS NOT NULL;

-- scan.changes events carry their page of changes.
ALTER TABLE scan_events ADD COLUMN payload jsonb;
ALTER TABLE scan_events DROP CONSTRAINT scan_events_event_check;
ALTER TABLE scan_events ADD CONSTRAINT scan_events_event_check
    CHECK (event IN ('created', 'completed', 'failed', 'cancelled', 'changes'));

-- One row, shared by every controller. NULL: keep scans for ever.
CREATE TABLE retention (
    id            boolean PRIMARY KEY DEFAULT true CHECK (id),
    retain_scans  interval,
    updated_at    timestamptz NOT NULL DEFAULT now()
);
INSERT INTO retention DEFAULT VALUES;

CREATE TABLE webhooks (
    id          uuid PRIMARY KEY,
    url         text NOT NULL CHECK (url ~ '^https?://'),
    -- Empty: every event.
    events      text[] NOT NULL DEFAULT '{}',
    secret      text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- The webhooks' outbox and delivery log: one row per (event, webhook),
-- written by a trigger in the transaction that records the event, so no
-- path that records an event can forget its webhooks.
CREATE TABLE webhook_deliveries (
    id               bigserial PRIMARY KEY,
    webhook_id       uuid NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
    event            text NOT NULL,
    scan_id          uuid NOT NULL,
    payload          jsonb,
    state            text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'delivered', 'failed')),
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    last_attempt_at  timestamptz,
    last_status      integer NOT NULL DEFAULT 0,
    last_error       text,
    created_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_deliveries_due_idx ON webhook_deliveries (next_attempt_at) WHERE state = 'pending';
CREATE INDEX webhook_deliveries_hook_idx ON webhook_deliveries (webhook_id, id);

CREATE FUNCTION webhook_fan_out() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO webhook_deliveries (webhook_id, event, scan_id, payload)
    SELECT w.id, 'scan.' || NEW.event, NEW.scan_id, NEW.payload
    FROM webhooks w
    WHERE cardinality(w.events) = 0 OR ('scan.' || NEW.event) = ANY (w.events);
    RETURN NULL;
END
$$;
CREATE TRIGGER scan_events_webhooks AFTER INSERT ON scan_events
    FOR EACH ROW EXECUTE FUNCTION webhook_fan_out();
