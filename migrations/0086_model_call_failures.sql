-- Model calls that ended without an answer (error or timeout; not skipped for quota, not a
-- provider without an API key): the other half of the admin console's error rate, beside the
-- answered calls in perspective_usage. Never the prompt, never the provider's message.
SET lock_timeout = '5s';
SET statement_timeout = '60s';

CREATE TABLE IF NOT EXISTS model_call_failures (
    id          UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id     UUID REFERENCES users (user_id),
    model_name  TEXT NOT NULL,
    model_tier  TEXT NOT NULL,
    provider    TEXT NOT NULL,
    status      TEXT NOT NULL CHECK (status IN ('error', 'timeout')),
    error_class TEXT NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS model_call_failures_created_at ON model_call_failures (created_at);
