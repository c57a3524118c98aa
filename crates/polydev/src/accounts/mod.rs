//! Accounts: users with their profile and plan, and their `pd_` API tokens with their scopes
//! and rate limits.

mod rate_limit;
mod scope;
mod throttle;
mod tokens;
mod users;

pub use rate_limit::check_rate_limit;
pub use scope::Scope;
pub use throttle::{AUTH_FAILURES_PER_MINUTE, FailedAuthLimiter};
pub use tokens::{
    ApiToken, Caller, CreatedToken, LastUsedTracker, MAX_LIVE_TOKENS_PER_USER, MAX_TOKEN_NAME_LEN,
    authenticate, create_scoped_token, create_token, list_tokens, revoke_token,
};
pub use users::{Plan, Profile, User, create_user, find_profile, find_user, find_user_by_email};
