-- Zero-knowledge hardening (docs/crypto.md): the migration manifest, the list of plaintext
-- rows (ids and hashes) a client saw when zero-knowledge was turned on, sealed under the
-- account key in chunks. Written once per chunk; the migration seals only rows it lists.
SET lock_timeout = '5s';
SET statement_timeout = '60s';

CREATE TABLE IF NOT EXISTS zk_manifest_chunks (
    user_id    UUID NOT NULL REFERENCES users (user_id),
    chunk      BIGINT NOT NULL,
    envelope   TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, chunk)
);
