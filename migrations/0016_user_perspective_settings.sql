-- Per-user defaults for get_perspectives (preferred models, how many perspectives).
SET lock_timeout = '5s';
SET statement_timeout = '60s';

-- INTEGER: a count from 1 to 10.
-- squawk-ignore-file prefer-bigint-over-int
CREATE TABLE IF NOT EXISTS user_perspective_settings (
    user_id          UUID PRIMARY KEY REFERENCES users (user_id) ON DELETE CASCADE,
    preferred_models TEXT[] NOT NULL DEFAULT '{}',
    max_perspectives INTEGER CHECK (max_perspectives BETWEEN 1 AND 10),
    updated_at       TIMESTAMPTZ NOT NULL DEFAULT now()
);
