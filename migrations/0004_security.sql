-- API tokens (docs/security.md). Only a SHA-256 of each token's secret is
-- stored; the token itself is shown once, when it is created. Scopes are
-- ordered: admin includes scan, scan includes read.
CREATE TABLE api_tokens (
    id           uuid PRIMARY KEY,
    name         text NOT NULL,
    scope        text NOT NULL CHECK (scope IN ('read', 'scan', 'admin')),
    secret_hash  bytea NOT NULL CHECK (length(secret_hash) = 32),
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz,
    revoked_at   timestamptz,
    last_used_at timestamptz
);

-- The controller's scope policy: an address may be scanned when an allow
-- rule covers it and no deny rule does (plus the built-in deny-list, see
-- docs/security.md). No allow rule: nothing may be scanned.
CREATE TABLE scope_rules (
    action     text NOT NULL CHECK (action IN ('allow', 'deny')),
    cidr       cidr NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (action, cidr)
);

-- One-time agent enrollment tokens: only hashes; a token is used once
-- (used_at, and the agent id it created) and expires.
CREATE TABLE enroll_tokens (
    id          uuid PRIMARY KEY,
    secret_hash bytea NOT NULL CHECK (length(secret_hash) = 32),
    labels      jsonb NOT NULL DEFAULT '{}',
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    used_at     timestamptz,
    agent_id    uuid
);

-- Agents whose certificates are refused for good.
CREATE TABLE revoked_agents (
    agent_id   uuid PRIMARY KEY,
    revoked_at timestamptz NOT NULL DEFAULT now()
);
