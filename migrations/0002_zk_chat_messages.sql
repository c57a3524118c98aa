-- V2 phase 1 (seed): client-side encrypted content for chat_messages. Additive; constant defaults are metadata-only on PG 11+.
SET lock_timeout = '5s';
SET statement_timeout = '60s';

ALTER TABLE chat_messages ADD COLUMN IF NOT EXISTS encrypted_content_v2 TEXT;
ALTER TABLE chat_messages ADD COLUMN IF NOT EXISTS encryption_metadata_v2 JSONB;
ALTER TABLE chat_messages ADD COLUMN IF NOT EXISTS migrated_to_zk BOOLEAN DEFAULT FALSE;
