-- Agent sessions: lease history, watch cursors, scheduling hints.

-- Every lease ever granted, for audits and for proving that no shard was
-- leased twice at once.
CREATE TABLE shard_leases (
    shard_id       bigint NOT NULL REFERENCES shards (id) ON DELETE CASCADE,
    lease_epoch    bigint NOT NULL,
    agent_id       uuid NOT NULL,
    controller_id  text NOT NULL,
    -- The checkpoint the lease started from.
    start_index    bigint NOT NULL,
    leased_at      timestamptz NOT NULL DEFAULT now(),
    ended_at       timestamptz,
    -- done, failed, released, expired, cancelled
    outcome        text,
    PRIMARY KEY (shard_id, lease_epoch)
);

ALTER TABLE scans
    ADD COLUMN has_ipv6 boolean NOT NULL DEFAULT false,
    ADD COLUMN waiting_reason text;

-- Result batches each shard has committed (see results.shard_batch).
ALTER TABLE shards ADD COLUMN result_batches integer NOT NULL DEFAULT 0;

CREATE INDEX shards_agent_idx ON shards (agent_id) WHERE state = 'leased';
