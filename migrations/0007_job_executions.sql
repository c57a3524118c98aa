-- V2 phase 3 (seed): CLI/tool job executions; command and output are client-side encrypted.
SET lock_timeout = '5s';
SET statement_timeout = '60s';
-- INTEGER as the seed writes it, matching the columns it pairs with:
-- squawk-ignore-file prefer-bigint-over-int

CREATE TABLE IF NOT EXISTS job_executions (
    id                  UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id             UUID NOT NULL REFERENCES users (user_id) ON DELETE CASCADE,
    container_id        UUID REFERENCES runtime_containers (id),
    job_type            TEXT NOT NULL CHECK (job_type IN ('cli', 'tool', 'function')),
    encrypted_command   TEXT NOT NULL,
    encrypted_stdout    TEXT,
    encrypted_stderr    TEXT,
    encryption_metadata JSONB,
    exit_code           INTEGER,
    duration_ms         INTEGER,
    created_at          TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    completed_at        TIMESTAMPTZ
);
