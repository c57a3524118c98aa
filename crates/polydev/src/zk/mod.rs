//! Zero-knowledge on the server: it stores key material and envelopes it cannot open, and checks
//! that what it stores is well-formed and bound to the caller (`polydev_zk::inspect`).
//! Tables: `users` (zero_knowledge_enabled, key_derivation_salt, encrypted_master_key_hint,
//! zk_password_wrapped_key, zk_recovery_wrapped_key).

/// The same definition as the clients' (the CLI here, the browser through WASM).
pub use polydev_zk::KeyMaterial;
use polydev_zk::{Header, KdfParams, Kind, inspect};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use uuid::Uuid;

use crate::error::{Error, Result};

/// The namespace of chat message envelopes.
pub const CHAT_MESSAGE: &str = "chat.message";
/// The namespace of the (optional) encrypted password hint.
pub const PASSWORD_HINT: &str = "user.password_hint";
/// Largest envelope the server accepts for a chat message (a 100,000-character message padded
/// to its bucket, base64url-encoded, with headers).
pub const MAX_MESSAGE_ENVELOPE: usize = 1024 * 1024;
const MAX_KEY_ENVELOPE: usize = 4096;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ZkStatus {
    pub enabled: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub material: Option<KeyMaterial>,
}

/// What `encryption_metadata_v2` records next to an envelope (the envelope describes itself;
/// this is for operators and old tools).
pub fn envelope_metadata() -> serde_json::Value {
    serde_json::json!({ "format": "pdz", "version": 1, "client_side": true })
}

/// Checks an envelope's header without a key: its kind, user binding and size, and for items
/// the namespace and row.
pub fn check_envelope(
    text: &str,
    kind: Kind,
    user_id: Uuid,
    namespace: Option<&str>,
    row_id: Option<&str>,
    max_len: usize,
) -> Result<Header> {
    if text.len() > max_len {
        return Err(Error::TooLarge(format!(
            "an envelope may be at most {max_len} bytes"
        )));
    }
    let header = inspect(text).map_err(|e| Error::Invalid(format!("not a valid envelope: {e}")))?;
    if header.kind != kind {
        return Err(Error::Invalid(format!(
            "expected a {kind:?} envelope, got {:?}",
            header.kind
        )));
    }
    if header.user_id != user_id.to_string() {
        return Err(Error::Invalid(
            "the envelope is bound to another user".into(),
        ));
    }
    if namespace.is_some() && header.namespace.as_deref() != namespace {
        return Err(Error::Invalid(format!(
            "the envelope's namespace must be {}",
            namespace.unwrap_or_default()
        )));
    }
    if row_id.is_some() && header.row_id.as_deref() != row_id {
        return Err(Error::Invalid(
            "the envelope is bound to another row".into(),
        ));
    }
    Ok(header)
}

/// The password envelope's salt, after checking it and its KDF parameters meet the floors.
fn check_material(material: &KeyMaterial, user_id: Uuid) -> Result<String> {
    let header = check_envelope(
        &material.password_wrapped,
        Kind::PasswordWrappedKey,
        user_id,
        None,
        None,
        MAX_KEY_ENVELOPE,
    )?;
    check_envelope(
        &material.recovery_wrapped,
        Kind::RecoveryWrappedKey,
        user_id,
        None,
        None,
        MAX_KEY_ENVELOPE,
    )?;
    if let Some(hint) = &material.password_hint {
        check_envelope(
            hint,
            Kind::Item,
            user_id,
            Some(PASSWORD_HINT),
            Some(&user_id.to_string()),
            MAX_KEY_ENVELOPE,
        )?;
    }
    header
        .kdf
        .unwrap_or(KdfParams {
            memory_kib: 0,
            iterations: 0,
            parallelism: 0,
        })
        .check()
        .map_err(|e| Error::Invalid(e.to_string()))?;
    header
        .salt_hex
        .ok_or_else(|| Error::Invalid("the password envelope has no salt".into()))
}

