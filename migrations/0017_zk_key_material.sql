-- Zero-knowledge key material (docs/crypto.md): the account key wrapped by the master password
-- (an envelope that carries its Argon2id parameters and salt) and by the recovery key. The
-- server cannot open either. Additive; NULL until the user turns zero-knowledge on.
SET lock_timeout = '5s';
SET statement_timeout = '60s';

ALTER TABLE users ADD COLUMN IF NOT EXISTS zk_password_wrapped_key TEXT;
ALTER TABLE users ADD COLUMN IF NOT EXISTS zk_recovery_wrapped_key TEXT;
