//! The device authorization grant (RFC 8628), for `polydev login`: the CLI gets a device code
//! and a short user code; the person signs in in a browser, types the user code and approves
//! or denies; the CLI polls the token endpoint (no faster than the interval, or `slow_down`).

use chrono::Utc;
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use super::clients::{Client, GRANT_DEVICE_CODE, clip};
use super::flow::{TokenResponse, access_lifetime, check_resource, issue, upsert_grant};
use super::{Config, Scopes, hash_secret, random_hex};
use crate::error::{Error, OAuthCode, Result};

pub const DEVICE_CODE_LIFETIME_SECS: i64 = 600;
pub const POLL_INTERVAL_SECS: i32 = 5;
/// Consonants only (RFC 8628 §6.1): no vowels, so no words; no look-alike characters.
const USER_CODE_ALPHABET: &[u8] = b"BCDFGHJKLMNPQRSTVWXZ";

#[derive(Debug, Clone, Serialize)]
pub struct DeviceAuthorization {
    pub device_code: String,
    pub user_code: String,
    pub verification_uri: String,
    pub verification_uri_complete: String,
    pub expires_in: i64,
    pub interval: i32,
}

fn user_code() -> String {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).expect("random");
    // 256 is not a multiple of 20: reject the top values to stay uniform.
    let mut out = String::with_capacity(8);
    let mut i = 0;
    while out.len() < 8 {
        if i == bytes.len() {
            getrandom::fill(&mut bytes).expect("random");
            i = 0;
        }
        let b = bytes[i];
        i += 1;
        if b < 240 {
            out.push(USER_CODE_ALPHABET[(b % 20) as usize] as char);
        }
    }
    out
}

/// `abcd-efgh`, `ABCDEFGH`, ` abcd efgh ` → `ABCDEFGH`.
pub fn normalize_user_code(code: &str) -> String {
    code.chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(16)
        .collect::<String>()
        .to_ascii_uppercase()
}

/// `ABCDEFGH` → `ABCD-EFGH` (how it is shown).
pub fn display_user_code(code: &str) -> String {
    if code.len() == 8 {
        format!("{}-{}", &code[..4], &code[4..])
    } else {
        code.to_string()
    }
}

/// Starts a device authorization for `client`.
pub async fn start(
    pool: &PgPool,
    config: &Config,
    client: &Client,
    scope: Option<&str>,
    resource: Option<&str>,
) -> Result<DeviceAuthorization> {
    if !client.allows_grant(GRANT_DEVICE_CODE) {
        return Err(Error::oauth(
            OAuthCode::UnauthorizedClient,
            format!("this client did not register the {GRANT_DEVICE_CODE} grant"),
        ));
    }
    let scopes = Scopes::parse(scope)?;
    let resource = check_resource(config, resource)?;
    let device_code = random_hex(32);
    // A user code is unique among live ones; a clash (1 in 2.5e10) just tries again.
    for _ in 0..5 {
        let code = user_code();
        let inserted = sqlx::query!(
            "INSERT INTO oauth_device_codes (device_code_hash, user_code, client_id, scope, resource,
                                             interval_secs, expires_at)
             VALUES ($1, $2, $3, $4, $5, $6, now() + make_interval(secs => $7))
             ON CONFLICT (user_code) DO NOTHING",
            hash_secret(&device_code),
            &code,
            &client.client_id,
            scopes.to_string(),
            &resource,
            POLL_INTERVAL_SECS,
            DEVICE_CODE_LIFETIME_SECS as f64
        )
        .execute(pool)
        .await?;
        if inserted.rows_affected() == 1 {
            let shown = display_user_code(&code);
            return Ok(DeviceAuthorization {
                device_code,
                verification_uri: format!("{}/device", config.issuer),
                verification_uri_complete: format!("{}/device?user_code={shown}", config.issuer),
                user_code: shown,
                expires_in: DEVICE_CODE_LIFETIME_SECS,
                interval: POLL_INTERVAL_SECS,
            });
        }
    }
    Err(Error::internal("no free device user code after 5 tries"))
}

/// A pending request as the approval page shows it.
#[derive(Debug, Clone)]
pub struct PendingDevice {
    pub user_code: String,
    pub client: Client,
    pub scope: String,
}

fn unknown_code() -> Error {
    Error::Invalid(
        "this code is not valid: it was mistyped, has expired or was already used; run `polydev login` again"
            .into(),
    )
}

/// The pending, unexpired request of `user_code`.
pub async fn find_pending(
    pool: &PgPool,
    config: &Config,
    user_code: &str,
) -> Result<PendingDevice> {
    let code = normalize_user_code(user_code);
    let row = sqlx::query!(
        "SELECT client_id, scope FROM oauth_device_codes
          WHERE user_code = $1 AND status = 'pending' AND expires_at > now()",
        &code
    )
    .fetch_optional(pool)
    .await?
    .ok_or_else(unknown_code)?;
    let client = super::find_or_fetch_client(pool, config, &row.client_id)
        .await?
        .ok_or_else(unknown_code)?;
    Ok(PendingDevice {
        user_code: display_user_code(&code),
        client,
        scope: row.scope,
    })
}

