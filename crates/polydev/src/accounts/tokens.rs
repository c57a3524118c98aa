use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use subtle::ConstantTimeEq;
use uuid::Uuid;

use super::Scope;
use super::token_cache::{Lookup, TokenCache};
use crate::error::{AuthFailure, Error, Result, reject_nul};

const PREFIX: &str = "pd_";
const SECRET_BYTES: usize = 32;
const TOKEN_LEN: usize = PREFIX.len() + SECRET_BYTES * 2;
pub const MAX_TOKEN_NAME_LEN: usize = 100;
const MAX_EXPIRY_DAYS: u32 = 3650;
/// Live (active and unexpired) tokens a user may hold at once.
pub const MAX_LIVE_TOKENS_PER_USER: i64 = 50;

/// A token as listed: never the secret, only its last 4 characters.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct ApiToken {
    pub id: Uuid,
    pub token_name: Option<String>,
    pub token_preview: Option<String>,
    pub active: Option<bool>,
    pub rate_limit_tier: Option<String>,
    pub scope: Scope,
    pub created_at: Option<DateTime<Utc>>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
}

/// A newly created token: the only time the secret exists outside the caller's hands.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct CreatedToken {
    pub token: String,
    #[serde(flatten)]
    pub info: ApiToken,
}

/// The authenticated caller of a request.
#[derive(Debug, Clone, Serialize)]
pub struct Caller {
    pub user_id: Uuid,
    pub token_id: Uuid,
    /// The token's tier: its own requests per minute.
    pub rate_limit_tier: Option<String>,
    /// The user's tier (`users.tier`): requests per minute of all their tokens together.
    pub user_tier: Option<String>,
    pub scope: Scope,
    /// The resource an OAuth access token was issued for (RFC 8707); `None` for tokens made by
    /// hand and for web sessions, which are valid for this server only.
    pub audience: Option<String>,
    /// What authenticated the request.
    pub via: Via,
}

/// How a caller authenticated: a `pd_` bearer token, or a browser's session cookie (whose
/// `token_id` is then the session's id).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Via {
    Token,
    WebSession,
}

/// Creates an `mcp` token for `user_id` (the narrow scope; see [`create_scoped_token`]).
pub async fn create_token(
    pool: &PgPool,
    user_id: Uuid,
    name: &str,
    expires_in_days: Option<u32>,
) -> Result<CreatedToken> {
    create_scoped_token(pool, user_id, name, expires_in_days, Scope::Mcp).await
}

/// Creates a token of `scope` for `user_id`. Only the SHA-256 of the secret is stored. A user
/// holds at most [`MAX_LIVE_TOKENS_PER_USER`] live tokens; beyond that it is a `Conflict`.
pub async fn create_scoped_token(
    pool: &PgPool,
    user_id: Uuid,
    name: &str,
    expires_in_days: Option<u32>,
    scope: Scope,
) -> Result<CreatedToken> {
    let name = name.trim();
    reject_nul("name", name)?;
    if name.is_empty() || name.chars().count() > MAX_TOKEN_NAME_LEN {
        return Err(Error::Invalid(format!(
            "a token name must be 1 to {MAX_TOKEN_NAME_LEN} characters"
        )));
    }
    if let Some(days) = expires_in_days
        && !(1..=MAX_EXPIRY_DAYS).contains(&days)
    {
        return Err(Error::Invalid(format!(
            "expiry must be 1 to {MAX_EXPIRY_DAYS} days"
        )));
    }
    let token = generate();
    let mut tx = pool.begin().await?;
    // Serialises token creation per user, so concurrent creates cannot pass the cap together
    // (an advisory lock: the users row, which the legacy application updates, stays free).
    sqlx::query!(
        "SELECT pg_advisory_xact_lock(hashtextextended('mcp_user_tokens:' || $1::uuid::text, 0))",
        user_id
    )
    .execute(&mut *tx)
    .await?;
    let live = sqlx::query_scalar!(
        r#"SELECT count(*) AS "live!" FROM mcp_user_tokens
            WHERE user_id = $1 AND active AND (expires_at IS NULL OR expires_at > now())"#,
        user_id
    )
    .fetch_one(&mut *tx)
    .await?;
    if live >= MAX_LIVE_TOKENS_PER_USER {
        return Err(Error::Conflict(format!(
            "this account already has {live} live API tokens, the most allowed is \
             {MAX_LIVE_TOKENS_PER_USER}: revoke one first (`DELETE /v1/tokens/{{id}}`, \
             `polydev token revoke`)"
        )));
    }
    // The rate-limit tier follows the user's plan.
    let info = sqlx::query_as!(
        ApiToken,
        r#"INSERT INTO mcp_user_tokens (user_id, token_name, token_hash, token_preview, active,
                                      rate_limit_tier, expires_at, scope)
         SELECT u.user_id, $2, $3, $4, true, coalesce(u.tier, 'free'),
                now() + make_interval(days => $5), $6
           FROM users u WHERE u.user_id = $1
         RETURNING id, token_name, token_preview, active, rate_limit_tier,
                   scope AS "scope: Scope", created_at, last_used_at, expires_at"#,
        user_id,
        name,
        hash(&token),
        &token[TOKEN_LEN - 4..],
        expires_in_days.map(|d| d as i32),
        scope.as_str()
    )
    .fetch_optional(&mut *tx)
    .await?
    .ok_or(Error::NotFound("user"))?;
    refresh_key_count(&mut tx, user_id).await?;
    tx.commit().await?;
    tracing::info!(%user_id, token_id = %info.id, scope = scope.as_str(), "API token created");
    Ok(CreatedToken { token, info })
}

