-- Plan tiers: the one place the monthly limits live (docs/operations.md). NULL messages_per_month = unlimited.
SET lock_timeout = '5s';
SET statement_timeout = '60s';
-- INTEGER as the seed writes it, matching the columns it pairs with:
-- squawk-ignore-file prefer-bigint-over-int

CREATE TABLE IF NOT EXISTS plan_tiers (
    tier                       TEXT PRIMARY KEY,
    messages_per_month         INTEGER CHECK (messages_per_month >= 0),
    premium_perspectives_limit INTEGER NOT NULL CHECK (premium_perspectives_limit >= 0),
    normal_perspectives_limit  INTEGER NOT NULL CHECK (normal_perspectives_limit >= 0),
    eco_perspectives_limit     INTEGER NOT NULL CHECK (eco_perspectives_limit >= 0),
    created_at                 TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at                 TIMESTAMPTZ NOT NULL DEFAULT now()
);

INSERT INTO plan_tiers (tier, messages_per_month, premium_perspectives_limit, normal_perspectives_limit, eco_perspectives_limit)
VALUES
    ('free',        200,   10,   40,   150),
    ('plus',       NULL,  400, 1600,  4000),
    ('pro',        NULL,  600, 2500,  8000),
    ('enterprise', NULL, 1200, 5000, 20000)
ON CONFLICT (tier) DO NOTHING;
