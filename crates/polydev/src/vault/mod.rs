//! Provider and CLI credentials (`provider_credentials`, `cli_credentials`) move from keys the
//! server holds to the owner's client-side keys. The server decrypts a legacy row only inside
//! the step that hands it to its owner's client, returns it over TLS, and keeps nothing; the
//! client seals it (`credential.provider` / `credential.cli`), the server stores the envelope
//! with a compare-and-swap, the client verifies it, and only then is the legacy ciphertext
//! cleared.
//!
//! Legacy format (the production code's): AES-256-GCM with a key from scrypt (N = 2^14, r = 8,
//! p = 1, 32 bytes) of the server master secret (`POLYDEV_LEGACY_CREDENTIAL_SECRET`) and a salt.
//! `provider_credentials` keeps bytes in BYTEA columns and its salt in `encryption_salt`;
//! `cli_credentials` keeps hex text and, having no salt column, uses its `credential_id` (text)
//! as the salt. Check these two facts against the production code before running it.

use std::sync::Arc;

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use tokio::sync::Semaphore;
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::error::{Error, Result};
use crate::zk;

pub const PROVIDER_NAMESPACE: &str = zk::CREDENTIAL_PROVIDER;
pub const CLI_NAMESPACE: &str = zk::CREDENTIAL_CLI;
const MAX_ENVELOPE: usize = 256 * 1024;
const MAX_BATCH: i64 = 100;

/// The server master secret that encrypted the legacy rows, and a bound on how many rows are
/// decrypted at once: scrypt (16 MiB, ~50 ms a row) runs on the blocking pool, never on the
/// async workers that serve requests.
#[derive(Clone)]
pub struct LegacySecret {
    secret: Arc<Zeroizing<Vec<u8>>>,
    permits: Arc<Semaphore>,
}

impl std::fmt::Debug for LegacySecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LegacySecret([redacted])")
    }
}

impl LegacySecret {
    pub fn new(secret: &[u8]) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        LegacySecret {
            secret: Arc::new(Zeroizing::new(secret.to_vec())),
            permits: Arc::new(Semaphore::new(cores)),
        }
    }

    fn key(&self, salt: &[u8]) -> Zeroizing<[u8; 32]> {
        let params = scrypt::Params::new(14, 8, 1).expect("valid scrypt parameters");
        let mut key = Zeroizing::new([0u8; 32]);
        scrypt::scrypt(&self.secret, salt, &params, key.as_mut())
            .expect("32 bytes is a valid scrypt length");
        key
    }

    /// Decrypts one legacy row on the blocking pool; the error is why it cannot be opened.
    async fn open(&self, row: LegacyRow) -> std::result::Result<Zeroizing<Vec<u8>>, String> {
        let _permit = self.permits.acquire().await.map_err(|e| e.to_string())?;
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.open_now(&row))
            .await
            .map_err(|e| format!("decryption task failed: {e}"))?
    }

    fn open_now(&self, row: &LegacyRow) -> std::result::Result<Zeroizing<Vec<u8>>, String> {
        let iv: [u8; 12] = row
            .iv
            .as_slice()
            .try_into()
            .map_err(|_| format!("its IV is {} bytes, not 12", row.iv.len()))?;
        let key = self.key(&row.salt);
        let cipher = Aes256Gcm::new((&*key).into());
        cipher
            .decrypt(
                &Nonce::from(iv),
                [row.ciphertext.as_slice(), &row.tag].concat().as_slice(),
            )
            .map(Zeroizing::new)
            .map_err(|_| "it does not decrypt with the server secret".into())
    }
}

/// The bytes of one legacy row, as the legacy code stored them.
struct LegacyRow {
    salt: Vec<u8>,
    iv: Vec<u8>,
    ciphertext: Vec<u8>,
    tag: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Table {
    ProviderCredentials,
    CliCredentials,
}

impl Table {
    /// Its name, as in the API (`provider_credentials`, `cli_credentials`).
    pub fn as_str(self) -> &'static str {
        self.sql().0
    }

    pub fn namespace(self) -> &'static str {
        match self {
            Table::ProviderCredentials => PROVIDER_NAMESPACE,
            Table::CliCredentials => CLI_NAMESPACE,
        }
    }
    /// (table, envelope column, legacy columns to clear). Static: safe in SQL.
    fn sql(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Table::ProviderCredentials => (
                "provider_credentials",
                "encrypted_credentials_v2",
                "encrypted_credentials = NULL, encryption_iv = NULL, encryption_tag = NULL, encryption_salt = NULL",
            ),
            Table::CliCredentials => (
                "cli_credentials",
                "encrypted_data_v2",
                "encrypted_data = NULL, encryption_iv = NULL, encryption_auth_tag = NULL",
            ),
        }
    }
}

