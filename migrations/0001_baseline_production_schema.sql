-- Baseline: the production schema as it exists today (../shared/seed/EXISTING_SCHEMA_ANALYSIS.md,
-- sections "Core Product", "OAuth VM System", "Credentials Storage" and "MCP OAuth System").
--
-- On an empty database this creates the legacy tables. On a production database that already has
-- them, `polydev migrate` does NOT run this file: it compares the live columns with the ones this
-- file creates (see crates/polydev/src/db/adopt.rs) and, when they match, records it as applied.
-- So: unqualified names only (the check runs it inside a scratch schema), and never edit it.
SET lock_timeout = '5s';
SET statement_timeout = '60s';

-- squawk-ignore-file prefer-bigint-over-int
-- (the legacy column types are production truth; this file only ever runs on an empty database)

CREATE TABLE users (
    user_id           UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    email             TEXT,
    tier              TEXT,
    status            TEXT,
    supabase_auth_id  UUID,
    decodo_proxy_port INTEGER,
    decodo_fixed_ip   TEXT,
    vm_id             TEXT,
    vm_ip             TEXT,
    subscription_plan TEXT,
    created_at        TIMESTAMPTZ DEFAULT now(),
    updated_at        TIMESTAMPTZ DEFAULT now(),
    last_active_at    TIMESTAMPTZ,
    vm_destroyed_at   TIMESTAMPTZ
);

CREATE TABLE profiles (
    id                     UUID PRIMARY KEY REFERENCES users (user_id),
    email                  TEXT,
    full_name              TEXT,
    display_name           TEXT,
    company                TEXT,
    subscription_tier      TEXT,
    current_plan_tier      TEXT,
    perspective_quota_id   UUID,
    is_admin               BOOLEAN DEFAULT false,
    theme                  TEXT,
    timezone               TEXT,
    role                   TEXT,
    email_notifications    BOOLEAN,
    security_notifications BOOLEAN,
    marketing_emails       BOOLEAN,
    monthly_queries        INTEGER,
    queries_used           INTEGER,
    api_keys_count         INTEGER,
    created_at             TIMESTAMPTZ DEFAULT now(),
    updated_at             TIMESTAMPTZ DEFAULT now()
);

CREATE TABLE mcp_user_tokens (
    id              UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id         UUID REFERENCES users (user_id),
    token_name      TEXT,
    token_hash      TEXT,
    token_preview   TEXT,
    active          BOOLEAN DEFAULT true,
    rate_limit_tier TEXT,
    created_at      TIMESTAMPTZ DEFAULT now(),
    updated_at      TIMESTAMPTZ DEFAULT now(),
    last_used_at    TIMESTAMPTZ
);

CREATE TABLE perspective_usage (
    id                    UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id               UUID REFERENCES users (user_id),
    session_id            TEXT,
    model_name            TEXT,
    model_tier            TEXT,
    provider              TEXT,
    provider_source_id    UUID,
    input_tokens          INTEGER,
    output_tokens         INTEGER,
    total_tokens          INTEGER,
    estimated_cost        NUMERIC,
    perspectives_deducted INTEGER,
    request_metadata      JSONB,
    response_metadata     JSONB,
    created_at            TIMESTAMPTZ DEFAULT now()
);

CREATE TABLE user_perspective_quotas (
    id                         UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id                    UUID REFERENCES users (user_id),
    plan_tier                  TEXT,
    messages_per_month         INTEGER,
    premium_perspectives_limit INTEGER,
    normal_perspectives_limit  INTEGER,
    eco_perspectives_limit     INTEGER,
    current_month_start        DATE,
    messages_used              INTEGER DEFAULT 0,
    premium_perspectives_used  INTEGER DEFAULT 0,
    normal_perspectives_used   INTEGER DEFAULT 0,
    eco_perspectives_used      INTEGER DEFAULT 0,
    last_reset_date            DATE,
    created_at                 TIMESTAMPTZ DEFAULT now(),
    updated_at                 TIMESTAMPTZ DEFAULT now()
);

CREATE TABLE user_proxy_ports (
    user_id          UUID PRIMARY KEY REFERENCES users (user_id),
    proxy_port       INTEGER,
    proxy_ip         TEXT,
    assigned_at      TIMESTAMPTZ DEFAULT now(),
    last_verified_at TIMESTAMPTZ
);

CREATE TABLE chat_sessions (
    id         UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id    UUID REFERENCES users (user_id),
    title      TEXT,
    archived   BOOLEAN DEFAULT false,
    created_at TIMESTAMPTZ DEFAULT now(),
    updated_at TIMESTAMPTZ DEFAULT now()
);

