//! Passkeys (WebAuthn, through `webauthn-rs`): a signed-in user registers one; anyone signs in
//! with one without typing an address (a discoverable credential: the authenticator names the
//! user). Ceremony state lives in `account_webauthn_challenges`, single-use and valid five
//! minutes; credentials in `account_passkeys` (public keys and counters, nothing secret).

use base64::Engine;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;
use webauthn_rs::Webauthn;
use webauthn_rs::prelude::{
    CreationChallengeResponse, DiscoverableAuthentication, DiscoverableKey, Passkey,
    PasskeyRegistration, PublicKeyCredential, RegisterPublicKeyCredential,
    RequestChallengeResponse,
};

use crate::error::{AuthFailure, Error, Result};

pub const CHALLENGE_SECS: i64 = 300;
pub const MAX_PASSKEYS_PER_USER: i64 = 20;
pub const MAX_PASSKEY_NAME: usize = 100;

#[derive(Debug, Clone, Serialize)]
pub struct PasskeyInfo {
    pub id: Uuid,
    pub name: String,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn ceremony_failed(detail: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("the passkey was not accepted: {detail}"))
}

async fn save_state(
    pool: &PgPool,
    user_id: Option<Uuid>,
    kind: &str,
    state: Value,
) -> Result<Uuid> {
    // Old ceremonies go as new ones start.
    sqlx::query!("DELETE FROM account_webauthn_challenges WHERE expires_at < now()")
        .execute(pool)
        .await?;
    Ok(sqlx::query_scalar!(
        "INSERT INTO account_webauthn_challenges (user_id, kind, state, expires_at)
         VALUES ($1, $2, $3, now() + make_interval(secs => $4)) RETURNING id",
        user_id,
        kind,
        state,
        CHALLENGE_SECS as f64
    )
    .fetch_one(pool)
    .await?)
}

/// Takes a ceremony's state once (deleted as it is read).
async fn take_state(pool: &PgPool, id: Uuid, kind: &str, user_id: Option<Uuid>) -> Result<Value> {
    sqlx::query_scalar!(
        "DELETE FROM account_webauthn_challenges
          WHERE id = $1 AND kind = $2 AND expires_at > now()
            AND user_id IS NOT DISTINCT FROM $3
         RETURNING state",
        id,
        kind,
        user_id
    )
    .fetch_optional(pool)
    .await?
    .ok_or_else(|| {
        Error::Invalid("this passkey request has expired or was already used: start again".into())
    })
}

/// Starts registering a passkey for a signed-in user.
pub async fn start_registration(
    pool: &PgPool,
    webauthn: &Webauthn,
    user_id: Uuid,
    email: &str,
) -> Result<(Uuid, CreationChallengeResponse)> {
    let existing = sqlx::query_scalar!(
        "SELECT credential_id FROM account_passkeys WHERE user_id = $1",
        user_id
    )
    .fetch_all(pool)
    .await?;
    if existing.len() as i64 >= MAX_PASSKEYS_PER_USER {
        return Err(Error::Conflict(format!(
            "at most {MAX_PASSKEYS_PER_USER} passkeys per account: remove one first"
        )));
    }
    let exclude = existing
        .iter()
        .filter_map(|id| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(id)
                .ok()
        })
        .collect::<Vec<_>>();
    let (options, state) = webauthn
        .start_passkey_registration(user_id, email, email, Some(exclude))
        .map_err(Error::internal)?;
    let state = serde_json::to_value(&state).map_err(Error::internal)?;
    let id = save_state(pool, Some(user_id), "register", state).await?;
    Ok((id, options))
}

