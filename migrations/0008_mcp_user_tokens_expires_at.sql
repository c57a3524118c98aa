-- API tokens may expire. NULL means never (every legacy token).
SET lock_timeout = '5s';
SET statement_timeout = '60s';

ALTER TABLE mcp_user_tokens ADD COLUMN IF NOT EXISTS expires_at TIMESTAMPTZ;
