-- Gatehouse credential store, version 2: named admin tokens (docs/admin.md#admin-tokens).
-- Stored like API tokens: SHA-256 and a hint, never the token. They are read on every
-- admin call, not followed into the gateways' snapshots, so they take no revision.
CREATE TABLE gatehouse_admin_tokens (
    id text PRIMARY KEY,
    -- the order tokens were created in (what a listing follows)
    seq bigserial NOT NULL UNIQUE,
    name text NOT NULL,
    role text NOT NULL CHECK (role IN ('viewer', 'operator', 'admin')),
    token_sha256 text NOT NULL UNIQUE,
    hint text NOT NULL,
    created_at timestamptz NOT NULL,
    created_by text NOT NULL DEFAULT '',
    expires_at timestamptz,
    revoked_at timestamptz
);
-- A name names one live token: a revoked token's name can be given again.
CREATE UNIQUE INDEX gatehouse_admin_tokens_live_name ON gatehouse_admin_tokens (name) WHERE revoked_at IS NULL;
