-- no-transaction
-- The login sweeper scans sessions still in progress (timeouts, lost heartbeats); finished
-- sessions pile up and stay out. Also serves a user's count of live sessions.
-- sqlx sends a file as one query, so CREATE INDEX CONCURRENTLY must stand alone: lock_timeout
-- and statement_timeout come from the migration connection (db::migrate), not from SET here.
-- squawk-ignore-file require-lock-timeout, require-statement-timeout
CREATE INDEX CONCURRENTLY IF NOT EXISTS auth_sessions_live_idx
    ON auth_sessions (user_id) WHERE status IN ('pending', 'authenticating');
