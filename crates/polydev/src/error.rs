//! The domain error type: what went wrong, independent of how it is reported. Every surface
//! (REST JSON, the SSE `error` event, MCP tool errors, the CLI) shows the same [`Error::code`]
//! and [`Error::public_message`]; details of server faults stay in the process log.

/// Why a presented API token was refused. Each says only something the presenter already
/// knows about their own token, never whether some other user's token exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    Missing,
    Malformed,
    Unknown,
    Revoked,
    Expired,
    /// The token is fine but its user's `users.status` is not `active`.
    AccountSuspended,
    /// The token is fine but its user's `users.status` is `deleted`.
    AccountDeleted,
    /// The token was issued (OAuth, RFC 8707) for another resource than this server.
    WrongAudience,
    /// Sign-in: the e-mail address or the password is wrong (never says which).
    BadCredentials,
    /// A web session cookie that is unknown, expired or signed out.
    SessionInvalid,
}

impl AuthFailure {
    pub fn code(self) -> &'static str {
        match self {
            AuthFailure::Missing => "token_missing",
            AuthFailure::Malformed => "token_malformed",
            AuthFailure::Unknown => "token_unknown",
            AuthFailure::Revoked => "token_revoked",
            AuthFailure::Expired => "token_expired",
            AuthFailure::AccountSuspended => "account_suspended",
            AuthFailure::AccountDeleted => "account_deleted",
            AuthFailure::WrongAudience => "token_wrong_audience",
            AuthFailure::BadCredentials => "credentials_invalid",
            AuthFailure::SessionInvalid => "session_invalid",
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
            AuthFailure::AccountSuspended => "the account of this API token is suspended",
            AuthFailure::AccountDeleted => "the account of this API token has been deleted",
            AuthFailure::WrongAudience => {
                "the token was issued for another resource (its audience is not this server)"
            }
            AuthFailure::BadCredentials => "the e-mail address or the password is wrong",
            AuthFailure::SessionInvalid => "the session has ended: sign in again",
        }
    }

    /// A failure anyone can cause by guessing (a malformed or unknown token), as opposed to one
    /// that needs a real token. These are what the per-address limit counts.
    pub fn is_guess(self) -> bool {
        matches!(
            self,
            AuthFailure::Malformed
                | AuthFailure::Unknown
                | AuthFailure::BadCredentials
                | AuthFailure::SessionInvalid
        )
    }
}

/// The error codes of OAuth 2.1 (RFC 6749 §4.1.2.1 and §5.2, RFC 7591 §3.2.2, RFC 8628 §3.5,
/// RFC 8707 §2). `http::oauth` answers them as `{"error", "error_description"}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OAuthCode {
    InvalidRequest,
    InvalidClient,
    InvalidGrant,
    UnauthorizedClient,
    UnsupportedGrantType,
    UnsupportedResponseType,
    InvalidScope,
    InvalidTarget,
    AccessDenied,
    InvalidRedirectUri,
    InvalidClientMetadata,
    InvalidToken,
    AuthorizationPending,
    SlowDown,
    ExpiredToken,
}

impl OAuthCode {
    pub fn as_str(self) -> &'static str {
        match self {
            OAuthCode::InvalidRequest => "invalid_request",
            OAuthCode::InvalidClient => "invalid_client",
            OAuthCode::InvalidGrant => "invalid_grant",
            OAuthCode::UnauthorizedClient => "unauthorized_client",
            OAuthCode::UnsupportedGrantType => "unsupported_grant_type",
            OAuthCode::UnsupportedResponseType => "unsupported_response_type",
            OAuthCode::InvalidScope => "invalid_scope",
            OAuthCode::InvalidTarget => "invalid_target",
            OAuthCode::AccessDenied => "access_denied",
            OAuthCode::InvalidRedirectUri => "invalid_redirect_uri",
            OAuthCode::InvalidClientMetadata => "invalid_client_metadata",
            OAuthCode::InvalidToken => "invalid_token",
            OAuthCode::AuthorizationPending => "authorization_pending",
            OAuthCode::SlowDown => "slow_down",
            OAuthCode::ExpiredToken => "expired_token",
        }
    }
}

/// Why a zero-knowledge change was refused: it needs the client's proof of the master password
/// or of the recovery key (`Polydev-Zk-Proof`, `Polydev-Zk-Recovery-Proof`), which a leaked API
/// token alone cannot give.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProofFailure {
    /// No proof was sent.
    Missing,
    /// The proof does not match the stored hash.
    Wrong,
    /// The account has no stored proof yet (zero-knowledge was turned on before proofs
    /// existed): the client registers it when it next unlocks.
    NotRegistered,
}

