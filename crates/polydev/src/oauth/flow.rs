//! The authorization code grant with PKCE (S256 only), consent grants, refresh-token rotation
//! with family revocation, and revocation (RFC 7009).

use base64::Engine;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::{PgConnection, PgPool};
use subtle::ConstantTimeEq;
use uuid::Uuid;

use super::clients::{Client, GRANT_AUTHORIZATION_CODE, GRANT_REFRESH_TOKEN, clip};
use super::{Config, Scopes, hash_secret, random_hex};
use crate::accounts;
use crate::error::{Error, OAuthCode, Result};

pub const CODE_LIFETIME_SECS: i64 = 120;
pub const ACCESS_TOKEN_LIFETIME_SECS: i64 = 3600;
/// Access tokens of clients registered for the device grant (command-line tools such as
/// `polydev login`): a stdio bridge holds one connection for a whole IDE session.
pub const DEVICE_ACCESS_TOKEN_LIFETIME_SECS: i64 = 30 * 86_400;
pub const REFRESH_TOKEN_LIFETIME_DAYS: i64 = 30;
pub const MAX_STATE_LEN: usize = 1000;

/// The parameters of an authorization request, as received.
#[derive(Debug, Clone, Default, serde::Deserialize, Serialize)]
pub struct AuthorizationParams {
    pub response_type: Option<String>,
    pub client_id: Option<String>,
    pub redirect_uri: Option<String>,
    pub scope: Option<String>,
    pub state: Option<String>,
    pub code_challenge: Option<String>,
    pub code_challenge_method: Option<String>,
    pub resource: Option<String>,
    pub prompt: Option<String>,
}

/// A checked authorization request.
#[derive(Debug, Clone)]
pub struct AuthorizationRequest {
    pub client: Client,
    pub redirect_uri: String,
    pub state: Option<String>,
    pub code_challenge: String,
    pub scopes: Scopes,
    pub resource: String,
}

/// Why an authorization request failed: before the client and redirect URI are known good, an
/// error page (never a redirect: no open redirector); after, a redirect with the error.
#[derive(Debug)]
pub enum AuthorizeError {
    Page(Error),
    Redirect {
        redirect_uri: String,
        state: Option<String>,
        error: Error,
    },
}

impl From<Error> for AuthorizeError {
    fn from(error: Error) -> Self {
        AuthorizeError::Page(error)
    }
}

fn req_error(description: impl Into<String>) -> Error {
    Error::oauth(OAuthCode::InvalidRequest, description)
}

/// Checks the resource indicator (RFC 8707): absent means this server's MCP endpoint.
pub fn check_resource(config: &Config, resource: Option<&str>) -> Result<String> {
    match resource {
        None | Some("") => Ok(config.resource()),
        Some(r) if config.is_own_resource(r) => Ok(config.resource()),
        Some(r) => Err(Error::oauth(
            OAuthCode::InvalidTarget,
            format!(
                "this server issues tokens for `{}` only, not for `{}`",
                config.resource(),
                clip(r)
            ),
        )),
    }
}

