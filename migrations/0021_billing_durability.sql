-- Billing durability: a trace of every reserved quota unit, owned idempotency claims with
-- per-model outcomes, and server secrets (the idempotency HMAC key).
SET lock_timeout = '5s';
SET statement_timeout = '60s';

-- One row per quota unit taken and not yet resolved. It is written in the same statement as the
-- counter increment, deleted in the same statement as the usage row that settles it (or as the
-- counter decrement that refunds it). A row older than the longest possible call was left by a
-- process or database that died mid-call: the sweeper refunds it (quota::reconcile).
CREATE TABLE IF NOT EXISTS quota_reservations (
    id          UUID PRIMARY KEY,
    quota_id    UUID NOT NULL,
    user_id     UUID NOT NULL,
    -- The get_perspectives call (its usage rows' session_id).
    request_id  UUID NOT NULL,
    counter     TEXT NOT NULL CHECK (counter IN ('messages', 'premium', 'normal', 'eco')),
    -- The quota row's month when the unit was taken: a refund in a later month gives nothing back.
    month       DATE NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- The owner of a running claim (a random token per call): only it completes or releases the key.
ALTER TABLE perspective_idempotency ADD COLUMN IF NOT EXISTS claim_token UUID;
-- The call's request id, kept across a takeover so a resumed call keeps it.
ALTER TABLE perspective_idempotency ADD COLUMN IF NOT EXISTS request_id UUID;
-- The answers already paid for (ModelResult JSON, without text for zero-knowledge users), written
-- with their usage rows: a retry after a failure reuses them instead of paying again.
ALTER TABLE perspective_idempotency ADD COLUMN IF NOT EXISTS outcomes JSONB;

-- Secrets the server generates once and every replica shares (`idempotency_hmac`).
CREATE TABLE IF NOT EXISTS server_secrets (
    name       TEXT PRIMARY KEY,
    value      BYTEA NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
