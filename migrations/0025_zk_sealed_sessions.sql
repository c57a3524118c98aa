-- Zero-knowledge hardening (docs/crypto.md): session texts are sealed once a user has
-- zero-knowledge on. One envelope per session holds its title (chat_sessions.title) or its
-- name, description and system prompt (sessions), bound to the session id. Additive.
SET lock_timeout = '5s';
SET statement_timeout = '60s';

ALTER TABLE chat_sessions ADD COLUMN IF NOT EXISTS encrypted_meta_v2 TEXT;
ALTER TABLE sessions ADD COLUMN IF NOT EXISTS encrypted_meta_v2 TEXT;
