-- no-transaction
-- Revoking a grant or a refresh-token family deactivates its access tokens: find them by index.
-- sqlx sends a file as one query, so CREATE INDEX CONCURRENTLY must stand alone: lock_timeout
-- and statement_timeout come from the migration connection (db::migrate), not from SET here.
-- squawk-ignore-file require-lock-timeout, require-statement-timeout
CREATE INDEX CONCURRENTLY IF NOT EXISTS mcp_user_tokens_oauth_grant_id
    ON mcp_user_tokens (oauth_grant_id) WHERE oauth_grant_id IS NOT NULL;
