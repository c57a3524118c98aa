//! Zero-knowledge on the server: it stores key material and envelopes it cannot open, and checks
//! that what it stores is well-formed and bound to the caller (`polydev_zk::inspect`).
//! Tables: `users` (zero_knowledge_enabled, key_derivation_salt, encrypted_master_key_hint,
//! zk_password_wrapped_key, zk_recovery_wrapped_key, zk_material_version, zk_proof_salt,
//! zk_password_proof_hash, zk_recovery_proof_hash, zk_rotation_wrapped_key) and
//! `zk_manifest_chunks`.
//!
//! Changes that need the owner — a new password or recovery key, a key rotation, clearing
//! plaintext, handing credentials over, writing the manifest — need the client's proof of the
//! master password or of the recovery key ([`Proofs`]): a leaked API token alone cannot make
//! them. The server keeps only a salted SHA-256 of each proof and compares in constant time.

pub mod rotation;

/// The same definition as the clients' (the CLI here, the browser through WASM).
pub use polydev_zk::KeyMaterial;
use polydev_zk::{Header, KdfParams, Kind, ProofKind, inspect};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::{PgConnection, PgPool};
use subtle::ConstantTimeEq;
use uuid::Uuid;

use crate::error::{Error, ProofFailure, Result};

/// The namespace of chat message envelopes.
pub const CHAT_MESSAGE: &str = "chat.message";
/// The namespace of session envelopes (a session's title, or name, description and system
/// prompt), bound to the session id.
pub const CHAT_SESSION: &str = "chat.session";
/// The namespace of the migration manifest's chunks (row: the chunk number).
pub const MANIFEST: &str = "zk.manifest";
/// The namespaces of credentials moved to client-side keys (`crate::vault`).
pub const CREDENTIAL_PROVIDER: &str = "credential.provider";
pub const CREDENTIAL_CLI: &str = "credential.cli";
/// The namespace of the (optional) encrypted password hint.
pub const PASSWORD_HINT: &str = "user.password_hint";
/// Largest envelope the server accepts for a chat message (a 100,000-character message padded
/// to its bucket, base64url-encoded, with headers).
pub const MAX_MESSAGE_ENVELOPE: usize = 1024 * 1024;
/// Largest session envelope (a title, a description and a system prompt).
pub const MAX_SESSION_ENVELOPE: usize = 256 * 1024;
/// Largest manifest chunk envelope.
pub const MAX_MANIFEST_ENVELOPE: usize = 2 * 1024 * 1024;
const MAX_KEY_ENVELOPE: usize = 4096;

/// The headers that carry the proofs (64 hex digits each).
pub const PROOF_HEADER: &str = "polydev-zk-proof";
pub const RECOVERY_PROOF_HEADER: &str = "polydev-zk-recovery-proof";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ZkStatus {
    pub enabled: bool,
    /// Grows by one with every change of the key material (enable, password, recovery key,
    /// rotation); clients pin it and refuse a server that goes back.
    #[serde(default)]
    pub version: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub material: Option<KeyMaterial>,
    /// Which proofs the server has (an account enabled before proofs existed has none until its
    /// client registers them, `POST /v1/zk/proof`).
    #[serde(default)]
    pub proofs: Registered,
    /// A key rotation in progress: the new account key, wrapped by the password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registered {
    pub password: bool,
    pub recovery: bool,
}

/// The proofs a request presents (hex, from the headers).
#[derive(Debug, Clone, Default)]
pub struct Proofs {
    pub password: Option<String>,
    pub recovery: Option<String>,
}

/// `POST /v1/zk/enable`: the material and the proofs of both secrets.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Enable {
    pub material: KeyMaterial,
    pub password_proof: String,
    pub recovery_proof: String,
}

/// `POST /v1/zk/proof`: registers the proofs of an account that has none yet.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterProofs {
    pub password_proof: Option<String>,
    pub recovery_proof: Option<String>,
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