pub async fn check_authorization(
    pool: &PgPool,
    config: &Config,
    params: &AuthorizationParams,
) -> Result<AuthorizationRequest, AuthorizeError> {
    let client_id = params
        .client_id
        .as_deref()
        .ok_or_else(|| req_error("`client_id` is missing"))?;
    let client = super::find_or_fetch_client(pool, config, client_id)
        .await?
        .ok_or_else(|| {
            Error::oauth(
                OAuthCode::InvalidClient,
                format!("the client `{}` is not registered here", clip(client_id)),
            )
        })?;
    let redirect_uri = match params.redirect_uri.as_deref() {
        Some(uri) => uri.to_string(),
        // RFC 6749 §3.1.2.3: may be left out when exactly one is registered.
        None if client.metadata.redirect_uris.len() == 1 => {
            client.metadata.redirect_uris[0].clone()
        }
        None => return Err(req_error("`redirect_uri` is missing").into()),
    };
    if !client.redirect_matches(&redirect_uri) {
        return Err(Error::oauth(
            OAuthCode::InvalidRequest,
            format!(
                "the redirect URI `{}` is not one registered for this client",
                clip(&redirect_uri)
            ),
        )
        .into());
    }
    let state = params.state.clone();
    let redirect = |error: Error| AuthorizeError::Redirect {
        redirect_uri: redirect_uri.clone(),
        state: state.clone(),
        error,
    };
    if state.as_ref().is_some_and(|s| s.len() > MAX_STATE_LEN) {
        return Err(redirect(req_error(format!(
            "`state` may be at most {MAX_STATE_LEN} characters"
        ))));
    }
    if params.response_type.as_deref() != Some("code") {
        return Err(redirect(Error::oauth(
            OAuthCode::UnsupportedResponseType,
            "only `response_type=code` is supported",
        )));
    }
    if !client.allows_grant(GRANT_AUTHORIZATION_CODE) {
        return Err(redirect(Error::oauth(
            OAuthCode::UnauthorizedClient,
            "this client did not register the authorization_code grant",
        )));
    }
    match params.code_challenge_method.as_deref() {
        Some("S256") => {}
        Some("plain") => {
            return Err(redirect(req_error(
                "PKCE `plain` is not accepted: use `code_challenge_method=S256`",
            )));
        }
        _ => {
            return Err(redirect(req_error(
                "PKCE is required: send `code_challenge` with `code_challenge_method=S256`",
            )));
        }
    }
    let code_challenge = params.code_challenge.clone().unwrap_or_default();
    let well_formed = code_challenge.len() == 43
        && code_challenge
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !well_formed {
        return Err(redirect(req_error(
            "`code_challenge` must be the base64url SHA-256 of the verifier (43 characters)",
        )));
    }
    let scopes = Scopes::parse(params.scope.as_deref()).map_err(redirect)?;
    let resource = check_resource(config, params.resource.as_deref()).map_err(redirect)?;
    Ok(AuthorizationRequest {
        client,
        redirect_uri,
        state,
        code_challenge,
        scopes,
        resource,
    })
}

