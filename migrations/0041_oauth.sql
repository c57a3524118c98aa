-- The OAuth 2.1 authorization server for `/mcp` (docs/api.md#oauth). Registered clients reuse
-- the legacy `mcp_registered_clients` table; its plaintext `client_secret` and
-- `registration_access_token` columns stay NULL for every client polydev registers (only
-- SHA-256 hashes are stored, in the new columns). A grant is a user's remembered consent to a
-- client (the "connected apps"); codes and refresh tokens hang off it. Access tokens are `pd_`
-- rows in `mcp_user_tokens` (see 0042).
SET lock_timeout = '5s';
SET statement_timeout = '60s';

ALTER TABLE mcp_registered_clients ADD COLUMN IF NOT EXISTS client_secret_hash TEXT;
ALTER TABLE mcp_registered_clients ADD COLUMN IF NOT EXISTS registration_token_hash TEXT;
ALTER TABLE mcp_registered_clients ADD COLUMN IF NOT EXISTS token_endpoint_auth_method TEXT;
ALTER TABLE mcp_registered_clients ADD COLUMN IF NOT EXISTS metadata JSONB;
-- `dynamic` (RFC 7591) or `metadata_document` (an https URL as client_id, cached here).
ALTER TABLE mcp_registered_clients ADD COLUMN IF NOT EXISTS registration_kind TEXT;
ALTER TABLE mcp_registered_clients ADD COLUMN IF NOT EXISTS fetched_at TIMESTAMPTZ;

CREATE TABLE IF NOT EXISTS oauth_grants (
    id         UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id    UUID NOT NULL REFERENCES users (user_id),
    client_id  TEXT NOT NULL,
    scope      TEXT NOT NULL,
    resource   TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    revoked_at TIMESTAMPTZ
);
CREATE INDEX IF NOT EXISTS oauth_grants_user_id ON oauth_grants (user_id);

CREATE TABLE IF NOT EXISTS oauth_codes (
    code_hash      TEXT PRIMARY KEY,
    grant_id       UUID NOT NULL REFERENCES oauth_grants (id),
    family_id      UUID NOT NULL,
    client_id      TEXT NOT NULL,
    user_id        UUID NOT NULL REFERENCES users (user_id),
    redirect_uri   TEXT NOT NULL,
    code_challenge TEXT NOT NULL,
    scope          TEXT NOT NULL,
    resource       TEXT NOT NULL,
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at     TIMESTAMPTZ NOT NULL,
    used_at        TIMESTAMPTZ
);

-- A family: every refresh token descended from one authorization code (or device grant).
CREATE TABLE IF NOT EXISTS oauth_refresh_tokens (
    id         UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    token_hash TEXT NOT NULL UNIQUE,
    family_id  UUID NOT NULL,
    grant_id   UUID NOT NULL REFERENCES oauth_grants (id),
    client_id  TEXT NOT NULL,
    user_id    UUID NOT NULL REFERENCES users (user_id),
    scope      TEXT NOT NULL,
    resource   TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at TIMESTAMPTZ NOT NULL,
    used_at    TIMESTAMPTZ,
    revoked_at TIMESTAMPTZ
);
CREATE INDEX IF NOT EXISTS oauth_refresh_tokens_family_id ON oauth_refresh_tokens (family_id);
CREATE INDEX IF NOT EXISTS oauth_refresh_tokens_grant_id ON oauth_refresh_tokens (grant_id);
