//! The domain error type: what went wrong, independent of how it is reported (HTTP or CLI).

/// Why a presented API token was refused. Each says only something the presenter already
/// knows about their own token, never whether some other user's token exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    Missing,
    Malformed,
    Unknown,
    Revoked,
    Expired,
}

impl AuthFailure {
    pub fn code(self) -> &'static str {
        match self {
            AuthFailure::Missing => "token_missing",
            AuthFailure::Malformed => "token_malformed",
            AuthFailure::Unknown => "token_unknown",
            AuthFailure::Revoked => "token_revoked",
            AuthFailure::Expired => "token_expired",
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            AuthFailure::Missing => "no API token: send `Authorization: Bearer pd_...`",
            AuthFailure::Malformed => {
                "the API token is malformed: expected `pd_` and 64 hex digits"
            }
            AuthFailure::Unknown => "the API token is not valid",
            AuthFailure::Revoked => "the API token has been revoked",
            AuthFailure::Expired => "the API token has expired",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("{0}")]
    Conflict(String),
    #[error("{}", .0.message())]
    Unauthorized(AuthFailure),
    #[error("rate limit exceeded: {limit} requests per minute; retry in {} s", retry_after.as_secs())]
    RateLimited {
        limit: i32,
        retry_after: std::time::Duration,
    },
    #[error("{0}")]
    QuotaExceeded(String),
    #[error("{0}")]
    Upstream(String),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
