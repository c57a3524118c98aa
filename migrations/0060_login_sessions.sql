-- Login sessions (issue 12, docs/login.md): a user connects a provider subscription by logging
-- in inside a sandboxed browser streamed over WebRTC. The seed's auth_sessions, vms and
-- vm_cleanup_tasks tables (0001, 0005) gain what the state machine, the signalling relay and
-- the cleanup worker need. Additive only; every column is nullable or has a constant default.
SET lock_timeout = '5s';
SET statement_timeout = '60s';

-- The login agent's bootstrap secret, SHA-256 hex (a fresh one per sandbox: a retry
-- invalidates the previous agent's).
ALTER TABLE auth_sessions ADD COLUMN IF NOT EXISTS agent_secret_hash TEXT;
-- Signalling messages are numbered per session (both sides share one counter, bumped under the
-- row lock): followers replay and de-duplicate by it.
ALTER TABLE auth_sessions ADD COLUMN IF NOT EXISTS signal_seq BIGINT NOT NULL DEFAULT 0;
-- Who sent the offer / answer in webrtc_offer / webrtc_answer (`user` or `agent`), and their
-- numbers. ice_candidates holds `{"seq", "from", "candidate"}` objects, appended atomically.
ALTER TABLE auth_sessions ADD COLUMN IF NOT EXISTS offer_from TEXT;
ALTER TABLE auth_sessions ADD COLUMN IF NOT EXISTS offer_seq BIGINT;
ALTER TABLE auth_sessions ADD COLUMN IF NOT EXISTS answer_from TEXT;
ALTER TABLE auth_sessions ADD COLUMN IF NOT EXISTS answer_seq BIGINT;

-- A login sandbox's orchestrator id and the orchestrator instance that runs it
-- (`runtime_containers.orchestrator`'s format): a local sandbox can only be stopped by the
-- process that started it.
ALTER TABLE vms ADD COLUMN IF NOT EXISTS container_id TEXT;
ALTER TABLE vms ADD COLUMN IF NOT EXISTS orchestrator TEXT;
ALTER TABLE vms ADD COLUMN IF NOT EXISTS session_id UUID;

-- Teardown attempts so far (the backoff grows with them).
ALTER TABLE vm_cleanup_tasks ADD COLUMN IF NOT EXISTS attempts BIGINT NOT NULL DEFAULT 0;

-- What kind of credential file a login captured (e.g. `claude-code`, `codex`); the credential
-- itself is the sealed box in encrypted_data_v2.
ALTER TABLE cli_credentials ADD COLUMN IF NOT EXISTS kind TEXT;
