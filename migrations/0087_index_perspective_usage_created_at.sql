-- no-transaction
-- The admin console's usage analytics and provider health read every user's calls of a period
-- (docs/admin.md); without this they would scan the whole table.
-- squawk-ignore-file require-lock-timeout, require-statement-timeout
CREATE INDEX CONCURRENTLY IF NOT EXISTS perspective_usage_created_at_idx
    ON perspective_usage (created_at);
