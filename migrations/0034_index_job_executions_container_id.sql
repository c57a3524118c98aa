-- no-transaction
-- The agent's queue (the next queued job of its container) and failing a dead container's jobs
-- look jobs up by container.
-- squawk-ignore-file require-lock-timeout, require-statement-timeout
CREATE INDEX CONCURRENTLY IF NOT EXISTS job_executions_container_id_idx
    ON job_executions (container_id, created_at);
