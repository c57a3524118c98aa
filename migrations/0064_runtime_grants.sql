-- CLI credential grants and per-job output keys (issue 11, docs/cli-backends.md, "In runtime
-- containers"). A grant is a sealed box of the user's CLI credential to one container's agent
-- key (namespace `runtime.grant`, row = the container id), made by a client that holds the
-- user's keys: the server stores it and hands it to that container's agent, and cannot open it.
-- It lives in the container's row, so it dies with the container (destroyed, never reused).
SET lock_timeout = '5s';
SET statement_timeout = '60s';

ALTER TABLE runtime_containers ADD COLUMN IF NOT EXISTS credential_grant TEXT;
-- The CLI the grant is for (`claude`, `codex`, `gemini`), in the clear: which models it serves.
ALTER TABLE runtime_containers ADD COLUMN IF NOT EXISTS grant_cli TEXT;
ALTER TABLE runtime_containers ADD COLUMN IF NOT EXISTS granted_at TIMESTAMPTZ;

-- The X25519 public key a job's output is sealed to when it is not the user's runtime key (the
-- ephemeral key of one server-side perspectives call); NULL: the user's key.
ALTER TABLE job_executions ADD COLUMN IF NOT EXISTS output_public_key TEXT;
