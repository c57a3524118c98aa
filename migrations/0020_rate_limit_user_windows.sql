-- Rate limits per user as well as per token, so that many tokens do not multiply a user's
-- limit: one row per user, the current one-minute window and its count (as rate_limit_windows
-- per token).
SET lock_timeout = '5s';
SET statement_timeout = '60s';

-- INTEGER: per-window counts are small.
-- squawk-ignore-file prefer-bigint-over-int
CREATE TABLE IF NOT EXISTS rate_limit_user_windows (
    user_id      UUID PRIMARY KEY,
    window_start TIMESTAMPTZ NOT NULL,
    count        INTEGER NOT NULL
);
