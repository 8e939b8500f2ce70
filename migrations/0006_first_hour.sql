-- A fingerprint of the normalised request that created a scan (with a
-- request_id): the same request_id with a different request is refused
-- instead of silently answered with the first scan. NULL for scans stored
-- before it: treated as matching.
ALTER TABLE scans ADD COLUMN request_fingerprint text;

-- Where an agent's current session comes from (the peer address), to name
-- it when a second session claims the same agent id while it lives.
ALTER TABLE agents ADD COLUMN session_peer text;
