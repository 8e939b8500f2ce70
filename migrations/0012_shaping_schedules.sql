-- Scan shaping (exclusions, address families, CDN edges, deadlines) and
-- recurring schedules (docs/schedules.md).
--
-- limited_ranges/limited_ports: addresses (CDN edges under the web-ports
-- policy) probed only on those ports; agents and coverage skip their
-- other positions. The request's own fields are kept to echo it back.
ALTER TABLE scans
    ADD COLUMN exclude           text[] NOT NULL DEFAULT '{}',
    ADD COLUMN exclude_ports     text NOT NULL DEFAULT '',
    ADD COLUMN ip_version        smallint NOT NULL DEFAULT 0 CHECK (ip_version IN (0, 4, 6)),
    ADD COLUMN scan_all_ips      boolean NOT NULL DEFAULT true,
    ADD COLUMN cdn_policy        text NOT NULL DEFAULT 'all' CHECK (cdn_policy IN ('all', 'web', 'skip')),
    ADD COLUMN limited_ranges    text[] NOT NULL DEFAULT '{}',
    ADD COLUMN limited_ports     text NOT NULL DEFAULT '',
    ADD COLUMN deadline          timestamptz,
    ADD COLUMN deadline_exceeded boolean NOT NULL DEFAULT false,
    ADD COLUMN schedule_id       uuid;

-- The deadline sweep looks only at scans that have one and are not done.
CREATE INDEX scans_deadline_idx ON scans (deadline) WHERE deadline IS NOT NULL AND state IN ('pending', 'running');

CREATE TABLE schedules (
    id               uuid PRIMARY KEY,
    name             text NOT NULL,
    -- Exactly one of cron (five fields, in time_zone) and interval_secs.
    cron             text,
    time_zone        text NOT NULL DEFAULT 'UTC',
    interval_secs    bigint CHECK (interval_secs > 0),
    jitter_secs      bigint NOT NULL DEFAULT 0 CHECK (jitter_secs >= 0),
    overlap          text NOT NULL DEFAULT 'skip' CHECK (overlap IN ('skip', 'queue', 'cancel')),
    -- The scan each run creates, as the domain's ScanTemplate (JSON).
    template         jsonb NOT NULL,
    max_run_secs     bigint CHECK (max_run_secs > 0),
    paused           boolean NOT NULL DEFAULT false,
    -- The due time of the next run (before jitter), and when it fires
    -- (after jitter, or later while a queued run waits): NULL while paused.
    next_run_at      timestamptz,
    fire_at          timestamptz,
    -- A controller firing the schedule holds it until then; a crash lets
    -- another take over once it passes. The token is the holder's: only
    -- it advances or releases the schedule.
    claimed_until    timestamptz,
    claim_token      uuid,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    CHECK ((cron IS NULL) <> (interval_secs IS NULL))
);

CREATE INDEX schedules_fire_idx ON schedules (fire_at) WHERE NOT paused;

-- One row per due time: its primary key is what makes a due time fire
-- once however many controllers try.
CREATE TABLE schedule_runs (
    schedule_id uuid NOT NULL REFERENCES schedules (id) ON DELETE CASCADE,
    due_at      timestamptz NOT NULL,
    fired_at    timestamptz NOT NULL DEFAULT now(),
    outcome     text NOT NULL CHECK (outcome IN ('started', 'skipped', 'failed')),
    scan_id     uuid,
    error       text,
    PRIMARY KEY (schedule_id, due_at)
);

-- schedule.fired: a schedule started a run (payload: schedule and due time).
ALTER TABLE scan_events DROP CONSTRAINT scan_events_event_check;
ALTER TABLE scan_events ADD CONSTRAINT scan_events_event_check
    CHECK (event IN ('created', 'completed', 'failed', 'cancelled', 'changes', 'schedule_fired'));

-- Event names on the wire: scan.<event>, and schedule.fired.
CREATE OR REPLACE FUNCTION webhook_fan_out() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    name text := CASE NEW.event WHEN 'schedule_fired' THEN 'schedule.fired' ELSE 'scan.' || NEW.event END;
BEGIN
    INSERT INTO webhook_deliveries (webhook_id, event, scan_id, payload)
    SELECT w.id, name, NEW.scan_id, NEW.payload
    FROM webhooks w
    WHERE cardinality(w.events) = 0 OR name = ANY (w.events);
    RETURN NULL;
END
$$;

ALTER TABLE scans DROP CONSTRAINT scans_origin_check;
ALTER TABLE scans ADD CONSTRAINT scans_origin_check CHECK (origin IN ('api', 'amqp', 'naabum8', 'schedule'));