impl ProofFailure {
    pub fn code(self) -> &'static str {
        match self {
            ProofFailure::Missing => "zk_proof_required",
            ProofFailure::Wrong => "zk_proof_wrong",
            ProofFailure::NotRegistered => "zk_proof_not_registered",
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            ProofFailure::Missing => {
                "this change needs the proof of your master password or recovery key (the `Polydev-Zk-Proof` or `Polydev-Zk-Recovery-Proof` header); unlock with `polydev zk` or the page"
            }
            ProofFailure::Wrong => {
                "the proof of the master password or recovery key is wrong: nothing was changed"
            }
            ProofFailure::NotRegistered => {
                "this account has no stored proof of its master password yet: unlock once (any `polydev zk` command that asks for the password, or the page) to register it"
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An OAuth request refused with one of the protocol's error codes.
    #[error("{description}")]
    OAuth {
        code: OAuthCode,
        description: String,
    },
    /// The request is wrong; the message says how to fix it.
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
    /// A valid token whose scope does not cover the route (scopes: `accounts::Scope`; `error`
    /// sits below every domain, so it holds the names only).
    #[error(
        "this API token has scope `{held}`; this route needs a token with scope `{required}` (`polydev token create --scope {required}`)"
    )]
    InsufficientScope {
        required: &'static str,
        held: &'static str,
    },
    /// Too many failed authentications (malformed or unknown tokens) from one client address.
    #[error("too many failed authentications from this address; retry in {} s", retry_after.as_secs())]
    AuthRateLimited { retry_after: std::time::Duration },
    /// A browser `Origin` the server does not accept (on `/mcp`).
    #[error("{0}")]
    OriginNotAllowed(String),
    /// A zero-knowledge change without (or with a wrong) proof of the owner's secret.
    #[error("{}", .0.message())]
    ZkProof(ProofFailure),
    /// Refused whoever asks (403): a missing or wrong CSRF token (`csrf_failed`), an e-mail
    /// address not yet verified (`email_unverified`).
    #[error("{message}")]
    Forbidden { code: &'static str, message: String },
    #[error("rate limit exceeded: {limit} requests per minute; retry in {} s", retry_after.as_secs())]
    RateLimited {
        limit: i32,
        retry_after: std::time::Duration,
    },
    #[error("{0}")]
    QuotaExceeded(String),
    /// No model of the call can run because none of their providers is configured (no API
    /// key, no local CLI answered): not a quota matter. The message names what to set.
    #[error("{0}")]
    NoProviderConfigured(String),
    /// A call with the same idempotency key is still running: retry after `retry_after`.
    #[error("a call with this idempotency_key is still running; retry in {} s", retry_after.as_secs())]
    InProgress { retry_after: std::time::Duration },
    /// The server lacks configuration this request needs (a secret, a provider). Not the
    /// caller's fault, and safe to say: the message names what the operator must set.
    #[error("{0}")]
    NotConfigured(String),
    /// A fault of the server, not the caller's: an unreadable stored row, a missing server
    /// secret, a query the database rejected. The detail is logged, never sent.
    #[error("{0}")]
    Internal(String),
    /// The database cannot be reached (connection refused, pool exhausted or closed).
    #[error("database unavailable: {0}")]
    Unavailable(sqlx::Error),
    /// The container orchestrator (bubblewrap, Nomad) cannot be reached or cannot start
    /// containers now; nothing was changed. The detail is logged, never sent.
    #[error("runtime unavailable: {0}")]
    RuntimeUnavailable(String),
    /// A user's proxy port cannot carry their runtime traffic (503): it failed its health check
    /// (`proxy_unhealthy`), the configured range has no free port (`proxy_ports_exhausted`), the
    /// gate cannot be resolved (`proxy_unreachable`). The message names the port, never the
    /// gate's credentials.
    #[error("{message}")]
    Proxy { code: &'static str, message: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The stable, machine-readable code every surface reports.
    pub fn code(&self) -> &'static str {
        match self {
            Error::Invalid(_) => "invalid_request",
            Error::OAuth { code, .. } => code.as_str(),
            Error::TooLarge(_) => "too_large",
            Error::NotFound(_) => "not_found",
            Error::Conflict(_) => "conflict",
            Error::Unauthorized(failure) => failure.code(),
            Error::InsufficientScope { .. } => "insufficient_scope",
            Error::AuthRateLimited { .. } => "auth_rate_limited",
            Error::OriginNotAllowed(_) => "origin_not_allowed",
            Error::ZkProof(failure) => failure.code(),
            Error::Forbidden { code, .. } => code,
            Error::RateLimited { .. } => "rate_limited",
            Error::QuotaExceeded(_) => "quota_exceeded",
            Error::NoProviderConfigured(_) => "no_provider_configured",
            Error::InProgress { .. } => "in_progress",
            Error::NotConfigured(_) => "not_configured",
            Error::Internal(_) => "internal",
            Error::Unavailable(_) => "database_unavailable",
            Error::RuntimeUnavailable(_) => "runtime_unavailable",
            Error::Proxy { code, .. } => code,
        }
    }

    /// What the caller may read: the domain's own words for client mistakes, a fixed sentence
    /// for server faults (their detail goes to the log through [`Error::log`]).
    pub fn public_message(&self) -> String {
        match self {
            Error::Internal(_) => {
                "an internal error occurred; it has been logged with the request id".into()
            }
            Error::Unavailable(_) => "the database is unavailable; try again shortly".into(),
            Error::RuntimeUnavailable(_) => {
                "the container runtime is unavailable; try again shortly".into()
            }
            other => other.to_string(),
        }
    }

    /// Server faults are logged (inside the request's span, so with its id); client mistakes
    /// are the client's business and are not.
    pub fn log(&self) {
        match self {
            Error::NotConfigured(what) => tracing::warn!(%what, "refused: not configured"),
            Error::Internal(detail) => tracing::error!(%detail, "internal error"),
            Error::Unavailable(error) => tracing::error!(%error, "database unavailable"),
            Error::RuntimeUnavailable(detail) => tracing::error!(%detail, "runtime unavailable"),
            Error::Proxy { code, message } => tracing::warn!(%code, %message, "proxy refused"),
            _ => {}
        }
    }

    /// A server fault with its detail, for the log.
    pub fn internal(detail: impl std::fmt::Display) -> Error {
        Error::Internal(detail.to_string())
    }

    /// An OAuth protocol error.
    pub fn oauth(code: OAuthCode, description: impl Into<String>) -> Error {
        Error::OAuth {
            code,
            description: description.into(),
        }
    }
}

/// PostgreSQL's verdicts on what the client sent are client errors; only a database that cannot
/// be reached is "unavailable"; anything else it rejects is a server fault.
impl From<sqlx::Error> for Error {
    fn from(error: sqlx::Error) -> Self {
        use sqlx::Error as E;
        match &error {
            E::Io(_) | E::Tls(_) | E::PoolTimedOut | E::PoolClosed | E::WorkerCrashed => {
                Error::Unavailable(error)
            }
            E::Database(db) => match db.code().as_deref() {
                // unique_violation: a client-chosen id that is taken.
                Some("23505") => Error::Conflict("a record with this id already exists".into()),
                // foreign_key_violation: what it points to is gone.
                Some("23503") => Error::NotFound("referenced record"),
                // not_null / check violations, bad encodings and lengths, NUL in text.
                Some("23502" | "23514" | "22001" | "22021" | "22P05") => Error::Invalid(
                    "the database refused a value of this request (too long, missing, or holding a NUL character)"
                        .into(),
                ),
                // admin_shutdown, crash_shutdown, cannot_connect_now, too_many_connections.
                Some("57P01" | "57P02" | "57P03" | "53300") => Error::Unavailable(error),
                _ => Error::internal(db),
            },
            _ => Error::internal(&error),
        }
    }
}

/// Refuses text that PostgreSQL cannot store. Called by every input path (the HTTP extractors
/// check whole bodies; the CLI and domain functions call it on their own fields).
pub fn reject_nul(field: &str, value: &str) -> Result<()> {
    if value.contains('\0') {
        return Err(Error::Invalid(format!(
            "`{field}` contains a NUL character (U+0000), which cannot be stored"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_faults_never_show_their_detail() {
        let error = Error::internal("relation \"secret_table\" does not exist");
        assert_eq!(error.code(), "internal");
        assert!(!error.public_message().contains("secret_table"));
        let unavailable = Error::from(sqlx::Error::PoolTimedOut);
        assert_eq!(unavailable.code(), "database_unavailable");
        assert!(!unavailable.public_message().contains("pool"));
    }

    #[test]
    fn nul_is_refused_with_the_field_name() {
        assert!(reject_nul("title", "fine").is_ok());
        let error = reject_nul("title", "a\0b").unwrap_err();
        assert_eq!(error.code(), "invalid_request");
        assert!(error.public_message().contains("`title`"));
    }
}