/// A credential in the clear, on its way to its owner's client.
#[derive(Serialize, Deserialize)]
pub struct HandedOver {
    pub table: Table,
    pub credential_id: Uuid,
    pub provider: Option<String>,
    /// Base64 of the decrypted bytes.
    pub plaintext: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sealed {
    pub table: Table,
    pub credential_id: Uuid,
    pub envelope: String,
    /// The provider the credential is for, when the row names one (the server lists it; a
    /// client uploading envelopes leaves it out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// When the row last changed (the server lists it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<chrono::DateTime<chrono::Utc>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CredentialRef {
    pub table: Table,
    pub credential_id: Uuid,
}

/// Where a hand-over goes on: after `after` in `table` (provider credentials come first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    pub table: Table,
    pub after: Uuid,
}

/// A legacy credential that cannot be decrypted: skipped and reported, so the others still move.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unreadable {
    pub table: Table,
    pub credential_id: Uuid,
    pub reason: String,
}

/// One batch of a hand-over.
#[derive(Serialize, Deserialize)]
pub struct HandOver {
    pub credentials: Vec<HandedOver>,
    pub unreadable: Vec<Unreadable>,
    /// Where the next batch starts; `None` when every row has been seen.
    pub next: Option<Position>,
}

/// Decrypts up to `limit` of the caller's credentials that have not moved yet, from `from` on.
/// A row that cannot be opened (missing columns, a bad IV, not the server's secret) is reported
/// in `unreadable` and the rest go on. Without a configured `secret`, a row to decrypt makes the
/// whole call say so (and an account with nothing to move is not bothered).
/// Needs the proof of the master password or recovery key: a leaked API token alone cannot have
/// the server decrypt the owner's credentials.
pub async fn hand_over(
    pool: &PgPool,
    secret: Option<&LegacySecret>,
    user_id: Uuid,
    proofs: &zk::Proofs,
    limit: i64,
    from: Option<Position>,
) -> Result<HandOver> {
    let secret = || {
        secret.ok_or_else(|| {
            Error::NotConfigured("this server has no POLYDEV_LEGACY_CREDENTIAL_SECRET: it cannot decrypt legacy credentials".into())
        })
    };
    require_enabled(pool, user_id).await?;
    {
        let mut tx = pool.begin().await?;
        zk::verify_proof(&mut tx, user_id, proofs).await?;
        tx.commit().await?;
    }
    let limit = limit.clamp(1, MAX_BATCH);
    let mut batch = HandOver {
        credentials: Vec::new(),
        unreadable: Vec::new(),
        next: None,
    };
    let after = |table| from.filter(|p| p.table == table).map(|p| p.after);
    if from.is_none_or(|p| p.table == Table::ProviderCredentials) {
        let rows = sqlx::query!(
            "SELECT credential_id, provider, encryption_salt, encryption_iv,
                    encrypted_credentials, encryption_tag
               FROM provider_credentials
              WHERE user_id = $1 AND NOT coalesce(migrated_to_zk, false)
                AND encrypted_credentials IS NOT NULL
                AND ($3::uuid IS NULL OR credential_id > $3)
              ORDER BY credential_id LIMIT $2",
            user_id,
            limit,
            after(Table::ProviderCredentials),
        )
        .fetch_all(pool)
        .await?;
        let full = rows.len() as i64 == limit;
        for row in rows {
            let legacy = match (
                row.encryption_salt,
                row.encryption_iv,
                row.encrypted_credentials,
                row.encryption_tag,
            ) {
                (Some(salt), Some(iv), Some(ciphertext), Some(tag)) => Ok(LegacyRow {
                    salt,
                    iv,
                    ciphertext,
                    tag,
                }),
                _ => Err("its salt, IV or tag is missing".to_string()),
            };
            batch
                .take(
                    Table::ProviderCredentials,
                    row.credential_id,
                    row.provider,
                    legacy,
                    secret()?,
                )
                .await;
        }
        if full {
            batch.next = batch.last(Table::ProviderCredentials);
            return Ok(batch.logged(user_id));
        }
    }
    let left = limit - (batch.credentials.len() + batch.unreadable.len()) as i64;
    let rows = sqlx::query!(
        "SELECT credential_id, provider, encryption_iv, encrypted_data, encryption_auth_tag
           FROM cli_credentials
          WHERE user_id = $1 AND NOT coalesce(migrated_to_zk, false) AND encrypted_data IS NOT NULL
            AND ($3::uuid IS NULL OR credential_id > $3)
          ORDER BY credential_id LIMIT $2",
        user_id,
        left,
        after(Table::CliCredentials),
    )
    .fetch_all(pool)
    .await?;
    let full = rows.len() as i64 == left;
    for row in rows {
        let hex = |s: Option<String>, what: &str| {
            s.ok_or_else(|| format!("its {what} is missing"))
                .and_then(|s| hex::decode(s).map_err(|_| format!("its {what} is not hex")))
        };
        // cli_credentials has no salt column: the legacy code salted with the credential id.
        let legacy = (|| {
            Ok(LegacyRow {
                salt: row.credential_id.to_string().into_bytes(),
                iv: hex(row.encryption_iv, "IV")?,
                ciphertext: hex(row.encrypted_data, "ciphertext")?,
                tag: hex(row.encryption_auth_tag, "tag")?,
            })
        })();
        batch
            .take(
                Table::CliCredentials,
                row.credential_id,
                row.provider,
                legacy,
                secret()?,
            )
            .await;
    }
    if full {
        batch.next = batch.last(Table::CliCredentials);
    }
    Ok(batch.logged(user_id))
}

