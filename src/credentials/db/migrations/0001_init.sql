-- Gatehouse credential store, version 1: what credentials.yaml holds, as tables.
-- Secrets are stored as the file stores them: SHA-256 of tokens, HMAC secrets sealed
-- with the master key (which never enters the database).

-- One row: the store's revision, bumped by every change to roles, users or keys. The
-- row lock that bump takes is held until the change commits, so changes commit in
-- revision order and a gateway that has applied revision N has seen every change <= N.
CREATE TABLE gatehouse_revision (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    revision bigint NOT NULL
);
INSERT INTO gatehouse_revision (revision) VALUES (0);

CREATE TABLE gatehouse_roles (
    name text PRIMARY KEY,
    description text NOT NULL DEFAULT '',
    rules text[] NOT NULL DEFAULT '{}'
);

CREATE TABLE gatehouse_users (
    id text PRIMARY KEY,
    -- the order users were added in (what a listing and an export follow)
    seq bigserial NOT NULL UNIQUE,
    display_name text NOT NULL DEFAULT '',
    description text NOT NULL DEFAULT '',
    organization text NOT NULL DEFAULT '',
    teams text[] NOT NULL DEFAULT '{}',
    default_team text,
    roles text[] NOT NULL DEFAULT '{}',
    status text NOT NULL CHECK (status IN ('active', 'inactive', 'retired')),
    auth_method text NOT NULL CHECK (auth_method IN ('api_key', 'hmac')),
    allowed_endpoints text[] NOT NULL DEFAULT '{}',
    allow_proxied_users boolean NOT NULL DEFAULT false,
    allowed_proxied_users text[] NOT NULL DEFAULT '{}',
    rate_per_second bigint,
    rate_burst bigint,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    CHECK ((rate_per_second IS NULL) = (rate_burst IS NULL))
);

CREATE TABLE gatehouse_keys (
    id text PRIMARY KEY,
    user_id text NOT NULL REFERENCES gatehouse_users (id) ON UPDATE CASCADE ON DELETE CASCADE,
    seq bigserial NOT NULL UNIQUE,
    label text NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL,
    expires_at timestamptz,
    revoked_at timestamptz,
    token_sha256 text UNIQUE,
    hint text,
    secret_sealed text,
    rate_per_second bigint,
    rate_burst bigint,
    CHECK ((token_sha256 IS NULL) <> (secret_sealed IS NULL)),
    CHECK ((rate_per_second IS NULL) = (rate_burst IS NULL))
);
CREATE INDEX gatehouse_keys_user ON gatehouse_keys (user_id);

-- What each revision changed: users (their row or one of their keys) and roles, by name.
-- One transaction is one revision. Gateways read this from the revision they have
-- applied; old rows are pruned.
CREATE TABLE gatehouse_changes (
    revision bigint NOT NULL,
    kind text NOT NULL CHECK (kind IN ('user', 'role')),
    name text NOT NULL,
    at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (revision, kind, name)
);
CREATE INDEX gatehouse_changes_at ON gatehouse_changes (at);

-- Admin changes, each written in the transaction of the change it records.
CREATE TABLE gatehouse_admin_audit (
    id bigserial PRIMARY KEY,
    at timestamptz NOT NULL DEFAULT now(),
    record jsonb NOT NULL
);

-- Every change, made by Gatehouse or by hand in psql, is numbered and announced. A
-- transaction takes one revision, at its first change (kept in a transaction-local
-- setting): an import of 100,000 rows updates the revision row once, not 100,000 times.
CREATE FUNCTION gatehouse_note_change(change_kind text, change_name text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    r bigint := nullif(current_setting('gatehouse.revision', true), '')::bigint;
BEGIN
    IF r IS NULL THEN
        UPDATE gatehouse_revision SET revision = revision + 1 RETURNING revision INTO r;
        PERFORM set_config('gatehouse.revision', r::text, true);
        -- One payload for every change: PostgreSQL folds identical notifications of
        -- one transaction into one, so each transaction wakes each gateway once.
        PERFORM pg_notify('gatehouse_credentials', '');
    END IF;
    INSERT INTO gatehouse_changes (revision, kind, name) VALUES (r, change_kind, change_name)
        ON CONFLICT DO NOTHING;
END $$;

CREATE FUNCTION gatehouse_role_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP <> 'INSERT' THEN PERFORM gatehouse_note_change('role', OLD.name); END IF;
    IF TG_OP <> 'DELETE' AND (TG_OP = 'INSERT' OR NEW.name <> OLD.name) THEN
        PERFORM gatehouse_note_change('role', NEW.name);
    END IF;
    RETURN NULL;
END $$;

CREATE FUNCTION gatehouse_user_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP <> 'INSERT' THEN PERFORM gatehouse_note_change('user', OLD.id); END IF;
    IF TG_OP <> 'DELETE' AND (TG_OP = 'INSERT' OR NEW.id <> OLD.id) THEN
        PERFORM gatehouse_note_change('user', NEW.id);
    END IF;
    RETURN NULL;
END $$;

CREATE FUNCTION gatehouse_key_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP <> 'INSERT' THEN PERFORM gatehouse_note_change('user', OLD.user_id); END IF;
    IF TG_OP <> 'DELETE' AND (TG_OP = 'INSERT' OR NEW.user_id <> OLD.user_id) THEN
        PERFORM gatehouse_note_change('user', NEW.user_id);
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER gatehouse_roles_changed AFTER INSERT OR UPDATE OR DELETE ON gatehouse_roles
    FOR EACH ROW EXECUTE FUNCTION gatehouse_role_changed();
CREATE TRIGGER gatehouse_users_changed AFTER INSERT OR UPDATE OR DELETE ON gatehouse_users
    FOR EACH ROW EXECUTE FUNCTION gatehouse_user_changed();
CREATE TRIGGER gatehouse_keys_changed AFTER INSERT OR UPDATE OR DELETE ON gatehouse_keys
    FOR EACH ROW EXECUTE FUNCTION gatehouse_key_changed();