/// A user's consent to a client ("connected app").
#[derive(Debug, Clone, Serialize)]
pub struct Grant {
    pub id: Uuid,
    pub client_id: String,
    pub client_name: Option<String>,
    pub scope: String,
    pub resource: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// The remembered consent of `user_id` to this request's client and resource, if any.
pub async fn remembered_grant(
    pool: &PgPool,
    user_id: Uuid,
    request: &AuthorizationRequest,
) -> Result<Option<Grant>> {
    Ok(sqlx::query_as!(
        Grant,
        r#"SELECT g.id, g.client_id, c.client_name AS "client_name?", g.scope, g.resource,
                  g.created_at, g.updated_at
             FROM oauth_grants g LEFT JOIN mcp_registered_clients c ON c.client_id = g.client_id
            WHERE g.user_id = $1 AND g.client_id = $2 AND g.resource = $3 AND g.revoked_at IS NULL
            ORDER BY g.created_at DESC LIMIT 1"#,
        user_id,
        &request.client.client_id,
        &request.resource
    )
    .fetch_optional(pool)
    .await?)
}

/// The user consented (with `granted` scopes, at most those asked): records or updates the
/// grant and issues a single-use code.
pub async fn approve(
    pool: &PgPool,
    user_id: Uuid,
    request: &AuthorizationRequest,
    granted: Scopes,
) -> Result<String> {
    let mut tx = pool.begin().await?;
    let grant_id = upsert_grant(
        &mut tx,
        user_id,
        &request.client.client_id,
        granted,
        &request.resource,
    )
    .await?;
    let code = random_hex(32);
    sqlx::query!(
        "INSERT INTO oauth_codes (code_hash, grant_id, family_id, client_id, user_id, redirect_uri,
                                  code_challenge, scope, resource, expires_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, now() + make_interval(secs => $10))",
        hash_secret(&code),
        grant_id,
        Uuid::new_v4(),
        &request.client.client_id,
        user_id,
        &request.redirect_uri,
        &request.code_challenge,
        granted.to_string(),
        &request.resource,
        CODE_LIFETIME_SECS as f64
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    tracing::info!(%user_id, client_id = %request.client.client_id, scope = %granted, "authorization code issued");
    Ok(code)
}

/// Records consent of `user_id` to `client_id` for `resource` with `granted` (one live grant
/// per user, client and resource; a new consent updates its scope).
pub(super) async fn upsert_grant(
    conn: &mut PgConnection,
    user_id: Uuid,
    client_id: &str,
    granted: Scopes,
    resource: &str,
) -> Result<Uuid> {
    let existing = sqlx::query_scalar!(
        "SELECT id FROM oauth_grants
          WHERE user_id = $1 AND client_id = $2 AND resource = $3 AND revoked_at IS NULL
          ORDER BY created_at DESC LIMIT 1 FOR UPDATE",
        user_id,
        client_id,
        resource
    )
    .fetch_optional(&mut *conn)
    .await?;
    Ok(match existing {
        Some(id) => {
            sqlx::query!(
                "UPDATE oauth_grants SET scope = $2, updated_at = now() WHERE id = $1",
                id,
                granted.to_string()
            )
            .execute(&mut *conn)
            .await?;
            id
        }
        None => {
            sqlx::query_scalar!(
                "INSERT INTO oauth_grants (user_id, client_id, scope, resource)
                 VALUES ($1, $2, $3, $4) RETURNING id",
                user_id,
                client_id,
                granted.to_string(),
                resource
            )
            .fetch_one(&mut *conn)
            .await?
        }
    })
}

/// How long the access tokens of `client` live.
pub fn access_lifetime(client: &Client) -> i64 {
    if client.allows_grant(super::clients::GRANT_DEVICE_CODE) {
        DEVICE_ACCESS_TOKEN_LIFETIME_SECS
    } else {
        ACCESS_TOKEN_LIFETIME_SECS
    }
}

/// A token response (RFC 6749 §5.1).
#[derive(Debug, Clone, Serialize)]
pub struct TokenResponse {
    pub access_token: String,
    pub token_type: &'static str,
    pub expires_in: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<String>,
    pub scope: String,
}

fn invalid_grant(description: impl Into<String>) -> Error {
    Error::oauth(OAuthCode::InvalidGrant, description)
}

/// `base64url(SHA-256(verifier)) == challenge`, with a verifier of 43 to 128 unreserved
/// characters (RFC 7636 §4.1).
pub fn pkce_matches(verifier: &str, challenge: &str) -> bool {
    let well_formed = (43..=128).contains(&verifier.len())
        && verifier
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b));
    if !well_formed {
        return false;
    }
    let computed = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(Sha256::digest(verifier.as_bytes()));
    bool::from(computed.as_bytes().ct_eq(challenge.as_bytes()))
}

/// Issues an access token (and a refresh token when the client may refresh) in a family.
#[allow(clippy::too_many_arguments)]
pub(super) async fn issue(
    conn: &mut PgConnection,
    client: &Client,
    user_id: Uuid,
    grant_id: Uuid,
    family_id: Uuid,
    scopes: Scopes,
    resource: &str,
    lifetime_secs: i64,
) -> Result<TokenResponse> {
    let access = accounts::issue_oauth_access_token(
        conn,
        user_id,
        &format!("OAuth: {}", client.name()),
        scopes.token_scope(),
        lifetime_secs,
        resource,
        grant_id,
        family_id,
    )
    .await?;
    let refresh_token = if client.allows_grant(GRANT_REFRESH_TOKEN) {
        let token = format!("pdr_{}", random_hex(32));
        sqlx::query!(
            "INSERT INTO oauth_refresh_tokens (token_hash, family_id, grant_id, client_id, user_id,
                                               scope, resource, expires_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, now() + make_interval(days => $8))",
            hash_secret(&token),
            family_id,
            grant_id,
            &client.client_id,
            user_id,
            scopes.to_string(),
            resource,
            REFRESH_TOKEN_LIFETIME_DAYS as i32
        )
        .execute(&mut *conn)
        .await?;
        Some(token)
    } else {
        None
    };
    Ok(TokenResponse {
        access_token: access.token,
        token_type: "Bearer",
        expires_in: lifetime_secs,
        refresh_token,
        scope: scopes.to_string(),
    })
}

