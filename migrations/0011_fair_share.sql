-- Fair share between scans (docs/protocol.md, "Scheduling"), stride
-- scheduling: each lease moves its scan's `pass` on by 1/priority and the
-- claim serves the lowest pass first, never below the lowest pass of the
-- scans being served; a new scan starts there. max_agents and max_parallel_shards keep a scan
-- gentle (0: no limit); last_leased_at breaks ties in favour of the scan
-- served least recently (a new one first).
ALTER TABLE scans
    ADD COLUMN priority            smallint NOT NULL DEFAULT 5 CHECK (priority BETWEEN 1 AND 10),
    ADD COLUMN max_agents          integer NOT NULL DEFAULT 0 CHECK (max_agents >= 0),
    ADD COLUMN max_parallel_shards integer NOT NULL DEFAULT 0 CHECK (max_parallel_shards >= 0),
    ADD COLUMN last_leased_at      timestamptz,
    ADD COLUMN pass                double precision NOT NULL DEFAULT 0;

-- The claim counts each scan's live leases and their agents (index only).
CREATE INDEX shards_leased_scan_idx ON shards (scan_id, agent_id) WHERE state = 'leased';
