//! Requests per minute, per token and per user. A token's limit comes from its
//! `rate_limit_tier`, a user's from their `users.tier` (both in `rate_limit_tiers`): every token
//! has its own budget, and all of a user's tokens together share the user's, so minting more
//! tokens does not multiply the limit. The counters live in PostgreSQL, so the limits hold
//! across every polydev process sharing it.

use std::time::Duration;

use sqlx::PgPool;

use super::Caller;
use crate::error::{Error, Result};

/// Counts one request of `caller` in the current one-minute window (database clock), for the
/// token and for its user, and refuses it with `Error::RateLimited` when either limit is
/// exceeded. Unknown tiers get the `free` limit.
pub async fn check_rate_limit(pool: &PgPool, caller: &Caller) -> Result<()> {
    // One statement: the token's row, then the user's (always in that order, so concurrent
    // requests cannot deadlock).
    let row = sqlx::query!(
        r#"WITH lim AS (
             SELECT coalesce((SELECT requests_per_minute FROM rate_limit_tiers WHERE tier = $2),
                             (SELECT requests_per_minute FROM rate_limit_tiers WHERE tier = 'free'),
                             30) AS token_rpm,
                    coalesce((SELECT requests_per_minute FROM rate_limit_tiers WHERE tier = $4),
                             (SELECT requests_per_minute FROM rate_limit_tiers WHERE tier = 'free'),
                             30) AS user_rpm),
         token AS (
             INSERT INTO rate_limit_windows AS w (token_id, window_start, count)
             VALUES ($1, date_trunc('minute', now()), 1)
             ON CONFLICT (token_id) DO UPDATE SET
                 count = CASE WHEN w.window_start = EXCLUDED.window_start THEN w.count + 1 ELSE 1 END,
                 window_start = EXCLUDED.window_start
             RETURNING w.count, w.window_start),
         person AS (
             INSERT INTO rate_limit_user_windows AS w (user_id, window_start, count)
             VALUES ($3, date_trunc('minute', now()), 1)
             ON CONFLICT (user_id) DO UPDATE SET
                 count = CASE WHEN w.window_start = EXCLUDED.window_start THEN w.count + 1 ELSE 1 END,
                 window_start = EXCLUDED.window_start
             RETURNING w.count)
         SELECT token.count AS "token_count!", lim.token_rpm AS "token_limit!",
                person.count AS "user_count!", lim.user_rpm AS "user_limit!",
                extract(epoch FROM token.window_start + interval '1 minute' - clock_timestamp())::float8
                  AS "retry_after!"
           FROM token, person, lim"#,
        caller.token_id,
        caller.rate_limit_tier.as_deref(),
        caller.user_id,
        caller.user_tier.as_deref()
    )
    .fetch_one(pool)
    .await?;
    let retry_after = Duration::from_secs(row.retry_after.ceil().max(1.0) as u64);
    if row.token_count > row.token_limit {
        return Err(Error::RateLimited {
            limit: row.token_limit,
            retry_after,
        });
    }
    if row.user_count > row.user_limit {
        return Err(Error::RateLimited {
            limit: row.user_limit,
            retry_after,
        });
    }
    Ok(())
}