pub async fn list_tokens(pool: &PgPool, user_id: Uuid) -> Result<Vec<ApiToken>> {
    Ok(sqlx::query_as!(
        ApiToken,
        r#"SELECT id, token_name, token_preview, active, rate_limit_tier, scope AS "scope: Scope",
                  created_at, last_used_at, expires_at
             FROM mcp_user_tokens WHERE user_id = $1 ORDER BY created_at, id"#,
        user_id
    )
    .fetch_all(pool)
    .await?)
}

/// Revokes a token. `owner` scopes it to one user (HTTP); `None` is the operator's CLI.
/// Revoking an already revoked token is not an error.
pub async fn revoke_token(pool: &PgPool, owner: Option<Uuid>, token_id: Uuid) -> Result<ApiToken> {
    let mut tx = pool.begin().await?;
    let token = sqlx::query_as!(
        ApiToken,
        r#"UPDATE mcp_user_tokens SET active = false, updated_at = now()
            WHERE id = $1 AND ($2::uuid IS NULL OR user_id = $2)
           RETURNING id, token_name, token_preview, active, rate_limit_tier,
                     scope AS "scope: Scope", created_at, last_used_at, expires_at"#,
        token_id,
        owner
    )
    .fetch_optional(&mut *tx)
    .await?
    .ok_or(Error::NotFound("token"))?;
    let user_id = sqlx::query_scalar!(
        r#"SELECT user_id AS "user_id!" FROM mcp_user_tokens WHERE id = $1"#,
        token_id
    )
    .fetch_one(&mut *tx)
    .await?;
    refresh_key_count(&mut tx, user_id).await?;
    tx.commit().await?;
    tracing::info!(%token_id, "API token revoked");
    Ok(token)
}

/// Resolves a presented `Authorization` header value to its caller: a known, active,
/// unexpired token of a user whose `users.status` is `active` (or unset, as on legacy rows).
pub async fn authenticate(pool: &PgPool, header: Option<&str>) -> Result<Caller> {
    authenticate_cached(pool, &TokenCache::default(), header).await
}

/// [`authenticate`], answered from `cache` when it holds the token (see [`TokenCache`]).
pub async fn authenticate_cached(
    pool: &PgPool,
    cache: &TokenCache,
    header: Option<&str>,
) -> Result<Caller> {
    let presented = parse_bearer(header)?;
    let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
    let generation = match cache.lookup(&digest, Instant::now()) {
        Lookup::Hit(caller) => {
            crate::telemetry::token_cache_lookup(true);
            return Ok(caller);
        }
        Lookup::Miss { generation } => generation,
    };
    crate::telemetry::token_cache_lookup(false);
    let (caller, expires_at) = look_up(pool, &hex::encode(digest)).await?;
    cache.store(digest, generation, &caller, expires_at, Instant::now());
    Ok(caller)
}

