//! Accounts: users with their profile and plan, and their `pd_` API tokens with their scopes
//! and rate limits; on the web, passwords, e-mail links and browser sessions.

pub mod email;
mod issued;
mod passkeys;
mod passwords;
mod rate_limit;
mod scope;
mod throttle;
pub mod token_cache;
mod tokens;
mod users;
mod web_sessions;

pub use email::Mailer;
pub use issued::{
    IssuedToken, deactivate_token, issue_oauth_access_token, oauth_access_token_grant,
    revoke_oauth_access_tokens,
};
pub use passkeys::{
    MAX_PASSKEYS_PER_USER, PasskeyInfo, delete_passkey,
    finish_authentication as finish_passkey_sign_in,
    finish_registration as finish_passkey_registration, list_passkeys,
    start_authentication as start_passkey_sign_in,
    start_registration as start_passkey_registration,
};
pub use passwords::{
    Links, MAX_PASSWORD_BYTES, MIN_PASSWORD_CHARS, hash_password, request_password_reset,
    reset_password, sign_in, sign_up, verify_email,
};
pub use rate_limit::{check_rate_limit, count_request_of};
pub use scope::Scope;
pub use throttle::{AUTH_FAILURES_PER_MINUTE, FailedAuthLimiter};
pub use token_cache::TokenCache;
pub use tokens::{
    ApiToken, Caller, CreatedToken, LastUsedTracker, MAX_LIVE_TOKENS_PER_USER, MAX_TOKEN_NAME_LEN,
    Via, authenticate, authenticate_cached, create_scoped_token, create_token, list_tokens,
    revoke_all_tokens_in, revoke_token,
};
pub use users::{Plan, Profile, User, create_user, find_profile, find_user, find_user_by_email};
pub use web_sessions::{
    NewSession, PRE_SESSION_CSRF_COOKIE, SESSION_COOKIE, SESSION_DAYS, check_csrf, csrf_token,
    end_all_sessions, end_all_sessions_in, end_session, random_secret, session_caller,
    start_session,
};