/// The signed-in user approves or denies the request of `user_code`.
pub async fn decide(pool: &PgPool, user_id: Uuid, user_code: &str, approve: bool) -> Result<()> {
    let code = normalize_user_code(user_code);
    let done = sqlx::query!(
        "UPDATE oauth_device_codes SET status = $3, user_id = $2
          WHERE user_code = $1 AND status = 'pending' AND expires_at > now()",
        &code,
        user_id,
        if approve { "approved" } else { "denied" }
    )
    .execute(pool)
    .await?;
    if done.rows_affected() == 0 {
        return Err(unknown_code());
    }
    tracing::info!(%user_id, approve, "device authorization decided");
    Ok(())
}

/// The token endpoint's device_code grant.
pub async fn poll(pool: &PgPool, client: &Client, device_code: &str) -> Result<TokenResponse> {
    if !client.allows_grant(GRANT_DEVICE_CODE) {
        return Err(Error::oauth(
            OAuthCode::UnauthorizedClient,
            format!("this client did not register the {GRANT_DEVICE_CODE} grant"),
        ));
    }
    let invalid = || Error::oauth(OAuthCode::InvalidGrant, "the device code is not valid");
    if device_code.len() > 200 {
        return Err(invalid());
    }
    let mut tx = pool.begin().await?;
    let row = sqlx::query!(
        "SELECT client_id, scope, resource, status, user_id, interval_secs, last_polled_at,
                expires_at, now() AS \"now!\"
           FROM oauth_device_codes WHERE device_code_hash = $1 FOR UPDATE",
        hash_secret(device_code)
    )
    .fetch_optional(&mut *tx)
    .await?
    .ok_or_else(invalid)?;
    if row.client_id != client.client_id {
        return Err(invalid());
    }
    if row.status == "used" {
        return Err(Error::oauth(
            OAuthCode::InvalidGrant,
            "the device code was already used",
        ));
    }
    if row.expires_at <= Utc::now() {
        return Err(Error::oauth(
            OAuthCode::ExpiredToken,
            "the device code has expired: run `polydev login` again",
        ));
    }
    // Polling faster than the interval: slow down, and the interval grows by 5 s (§3.5).
    let too_fast = row
        .last_polled_at
        .is_some_and(|at| (row.now - at).num_milliseconds() < i64::from(row.interval_secs) * 1000);
    let interval = if too_fast {
        row.interval_secs + 5
    } else {
        row.interval_secs
    };
    sqlx::query!(
        "UPDATE oauth_device_codes SET last_polled_at = now(), interval_secs = $2
          WHERE device_code_hash = $1",
        hash_secret(device_code),
        interval
    )
    .execute(&mut *tx)
    .await?;
    if too_fast {
        tx.commit().await?;
        return Err(Error::oauth(
            OAuthCode::SlowDown,
            format!("polling too fast: wait {interval} s between requests"),
        ));
    }
    match (row.status.as_str(), row.user_id) {
        ("pending", _) => {
            tx.commit().await?;
            Err(Error::oauth(
                OAuthCode::AuthorizationPending,
                "waiting for the user to approve in the browser",
            ))
        }
        ("denied", _) => {
            sqlx::query!(
                "UPDATE oauth_device_codes SET status = 'used' WHERE device_code_hash = $1",
                hash_secret(device_code)
            )
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Err(Error::oauth(
                OAuthCode::AccessDenied,
                "the user denied the request",
            ))
        }
        ("approved", Some(user_id)) => {
            sqlx::query!(
                "UPDATE oauth_device_codes SET status = 'used' WHERE device_code_hash = $1",
                hash_secret(device_code)
            )
            .execute(&mut *tx)
            .await?;
            let scopes = Scopes::parse(Some(&row.scope))?;
            let grant_id =
                upsert_grant(&mut tx, user_id, &client.client_id, scopes, &row.resource).await?;
            let response = issue(
                &mut tx,
                client,
                user_id,
                grant_id,
                Uuid::new_v4(),
                scopes,
                &row.resource,
                access_lifetime(client),
            )
            .await?;
            tx.commit().await?;
            tracing::info!(%user_id, client_id = %client.client_id, "device grant: tokens issued");
            Ok(response)
        }
        (other, _) => Err(Error::internal(format!(
            "device code in state `{}`",
            clip(other)
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_codes_are_short_consonants_and_normalize() {
        let code = user_code();
        assert_eq!(code.len(), 8);
        assert!(code.bytes().all(|b| USER_CODE_ALPHABET.contains(&b)));
        let shown = display_user_code(&code);
        assert_eq!(normalize_user_code(&shown.to_lowercase()), code);
        assert_eq!(normalize_user_code(" bcdf-ghjk "), "BCDFGHJK");
    }
}
