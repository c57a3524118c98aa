//! Key rotation, driven by the client: it makes a new account key, stores it wrapped by the
//! password as the rotation in progress (`start`), re-seals every envelope of the account under
//! it with a compare-and-swap on the old envelope (`items`, `reseal`), and finally swaps the key
//! material (`commit`, a compare-and-swap on the password envelope). Every step needs the proof
//! of the password or recovery key. While a rotation is in progress new envelopes are refused
//! ([`super::WriteState::ensure_not_rotating`]), so nothing is sealed under the old key behind
//! the rotating client's back. Interrupted, it resumes: the client finds the rotation in
//! `GET /v1/zk`, unlocks its key with the password and re-seals what is left.

use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::{
    KeyMaterial, MAX_MANIFEST_ENVELOPE, MAX_MESSAGE_ENVELOPE, MAX_SESSION_ENVELOPE, Proofs,
    check_envelope, check_material, check_password_envelope, new_proof, proof_hash, proof_salt,
    verify_proof,
};
use crate::error::{Error, Result};
use polydev_zk::{Kind, ProofKind};

/// Most items per batch.
pub const MAX_BATCH: i64 = 200;

/// Every kind of envelope an account holds (the password hint travels with the key material).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ItemKind {
    /// The migration manifest's chunks.
    Manifest,
    /// `chat_sessions.encrypted_meta_v2`
    ChatSession,
    /// `sessions.encrypted_meta_v2`
    Session,
    /// `chat_messages.encrypted_content_v2`
    ChatMessage,
    /// `messages.encrypted_content_v2`
    Message,
    /// `provider_credentials.encrypted_credentials_v2`
    ProviderCredential,
    /// `cli_credentials.encrypted_data_v2`
    CliCredential,
}

/// How one kind is stored. Static strings: safe in SQL.
struct Storage {
    /// `table m`
    table: &'static str,
    /// Extra `FROM` entries for the ownership join (after the batch), with a leading comma.
    join: &'static str,
    /// The ownership condition (`$1` is the user).
    owner: &'static str,
    id: &'static str,
    column: &'static str,
    namespace: &'static str,
    max: usize,
}

impl ItemKind {
    pub const ALL: [ItemKind; 7] = [
        ItemKind::Manifest,
        ItemKind::ChatSession,
        ItemKind::Session,
        ItemKind::ChatMessage,
        ItemKind::Message,
        ItemKind::ProviderCredential,
        ItemKind::CliCredential,
    ];

    pub fn namespace(self) -> &'static str {
        self.storage().namespace
    }

    fn storage(self) -> Storage {
        let owned = "m.user_id = $1";
        match self {
            ItemKind::Manifest => Storage {
                table: "zk_manifest_chunks m",
                join: "",
                owner: owned,
                id: "m.chunk",
                column: "envelope",
                namespace: super::MANIFEST,
                max: MAX_MANIFEST_ENVELOPE,
            },
            ItemKind::ChatSession => Storage {
                table: "chat_sessions m",
                join: "",
                owner: owned,
                id: "m.id",
                column: "encrypted_meta_v2",
                namespace: super::CHAT_SESSION,
                max: MAX_SESSION_ENVELOPE,
            },
            ItemKind::Session => Storage {
                table: "sessions m",
                join: "",
                owner: owned,
                id: "m.id",
                column: "encrypted_meta_v2",
                namespace: super::CHAT_SESSION,
                max: MAX_SESSION_ENVELOPE,
            },
            ItemKind::ChatMessage => Storage {
                table: "chat_messages m",
                join: ", chat_sessions s",
                owner: "s.id = m.session_id AND s.user_id = $1",
                id: "m.id",
                column: "encrypted_content_v2",
                namespace: super::CHAT_MESSAGE,
                max: MAX_MESSAGE_ENVELOPE,
            },
            ItemKind::Message => Storage {
                table: "messages m",
                join: ", sessions s",
                owner: "s.id = m.session_id AND s.user_id = $1",
                id: "m.id",
                column: "encrypted_content_v2",
                namespace: super::CHAT_MESSAGE,
                max: MAX_MESSAGE_ENVELOPE,
            },
            ItemKind::ProviderCredential => Storage {
                table: "provider_credentials m",
                join: "",
                owner: owned,
                id: "m.credential_id",
                column: "encrypted_credentials_v2",
                namespace: super::CREDENTIAL_PROVIDER,
                max: 256 * 1024,
            },
            ItemKind::CliCredential => Storage {
                table: "cli_credentials m",
                join: "",
                owner: owned,
                id: "m.credential_id",
                column: "encrypted_data_v2",
                namespace: super::CREDENTIAL_CLI,
                max: 256 * 1024,
            },
        }
    }
}

