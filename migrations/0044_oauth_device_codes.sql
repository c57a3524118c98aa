-- The device authorization grant (RFC 8628) for `polydev login`: a device code (stored as its
-- SHA-256) the CLI polls with, and a short user code the person types in the browser.
SET lock_timeout = '5s';
SET statement_timeout = '60s';

-- INTEGER: a polling interval in seconds.
-- squawk-ignore-file prefer-bigint-over-int
CREATE TABLE IF NOT EXISTS oauth_device_codes (
    device_code_hash TEXT PRIMARY KEY,
    user_code        TEXT NOT NULL UNIQUE,
    client_id        TEXT NOT NULL,
    scope            TEXT NOT NULL,
    resource         TEXT NOT NULL,
    -- pending → approved | denied → used
    status           TEXT NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'approved', 'denied', 'used')),
    user_id          UUID REFERENCES users (user_id),
    interval_secs    INTEGER NOT NULL,
    last_polled_at   TIMESTAMPTZ,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at       TIMESTAMPTZ NOT NULL
);
