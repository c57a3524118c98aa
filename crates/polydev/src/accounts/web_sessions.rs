//! Browser sessions: a random 256-bit id in an HttpOnly cookie, stored as its SHA-256, valid
//! for [`SESSION_DAYS`] unless signed out. A new id at every sign-in (the previous one, if the
//! browser had one, ends). A session acts with the `account` scope.
//!
//! CSRF: a state-changing request made with the cookie must carry the session's CSRF token
//! (`X-CSRF-Token` header or a `csrf_token` form field), derived from the session id
//! (SHA-256 of a label and the id), so it needs no storage and changes with the session.
//! Before sign-in, a form carries the value of a separate random `polydev_csrf` cookie
//! (double submit). Both are compared in constant time.

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use sqlx::{PgConnection, PgPool};
use subtle::ConstantTimeEq;
use uuid::Uuid;

use super::tokens::{account_status, generate};
use super::{Caller, Scope, Via};
use crate::error::{AuthFailure, Error, Result};

pub const SESSION_COOKIE: &str = "polydev_session";
/// The cookie that protects forms before sign-in (double submit).
pub const PRE_SESSION_CSRF_COOKIE: &str = "polydev_csrf";
pub const SESSION_DAYS: i64 = 30;
const MAX_USER_AGENT: usize = 200;

#[derive(Debug, Clone)]
pub struct NewSession {
    /// The cookie value: shown to the browser once, stored only hashed.
    pub secret: String,
    pub id: Uuid,
    pub expires_at: DateTime<Utc>,
}

/// A random secret of 64 hex digits (session ids, pre-session CSRF cookies).
pub fn random_secret() -> String {
    generate()[3..].to_string()
}

fn session_hash(secret: &str) -> String {
    hex::encode(Sha256::digest(
        format!("polydev-session:{secret}").as_bytes(),
    ))
}

/// The CSRF token of a session.
pub fn csrf_token(session_secret: &str) -> String {
    hex::encode(Sha256::digest(
        format!("polydev-csrf:{session_secret}").as_bytes(),
    ))
}

/// `presented` must equal `expected` (constant time); else 403 `csrf_failed`.
pub fn check_csrf(expected: Option<&str>, presented: Option<&str>) -> Result<()> {
    let ok = match (expected, presented) {
        (Some(expected), Some(presented)) if !expected.is_empty() => {
            bool::from(expected.as_bytes().ct_eq(presented.as_bytes()))
        }
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(Error::Forbidden {
            code: "csrf_failed",
            message: "the CSRF token is missing or wrong: reload the page and try again".into(),
        })
    }
}

fn well_formed(secret: &str) -> bool {
    secret.len() == 64 && secret.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Starts a session for `user_id`, ending `previous` (the browser's earlier session id).
pub async fn start_session(
    pool: &PgPool,
    user_id: Uuid,
    previous: Option<&str>,
    user_agent: Option<&str>,
) -> Result<NewSession> {
    if let Some(previous) = previous.filter(|p| well_formed(p)) {
        end_session(pool, previous).await?;
    }
    let secret = random_secret();
    let user_agent: Option<String> = user_agent.map(|ua| {
        ua.chars()
            .filter(|c| *c != '\0')
            .take(MAX_USER_AGENT)
            .collect()
    });
    let row = sqlx::query!(
        "INSERT INTO account_web_sessions (user_id, session_hash, user_agent, expires_at)
         VALUES ($1, $2, $3, now() + make_interval(days => $4))
         RETURNING id, expires_at",
        user_id,
        session_hash(&secret),
        user_agent,
        SESSION_DAYS as i32
    )
    .fetch_one(pool)
    .await?;
    sqlx::query!(
        "UPDATE users SET last_active_at = now() WHERE user_id = $1",
        user_id
    )
    .execute(pool)
    .await?;
    tracing::info!(%user_id, session = %row.id, "signed in");
    Ok(NewSession {
        secret,
        id: row.id,
        expires_at: row.expires_at,
    })
}

/// The caller behind a session cookie (scope `account`).
pub async fn session_caller(pool: &PgPool, secret: &str) -> Result<Caller> {
    if !well_formed(secret) {
        return Err(Error::Unauthorized(AuthFailure::SessionInvalid));
    }
    let presented = session_hash(secret);
    let row = sqlx::query!(
        r#"SELECT s.id, s.user_id, s.session_hash, s.expires_at, s.revoked_at,
                  u.status AS user_status, u.tier AS user_tier
             FROM account_web_sessions s JOIN users u ON u.user_id = s.user_id
            WHERE s.session_hash = $1"#,
        &presented
    )
    .fetch_optional(pool)
    .await?
    .ok_or(Error::Unauthorized(AuthFailure::SessionInvalid))?;
    if !bool::from(row.session_hash.as_bytes().ct_eq(presented.as_bytes()))
        || row.revoked_at.is_some()
        || row.expires_at <= Utc::now()
    {
        return Err(Error::Unauthorized(AuthFailure::SessionInvalid));
    }
    account_status(row.user_status.as_deref())?;
    Ok(Caller {
        user_id: row.user_id,
        token_id: row.id,
        rate_limit_tier: row.user_tier.clone(),
        user_tier: row.user_tier,
        scope: Scope::Account,
        audience: None,
        via: Via::WebSession,
    })
}

/// Ends one session (sign out). Ending an unknown or ended session is not an error.
pub async fn end_session(pool: &PgPool, secret: &str) -> Result<()> {
    sqlx::query!(
        "UPDATE account_web_sessions SET revoked_at = now()
          WHERE session_hash = $1 AND revoked_at IS NULL",
        session_hash(secret)
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// Ends every session of a user ("sign out everywhere"); how many were live.
pub async fn end_all_sessions(pool: &PgPool, user_id: Uuid) -> Result<u64> {
    let mut conn = pool.acquire().await?;
    end_all_sessions_in(&mut conn, user_id).await
}

/// [`end_all_sessions`] inside the caller's transaction.
pub async fn end_all_sessions_in(conn: &mut PgConnection, user_id: Uuid) -> Result<u64> {
    let done = sqlx::query!(
        "UPDATE account_web_sessions SET revoked_at = now()
          WHERE user_id = $1 AND revoked_at IS NULL",
        user_id
    )
    .execute(conn)
    .await?;
    tracing::info!(%user_id, sessions = done.rows_affected(), "signed out everywhere");
    Ok(done.rows_affected())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csrf_tokens_follow_the_session_and_are_checked() {
        let a = random_secret();
        let b = random_secret();
        assert_ne!(csrf_token(&a), csrf_token(&b));
        assert!(check_csrf(Some(&csrf_token(&a)), Some(&csrf_token(&a))).is_ok());
        assert!(check_csrf(Some(&csrf_token(&a)), Some(&csrf_token(&b))).is_err());
        assert!(check_csrf(Some(&csrf_token(&a)), None).is_err());
        assert!(check_csrf(None, Some("")).is_err());
        assert!(check_csrf(Some(""), Some("")).is_err());
    }
}
