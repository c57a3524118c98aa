-- Credentials move to client-side keys (docs/crypto.md): the envelope written by the owner's
-- client, and whether the row has moved. The legacy server-encrypted columns stay until the
-- owner's client has verified the envelope. Additive.
SET lock_timeout = '5s';
SET statement_timeout = '60s';

ALTER TABLE provider_credentials ADD COLUMN IF NOT EXISTS encrypted_credentials_v2 TEXT;
ALTER TABLE provider_credentials ADD COLUMN IF NOT EXISTS migrated_to_zk BOOLEAN DEFAULT FALSE;
ALTER TABLE cli_credentials ADD COLUMN IF NOT EXISTS encrypted_data_v2 TEXT;
ALTER TABLE cli_credentials ADD COLUMN IF NOT EXISTS migrated_to_zk BOOLEAN DEFAULT FALSE;
