-- Passkeys (WebAuthn): a user's registered credentials, and the state of ceremonies in
-- progress (a challenge is single-use and expires after five minutes; stored here so that any
-- replica can finish what another started).
SET lock_timeout = '5s';
SET statement_timeout = '60s';

CREATE TABLE IF NOT EXISTS account_passkeys (
    id            UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id       UUID NOT NULL REFERENCES users (user_id),
    -- base64url of the credential id
    credential_id TEXT NOT NULL UNIQUE,
    -- webauthn-rs's Passkey (public key, counter, flags): no secret
    passkey       JSONB NOT NULL,
    name          TEXT NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_used_at  TIMESTAMPTZ
);
CREATE INDEX IF NOT EXISTS account_passkeys_user_id ON account_passkeys (user_id);

CREATE TABLE IF NOT EXISTS account_webauthn_challenges (
    id         UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id    UUID REFERENCES users (user_id),
    -- `register` or `authenticate`
    kind       TEXT NOT NULL CHECK (kind IN ('register', 'authenticate')),
    state      JSONB NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at TIMESTAMPTZ NOT NULL
);