/// One envelope of the account (`id`: the row it is bound to, as text).
#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow)]
pub struct RotationItem {
    pub id: String,
    pub envelope: String,
}

/// `GET /v1/zk/rotation/items`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ItemsQuery {
    pub kind: ItemKind,
    /// Items with an id (as text) after this one.
    pub after: Option<String>,
    pub limit: Option<i64>,
}

/// `POST /v1/zk/rotation/items`: envelopes re-sealed under the new key, each replacing
/// `previous` only if that is still what is stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reseal {
    pub kind: ItemKind,
    pub items: Vec<ResealItem>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResealItem {
    pub id: String,
    pub previous: String,
    pub envelope: String,
}

/// `POST /v1/zk/rotation`: the new account key wrapped by the (current) password.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Start {
    pub wrapped_key: String,
}

/// `POST /v1/zk/rotation/commit`: the final material (its password envelope wraps the new
/// key, under the current or a new password; a new recovery key) and the new proofs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Commit {
    /// The password envelope being replaced, as fetched.
    pub previous: String,
    pub material: KeyMaterial,
    pub password_proof: String,
    pub recovery_proof: String,
}

pub(super) async fn is_rotating(conn: &mut PgConnection, user_id: Uuid) -> Result<bool> {
    let rotating = sqlx::query_scalar!(
        r#"SELECT zk_rotation_wrapped_key IS NOT NULL AS "rotating!" FROM users WHERE user_id = $1"#,
        user_id
    )
    .fetch_optional(conn)
    .await?;
    Ok(rotating.unwrap_or(false))
}

/// Records the rotation in progress. A second start is a conflict: the client resumes the one
/// in progress instead (a restart would strand what was re-sealed already).
pub async fn start(pool: &PgPool, user_id: Uuid, proofs: &Proofs, request: &Start) -> Result<()> {
    check_password_envelope(&request.wrapped_key, user_id)?;
    let mut tx = pool.begin().await?;
    verify_proof(&mut tx, user_id, proofs).await?;
    let updated = sqlx::query!(
        "UPDATE users SET zk_rotation_wrapped_key = $2, updated_at = now()
          WHERE user_id = $1 AND zero_knowledge_enabled AND zk_rotation_wrapped_key IS NULL",
        user_id,
        &request.wrapped_key
    )
    .execute(&mut *tx)
    .await?;
    if updated.rows_affected() == 0 {
        return Err(Error::Conflict(
            "a key rotation is already in progress: resume it (`polydev zk rotate`)".into(),
        ));
    }
    tx.commit().await?;
    tracing::info!(%user_id, "key rotation started");
    Ok(())
}

/// A batch of the caller's envelopes of one kind, by id.
pub async fn items(pool: &PgPool, user_id: Uuid, query: &ItemsQuery) -> Result<Vec<RotationItem>> {
    let s = query.kind.storage();
    let limit = query.limit.unwrap_or(100).clamp(1, MAX_BATCH);
    // Dynamic: the table, id and envelope column of the item kind are spliced in.
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {id}::text AS id, m.{column} AS envelope FROM {table}{join}
          WHERE {owner} AND m.{column} IS NOT NULL AND {id}::text COLLATE \"C\" > $2
          ORDER BY {id}::text COLLATE \"C\" LIMIT $3",
        id = s.id,
        column = s.column,
        table = s.table,
        join = s.join,
        owner = s.owner,
    )))
    .bind(user_id)
    .bind(query.after.as_deref().unwrap_or(""))
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

/// How many envelopes the account holds (for a rotation's progress bar).
pub async fn count(pool: &PgPool, user_id: Uuid) -> Result<i64> {
    let mut total = 0;
    for kind in ItemKind::ALL {
        let s = kind.storage();
        // Dynamic: the table and envelope column of each item kind are spliced in.
        let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FROM {table}{join} WHERE {owner} AND m.{column} IS NOT NULL",
            table = s.table,
            join = s.join,
            owner = s.owner,
            column = s.column,
        )))
        .bind(user_id)
        .fetch_one(pool)
        .await?;
        total += n;
    }
    Ok(total)
}