/// Finishes a registration: the passkey is stored under `name`.
pub async fn finish_registration(
    pool: &PgPool,
    webauthn: &Webauthn,
    user_id: Uuid,
    challenge_id: Uuid,
    name: &str,
    credential: &RegisterPublicKeyCredential,
) -> Result<PasskeyInfo> {
    let name = name.trim();
    crate::error::reject_nul("name", name)?;
    let name: String = if name.is_empty() {
        "Passkey".into()
    } else {
        name.chars().take(MAX_PASSKEY_NAME).collect()
    };
    let state = take_state(pool, challenge_id, "register", Some(user_id)).await?;
    let state: PasskeyRegistration = serde_json::from_value(state).map_err(Error::internal)?;
    let passkey = webauthn
        .finish_passkey_registration(credential, &state)
        .map_err(ceremony_failed)?;
    let row = sqlx::query_as!(
        PasskeyInfo,
        "INSERT INTO account_passkeys (user_id, credential_id, passkey, name)
         VALUES ($1, $2, $3, $4) RETURNING id, name, created_at, last_used_at",
        user_id,
        b64(passkey.cred_id().as_ref()),
        serde_json::to_value(&passkey).map_err(Error::internal)?,
        name
    )
    .fetch_one(pool)
    .await?;
    tracing::info!(%user_id, passkey = %row.id, "passkey registered");
    Ok(row)
}

/// Starts a passkey sign-in (no address: the authenticator offers the user's passkeys).
pub async fn start_authentication(
    pool: &PgPool,
    webauthn: &Webauthn,
) -> Result<(Uuid, RequestChallengeResponse)> {
    let (options, state) = webauthn
        .start_discoverable_authentication()
        .map_err(Error::internal)?;
    let state = serde_json::to_value(&state).map_err(Error::internal)?;
    let id = save_state(pool, None, "authenticate", state).await?;
    Ok((id, options))
}

/// Finishes a passkey sign-in: the user it belongs to. Any failure is the same
/// `credentials_invalid`, like a wrong password.
pub async fn finish_authentication(
    pool: &PgPool,
    webauthn: &Webauthn,
    challenge_id: Uuid,
    credential: &PublicKeyCredential,
) -> Result<Uuid> {
    let bad = || Error::Unauthorized(AuthFailure::BadCredentials);
    let state = take_state(pool, challenge_id, "authenticate", None).await?;
    let state: DiscoverableAuthentication =
        serde_json::from_value(state).map_err(Error::internal)?;
    let (user_id, credential_id) = webauthn
        .identify_discoverable_authentication(credential)
        .map_err(|_| bad())?;
    let row = sqlx::query!(
        "SELECT p.id, p.passkey, u.status FROM account_passkeys p JOIN users u ON u.user_id = p.user_id
          WHERE p.credential_id = $1 AND p.user_id = $2",
        b64(credential_id),
        user_id
    )
    .fetch_optional(pool)
    .await?
    .ok_or_else(bad)?;
    let mut passkey: Passkey = serde_json::from_value(row.passkey).map_err(Error::internal)?;
    let result = webauthn
        .finish_discoverable_authentication_v2(credential, state, DiscoverableKey::from(&passkey))
        .map_err(|_| bad())?;
    super::tokens::account_status(row.status.as_deref())?;
    // The signature counter and backup state move forward.
    passkey.update_credential(&result);
    sqlx::query!(
        "UPDATE account_passkeys SET passkey = $2, last_used_at = now() WHERE id = $1",
        row.id,
        serde_json::to_value(&passkey).map_err(Error::internal)?
    )
    .execute(pool)
    .await?;
    tracing::info!(%user_id, passkey = %row.id, "signed in with a passkey");
    Ok(user_id)
}

pub async fn list_passkeys(pool: &PgPool, user_id: Uuid) -> Result<Vec<PasskeyInfo>> {
    Ok(sqlx::query_as!(
        PasskeyInfo,
        "SELECT id, name, created_at, last_used_at FROM account_passkeys
          WHERE user_id = $1 ORDER BY created_at, id",
        user_id
    )
    .fetch_all(pool)
    .await?)
}

pub async fn delete_passkey(pool: &PgPool, user_id: Uuid, id: Uuid) -> Result<()> {
    let done = sqlx::query!(
        "DELETE FROM account_passkeys WHERE id = $1 AND user_id = $2",
        id,
        user_id
    )
    .execute(pool)
    .await?;
    if done.rows_affected() == 0 {
        return Err(Error::NotFound("passkey"));
    }
    Ok(())
}
