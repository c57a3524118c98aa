-- get_perspectives idempotency: the same key from the same user within 24 h returns the first result and charges nothing again.
SET lock_timeout = '5s';
SET statement_timeout = '60s';

CREATE TABLE IF NOT EXISTS perspective_idempotency (
    user_id         UUID NOT NULL REFERENCES users (user_id) ON DELETE CASCADE,
    idempotency_key TEXT NOT NULL,
    request_hash    TEXT NOT NULL,
    -- While NULL the first call is still running; it must finish before this time or be taken over.
    response        JSONB,
    running_until   TIMESTAMPTZ NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, idempotency_key)
);
