//! Requests per minute, per token and per user. A token's limit comes from its
//! `rate_limit_tier`, a user's from their `users.tier` (both in `rate_limit_tiers`): every token
//! has its own budget, and all of a user's tokens together share the user's, so minting more
//! tokens does not multiply the limit. The counters live in PostgreSQL, so the limits hold
//! across every polydev process sharing it. The counting is one database function,
//! `polydev_count_request` (migration 0076), which a perspectives call runs inside the
//! statement that reserves its quota (`quota::reserve_all_counting`) instead of separately.

use sqlx::PgPool;

use super::Caller;
use crate::error::Result;
use crate::quota::{self, CountRequest};

/// Counts one request of `caller` in the current one-minute window (database clock), for the
/// token and for its user, and refuses it with `Error::RateLimited` when either limit is
/// exceeded. Unknown tiers get the `free` limit.
pub async fn check_rate_limit(pool: &PgPool, caller: &Caller) -> Result<()> {
    quota::count_request(pool, &count_request_of(caller)).await
}

/// What counting a request of `caller` takes (to count it later, with its quota reservation).
pub fn count_request_of(caller: &Caller) -> CountRequest {
    CountRequest {
        token_id: caller.token_id,
        token_tier: caller.rate_limit_tier.clone(),
        user_id: caller.user_id,
        user_tier: caller.user_tier.clone(),
    }
}
