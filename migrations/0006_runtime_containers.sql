-- V2 phase 3 (seed): per-user runtime containers. A new table, so its foreign key takes only a brief lock on users.
SET lock_timeout = '5s';
SET statement_timeout = '60s';
-- INTEGER as the seed writes it, matching the columns it pairs with:
-- squawk-ignore-file prefer-bigint-over-int

CREATE TABLE IF NOT EXISTS runtime_containers (
    id           UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id      UUID NOT NULL REFERENCES users (user_id) ON DELETE CASCADE,
    provider     TEXT NOT NULL CHECK (provider IN ('openai', 'anthropic', 'google')),
    container_id TEXT NOT NULL UNIQUE,
    status       TEXT CHECK (status IN ('warming', 'ready', 'assigned', 'executing', 'destroyed')),
    assigned_at  TIMESTAMPTZ,
    last_used_at TIMESTAMPTZ,
    decodo_port  INTEGER,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    destroyed_at TIMESTAMPTZ
);