/// `GET /v1/zk/rotation/count`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Count {
    pub total: i64,
}

/// Replaces envelopes during a rotation, each only if it is still `previous`; returns the ids
/// replaced. Needs a proof and a rotation in progress.
pub async fn reseal(
    pool: &PgPool,
    user_id: Uuid,
    proofs: &Proofs,
    request: &Reseal,
) -> Result<Vec<String>> {
    let s = request.kind.storage();
    if request.items.len() as i64 > MAX_BATCH {
        return Err(Error::TooLarge(format!(
            "at most {MAX_BATCH} items per batch"
        )));
    }
    for item in &request.items {
        let valid_id = match request.kind {
            ItemKind::Manifest => item.id.parse::<u32>().is_ok(),
            _ => item.id.parse::<Uuid>().is_ok(),
        };
        if !valid_id {
            return Err(Error::Invalid(format!("`{}` is not a valid id", item.id)));
        }
        check_envelope(
            &item.envelope,
            Kind::Item,
            user_id,
            Some(s.namespace),
            Some(&item.id),
            s.max,
        )?;
    }
    let mut tx = pool.begin().await?;
    verify_proof(&mut tx, user_id, proofs).await?;
    if !is_rotating(&mut tx, user_id).await? {
        return Err(Error::Conflict(
            "no key rotation is in progress: start one first".into(),
        ));
    }
    let ids: Vec<&str> = request.items.iter().map(|i| i.id.as_str()).collect();
    let previous: Vec<&str> = request.items.iter().map(|i| i.previous.as_str()).collect();
    let envelopes: Vec<&str> = request.items.iter().map(|i| i.envelope.as_str()).collect();
    // Dynamic: the table, id and envelope column of the item kind are spliced in.
    let done: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "UPDATE {table} SET {column} = w.envelope
           FROM unnest($2::text[], $3::text[], $4::text[]) AS w(id, previous, envelope){join}
          WHERE {owner} AND {id}::text = w.id AND m.{column} = w.previous
         RETURNING {id}::text",
        table = s.table,
        column = s.column,
        join = s.join,
        owner = s.owner,
        id = s.id,
    )))
    .bind(user_id)
    .bind(&ids)
    .bind(&previous)
    .bind(&envelopes)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(done)
}

/// Swaps in the rotated key material and ends the rotation.
pub async fn commit(pool: &PgPool, user_id: Uuid, proofs: &Proofs, request: &Commit) -> Result<()> {
    let material = &request.material;
    let salt = check_material(material, user_id)?;
    let password_proof = new_proof(Some(&request.password_proof), "password_proof")?;
    let recovery_proof = new_proof(Some(&request.recovery_proof), "recovery_proof")?;
    let mut tx = pool.begin().await?;
    verify_proof(&mut tx, user_id, proofs).await?;
    let proof_salt = proof_salt(&mut tx, user_id).await?;
    let updated = sqlx::query!(
        "UPDATE users SET zk_password_wrapped_key = $3, zk_recovery_wrapped_key = $4,
                encrypted_master_key_hint = $5, key_derivation_salt = $6, zk_proof_salt = $7,
                zk_password_proof_hash = $8, zk_recovery_proof_hash = $9,
                zk_material_version = coalesce(zk_material_version, 0) + 1,
                zk_rotation_wrapped_key = NULL, updated_at = now()
          WHERE user_id = $1 AND zero_knowledge_enabled AND zk_password_wrapped_key = $2
            AND zk_rotation_wrapped_key IS NOT NULL",
        user_id,
        &request.previous,
        &material.password_wrapped,
        &material.recovery_wrapped,
        material.password_hint.as_deref(),
        salt,
        &proof_salt,
        proof_hash(&proof_salt, ProofKind::Password, &password_proof),
        proof_hash(&proof_salt, ProofKind::Recovery, &recovery_proof)
    )
    .execute(&mut *tx)
    .await?;
    if updated.rows_affected() == 0 {
        return Err(Error::Conflict(
            "the key material changed since it was read, or no rotation is in progress: fetch it again".into(),
        ));
    }
    tx.commit().await?;
    tracing::info!(%user_id, "key rotation committed");
    Ok(())
}
