-- no-transaction
-- Listing a user's tokens.
-- sqlx sends a file as one query, so CREATE INDEX CONCURRENTLY must stand alone: lock_timeout
-- and statement_timeout come from the migration connection (db::migrate), not from SET here.
-- squawk-ignore-file require-lock-timeout, require-statement-timeout
CREATE INDEX CONCURRENTLY IF NOT EXISTS mcp_user_tokens_user_id_idx ON mcp_user_tokens (user_id);
