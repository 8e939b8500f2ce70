-- portfleet schema: targets, scans with their shards and hostnames, agents,
-- and results. All writes that loop are batched (UNNEST); every list is
-- served by an index in keyset order.

CREATE TABLE targets (
    id          uuid PRIMARY KEY,                 -- UUIDv7: creation order
    value       text NOT NULL,                    -- normalised spec
    kind        text NOT NULL CHECK (kind IN ('address', 'cidr', 'range', 'hostname')),
    group_name  text NOT NULL DEFAULT '',
    enabled     boolean NOT NULL DEFAULT true,
    created_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT targets_group_value_key UNIQUE (group_name, value)
);
CREATE INDEX targets_group_enabled_idx ON targets (group_name, id) WHERE enabled;

CREATE TABLE scans (
    id              uuid PRIMARY KEY,             -- UUIDv7: newest sorts last
    request_id      text CONSTRAINT scans_request_id_key UNIQUE,
    state           text NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'running', 'completed', 'cancelled', 'failed')),
    -- The normalised request.
    targets         text[] NOT NULL,
    target_group    text NOT NULL DEFAULT '',
    ports           text NOT NULL,
    scan_type       text NOT NULL CHECK (scan_type IN ('syn', 'connect')),
    rate            integer NOT NULL CHECK (rate > 0),
    retries         integer NOT NULL CHECK (retries >= 0),
    labels          jsonb NOT NULL DEFAULT '{}',
    agent_selector  jsonb NOT NULL DEFAULT '{}',
    allow_connect_fallback boolean NOT NULL DEFAULT false,
    -- The plan: agents rebuild the index space from these.
    seed            bigint NOT NULL,
    address_ranges  text[] NOT NULL,
    address_count   bigint NOT NULL,
    port_count      integer NOT NULL,
    probes_planned  bigint NOT NULL,
    shard_count     integer NOT NULL,
    -- Progress, maintained in the same transactions as shard checkpoints.
    probes_done     bigint NOT NULL DEFAULT 0,
    open_ports      bigint NOT NULL DEFAULT 0,
    error           text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    started_at      timestamptz,
    finished_at     timestamptz,
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX scans_state_id_idx ON scans (state, id);

-- The hostname each named address came from, joined into results on insert.
CREATE TABLE scan_hosts (
    scan_id   uuid NOT NULL REFERENCES scans (id) ON DELETE CASCADE,
    ip        inet NOT NULL,
    hostname  text NOT NULL,
    PRIMARY KEY (scan_id, ip)
);

-- Work units: contiguous ranges of the scan's permuted index space.
CREATE TABLE shards (
    id                bigserial PRIMARY KEY,
    scan_id           uuid NOT NULL REFERENCES scans (id) ON DELETE CASCADE,
    shard_no          integer NOT NULL,
    start_index       bigint NOT NULL,
    end_index         bigint NOT NULL,
    -- Every position below is final and its results are committed.
    checkpoint        bigint NOT NULL,
    state             text NOT NULL DEFAULT 'pending'
                      CHECK (state IN ('pending', 'leased', 'done', 'failed', 'cancelled')),
    -- Goes up with every lease; frames carrying an older epoch are refused.
    lease_epoch       bigint NOT NULL DEFAULT 0,
    agent_id          uuid,
    controller_id     text,
    lease_expires_at  timestamptz,
    -- Highest frame sequence of the current lease that is committed.
    acked_seq         bigint NOT NULL DEFAULT 0,
    failures          integer NOT NULL DEFAULT 0,
    last_error        text,
    probes_sent       bigint NOT NULL DEFAULT 0,
    open_count        bigint NOT NULL DEFAULT 0,
    closed_count      bigint NOT NULL DEFAULT 0,
    filtered_count    bigint NOT NULL DEFAULT 0,
    updated_at        timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT shards_scan_no_key UNIQUE (scan_id, shard_no),
    CHECK (start_index <= checkpoint AND checkpoint <= end_index)
);
CREATE INDEX shards_pending_idx ON shards (scan_id, shard_no) WHERE state = 'pending';
CREATE INDEX shards_leased_idx ON shards (lease_expires_at) WHERE state = 'leased';

CREATE TABLE agents (
    id                  uuid PRIMARY KEY,
    name                text NOT NULL,
    version             text NOT NULL DEFAULT '',
    labels              jsonb NOT NULL DEFAULT '{}',
    raw_socket          boolean NOT NULL DEFAULT false,
    ipv6                boolean NOT NULL DEFAULT false,
    max_rate            integer NOT NULL DEFAULT 0,
    max_shards          integer NOT NULL DEFAULT 1,
    state               text NOT NULL DEFAULT 'gone' CHECK (state IN ('connected', 'draining', 'gone')),
    controller_id       text,
    session_generation  bigint NOT NULL DEFAULT 0,
    current_rate        integer NOT NULL DEFAULT 0,
    active_shards       integer NOT NULL DEFAULT 0,
    connected_at        timestamptz,
    last_heartbeat_at   timestamptz,
    created_at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX agents_state_id_idx ON agents (state, id);

-- Open ports, keyed by the probe's position in the scan's permuted index
-- space. Positions and (ip, port) pairs of a scan are in bijection (TCP
-- only), so the key is idempotent on (scan, ip, port, protocol): a resent
-- batch never adds a row. It is also what makes ingest fast: each shard
-- reports positions in nearly increasing order, so inserts land at a few
-- points of the index rather than all over it, as an (ip, port) key would.
-- No foreign key to scans: the check would cost an index lookup per row on
-- the hottest insert path, and rows are only written under a live lease.
CREATE TABLE results (
    scan_id        uuid NOT NULL,
    position       bigint NOT NULL,
    ip             inet NOT NULL,
    port           integer NOT NULL CHECK (port BETWEEN 1 AND 65535),
    protocol       text NOT NULL DEFAULT 'tcp' CHECK (protocol IN ('tcp')),
    state          text NOT NULL DEFAULT 'open' CHECK (state IN ('open', 'closed', 'filtered')),
    hostname       text,
    first_seen_at  timestamptz NOT NULL,
    last_seen_at   timestamptz NOT NULL,
    -- Which committed batch of which shard first wrote the row. A shard's
    -- batches commit one after another under its row lock, so a watcher
    -- that remembers the last batch it saw per shard never misses a row -
    -- unlike a global sequence, whose values commit out of order.
    shard_id       bigint NOT NULL DEFAULT 0,
    shard_batch    integer NOT NULL DEFAULT 0,
    PRIMARY KEY (scan_id, position)
);
CREATE INDEX results_shard_batch_idx ON results (shard_id, shard_batch);
