//! Accounts: users with their profile and plan, and their `pd_` API tokens.

mod rate_limit;
mod tokens;
mod users;

pub use rate_limit::check_rate_limit;
pub use tokens::{
    ApiToken, Caller, CreatedToken, LastUsedTracker, MAX_TOKEN_NAME_LEN, authenticate,
    create_token, list_tokens, revoke_token,
};
pub use users::{Plan, Profile, User, create_user, find_profile, find_user, find_user_by_email};
