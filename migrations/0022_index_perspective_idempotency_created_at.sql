-- no-transaction
-- The sweeper deletes idempotency rows older than 24 hours.
-- sqlx sends a file as one query, so CREATE INDEX CONCURRENTLY must stand alone: lock_timeout
-- and statement_timeout come from the migration connection (db::migrate), not from SET here.
-- squawk-ignore-file require-lock-timeout, require-statement-timeout
CREATE INDEX CONCURRENTLY IF NOT EXISTS perspective_idempotency_created_at_idx ON perspective_idempotency (created_at);
