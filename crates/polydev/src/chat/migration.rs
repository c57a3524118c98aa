//! Moving a user's plaintext messages to envelopes, driven by the client (which alone holds the
//! key): fetch plaintext → encrypt locally → write with a compare-and-swap on the plaintext's
//! hash (a row changed since it was read is not overwritten, and is picked up again) → read back
//! and decrypt to verify → clear the plaintext in a separate, idempotent step. Every step can be
//! interrupted and re-run: nothing is lost and nothing is encrypted twice.

use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use uuid::Uuid;

use super::System;
use crate::error::{Error, Result};
use crate::zk;

/// Most rows per batch.
pub const MAX_BATCH: i64 = 500;

/// A message still in plaintext.
#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow)]
pub struct Plaintext {
    #[sqlx(skip)]
    pub system: Option<System>,
    pub id: Uuid,
    pub content: String,
    /// SHA-256 (hex) of the content as stored: the compare-and-swap token.
    pub content_sha256: String,
}

/// A message written as an envelope whose plaintext has not been cleared yet.
#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow)]
pub struct Unverified {
    #[sqlx(skip)]
    pub system: Option<System>,
    pub id: Uuid,
    pub content: String,
    pub encrypted_content: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EncryptedWrite {
    pub system: System,
    pub id: Uuid,
    pub content_sha256: String,
    pub encrypted_content: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Item {
    pub system: System,
    pub id: Uuid,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Status {
    /// Not yet encrypted.
    pub plaintext: i64,
    /// Encrypted, plaintext not yet cleared.
    pub unverified: i64,
    /// Encrypted and cleared.
    pub done: i64,
}

impl Status {
    pub fn total(&self) -> i64 {
        self.plaintext + self.unverified + self.done
    }
}

/// `FROM {messages} m JOIN {sessions} s ... WHERE s.user_id = $1`: every query is scoped to
/// the caller's own sessions. The queries of this module stay dynamic (not `query!`): each
/// splices the legacy tables of a chat system.
fn scoped(system: System) -> String {
    format!(
        "{} m JOIN {} s ON s.id = m.session_id WHERE s.user_id = $1",
        system.messages_table(),
        system.sessions_table()
    )
}

const SYSTEMS: [System; 2] = [System::Chat, System::Sessions];

async fn require_enabled(pool: &PgPool, user_id: Uuid) -> Result<()> {
    if !zk::is_enabled(pool, user_id).await? {
        return Err(Error::Invalid(
            "turn zero-knowledge on (POST /v1/zk/enable) before migrating".into(),
        ));
    }
    Ok(())
}

pub async fn status(pool: &PgPool, user_id: Uuid) -> Result<Status> {
    let mut status = Status::default();
    for system in SYSTEMS {
        let (plaintext, unverified, done): (i64, i64, i64) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FILTER (WHERE NOT coalesce(m.migrated_to_zk, false) AND m.content IS NOT NULL),
                    count(*) FILTER (WHERE coalesce(m.migrated_to_zk, false) AND m.content IS NOT NULL),
                    count(*) FILTER (WHERE coalesce(m.migrated_to_zk, false) AND m.content IS NULL)
               FROM {}",
            scoped(system)
        )))
        .bind(user_id)
        .fetch_one(pool)
        .await?;
        status.plaintext += plaintext;
        status.unverified += unverified;
        status.done += done;
    }
    Ok(status)
}

/// Rows of both chat systems, up to `limit` in all, each tagged with its system. `select`
/// gives the query for one system; `$1` is the user, `$2` the limit left.
async fn across_systems<T>(
    pool: &PgPool,
    user_id: Uuid,
    limit: i64,
    select: impl Fn(System) -> String,
) -> Result<Vec<T>>
where
    T: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> + Send + Unpin + Tagged,
{
    let limit = limit.clamp(1, MAX_BATCH);
    let mut out = Vec::new();
    for system in SYSTEMS {
        let rows: Vec<T> = sqlx::query_as(sqlx::AssertSqlSafe(select(system)))
            .bind(user_id)
            .bind(limit - out.len() as i64)
            .fetch_all(pool)
            .await?;
        out.extend(rows.into_iter().map(|row| row.tagged(system)));
        if out.len() as i64 >= limit {
            break;
        }
    }
    Ok(out)
}

/// Rows that carry the chat system they were read from.
trait Tagged {
    fn tagged(self, system: System) -> Self;
}

impl Tagged for Plaintext {
    fn tagged(self, system: System) -> Self {
        Plaintext {
            system: Some(system),
            ..self
        }
    }
}

impl Tagged for Unverified {
    fn tagged(self, system: System) -> Self {
        Unverified {
            system: Some(system),
            ..self
        }
    }
}