/// Revokes one family: its refresh tokens and its access tokens.
async fn revoke_family(conn: &mut PgConnection, grant_id: Uuid, family_id: Uuid) -> Result<()> {
    sqlx::query!(
        "UPDATE oauth_refresh_tokens SET revoked_at = now()
          WHERE family_id = $1 AND revoked_at IS NULL",
        family_id
    )
    .execute(&mut *conn)
    .await?;
    accounts::revoke_oauth_access_tokens(conn, grant_id, Some(family_id)).await?;
    Ok(())
}

/// The grant is live and its user active.
async fn check_grant_live(conn: &mut PgConnection, grant_id: Uuid) -> Result<()> {
    let row = sqlx::query!(
        "SELECT g.revoked_at, u.status FROM oauth_grants g JOIN users u ON u.user_id = g.user_id
          WHERE g.id = $1",
        grant_id
    )
    .fetch_optional(&mut *conn)
    .await?;
    match row {
        Some(row) if row.revoked_at.is_none() => {
            let active = row
                .status
                .as_deref()
                .is_none_or(|s| s.trim().eq_ignore_ascii_case("active"));
            if active {
                Ok(())
            } else {
                Err(invalid_grant("the account is not active"))
            }
        }
        _ => Err(invalid_grant("the user revoked this app's access")),
    }
}

/// The authorization code grant: a code used once, by the client it was issued to, with the
/// same redirect URI and the PKCE verifier. A second use revokes what the first issued.
pub async fn exchange_code(
    pool: &PgPool,
    config: &Config,
    client: &Client,
    code: &str,
    redirect_uri: Option<&str>,
    verifier: Option<&str>,
    resource: Option<&str>,
) -> Result<TokenResponse> {
    if !client.allows_grant(GRANT_AUTHORIZATION_CODE) {
        return Err(Error::oauth(
            OAuthCode::UnauthorizedClient,
            "this client did not register the authorization_code grant",
        ));
    }
    if code.len() > 200 {
        return Err(invalid_grant("the authorization code is not valid"));
    }
    let mut tx = pool.begin().await?;
    let row = sqlx::query!(
        "SELECT grant_id, family_id, client_id, user_id, redirect_uri, code_challenge, scope,
                resource, expires_at, used_at
           FROM oauth_codes WHERE code_hash = $1 FOR UPDATE",
        hash_secret(code)
    )
    .fetch_optional(&mut *tx)
    .await?
    .ok_or_else(|| invalid_grant("the authorization code is not valid"))?;
    if row.used_at.is_some() {
        revoke_family(&mut tx, row.grant_id, row.family_id).await?;
        tx.commit().await?;
        tracing::warn!(client_id = %row.client_id, "authorization code reused: its tokens are revoked");
        return Err(invalid_grant(
            "the authorization code was already used; the tokens it issued are revoked",
        ));
    }
    sqlx::query!(
        "UPDATE oauth_codes SET used_at = now() WHERE code_hash = $1",
        hash_secret(code)
    )
    .execute(&mut *tx)
    .await?;
    // The code is spent whatever happens next.
    let outcome = async {
        if row.expires_at <= Utc::now() {
            return Err(invalid_grant("the authorization code has expired"));
        }
        if row.client_id != client.client_id {
            return Err(invalid_grant(
                "the authorization code was issued to another client",
            ));
        }
        if redirect_uri != Some(row.redirect_uri.as_str()) {
            return Err(invalid_grant(
                "`redirect_uri` must be the one sent in the authorization request",
            ));
        }
        let Some(verifier) = verifier else {
            return Err(Error::oauth(
                OAuthCode::InvalidRequest,
                "`code_verifier` is missing",
            ));
        };
        if !pkce_matches(verifier, &row.code_challenge) {
            return Err(invalid_grant(
                "the PKCE code_verifier does not match the code_challenge",
            ));
        }
        if check_resource(config, resource)? != row.resource {
            return Err(Error::oauth(
                OAuthCode::InvalidTarget,
                "`resource` differs from the authorization request's",
            ));
        }
        Ok(())
    }
    .await;
    if let Err(error) = outcome {
        tx.commit().await?;
        return Err(error);
    }
    check_grant_live(&mut tx, row.grant_id).await?;
    let scopes = Scopes::parse(Some(&row.scope))?;
    let response = issue(
        &mut tx,
        client,
        row.user_id,
        row.grant_id,
        row.family_id,
        scopes,
        &row.resource,
        access_lifetime(client),
    )
    .await?;
    tx.commit().await?;
    tracing::info!(user_id = %row.user_id, client_id = %client.client_id, "OAuth tokens issued");
    Ok(response)
}

