//! Requests per minute per token, by the token's `rate_limit_tier` (`rate_limit_tiers`). The
//! counter lives in PostgreSQL, so the limit holds across every polydev process sharing it.

use std::time::Duration;

use sqlx::PgPool;
use uuid::Uuid;

use crate::error::{Error, Result};

/// Counts one request for `token_id` in the current one-minute window (database clock) and
/// refuses it with `Error::RateLimited` when the tier's limit is exceeded. Unknown tiers get the
/// `free` limit.
pub async fn check_rate_limit(pool: &PgPool, token_id: Uuid, tier: Option<&str>) -> Result<()> {
    let row = sqlx::query!(
        r#"WITH lim AS (
             SELECT coalesce((SELECT requests_per_minute FROM rate_limit_tiers WHERE tier = $2),
                             (SELECT requests_per_minute FROM rate_limit_tiers WHERE tier = 'free'),
                             30) AS rpm)
         INSERT INTO rate_limit_windows AS w (token_id, window_start, count)
         VALUES ($1, date_trunc('minute', now()), 1)
         ON CONFLICT (token_id) DO UPDATE SET
             count = CASE WHEN w.window_start = EXCLUDED.window_start THEN w.count + 1 ELSE 1 END,
             window_start = EXCLUDED.window_start
         RETURNING count, (SELECT rpm FROM lim) AS "limit!",
                   extract(epoch FROM window_start + interval '1 minute' - clock_timestamp())::float8
                     AS "retry_after!""#,
        token_id,
        tier
    )
    .fetch_one(pool)
    .await?;
    if row.count > row.limit {
        return Err(Error::RateLimited {
            limit: row.limit,
            retry_after: Duration::from_secs(row.retry_after.ceil().max(1.0) as u64),
        });
    }
    Ok(())
}