pub async fn status(pool: &PgPool, user_id: Uuid) -> Result<ZkStatus> {
    let row = sqlx::query!(
        "SELECT zero_knowledge_enabled, zk_password_wrapped_key, zk_recovery_wrapped_key, encrypted_master_key_hint
           FROM users WHERE user_id = $1",
        user_id
    )
    .fetch_optional(pool)
    .await?
    .ok_or(Error::NotFound("user"))?;
    let material = match (row.zk_password_wrapped_key, row.zk_recovery_wrapped_key) {
        (Some(password_wrapped), Some(recovery_wrapped)) => Some(KeyMaterial {
            password_wrapped,
            recovery_wrapped,
            password_hint: row.encrypted_master_key_hint,
        }),
        _ => None,
    };
    Ok(ZkStatus {
        enabled: row.zero_knowledge_enabled.unwrap_or(false),
        material,
    })
}

pub async fn is_enabled(pool: &PgPool, user_id: Uuid) -> Result<bool> {
    let enabled = sqlx::query_scalar!(
        "SELECT zero_knowledge_enabled FROM users WHERE user_id = $1",
        user_id
    )
    .fetch_optional(pool)
    .await?;
    Ok(enabled.flatten().unwrap_or(false))
}

/// `is_enabled` inside a transaction, holding a share lock on the user's row until it ends:
/// a write that depends on the answer cannot race past a concurrent `enable`.
pub async fn is_enabled_locked(conn: &mut sqlx::PgConnection, user_id: Uuid) -> Result<bool> {
    let enabled = sqlx::query_scalar!(
        "SELECT zero_knowledge_enabled FROM users WHERE user_id = $1 FOR SHARE",
        user_id
    )
    .fetch_optional(conn)
    .await?;
    Ok(enabled.flatten().unwrap_or(false))
}

/// Turns zero-knowledge on for `user_id` with key material made by the client.
pub async fn enable(pool: &PgPool, user_id: Uuid, material: &KeyMaterial) -> Result<()> {
    let salt = check_material(material, user_id)?;
    let updated = sqlx::query!(
        "UPDATE users SET zero_knowledge_enabled = true, zk_password_wrapped_key = $2,
                zk_recovery_wrapped_key = $3, encrypted_master_key_hint = $4,
                key_derivation_salt = $5, updated_at = now()
          WHERE user_id = $1 AND NOT coalesce(zero_knowledge_enabled, false)",
        user_id,
        &material.password_wrapped,
        &material.recovery_wrapped,
        material.password_hint.as_deref(),
        salt
    )
    .execute(pool)
    .await?;
    if updated.rows_affected() == 0 {
        return Err(Error::Conflict(
            "zero-knowledge is already enabled for this account".into(),
        ));
    }
    tracing::info!(%user_id, "zero-knowledge enabled");
    Ok(())
}

/// Replaces the password envelope (a password change: the client re-wrapped the account key).
/// `previous` must be the stored envelope, so concurrent changes cannot overwrite each other.
pub async fn replace_password_envelope(
    pool: &PgPool,
    user_id: Uuid,
    previous: &str,
    material: &KeyMaterial,
) -> Result<()> {
    let salt = check_material(material, user_id)?;
    let updated = sqlx::query!(
        "UPDATE users SET zk_password_wrapped_key = $3, key_derivation_salt = $4,
                encrypted_master_key_hint = $5, updated_at = now()
          WHERE user_id = $1 AND zero_knowledge_enabled AND zk_password_wrapped_key = $2
            AND zk_recovery_wrapped_key = $6",
        user_id,
        previous,
        &material.password_wrapped,
        salt,
        material.password_hint.as_deref(),
        &material.recovery_wrapped
    )
    .execute(pool)
    .await?;
    ensure_swapped(updated.rows_affected())
}

/// Replaces the recovery envelope (a new recovery key).
pub async fn replace_recovery_envelope(
    pool: &PgPool,
    user_id: Uuid,
    previous: &str,
    material: &KeyMaterial,
) -> Result<()> {
    check_material(material, user_id)?;
    let updated = sqlx::query!(
        "UPDATE users SET zk_recovery_wrapped_key = $3, updated_at = now()
          WHERE user_id = $1 AND zero_knowledge_enabled AND zk_recovery_wrapped_key = $2
            AND zk_password_wrapped_key = $4",
        user_id,
        previous,
        &material.recovery_wrapped,
        &material.password_wrapped
    )
    .execute(pool)
    .await?;
    ensure_swapped(updated.rows_affected())
}

fn ensure_swapped(rows: u64) -> Result<()> {
    if rows == 0 {
        return Err(Error::Conflict(
            "the key material changed since it was read (or zero-knowledge is off): fetch it again"
                .into(),
        ));
    }
    Ok(())
}