/// Checks a password envelope (kind, user, KDF floors); returns its salt (hex).
pub fn check_password_envelope(envelope: &str, user_id: Uuid) -> Result<String> {
    let header = check_envelope(
        envelope,
        Kind::PasswordWrappedKey,
        user_id,
        None,
        None,
        MAX_KEY_ENVELOPE,
    )?;
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

/// The password envelope's salt, after checking it and its KDF parameters meet the floors.
fn check_material(material: &KeyMaterial, user_id: Uuid) -> Result<String> {
    let salt = check_password_envelope(&material.password_wrapped, user_id)?;
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
    Ok(salt)
}

/// A proof as sent: 64 hex digits.
fn parse_proof(hex_text: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_text.trim(), &mut out).ok()?;
    Some(out)
}

/// A new proof to store: refused unless it has the shape of one.
fn new_proof(hex_text: Option<&str>, what: &str) -> Result<[u8; 32]> {
    hex_text.and_then(parse_proof).ok_or_else(|| {
        Error::Invalid(format!(
            "`{what}` is required: the new proof (64 hex digits) of the secret being set"
        ))
    })
}

/// SHA-256 of the proof with the user's salt and the proof's kind. The proof is a 256-bit HKDF
/// output, so a fast salted hash is enough: there is nothing to guess.
fn proof_hash(salt: &str, kind: ProofKind, proof: &[u8; 32]) -> String {
    let mut hash = Sha256::new();
    hash.update(b"polydev zk proof v1\0");
    hash.update(match kind {
        ProofKind::Password => b"password\0".as_slice(),
        ProofKind::Recovery => b"recovery\0".as_slice(),
    });
    hash.update(salt.as_bytes());
    hash.update([0]);
    hash.update(proof);
    hex::encode(hash.finalize())
}

fn new_salt() -> Result<String> {
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).map_err(|e| Error::internal(format!("random: {e}")))?;
    Ok(hex::encode(salt))
}

/// Checks the presented proofs against the stored hashes, locking the user's row until the
/// transaction ends (so the change that follows cannot race another). Accepts either proof.
pub async fn verify_proof(conn: &mut PgConnection, user_id: Uuid, proofs: &Proofs) -> Result<()> {
    if proofs.password.is_none() && proofs.recovery.is_none() {
        return Err(Error::ZkProof(ProofFailure::Missing));
    }
    let row = sqlx::query!(
        "SELECT zk_proof_salt, zk_password_proof_hash, zk_recovery_proof_hash
           FROM users WHERE user_id = $1 AND coalesce(zero_knowledge_enabled, false) FOR UPDATE",
        user_id
    )
    .fetch_optional(&mut *conn)
    .await?;
    let Some(row) = row else {
        return Err(Error::Invalid(
            "zero-knowledge is not enabled for this account".into(),
        ));
    };
    let (salt, password_hash, recovery_hash) = (
        row.zk_proof_salt,
        row.zk_password_proof_hash,
        row.zk_recovery_proof_hash,
    );
    let mut any_registered = false;
    for (presented, stored, kind) in [
        (&proofs.password, &password_hash, ProofKind::Password),
        (&proofs.recovery, &recovery_hash, ProofKind::Recovery),
    ] {
        let (Some(presented), Some(stored), Some(salt)) = (presented, stored, &salt) else {
            continue;
        };
        any_registered = true;
        let Some(proof) = parse_proof(presented) else {
            continue;
        };
        let computed = proof_hash(salt, kind, &proof);
        if bool::from(computed.as_bytes().ct_eq(stored.as_bytes())) {
            return Ok(());
        }
    }
    Err(Error::ZkProof(if any_registered {
        ProofFailure::Wrong
    } else {
        ProofFailure::NotRegistered
    }))
}