/// The caller of the token whose SHA-256 (hex) is `presented_hash`, and its expiry.
async fn look_up(pool: &PgPool, presented_hash: &str) -> Result<(Caller, Option<DateTime<Utc>>)> {
    // The legacy columns are nullable: a token row without a user matches no user row and is
    // unknown; token_hash is the one the WHERE clause matched.
    let row = sqlx::query!(
        r#"SELECT t.id, t.user_id AS "user_id!", t.token_hash AS "token_hash!", t.active,
                  t.expires_at, t.rate_limit_tier, t.scope AS "scope!: Scope", t.audience,
                  u.status AS user_status, u.tier AS user_tier
             FROM mcp_user_tokens t JOIN users u ON u.user_id = t.user_id
            WHERE t.token_hash = $1
            ORDER BY t.active DESC NULLS LAST LIMIT 1"#,
        presented_hash
    )
    .fetch_optional(pool)
    .await?;
    let Some(row) = row else {
        return Err(Error::Unauthorized(AuthFailure::Unknown));
    };
    // The index lookup already matched; compare again in constant time as defence in depth.
    if !bool::from(row.token_hash.as_bytes().ct_eq(presented_hash.as_bytes())) {
        return Err(Error::Unauthorized(AuthFailure::Unknown));
    }
    if row.active != Some(true) {
        return Err(Error::Unauthorized(AuthFailure::Revoked));
    }
    if row.expires_at.is_some_and(|at| at <= Utc::now()) {
        return Err(Error::Unauthorized(AuthFailure::Expired));
    }
    account_status(row.user_status.as_deref())?;
    let caller = Caller {
        user_id: row.user_id,
        token_id: row.id,
        rate_limit_tier: row.rate_limit_tier,
        user_tier: row.user_tier,
        scope: row.scope,
        audience: row.audience,
        via: Via::Token,
    };
    Ok((caller, row.expires_at))
}

/// `users.status`: `active` passes; so does no status at all (legacy rows that predate the
/// column's use; polydev always writes `active`). `deleted` is told apart; any other value
/// (`suspended`, `banned`, ...) is a suspension.
pub(super) fn account_status(status: Option<&str>) -> Result<()> {
    match status.map(str::trim) {
        None => Ok(()),
        Some(s) if s.eq_ignore_ascii_case("active") => Ok(()),
        Some(s) if s.eq_ignore_ascii_case("deleted") => {
            Err(Error::Unauthorized(AuthFailure::AccountDeleted))
        }
        Some(_) => Err(Error::Unauthorized(AuthFailure::AccountSuspended)),
    }
}

fn parse_bearer(header: Option<&str>) -> Result<&str> {
    let value = header.ok_or(Error::Unauthorized(AuthFailure::Missing))?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .ok_or(Error::Unauthorized(AuthFailure::Malformed))?
        .trim();
    let well_formed = token.len() == TOKEN_LEN
        && token.starts_with(PREFIX)
        && token[PREFIX.len()..].bytes().all(|b| b.is_ascii_hexdigit());
    if well_formed {
        Ok(token)
    } else {
        Err(Error::Unauthorized(AuthFailure::Malformed))
    }
}

pub(super) fn generate() -> String {
    let mut secret = [0u8; SECRET_BYTES];
    getrandom::fill(&mut secret).expect("the operating system's random source failed");
    format!("{PREFIX}{}", hex::encode(secret))
}

