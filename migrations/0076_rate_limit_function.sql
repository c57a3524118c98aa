-- The per-token and per-user request count of one request (crate::accounts::rate_limit) as a
-- function, so the statement that reserves a perspectives call's quota can count the request
-- in the same round trip (crate::quota::reserve_all) while the SQL stays in one place.
-- PL/pgSQL, not SQL: its plan is prepared once per connection (a SQL function with
-- data-modifying statements is planned on every call before PostgreSQL 18).
-- The token's row, then the user's (always in that order, so concurrent requests cannot
-- deadlock). Unknown tiers get the `free` limit (30 if even that is missing).
SET lock_timeout = '5s';
SET statement_timeout = '60s';

CREATE OR REPLACE FUNCTION polydev_count_request(
    p_token_id UUID, p_token_tier TEXT, p_user_id UUID, p_user_tier TEXT)
RETURNS TABLE (token_count INTEGER, token_limit INTEGER, user_count INTEGER, user_limit INTEGER,
               retry_after DOUBLE PRECISION)
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    RETURN QUERY
    WITH lim AS (
         SELECT coalesce((SELECT t.requests_per_minute FROM rate_limit_tiers t WHERE t.tier = p_token_tier),
                         (SELECT t.requests_per_minute FROM rate_limit_tiers t WHERE t.tier = 'free'),
                         30) AS token_rpm,
                coalesce((SELECT t.requests_per_minute FROM rate_limit_tiers t WHERE t.tier = p_user_tier),
                         (SELECT t.requests_per_minute FROM rate_limit_tiers t WHERE t.tier = 'free'),
                         30) AS user_rpm),
     token AS (
         INSERT INTO rate_limit_windows AS w (token_id, window_start, count)
         VALUES (p_token_id, date_trunc('minute', now()), 1)
         ON CONFLICT (token_id) DO UPDATE SET
             count = CASE WHEN w.window_start = EXCLUDED.window_start THEN w.count + 1 ELSE 1 END,
             window_start = EXCLUDED.window_start
         RETURNING w.count, w.window_start),
     person AS (
         INSERT INTO rate_limit_user_windows AS w (user_id, window_start, count)
         VALUES (p_user_id, date_trunc('minute', now()), 1)
         ON CONFLICT (user_id) DO UPDATE SET
             count = CASE WHEN w.window_start = EXCLUDED.window_start THEN w.count + 1 ELSE 1 END,
             window_start = EXCLUDED.window_start
         RETURNING w.count)
    SELECT token.count, lim.token_rpm, person.count, lim.user_rpm,
           extract(epoch FROM token.window_start + interval '1 minute' - clock_timestamp())::float8
      FROM token, person, lim;
END;
$$;
