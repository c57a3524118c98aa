-- no-transaction
-- Token lookup on every authenticated request is by hash.
-- sqlx sends a file as one query, so CREATE INDEX CONCURRENTLY must stand alone: lock_timeout
-- and statement_timeout come from the migration connection (db::migrate), not from SET here.
-- squawk-ignore-file require-lock-timeout, require-statement-timeout
CREATE INDEX CONCURRENTLY IF NOT EXISTS mcp_user_tokens_token_hash_idx ON mcp_user_tokens (token_hash);
