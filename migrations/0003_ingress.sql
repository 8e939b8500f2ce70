-- The RabbitMQ ingress: where a scan came from and where to reply, and
-- an outbox of lifecycle events to publish.

ALTER TABLE scans
    ADD COLUMN origin text NOT NULL DEFAULT 'api' CHECK (origin IN ('api', 'amqp', 'naabum8')),
    ADD COLUMN reply_to text,
    ADD COLUMN correlation_id text;

-- Written in the same transaction as the change it announces; the
-- publisher claims rows with FOR UPDATE SKIP LOCKED, publishes them with
-- confirms and deletes them: each event goes out once per fleet (at least
-- once across crashes). Rows nobody publishes (no ingress) are dropped
-- after a day.
CREATE TABLE scan_events (
    id          bigserial PRIMARY KEY,
    scan_id     uuid NOT NULL,
    event       text NOT NULL CHECK (event IN ('created', 'completed', 'failed', 'cancelled')),
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX scan_events_created_at_idx ON scan_events (created_at);