/// The refresh token grant: rotates the refresh token. An already rotated (or revoked) one
/// presented again revokes its whole family: someone holds a copy.
pub async fn refresh(
    pool: &PgPool,
    config: &Config,
    client: &Client,
    refresh_token: &str,
    scope: Option<&str>,
    resource: Option<&str>,
) -> Result<TokenResponse> {
    if !client.allows_grant(GRANT_REFRESH_TOKEN) {
        return Err(Error::oauth(
            OAuthCode::UnauthorizedClient,
            "this client did not register the refresh_token grant",
        ));
    }
    if refresh_token.len() > 200 {
        return Err(invalid_grant("the refresh token is not valid"));
    }
    let mut tx = pool.begin().await?;
    let row = sqlx::query!(
        "SELECT id, family_id, grant_id, client_id, user_id, scope, resource, expires_at, used_at,
                revoked_at
           FROM oauth_refresh_tokens WHERE token_hash = $1 FOR UPDATE",
        hash_secret(refresh_token)
    )
    .fetch_optional(&mut *tx)
    .await?
    .ok_or_else(|| invalid_grant("the refresh token is not valid"))?;
    if row.client_id != client.client_id {
        return Err(invalid_grant(
            "the refresh token was issued to another client",
        ));
    }
    if row.used_at.is_some() || row.revoked_at.is_some() {
        let reused = row.used_at.is_some() && row.revoked_at.is_none();
        revoke_family(&mut tx, row.grant_id, row.family_id).await?;
        tx.commit().await?;
        if reused {
            tracing::warn!(client_id = %row.client_id, user_id = %row.user_id,
                "a rotated refresh token was reused: its family is revoked");
            return Err(invalid_grant(
                "this refresh token was already used; every token of its family is now revoked: authorize again",
            ));
        }
        return Err(invalid_grant("the refresh token has been revoked"));
    }
    if row.expires_at <= Utc::now() {
        return Err(invalid_grant(
            "the refresh token has expired: authorize again",
        ));
    }
    if check_resource(config, resource)? != row.resource {
        return Err(Error::oauth(
            OAuthCode::InvalidTarget,
            "`resource` differs from the grant's",
        ));
    }
    let held = Scopes::parse(Some(&row.scope))?;
    let scopes = match scope {
        None | Some("") => held,
        Some(asked) => {
            let asked = Scopes::parse(Some(asked))?;
            if !held.contains(asked) {
                return Err(Error::oauth(
                    OAuthCode::InvalidScope,
                    format!("the grant holds `{held}`; a refresh cannot widen it to `{asked}`"),
                ));
            }
            asked
        }
    };
    check_grant_live(&mut tx, row.grant_id).await?;
    sqlx::query!(
        "UPDATE oauth_refresh_tokens SET used_at = now() WHERE id = $1",
        row.id
    )
    .execute(&mut *tx)
    .await?;
    let response = issue(
        &mut tx,
        client,
        row.user_id,
        row.grant_id,
        row.family_id,
        scopes,
        &row.resource,
        access_lifetime(client),
    )
    .await?;
    tx.commit().await?;
    Ok(response)
}

