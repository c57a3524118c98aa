-- The in-process token cache of every `polydev serve` (docs/operations.md, "Token cache"):
-- any change that can make a cached token lookup wrong notifies the channel `polydev_auth`
-- with the user's id, inside the changing transaction (delivered at its commit, never for a
-- rolled-back change), whoever writes it: this server, another replica, the admin CLI, the
-- legacy application or `psql`. The triggers fire only when a column the lookup reads changes
-- (`last_used_at` and the other bookkeeping columns do not notify).
SET lock_timeout = '5s';
SET statement_timeout = '60s';

CREATE OR REPLACE FUNCTION polydev_auth_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') AND OLD.user_id IS NOT NULL THEN
        PERFORM pg_notify('polydev_auth', OLD.user_id::text);
    END IF;
    IF TG_OP = 'UPDATE' AND NEW.user_id IS NOT NULL
       AND NEW.user_id IS DISTINCT FROM OLD.user_id THEN
        PERFORM pg_notify('polydev_auth', NEW.user_id::text);
    END IF;
    RETURN NULL;
END;
$$;

CREATE OR REPLACE FUNCTION polydev_auth_truncated() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('polydev_auth', '*');
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS mcp_user_tokens_auth_changed ON mcp_user_tokens;
CREATE TRIGGER mcp_user_tokens_auth_changed
    AFTER UPDATE OF active, expires_at, scope, rate_limit_tier, audience, user_id, token_hash
    ON mcp_user_tokens FOR EACH ROW
    WHEN (OLD.active IS DISTINCT FROM NEW.active
          OR OLD.expires_at IS DISTINCT FROM NEW.expires_at
          OR OLD.scope IS DISTINCT FROM NEW.scope
          OR OLD.rate_limit_tier IS DISTINCT FROM NEW.rate_limit_tier
          OR OLD.audience IS DISTINCT FROM NEW.audience
          OR OLD.user_id IS DISTINCT FROM NEW.user_id
          OR OLD.token_hash IS DISTINCT FROM NEW.token_hash)
    EXECUTE FUNCTION polydev_auth_changed();

DROP TRIGGER IF EXISTS mcp_user_tokens_auth_deleted ON mcp_user_tokens;
CREATE TRIGGER mcp_user_tokens_auth_deleted
    AFTER DELETE ON mcp_user_tokens FOR EACH ROW EXECUTE FUNCTION polydev_auth_changed();

DROP TRIGGER IF EXISTS mcp_user_tokens_auth_truncated ON mcp_user_tokens;
CREATE TRIGGER mcp_user_tokens_auth_truncated
    AFTER TRUNCATE ON mcp_user_tokens FOR EACH STATEMENT EXECUTE FUNCTION polydev_auth_truncated();

DROP TRIGGER IF EXISTS users_auth_changed ON users;
CREATE TRIGGER users_auth_changed
    AFTER UPDATE OF status, tier, user_id ON users FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status
          OR OLD.tier IS DISTINCT FROM NEW.tier
          OR OLD.user_id IS DISTINCT FROM NEW.user_id)
    EXECUTE FUNCTION polydev_auth_changed();

DROP TRIGGER IF EXISTS users_auth_deleted ON users;
CREATE TRIGGER users_auth_deleted
    AFTER DELETE ON users FOR EACH ROW EXECUTE FUNCTION polydev_auth_changed();

DROP TRIGGER IF EXISTS users_auth_truncated ON users;
CREATE TRIGGER users_auth_truncated
    AFTER TRUNCATE ON users FOR EACH STATEMENT EXECUTE FUNCTION polydev_auth_truncated();
