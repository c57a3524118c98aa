-- no-transaction
-- A user's list of login sessions (newest first).
-- sqlx sends a file as one query, so CREATE INDEX CONCURRENTLY must stand alone: lock_timeout
-- and statement_timeout come from the migration connection (db::migrate), not from SET here.
-- squawk-ignore-file require-lock-timeout, require-statement-timeout
CREATE INDEX CONCURRENTLY IF NOT EXISTS auth_sessions_user_created_idx
    ON auth_sessions (user_id, created_at DESC);
