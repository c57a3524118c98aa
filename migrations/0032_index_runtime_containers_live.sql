-- no-transaction
-- Claims (`provider`, `status = 'ready'`, oldest first) and the reconcile loop's scan of live
-- containers read only rows that are not destroyed; destroyed rows pile up and stay out.
-- sqlx sends a file as one query, so CREATE INDEX CONCURRENTLY must stand alone: lock_timeout
-- and statement_timeout come from the migration connection (db::migrate), not from SET here.
-- squawk-ignore-file require-lock-timeout, require-statement-timeout
CREATE INDEX CONCURRENTLY IF NOT EXISTS runtime_containers_live_idx
    ON runtime_containers (provider, status, created_at) WHERE status <> 'destroyed';
