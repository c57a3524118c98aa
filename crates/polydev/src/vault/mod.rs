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

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::error::{Error, Result};
use crate::zk;

pub const PROVIDER_NAMESPACE: &str = zk::CREDENTIAL_PROVIDER;
pub const CLI_NAMESPACE: &str = zk::CREDENTIAL_CLI;
const MAX_ENVELOPE: usize = 256 * 1024;
const MAX_BATCH: i64 = 100;

/// The server master secret that encrypted the legacy rows.
#[derive(Clone)]
pub struct LegacySecret(Zeroizing<Vec<u8>>);

impl std::fmt::Debug for LegacySecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LegacySecret([redacted])")
    }
}

impl LegacySecret {
    pub fn new(secret: &[u8]) -> Self {
        LegacySecret(Zeroizing::new(secret.to_vec()))
    }

    fn key(&self, salt: &[u8]) -> Zeroizing<[u8; 32]> {
        let params = scrypt::Params::new(14, 8, 1).expect("valid scrypt parameters");
        let mut key = Zeroizing::new([0u8; 32]);
        scrypt::scrypt(&self.0, salt, &params, key.as_mut())
            .expect("32 bytes is a valid scrypt length");
        key
    }

    fn open(
        &self,
        salt: &[u8],
        iv: &[u8],
        ciphertext: &[u8],
        tag: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>> {
        let iv: [u8; 12] = iv
            .try_into()
            .map_err(|_| Error::internal("a legacy credential has an IV that is not 12 bytes"))?;
        let key = self.key(salt);
        let cipher = Aes256Gcm::new((&*key).into());
        cipher
            .decrypt(&Nonce::from(iv), [ciphertext, tag].concat().as_slice())
            .map(Zeroizing::new)
            .map_err(|_| {
                Error::internal("a legacy credential does not decrypt with the server secret")
            })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Table {
    ProviderCredentials,
    CliCredentials,
}

impl Table {
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
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CredentialRef {
    pub table: Table,
    pub credential_id: Uuid,
}

/// Decrypts up to `limit` of the caller's credentials that have not moved yet.
/// credential_id, provider, salt, iv, ciphertext, tag
type LegacyProviderRow = (Uuid, Option<String>, Vec<u8>, Vec<u8>, Vec<u8>, Vec<u8>);

/// Without a configured `secret`, any row to decrypt is an error that says so. Needs the proof
/// of the master password or recovery key: a leaked API token alone cannot have the server
/// decrypt the owner's credentials.
pub async fn hand_over(
    pool: &PgPool,
    secret: Option<&LegacySecret>,
    user_id: Uuid,
    proofs: &zk::Proofs,
    limit: i64,
) -> Result<Vec<HandedOver>> {
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
    let mut out = Vec::new();
    let provider_rows: Vec<LegacyProviderRow> = sqlx::query_as(
        "SELECT credential_id, provider, encryption_salt, encryption_iv, encrypted_credentials, encryption_tag
           FROM provider_credentials
          WHERE user_id = $1 AND NOT coalesce(migrated_to_zk, false) AND encrypted_credentials IS NOT NULL
          ORDER BY credential_id LIMIT $2",
    )
    .bind(user_id)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    for (id, provider, salt, iv, ciphertext, tag) in provider_rows {
        let plaintext = secret()?.open(&salt, &iv, &ciphertext, &tag)?;
        out.push(HandedOver {
            table: Table::ProviderCredentials,
            credential_id: id,
            provider,
            plaintext: STANDARD.encode(&*plaintext),
        });
    }
    let cli_rows: Vec<(Uuid, Option<String>, String, String, String)> = sqlx::query_as(
        "SELECT credential_id, provider, encryption_iv, encrypted_data, encryption_auth_tag
           FROM cli_credentials
          WHERE user_id = $1 AND NOT coalesce(migrated_to_zk, false) AND encrypted_data IS NOT NULL
          ORDER BY credential_id LIMIT $2",
    )
    .bind(user_id)
    .bind(limit - out.len() as i64)
    .fetch_all(pool)
    .await?;
    for (id, provider, iv, ciphertext, tag) in cli_rows {
        let hex = |s: &str| {
            hex::decode(s).map_err(|_| Error::internal("a legacy CLI credential is not hex"))
        };
        let plaintext = secret()?.open(
            id.to_string().as_bytes(),
            &hex(&iv)?,
            &hex(&ciphertext)?,
            &hex(&tag)?,
        )?;
        out.push(HandedOver {
            table: Table::CliCredentials,
            credential_id: id,
            provider,
            plaintext: STANDARD.encode(&*plaintext),
        });
    }
    tracing::info!(%user_id, count = out.len(), "legacy credentials handed to their owner for client-side encryption");
    Ok(out)
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
        let rows: Vec<(Uuid, String)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT credential_id, {column} FROM {name}
              WHERE user_id = $1 AND coalesce(migrated_to_zk, false) AND {column} IS NOT NULL
              ORDER BY credential_id"
        )))
        .bind(user_id)
        .fetch_all(pool)
        .await?;
        out.extend(rows.into_iter().map(|(credential_id, envelope)| Sealed {
            table,
            credential_id,
            envelope,
        }));
    }
    Ok(out)
}

/// Clears the legacy ciphertext of moved credentials the client has verified. Idempotent.
pub async fn clear_legacy(pool: &PgPool, user_id: Uuid, items: &[CredentialRef]) -> Result<u64> {
    let mut cleared = 0;
    for item in items {
        let (table, column, legacy) = item.table.sql();
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
