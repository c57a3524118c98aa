-- V2 phase 1 (seed): zero-knowledge key material on users.
SET lock_timeout = '5s';
SET statement_timeout = '60s';

ALTER TABLE users ADD COLUMN IF NOT EXISTS encrypted_master_key_hint TEXT;
ALTER TABLE users ADD COLUMN IF NOT EXISTS key_derivation_salt TEXT;
ALTER TABLE users ADD COLUMN IF NOT EXISTS zero_knowledge_enabled BOOLEAN DEFAULT FALSE;