pub async fn status(pool: &PgPool, user_id: Uuid) -> Result<ZkStatus> {
    let row = sqlx::query!(
        r#"SELECT zero_knowledge_enabled, zk_password_wrapped_key, zk_recovery_wrapped_key,
                  encrypted_master_key_hint, zk_material_version,
                  zk_password_proof_hash IS NOT NULL AS "password_proof!",
                  zk_recovery_proof_hash IS NOT NULL AS "recovery_proof!",
                  zk_rotation_wrapped_key
             FROM users WHERE user_id = $1"#,
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
        version: row.zk_material_version.unwrap_or(0),
        material,
        proofs: Registered {
            password: row.password_proof,
            recovery: row.recovery_proof,
        },
        rotation: row.zk_rotation_wrapped_key,
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

/// Whether zero-knowledge is on, and whether a key rotation is in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteState {
    pub enabled: bool,
    pub rotating: bool,
}

impl WriteState {
    /// While a key rotation is in progress, new envelopes are refused: the client rotating
    /// could not tell which key sealed them, and they would be lost with the old key.
    pub fn ensure_not_rotating(self) -> Result<()> {
        if self.rotating {
            return Err(Error::Conflict(
                "a key rotation is in progress for this account: finish it (`polydev zk rotate`) before writing encrypted data".into(),
            ));
        }
        Ok(())
    }
}

/// The write state inside a transaction, holding a share lock on the user's row until it ends:
/// a write that depends on the answer cannot race past a concurrent `enable` or rotation.
pub async fn write_state_locked(conn: &mut PgConnection, user_id: Uuid) -> Result<WriteState> {
    let row = sqlx::query!(
        r#"SELECT zero_knowledge_enabled, zk_rotation_wrapped_key IS NOT NULL AS "rotating!"
             FROM users WHERE user_id = $1 FOR SHARE"#,
        user_id
    )
    .fetch_optional(conn)
    .await?;
    let (enabled, rotating) = row.map_or((None, false), |row| {
        (row.zero_knowledge_enabled, row.rotating)
    });
    Ok(WriteState {
        enabled: enabled.unwrap_or(false),
        rotating,
    })
}

/// `is_enabled` inside a transaction, holding a share lock on the user's row until it ends.
pub async fn is_enabled_locked(conn: &mut PgConnection, user_id: Uuid) -> Result<bool> {
    Ok(write_state_locked(conn, user_id).await?.enabled)
}

/// Turns zero-knowledge on for `user_id` with key material made by the client, and stores the
/// salted hashes of the proofs of its password and recovery key.
pub async fn enable(pool: &PgPool, user_id: Uuid, request: &Enable) -> Result<()> {
    let material = &request.material;
    let salt = check_material(material, user_id)?;
    let password_proof = new_proof(Some(&request.password_proof), "password_proof")?;
    let recovery_proof = new_proof(Some(&request.recovery_proof), "recovery_proof")?;
    let proof_salt = new_salt()?;
    let updated = sqlx::query!(
        "UPDATE users SET zero_knowledge_enabled = true, zk_password_wrapped_key = $2,
                zk_recovery_wrapped_key = $3, encrypted_master_key_hint = $4,
                key_derivation_salt = $5, zk_proof_salt = $6, zk_password_proof_hash = $7,
                zk_recovery_proof_hash = $8, zk_material_version = coalesce(zk_material_version, 0) + 1,
                zk_rotation_wrapped_key = NULL, updated_at = now()
          WHERE user_id = $1 AND NOT coalesce(zero_knowledge_enabled, false)",
        user_id,
        &material.password_wrapped,
        &material.recovery_wrapped,
        material.password_hint.as_deref(),
        salt,
        &proof_salt,
        proof_hash(&proof_salt, ProofKind::Password, &password_proof),
        proof_hash(&proof_salt, ProofKind::Recovery, &recovery_proof)
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

/// Registers the proofs of an account that has none (zero-knowledge turned on before proofs
/// existed). Each is set only where none is stored; returns which are now registered. The
/// server cannot check a first proof: until the owner's client registers it, whoever holds the
/// account's API token could register another (docs/crypto.md, threat model).
pub async fn register_proofs(
    pool: &PgPool,
    user_id: Uuid,
    request: &RegisterProofs,
) -> Result<Registered> {
    let password = request
        .password_proof
        .as_deref()
        .map(|p| new_proof(Some(p), "password_proof"))
        .transpose()?;
    let recovery = request
        .recovery_proof
        .as_deref()
        .map(|p| new_proof(Some(p), "recovery_proof"))
        .transpose()?;
    let mut tx = pool.begin().await?;
    let row = sqlx::query!(
        "SELECT zk_proof_salt, zk_password_proof_hash, zk_recovery_proof_hash
           FROM users WHERE user_id = $1 AND coalesce(zero_knowledge_enabled, false) FOR UPDATE",
        user_id
    )
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = row else {
        return Err(Error::Invalid(
            "zero-knowledge is not enabled for this account".into(),
        ));
    };
    let (salt, password_hash, recovery_hash) = (
        row.zk_proof_salt,
        row.zk_password_proof_hash,
        row.zk_recovery_proof_hash,
    );
    let salt = match salt {
        Some(salt) => salt,
        None => new_salt()?,
    };
    let password_hash =
        password_hash.or_else(|| password.map(|p| proof_hash(&salt, ProofKind::Password, &p)));
    let recovery_hash =
        recovery_hash.or_else(|| recovery.map(|p| proof_hash(&salt, ProofKind::Recovery, &p)));
    sqlx::query!(
        "UPDATE users SET zk_proof_salt = $2, zk_password_proof_hash = $3,
                zk_recovery_proof_hash = $4
          WHERE user_id = $1",
        user_id,
        &salt,
        password_hash.as_deref(),
        recovery_hash.as_deref()
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Registered {
        password: password_hash.is_some(),
        recovery: recovery_hash.is_some(),
    })
}

/// The stored proof salt (under the row lock taken by [`verify_proof`]).
async fn proof_salt(conn: &mut PgConnection, user_id: Uuid) -> Result<String> {
    let salt = sqlx::query_scalar!(
        "SELECT zk_proof_salt FROM users WHERE user_id = $1",
        user_id
    )
    .fetch_one(&mut *conn)
    .await?;
    Ok(match salt {
        Some(salt) => salt,
        None => new_salt()?,
    })
}

/// Replaces the password envelope (a password change: the client re-wrapped the account key).
/// Needs the proof of the current password or of the recovery key, and the new password's
/// proof. `previous` must be the stored envelope, so concurrent changes cannot overwrite each
/// other.
pub async fn replace_password_envelope(
    pool: &PgPool,
    user_id: Uuid,
    proofs: &Proofs,
    previous: &str,
    material: &KeyMaterial,
    new_password_proof: Option<&str>,
) -> Result<()> {
    let salt = check_material(material, user_id)?;
    let new_proof = new_proof(new_password_proof, "password_proof")?;
    let mut tx = pool.begin().await?;
    verify_proof(&mut tx, user_id, proofs).await?;
    let proof_salt = proof_salt(&mut tx, user_id).await?;
    let updated = sqlx::query!(
        "UPDATE users SET zk_password_wrapped_key = $3, key_derivation_salt = $4,
                encrypted_master_key_hint = $5, zk_proof_salt = $7, zk_password_proof_hash = $8,
                zk_material_version = coalesce(zk_material_version, 0) + 1, updated_at = now()
          WHERE user_id = $1 AND zero_knowledge_enabled AND zk_password_wrapped_key = $2
            AND zk_recovery_wrapped_key = $6 AND zk_rotation_wrapped_key IS NULL",
        user_id,
        previous,
        &material.password_wrapped,
        salt,
        material.password_hint.as_deref(),
        &material.recovery_wrapped,
        &proof_salt,
        proof_hash(&proof_salt, ProofKind::Password, &new_proof)
    )
    .execute(&mut *tx)
    .await?;
    ensure_swapped(updated.rows_affected())?;
    tx.commit().await?;
    Ok(())
}

/// Replaces the recovery envelope (a new recovery key). Needs a proof, and the new recovery
/// key's proof.
pub async fn replace_recovery_envelope(
    pool: &PgPool,
    user_id: Uuid,
    proofs: &Proofs,
    previous: &str,
    material: &KeyMaterial,
    new_recovery_proof: Option<&str>,
) -> Result<()> {
    check_material(material, user_id)?;
    let new_proof = new_proof(new_recovery_proof, "recovery_proof")?;
    let mut tx = pool.begin().await?;
    verify_proof(&mut tx, user_id, proofs).await?;
    let proof_salt = proof_salt(&mut tx, user_id).await?;
    let updated = sqlx::query!(
        "UPDATE users SET zk_recovery_wrapped_key = $3, zk_proof_salt = $5,
                zk_recovery_proof_hash = $6,
                zk_material_version = coalesce(zk_material_version, 0) + 1, updated_at = now()
          WHERE user_id = $1 AND zero_knowledge_enabled AND zk_recovery_wrapped_key = $2
            AND zk_password_wrapped_key = $4 AND zk_rotation_wrapped_key IS NULL",
        user_id,
        previous,
        &material.recovery_wrapped,
        &material.password_wrapped,
        &proof_salt,
        proof_hash(&proof_salt, ProofKind::Recovery, &new_proof)
    )
    .execute(&mut *tx)
    .await?;
    ensure_swapped(updated.rows_affected())?;
    tx.commit().await?;
    Ok(())
}

fn ensure_swapped(rows: u64) -> Result<()> {
    if rows == 0 {
        return Err(Error::Conflict(
            "the key material changed since it was read (or zero-knowledge is off, or a key rotation is in progress): fetch it again"
                .into(),
        ));
    }
    Ok(())
}

/// One sealed chunk of the migration manifest.
#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow)]
pub struct ManifestChunk {
    pub chunk: i64,
    pub envelope: String,
}

/// The caller's manifest chunks, in order.
pub async fn manifest(pool: &PgPool, user_id: Uuid) -> Result<Vec<ManifestChunk>> {
    Ok(sqlx::query_as!(
        ManifestChunk,
        "SELECT chunk, envelope FROM zk_manifest_chunks WHERE user_id = $1 ORDER BY chunk",
        user_id
    )
    .fetch_all(pool)
    .await?)
}

/// Stores manifest chunks, each written once: the same chunk again is fine, another under a
/// taken number is a conflict. Needs a proof.
pub async fn store_manifest(
    pool: &PgPool,
    user_id: Uuid,
    proofs: &Proofs,
    chunks: &[ManifestChunk],
) -> Result<u64> {
    if chunks.len() > 64 {
        return Err(Error::TooLarge("at most 64 chunks per request".into()));
    }
    for chunk in chunks {
        if !(0..1_000_000).contains(&chunk.chunk) {
            return Err(Error::Invalid("a chunk number is 0 to 999999".into()));
        }
        check_envelope(
            &chunk.envelope,
            Kind::Item,
            user_id,
            Some(MANIFEST),
            Some(&chunk.chunk.to_string()),
            MAX_MANIFEST_ENVELOPE,
        )?;
    }
    let mut tx = pool.begin().await?;
    verify_proof(&mut tx, user_id, proofs).await?;
    if rotation::is_rotating(&mut tx, user_id).await? {
        return Err(Error::Conflict(
            "a key rotation is in progress: finish it first".into(),
        ));
    }
    let mut stored = 0;
    for chunk in chunks {
        let existing = sqlx::query_scalar!(
            "INSERT INTO zk_manifest_chunks (user_id, chunk, envelope) VALUES ($1, $2, $3)
             ON CONFLICT (user_id, chunk) DO UPDATE SET envelope = zk_manifest_chunks.envelope
             RETURNING envelope",
            user_id,
            chunk.chunk,
            &chunk.envelope
        )
        .fetch_optional(&mut *tx)
        .await?;
        if existing.as_deref() != Some(chunk.envelope.as_str()) {
            return Err(Error::Conflict(format!(
                "manifest chunk {} is already stored, and differs",
                chunk.chunk
            )));
        }
        stored += 1;
    }
    tx.commit().await?;
    Ok(stored)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proof_hashes_depend_on_salt_kind_and_proof() {
        let proof = [7u8; 32];
        let a = proof_hash("00", ProofKind::Password, &proof);
        assert_eq!(a.len(), 64);
        assert_ne!(a, proof_hash("01", ProofKind::Password, &proof));
        assert_ne!(a, proof_hash("00", ProofKind::Recovery, &proof));
        assert_ne!(a, proof_hash("00", ProofKind::Password, &[8u8; 32]));
        assert_eq!(parse_proof(&"ab".repeat(32)), Some([0xab; 32]));
        assert_eq!(parse_proof("abc"), None);
    }
}