/// A batch of messages still in plaintext.
pub async fn plaintext_batch(pool: &PgPool, user_id: Uuid, limit: i64) -> Result<Vec<Plaintext>> {
    require_enabled(pool, user_id).await?;
    across_systems(pool, user_id, limit, |system| {
        format!(
            "SELECT m.id, m.content, encode(sha256(convert_to(m.content, 'UTF8')), 'hex') AS content_sha256
               FROM {} AND NOT coalesce(m.migrated_to_zk, false) AND m.content IS NOT NULL
              ORDER BY m.id LIMIT $2",
            scoped(system)
        )
    })
    .await
}

/// Writes envelopes, each only if its row is still the plaintext that was read (same hash, not
/// yet migrated). Returns the ids written; the others changed meanwhile.
pub async fn write_encrypted(
    pool: &PgPool,
    user_id: Uuid,
    writes: &[EncryptedWrite],
) -> Result<Vec<Uuid>> {
    require_enabled(pool, user_id).await?;
    if writes.len() as i64 > MAX_BATCH {
        return Err(Error::TooLarge(format!(
            "at most {MAX_BATCH} rows per batch"
        )));
    }
    for write in writes {
        zk::check_envelope(
            &write.encrypted_content,
            polydev_zk::Kind::Item,
            user_id,
            Some(zk::CHAT_MESSAGE),
            Some(&write.id.to_string()),
            zk::MAX_MESSAGE_ENVELOPE,
        )?;
    }
    // One statement per chat system for the whole batch.
    let mut written = Vec::new();
    for system in SYSTEMS {
        let rows: Vec<&EncryptedWrite> = writes.iter().filter(|w| w.system == system).collect();
        if rows.is_empty() {
            continue;
        }
        let ids: Vec<Uuid> = rows.iter().map(|w| w.id).collect();
        let hashes: Vec<&str> = rows.iter().map(|w| w.content_sha256.as_str()).collect();
        let envelopes: Vec<&str> = rows.iter().map(|w| w.encrypted_content.as_str()).collect();
        let done: Vec<Uuid> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "UPDATE {table} m SET encrypted_content_v2 = w.envelope, encryption_metadata_v2 = $5, migrated_to_zk = true
               FROM unnest($2::uuid[], $3::text[], $4::text[]) AS w(id, hash, envelope), {sessions} s
              WHERE m.id = w.id AND s.id = m.session_id AND s.user_id = $1
                AND NOT coalesce(m.migrated_to_zk, false)
                AND encode(sha256(convert_to(m.content, 'UTF8')), 'hex') = w.hash
             RETURNING m.id",
            table = system.messages_table(),
            sessions = system.sessions_table()
        )))
        .bind(user_id)
        .bind(&ids)
        .bind(&hashes)
        .bind(&envelopes)
        .bind(zk::envelope_metadata())
        .fetch_all(pool)
        .await?;
        written.extend(done);
    }
    Ok(written)
}

/// Encrypted rows whose plaintext is still there, for the client to verify.
pub async fn unverified_batch(pool: &PgPool, user_id: Uuid, limit: i64) -> Result<Vec<Unverified>> {
    across_systems(pool, user_id, limit, |system| {
        format!(
            "SELECT m.id, m.content, m.encrypted_content_v2 AS encrypted_content
               FROM {} AND coalesce(m.migrated_to_zk, false) AND m.content IS NOT NULL
                AND m.encrypted_content_v2 IS NOT NULL
              ORDER BY m.id LIMIT $2",
            scoped(system)
        )
    })
    .await
}

/// Runs `set` on the caller's rows among `items`, one statement per chat system.
async fn update_items(
    pool: &PgPool,
    user_id: Uuid,
    items: &[Item],
    set: &str,
    condition: &str,
) -> Result<u64> {
    let mut changed = 0;
    for system in SYSTEMS {
        let ids: Vec<Uuid> = items
            .iter()
            .filter(|i| i.system == system)
            .map(|i| i.id)
            .collect();
        if ids.is_empty() {
            continue;
        }
        let done = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE {} m SET {set} FROM {} s
              WHERE m.id = ANY($2) AND s.id = m.session_id AND s.user_id = $1 AND {condition}",
            system.messages_table(),
            system.sessions_table()
        )))
        .bind(user_id)
        .bind(&ids)
        .execute(pool)
        .await?;
        changed += done.rows_affected();
    }
    Ok(changed)
}

/// Clears the plaintext of verified rows. Idempotent; only rows that hold an envelope.
pub async fn clear_plaintext(pool: &PgPool, user_id: Uuid, items: &[Item]) -> Result<u64> {
    update_items(
        pool,
        user_id,
        items,
        "content = NULL",
        "coalesce(m.migrated_to_zk, false) AND m.encrypted_content_v2 IS NOT NULL AND m.content IS NOT NULL",
    )
    .await
}

/// Puts back into the queue rows whose envelope did not verify (their plaintext is kept).
pub async fn reset(pool: &PgPool, user_id: Uuid, items: &[Item]) -> Result<u64> {
    update_items(
        pool,
        user_id,
        items,
        "migrated_to_zk = false, encrypted_content_v2 = NULL, encryption_metadata_v2 = NULL",
        "m.content IS NOT NULL",
    )
    .await
}
