-- Sealed jobs (issue 10, docs/runtime.md): the state of a job_executions row, and the users'
-- X25519 keys that job output is sealed to. job_executions was created by our own V2
-- migration 0007 and is empty in production. Only envelopes are stored: the command and its
-- output are sealed on the client and in the container.
SET lock_timeout = '5s';
SET statement_timeout = '60s';

-- queued → running → succeeded | failed | cancelled (NULL: a row written before this file).
ALTER TABLE job_executions ADD COLUMN IF NOT EXISTS status TEXT;
ALTER TABLE job_executions ADD COLUMN IF NOT EXISTS failure_reason TEXT;
ALTER TABLE job_executions ADD COLUMN IF NOT EXISTS started_at TIMESTAMPTZ;
ALTER TABLE job_executions ADD COLUMN IF NOT EXISTS output_truncated BOOLEAN;

-- A user's X25519 key pair: the public key in the clear, the private key sealed under the
-- user's account key (an item envelope, namespace `runtime.x25519`). Owned by the runtime
-- domain, so the users table is left alone.
CREATE TABLE IF NOT EXISTS runtime_user_keys (
    user_id             UUID PRIMARY KEY REFERENCES users (user_id) ON DELETE CASCADE,
    public_key          TEXT NOT NULL,
    wrapped_private_key TEXT NOT NULL,
    created_at          TIMESTAMPTZ NOT NULL DEFAULT NOW()
);
