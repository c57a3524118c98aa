-- V2 phase 1 (seed): client-side encrypted content for messages.
SET lock_timeout = '5s';
SET statement_timeout = '60s';

ALTER TABLE messages ADD COLUMN IF NOT EXISTS encrypted_content_v2 TEXT;
ALTER TABLE messages ADD COLUMN IF NOT EXISTS encryption_metadata_v2 JSONB;
ALTER TABLE messages ADD COLUMN IF NOT EXISTS migrated_to_zk BOOLEAN DEFAULT FALSE;
