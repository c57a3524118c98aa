-- The admin console's audit log (docs/admin.md): one row per admin action, written in the same
-- transaction as the change. Append-only: the triggers below refuse UPDATE, DELETE and TRUNCATE,
-- so a row once committed stays as it was (only a superuser who drops the trigger can change it).
SET lock_timeout = '5s';
SET statement_timeout = '60s';

CREATE TABLE IF NOT EXISTS admin_audit_log (
    id            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at            TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- The admin who acted (web), or NULL for the command line on the server host.
    actor_user_id UUID REFERENCES users (user_id),
    -- `user:<uuid>` or `cli:<os user>`: readable without a join, and kept for the CLI.
    actor         TEXT NOT NULL CHECK (length(actor) BETWEEN 1 AND 200),
    action        TEXT NOT NULL CHECK (length(action) BETWEEN 1 AND 100),
    target_type   TEXT NOT NULL CHECK (length(target_type) BETWEEN 1 AND 100),
    target_id     TEXT NOT NULL CHECK (length(target_id) BETWEEN 1 AND 200),
    before        JSONB,
    after         JSONB
);
CREATE INDEX IF NOT EXISTS admin_audit_log_at ON admin_audit_log (at DESC, id DESC);

CREATE OR REPLACE FUNCTION admin_audit_log_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'admin_audit_log is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;

DROP TRIGGER IF EXISTS admin_audit_log_no_change ON admin_audit_log;
CREATE TRIGGER admin_audit_log_no_change
    BEFORE UPDATE OR DELETE ON admin_audit_log
    FOR EACH ROW EXECUTE FUNCTION admin_audit_log_append_only();
DROP TRIGGER IF EXISTS admin_audit_log_no_truncate ON admin_audit_log;
CREATE TRIGGER admin_audit_log_no_truncate
    BEFORE TRUNCATE ON admin_audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION admin_audit_log_append_only();
