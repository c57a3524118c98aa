-- no-transaction
-- Accounts are found by e-mail, case-insensitively (polydev user/token commands).
-- sqlx sends a file as one query, so CREATE INDEX CONCURRENTLY must stand alone: lock_timeout
-- and statement_timeout come from the migration connection (db::migrate), not from SET here.
-- squawk-ignore-file require-lock-timeout, require-statement-timeout
CREATE INDEX CONCURRENTLY IF NOT EXISTS users_email_lower_idx ON users (lower(email));