CREATE TABLE chat_messages (
    id            UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    session_id    UUID REFERENCES chat_sessions (id),
    role          TEXT,
    content       TEXT,
    model_id      TEXT,
    provider_info JSONB,
    usage_info    JSONB,
    cost_info     JSONB,
    metadata      JSONB,
    created_at    TIMESTAMPTZ DEFAULT now()
);

CREATE TABLE sessions (
    id               UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id          UUID REFERENCES users (user_id),
    name             TEXT,
    description      TEXT,
    model            TEXT,
    provider         TEXT,
    system_prompt    TEXT,
    is_active        BOOLEAN DEFAULT true,
    message_count    INTEGER DEFAULT 0,
    total_tokens     INTEGER DEFAULT 0,
    total_cost_usd   NUMERIC DEFAULT 0,
    last_activity_at TIMESTAMPTZ,
    created_at       TIMESTAMPTZ DEFAULT now(),
    updated_at       TIMESTAMPTZ DEFAULT now()
);

CREATE TABLE messages (
    id         UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    session_id UUID REFERENCES sessions (id),
    role       TEXT,
    content    TEXT,
    tokens     INTEGER,
    cost_usd   NUMERIC,
    created_at TIMESTAMPTZ DEFAULT now()
);

CREATE TABLE vms (
    vm_id             TEXT PRIMARY KEY,
    user_id           UUID REFERENCES users (user_id),
    type              TEXT,
    vm_type           TEXT,
    status            TEXT,
    provider          TEXT,
    ip_address        INET,
    tap_device        TEXT,
    socket_path       TEXT,
    snapshot_path     TEXT,
    memory_path       TEXT,
    memory_mb         INTEGER,
    vcpu_count        NUMERIC,
    cpu_usage_percent NUMERIC,
    memory_usage_mb   INTEGER,
    firecracker_pid   INTEGER,
    last_heartbeat    TIMESTAMPTZ,
    created_at        TIMESTAMPTZ DEFAULT now(),
    destroyed_at      TIMESTAMPTZ
);

CREATE TABLE auth_sessions (
    session_id     UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id        UUID REFERENCES users (user_id),
    provider       TEXT,
    status         TEXT,
    vm_id          TEXT,
    browser_vm_id  TEXT,
    vm_ip          TEXT,
    vnc_url        TEXT,
    auth_url       TEXT,
    redirect_url   TEXT,
    error_message  TEXT,
    retry_count    INTEGER DEFAULT 0,
    started_at     TIMESTAMPTZ,
    timeout_at     TIMESTAMPTZ,
    completed_at   TIMESTAMPTZ,
    last_heartbeat TIMESTAMPTZ,
    created_at     TIMESTAMPTZ DEFAULT now()
);

CREATE TABLE vm_cleanup_tasks (
    id            UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    vm_id         TEXT REFERENCES vms (vm_id),
    session_id    TEXT,
    cleanup_at    TIMESTAMPTZ,
    status        TEXT,
    error_message TEXT,
    created_at    TIMESTAMPTZ DEFAULT now(),
    completed_at  TIMESTAMPTZ
);

CREATE TABLE provider_credentials (
    credential_id         UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id               UUID REFERENCES users (user_id),
    provider              TEXT,
    encrypted_credentials BYTEA,
    encryption_iv         BYTEA,
    encryption_salt       BYTEA,
    encryption_tag        BYTEA,
    is_valid              BOOLEAN DEFAULT true,
    last_verified         TIMESTAMPTZ,
    created_at            TIMESTAMPTZ DEFAULT now(),
    updated_at            TIMESTAMPTZ DEFAULT now()
);

CREATE TABLE cli_credentials (
    credential_id       UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id             UUID REFERENCES users (user_id),
    provider            TEXT,
    encrypted_data      TEXT,
    encryption_iv       TEXT,
    encryption_auth_tag TEXT,
    created_at          TIMESTAMPTZ DEFAULT now(),
    updated_at          TIMESTAMPTZ DEFAULT now(),
    last_used_at        TIMESTAMPTZ
);

CREATE TABLE mcp_registered_clients (
    client_id                 TEXT PRIMARY KEY,
    client_secret             TEXT,
    client_name               TEXT,
    redirect_uris             JSONB,
    scope                     TEXT,
    client_uri                TEXT,
    logo_uri                  TEXT,
    tos_uri                   TEXT,
    policy_uri                TEXT,
    registration_access_token TEXT,
    created_at                TIMESTAMPTZ DEFAULT now(),
    updated_at                TIMESTAMPTZ DEFAULT now()
);