impl HandOver {
    /// Decrypts one row into the batch, or records why it cannot be.
    async fn take(
        &mut self,
        table: Table,
        credential_id: Uuid,
        provider: Option<String>,
        legacy: std::result::Result<LegacyRow, String>,
        secret: &LegacySecret,
    ) {
        let opened = match legacy {
            Ok(row) => secret.open(row).await,
            Err(reason) => Err(reason),
        };
        match opened {
            Ok(plaintext) => self.credentials.push(HandedOver {
                table,
                credential_id,
                provider,
                plaintext: STANDARD.encode(&*plaintext),
            }),
            Err(reason) => {
                tracing::warn!(%credential_id, ?table, %reason, "legacy credential cannot be decrypted: skipped");
                self.unreadable.push(Unreadable {
                    table,
                    credential_id,
                    reason,
                });
            }
        }
    }

    /// The position after the last row of `table` in this batch.
    fn last(&self, table: Table) -> Option<Position> {
        let handed = self
            .credentials
            .iter()
            .filter(|c| c.table == table)
            .map(|c| c.credential_id);
        let skipped = self
            .unreadable
            .iter()
            .filter(|u| u.table == table)
            .map(|u| u.credential_id);
        handed
            .chain(skipped)
            .max()
            .map(|after| Position { table, after })
    }

    fn logged(self, user_id: Uuid) -> Self {
        tracing::info!(%user_id, count = self.credentials.len(), unreadable = self.unreadable.len(), "legacy credentials handed to their owner for client-side encryption");
        self
    }
}

/// Stores envelopes for credentials that have not moved yet (compare-and-swap on
/// `migrated_to_zk`); returns the ids stored.
pub async fn store(pool: &PgPool, user_id: Uuid, sealed: &[Sealed]) -> Result<Vec<Uuid>> {
    require_enabled(pool, user_id).await?;
    let mut tx = pool.begin().await?;
    zk::write_state_locked(&mut tx, user_id)
        .await?
        .ensure_not_rotating()?;
    let mut stored = Vec::new();
    for item in sealed {
        zk::check_envelope(
            &item.envelope,
            polydev_zk::Kind::Item,
            user_id,
            Some(item.table.namespace()),
            Some(&item.credential_id.to_string()),
            MAX_ENVELOPE,
        )?;
        let (table, column, _) = item.table.sql();
        // Dynamic: the credential table and its envelope column are spliced in.
        let done: Option<Uuid> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "UPDATE {table} SET {column} = $3, migrated_to_zk = true, updated_at = now()
              WHERE credential_id = $2 AND user_id = $1 AND NOT coalesce(migrated_to_zk, false)
             RETURNING credential_id"
        )))
        .bind(user_id)
        .bind(item.credential_id)
        .bind(&item.envelope)
        .fetch_optional(&mut *tx)
        .await?;
        stored.extend(done);
    }
    tx.commit().await?;
    Ok(stored)
}

/// The caller's moved credentials (envelopes), for the client to verify and to use.
pub async fn envelopes(pool: &PgPool, user_id: Uuid) -> Result<Vec<Sealed>> {
    let mut out = Vec::new();
    for table in [Table::ProviderCredentials, Table::CliCredentials] {
        let (name, column, _) = table.sql();
        // Dynamic: the credential table and its envelope column are spliced in.
        type Row = (
            Uuid,
            String,
            Option<String>,
            Option<chrono::DateTime<chrono::Utc>>,
        );
        let rows: Vec<Row> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT credential_id, {column}, provider, updated_at FROM {name}
              WHERE user_id = $1 AND coalesce(migrated_to_zk, false) AND {column} IS NOT NULL
              ORDER BY credential_id"
        )))
        .bind(user_id)
        .fetch_all(pool)
        .await?;
        out.extend(
            rows.into_iter()
                .map(|(credential_id, envelope, provider, updated_at)| Sealed {
                    table,
                    credential_id,
                    envelope,
                    provider,
                    updated_at,
                }),
        );
    }
    Ok(out)
}

/// Clears the legacy ciphertext of moved credentials the client has verified. Idempotent.
pub async fn clear_legacy(pool: &PgPool, user_id: Uuid, items: &[CredentialRef]) -> Result<u64> {
    let mut cleared = 0;
    for item in items {
        let (table, column, legacy) = item.table.sql();
        // Dynamic: the credential table and its columns are spliced in.
        let done = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE {table} SET {legacy}, updated_at = now()
              WHERE credential_id = $2 AND user_id = $1 AND coalesce(migrated_to_zk, false)
                AND {column} IS NOT NULL"
        )))
        .bind(user_id)
        .bind(item.credential_id)
        .execute(pool)
        .await?;
        cleared += done.rows_affected();
    }
    Ok(cleared)
}

async fn require_enabled(pool: &PgPool, user_id: Uuid) -> Result<()> {
    if !zk::is_enabled(pool, user_id).await? {
        return Err(Error::Invalid(
            "turn zero-knowledge on (POST /v1/zk/enable) before moving credentials".into(),
        ));
    }
    Ok(())
}
