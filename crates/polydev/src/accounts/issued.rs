//! Access tokens issued by the OAuth authorization server (`crate::oauth`): ordinary `pd_`
//! rows in `mcp_user_tokens`, so `/mcp` authenticates them like any token and revoking one
//! takes effect at once on every replica. Each carries its audience (RFC 8707) and the grant
//! and refresh-token family that issued it, so a grant or a family is revoked in one statement.
//! They do not count against the per-user cap of hand-made tokens: there is at most one live
//! access token per family (a refresh deactivates the previous one).

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use super::Scope;
use super::tokens::{generate, hash, refresh_key_count};
use crate::error::{Error, Result};

/// What an OAuth access token is bound to.
#[derive(Debug, Clone)]
pub struct IssuedToken {
    pub token: String,
    pub id: Uuid,
    pub expires_at: DateTime<Utc>,
}

/// Issues an access token of `scope` for `audience`, valid for `lifetime_secs`, and
/// deactivates the earlier tokens of the same family.
#[allow(clippy::too_many_arguments)]
pub async fn issue_oauth_access_token(
    conn: &mut PgConnection,
    user_id: Uuid,
    name: &str,
    scope: Scope,
    lifetime_secs: i64,
    audience: &str,
    grant_id: Uuid,
    family_id: Uuid,
) -> Result<IssuedToken> {
    sqlx::query!(
        "UPDATE mcp_user_tokens SET active = false, updated_at = now()
          WHERE oauth_grant_id = $1 AND oauth_family_id = $2 AND active",
        grant_id,
        family_id
    )
    .execute(&mut *conn)
    .await?;
    let token = generate();
    let name: String = name.chars().take(super::MAX_TOKEN_NAME_LEN).collect();
    let row = sqlx::query!(
        r#"INSERT INTO mcp_user_tokens (user_id, token_name, token_hash, token_preview, active,
                                      rate_limit_tier, expires_at, scope, audience,
                                      oauth_grant_id, oauth_family_id)
           SELECT u.user_id, $2, $3, $4, true, coalesce(u.tier, 'free'),
                  now() + make_interval(secs => $5), $6, $7, $8, $9
             FROM users u WHERE u.user_id = $1
           RETURNING id, expires_at AS "expires_at!""#,
        user_id,
        name,
        hash(&token),
        &token[token.len() - 4..],
        lifetime_secs as f64,
        scope.as_str(),
        audience,
        grant_id,
        family_id
    )
    .fetch_optional(&mut *conn)
    .await?
    .ok_or(Error::NotFound("user"))?;
    refresh_key_count(conn, user_id).await?;
    Ok(IssuedToken {
        token,
        id: row.id,
        expires_at: row.expires_at,
    })
}

/// Deactivates the access tokens of a grant (every family), or of one family of it.
pub async fn revoke_oauth_access_tokens(
    conn: &mut PgConnection,
    grant_id: Uuid,
    family_id: Option<Uuid>,
) -> Result<u64> {
    let done = sqlx::query!(
        "UPDATE mcp_user_tokens SET active = false, updated_at = now()
          WHERE oauth_grant_id = $1 AND ($2::uuid IS NULL OR oauth_family_id = $2) AND active",
        grant_id,
        family_id
    )
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected())
}

/// The grant of the OAuth access token `token` (for RFC 7009 revocation), when it is one.
pub async fn oauth_access_token_grant(
    conn: &mut PgConnection,
    token: &str,
) -> Result<Option<(Uuid, Uuid)>> {
    let row = sqlx::query!(
        r#"SELECT id, oauth_grant_id AS "grant_id!" FROM mcp_user_tokens
            WHERE token_hash = $1 AND oauth_grant_id IS NOT NULL"#,
        hash(token)
    )
    .fetch_optional(&mut *conn)
    .await?;
    Ok(row.map(|r| (r.id, r.grant_id)))
}

/// Deactivates one token by id.
pub async fn deactivate_token(conn: &mut PgConnection, token_id: Uuid) -> Result<()> {
    sqlx::query!(
        "UPDATE mcp_user_tokens SET active = false, updated_at = now() WHERE id = $1",
        token_id
    )
    .execute(conn)
    .await?;
    Ok(())
}
