-- no-transaction
-- A new user's port is the first one of the configured range that no row holds: that search
-- (and the probe's update by port) looks rows up by proxy_port. Not UNIQUE: the seed's rows are
-- production truth and are not judged here; allocation itself never hands out a taken port
-- (it runs under an advisory lock, proxy::ports).
-- sqlx sends a file as one query, so CREATE INDEX CONCURRENTLY must stand alone: lock_timeout
-- and statement_timeout come from the migration connection (db::migrate), not from SET here.
-- squawk-ignore-file require-lock-timeout, require-statement-timeout
CREATE INDEX CONCURRENTLY IF NOT EXISTS user_proxy_ports_proxy_port_idx
    ON user_proxy_ports (proxy_port);
