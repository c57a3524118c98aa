-- OAuth access tokens are ordinary `pd_` rows in mcp_user_tokens (so `/mcp` authentication and
-- immediate revocation work as for every token), with the resource they were issued for
-- (RFC 8707 audience; NULL for tokens made by hand, which are valid for this server) and the
-- grant and refresh-token family that issued them (revoked together).
SET lock_timeout = '5s';
SET statement_timeout = '60s';

ALTER TABLE mcp_user_tokens ADD COLUMN IF NOT EXISTS audience TEXT;
ALTER TABLE mcp_user_tokens ADD COLUMN IF NOT EXISTS oauth_grant_id UUID;
ALTER TABLE mcp_user_tokens ADD COLUMN IF NOT EXISTS oauth_family_id UUID;