pub(super) fn hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Keeps the legacy `profiles.api_keys_count` equal to the user's active tokens.
pub(super) async fn refresh_key_count(conn: &mut sqlx::PgConnection, user_id: Uuid) -> Result<()> {
    sqlx::query!(
        "UPDATE profiles SET api_keys_count =
            (SELECT count(*) FROM mcp_user_tokens WHERE user_id = $1 AND active), updated_at = now()
          WHERE id = $1",
        user_id
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// Keeps `last_used_at` current without a database write per request: at most one write per
/// token per `interval` from this process.
#[derive(Debug)]
pub struct LastUsedTracker {
    interval: Duration,
    last_written: Mutex<HashMap<Uuid, Instant>>,
}

impl LastUsedTracker {
    pub fn new(interval: Duration) -> Self {
        LastUsedTracker {
            interval,
            last_written: Mutex::new(HashMap::new()),
        }
    }

    /// True when the caller should write `last_used_at` for this token now.
    pub fn due(&self, token_id: Uuid, now: Instant) -> bool {
        let mut map = self.last_written.lock().expect("tracker lock poisoned");
        match map.get(&token_id) {
            Some(last) if now.duration_since(*last) < self.interval => false,
            _ => {
                map.insert(token_id, now);
                true
            }
        }
    }

    /// Records a use; writes to the database in the background when due.
    pub fn touch(&self, pool: &PgPool, token_id: Uuid) {
        if !self.due(token_id, Instant::now()) {
            return;
        }
        let pool = pool.clone();
        tokio::spawn(async move {
            let result = sqlx::query!(
                "UPDATE mcp_user_tokens SET last_used_at = now() WHERE id = $1",
                token_id
            )
            .execute(&pool)
            .await;
            if let Err(error) = result {
                tracing::warn!(%token_id, %error, "could not record token use");
            }
        });
    }
}

/// Deactivates every active token of `user_id` (its `pd_` tokens and the OAuth access tokens
/// issued to it) inside the caller's transaction; how many were active.
pub async fn revoke_all_tokens_in(conn: &mut sqlx::PgConnection, user_id: Uuid) -> Result<u64> {
    Ok(sqlx::query!(
        "UPDATE mcp_user_tokens SET active = false, updated_at = now()
          WHERE user_id = $1 AND active IS TRUE",
        user_id
    )
    .execute(conn)
    .await?
    .rows_affected())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_have_the_documented_shape() {
        let token = generate();
        assert_eq!(token.len(), 67);
        assert!(token.starts_with("pd_"));
        assert_eq!(
            parse_bearer(Some(&format!("Bearer {token}"))).unwrap(),
            token
        );
        assert_ne!(generate(), token);
        assert_eq!(hash(&token).len(), 64);
    }

    #[test]
    fn malformed_headers_are_told_apart_from_missing_ones() {
        let failure = |h: Option<&str>| match parse_bearer(h) {
            Err(Error::Unauthorized(f)) => f,
            other => panic!("{other:?}"),
        };
        assert_eq!(failure(None), AuthFailure::Missing);
        for bad in [
            "Basic abc",
            "Bearer ",
            "Bearer sk_0000",
            &format!("Bearer pd_{}", "g".repeat(64)),
            &format!("Bearer pd_{}", "a".repeat(63)),
        ] {
            assert_eq!(failure(Some(bad)), AuthFailure::Malformed, "{bad}");
        }
    }

    #[test]
    fn only_active_accounts_pass() {
        let failure = |s: Option<&str>| match account_status(s) {
            Ok(()) => None,
            Err(Error::Unauthorized(f)) => Some(f),
            Err(other) => panic!("{other:?}"),
        };
        assert_eq!(failure(Some("active")), None);
        assert_eq!(failure(Some(" Active ")), None);
        assert_eq!(failure(None), None, "legacy rows without a status");
        assert_eq!(
            failure(Some("suspended")),
            Some(AuthFailure::AccountSuspended)
        );
        assert_eq!(failure(Some("banned")), Some(AuthFailure::AccountSuspended));
        assert_eq!(failure(Some("")), Some(AuthFailure::AccountSuspended));
        assert_eq!(failure(Some("deleted")), Some(AuthFailure::AccountDeleted));
    }

    #[test]
    fn last_used_is_written_at_most_once_per_interval() {
        let tracker = LastUsedTracker::new(Duration::from_secs(60));
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let t0 = Instant::now();
        assert!(tracker.due(a, t0));
        assert!(!tracker.due(a, t0 + Duration::from_secs(59)));
        assert!(tracker.due(b, t0 + Duration::from_secs(1)));
        assert!(tracker.due(a, t0 + Duration::from_secs(60)));
    }
}
