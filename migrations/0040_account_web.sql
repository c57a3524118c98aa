-- Accounts on the web (docs/api.md#accounts): a password per user, browser sessions, and the
-- single-use links sent by e-mail (verification, password reset). The legacy `users` and
-- `profiles` rows stay the account's truth; these tables only add to them. Every secret is
-- stored as a hash: Argon2id (PHC string with its parameters) for passwords, SHA-256 of 256
-- random bits for session ids and e-mail links.
SET lock_timeout = '5s';
SET statement_timeout = '60s';

CREATE TABLE IF NOT EXISTS account_passwords (
    user_id           UUID PRIMARY KEY REFERENCES users (user_id),
    password_hash     TEXT NOT NULL,
    email_verified_at TIMESTAMPTZ,
    created_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at        TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS account_web_sessions (
    id           UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id      UUID NOT NULL REFERENCES users (user_id),
    session_hash TEXT NOT NULL UNIQUE,
    user_agent   TEXT,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_seen_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at   TIMESTAMPTZ NOT NULL,
    revoked_at   TIMESTAMPTZ
);
CREATE INDEX IF NOT EXISTS account_web_sessions_user_id ON account_web_sessions (user_id);

-- purpose: `verify` (confirms the e-mail address) or `reset` (sets a new password).
CREATE TABLE IF NOT EXISTS account_email_links (
    link_hash  TEXT PRIMARY KEY,
    user_id    UUID NOT NULL REFERENCES users (user_id),
    purpose    TEXT NOT NULL CHECK (purpose IN ('verify', 'reset')),
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at TIMESTAMPTZ NOT NULL,
    used_at    TIMESTAMPTZ
);
CREATE INDEX IF NOT EXISTS account_email_links_user_id ON account_email_links (user_id);