/// RFC 7009: revokes a refresh token (with its family) or an access token, if it is the
/// client's. Unknown tokens and other clients' tokens are not an error (and change nothing).
pub async fn revoke(pool: &PgPool, client: &Client, token: &str) -> Result<()> {
    if token.len() > 200 {
        return Ok(());
    }
    let mut tx = pool.begin().await?;
    let refresh = sqlx::query!(
        "SELECT grant_id, family_id, client_id FROM oauth_refresh_tokens WHERE token_hash = $1",
        hash_secret(token)
    )
    .fetch_optional(&mut *tx)
    .await?;
    if let Some(row) = refresh {
        if row.client_id == client.client_id {
            revoke_family(&mut tx, row.grant_id, row.family_id).await?;
            tracing::info!(client_id = %client.client_id, "refresh token revoked with its family");
        }
    } else if let Some((token_id, grant_id)) =
        accounts::oauth_access_token_grant(&mut tx, token).await?
    {
        let owner =
            sqlx::query_scalar!("SELECT client_id FROM oauth_grants WHERE id = $1", grant_id)
                .fetch_optional(&mut *tx)
                .await?;
        if owner.as_deref() == Some(client.client_id.as_str()) {
            accounts::deactivate_token(&mut tx, token_id).await?;
            tracing::info!(client_id = %client.client_id, "access token revoked");
        }
    }
    tx.commit().await?;
    Ok(())
}

/// The user's live grants ("connected apps").
pub async fn list_grants(pool: &PgPool, user_id: Uuid) -> Result<Vec<Grant>> {
    Ok(sqlx::query_as!(
        Grant,
        r#"SELECT g.id, g.client_id, c.client_name AS "client_name?", g.scope, g.resource,
                  g.created_at, g.updated_at
             FROM oauth_grants g LEFT JOIN mcp_registered_clients c ON c.client_id = g.client_id
            WHERE g.user_id = $1 AND g.revoked_at IS NULL
            ORDER BY g.created_at, g.id"#,
        user_id
    )
    .fetch_all(pool)
    .await?)
}

/// Revokes a grant of `user_id`: the consent is forgotten, and its refresh and access tokens
/// stop working at once.
pub async fn revoke_grant(pool: &PgPool, user_id: Uuid, grant_id: Uuid) -> Result<()> {
    let mut tx = pool.begin().await?;
    let owned = sqlx::query_scalar!(
        r#"SELECT EXISTS (SELECT 1 FROM oauth_grants WHERE id = $1 AND user_id = $2) AS "owned!""#,
        grant_id,
        user_id
    )
    .fetch_one(&mut *tx)
    .await?;
    if !owned {
        return Err(Error::NotFound("grant"));
    }
    revoke_grant_in(&mut tx, grant_id).await?;
    tx.commit().await?;
    tracing::info!(%user_id, %grant_id, "OAuth grant revoked");
    Ok(())
}

/// Revokes every grant of `user_id` and their refresh tokens inside the caller's transaction
/// (their access tokens are `mcp_user_tokens` rows: `accounts::revoke_all_tokens_in`); how many
/// grants and refresh tokens were live.
pub async fn revoke_all_grants_in(conn: &mut PgConnection, user_id: Uuid) -> Result<(u64, u64)> {
    let grants = sqlx::query!(
        "UPDATE oauth_grants SET revoked_at = now(), updated_at = now()
          WHERE user_id = $1 AND revoked_at IS NULL",
        user_id
    )
    .execute(&mut *conn)
    .await?
    .rows_affected();
    let refresh_tokens = sqlx::query!(
        "UPDATE oauth_refresh_tokens SET revoked_at = now() WHERE user_id = $1 AND revoked_at IS NULL",
        user_id
    )
    .execute(&mut *conn)
    .await?
    .rows_affected();
    Ok((grants, refresh_tokens))
}

pub(super) async fn revoke_grant_in(conn: &mut PgConnection, grant_id: Uuid) -> Result<()> {
    sqlx::query!(
        "UPDATE oauth_grants SET revoked_at = coalesce(revoked_at, now()) WHERE id = $1",
        grant_id
    )
    .execute(&mut *conn)
    .await?;
    sqlx::query!(
        "UPDATE oauth_refresh_tokens SET revoked_at = now() WHERE grant_id = $1 AND revoked_at IS NULL",
        grant_id
    )
    .execute(&mut *conn)
    .await?;
    accounts::revoke_oauth_access_tokens(conn, grant_id, None).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pkce_s256_is_checked() {
        // RFC 7636 appendix B.
        let verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
        let challenge = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM";
        assert!(pkce_matches(verifier, challenge));
        assert!(!pkce_matches(verifier, verifier));
        assert!(!pkce_matches("short", challenge));
        assert!(!pkce_matches(&format!("{verifier}x"), challenge));
    }
}
