-- no-transaction
-- The cleanup worker takes due tasks (`status = 'pending'`, oldest `cleanup_at` first); completed
-- rows pile up and stay out. One pending task per sandbox at most.
-- sqlx sends a file as one query, so CREATE INDEX CONCURRENTLY must stand alone: lock_timeout
-- and statement_timeout come from the migration connection (db::migrate), not from SET here.
-- squawk-ignore-file require-lock-timeout, require-statement-timeout
CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS vm_cleanup_tasks_pending_idx
    ON vm_cleanup_tasks (vm_id) WHERE status = 'pending';
