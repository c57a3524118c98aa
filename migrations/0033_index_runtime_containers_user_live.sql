-- no-transaction
-- One live container per user and provider: a second concurrent claim by the same user fails on
-- this index and returns the first one instead of taking another warm container.
-- squawk-ignore-file require-lock-timeout, require-statement-timeout
CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS runtime_containers_user_live_idx
    ON runtime_containers (user_id, provider) WHERE status IN ('assigned', 'executing');
