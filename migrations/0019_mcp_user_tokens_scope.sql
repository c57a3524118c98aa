-- API tokens carry a scope (docs/api.md#scopes): `mcp`, what an IDE's MCP configuration needs,
-- or `account`, which adds token management, settings writes, key material and credentials.
-- Every existing token, and every token the legacy application still creates, is `mcp`. The
-- server reads any value other than `account` as `mcp` (the narrower one), so no CHECK here.
SET lock_timeout = '5s';
SET statement_timeout = '60s';

-- A constant default: PostgreSQL 11+ adds the column without rewriting the table.
ALTER TABLE mcp_user_tokens ADD COLUMN IF NOT EXISTS scope TEXT NOT NULL DEFAULT 'mcp';
