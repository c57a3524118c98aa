-- Rate limits per token tier, shared by every polydev process through the database.
SET lock_timeout = '5s';
SET statement_timeout = '60s';

-- INTEGER: requests per minute and per-window counts are small.
-- squawk-ignore-file prefer-bigint-over-int
CREATE TABLE IF NOT EXISTS rate_limit_tiers (
    tier                TEXT PRIMARY KEY,
    requests_per_minute INTEGER NOT NULL CHECK (requests_per_minute > 0)
);

INSERT INTO rate_limit_tiers (tier, requests_per_minute)
VALUES ('free', 30), ('plus', 120), ('pro', 300), ('enterprise', 1200)
ON CONFLICT (tier) DO NOTHING;

-- One row per token: the current one-minute window and its count.
CREATE TABLE IF NOT EXISTS rate_limit_windows (
    token_id     UUID PRIMARY KEY,
    window_start TIMESTAMPTZ NOT NULL,
    count        INTEGER NOT NULL
);
