-- Zero-knowledge hardening (docs/crypto.md): the salted hashes of the clients' proofs of the
-- master password and of the recovery key (the server never sees either secret; a proof is a
-- separate HKDF output of it), the per-user salt of those hashes, a version of the key material
-- that grows with every change (clients pin it), and the new wrapped account key of a key
-- rotation in progress. Additive; NULL until used.
SET lock_timeout = '5s';
SET statement_timeout = '60s';

ALTER TABLE users ADD COLUMN IF NOT EXISTS zk_proof_salt TEXT;
ALTER TABLE users ADD COLUMN IF NOT EXISTS zk_password_proof_hash TEXT;
ALTER TABLE users ADD COLUMN IF NOT EXISTS zk_recovery_proof_hash TEXT;
ALTER TABLE users ADD COLUMN IF NOT EXISTS zk_material_version BIGINT;
ALTER TABLE users ADD COLUMN IF NOT EXISTS zk_rotation_wrapped_key TEXT;
