-- Decodo proxy ports (issue 11, docs/cli-backends.md "Proxy ports"). The seed's
-- user_proxy_ports rows are reused as they are (one port per user, "ALREADY allocated"); these
-- additive columns hold the periodic probe's verdict. `last_verified_at` (seed) stays the time of
-- the last successful check.
SET lock_timeout = '5s';
SET statement_timeout = '60s';

-- NULL: never checked; false: the last CONNECT through the port failed (see last_error).
ALTER TABLE user_proxy_ports ADD COLUMN IF NOT EXISTS healthy BOOLEAN;
ALTER TABLE user_proxy_ports ADD COLUMN IF NOT EXISTS last_checked_at TIMESTAMPTZ;
ALTER TABLE user_proxy_ports ADD COLUMN IF NOT EXISTS last_error TEXT;
