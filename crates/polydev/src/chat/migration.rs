//! Moving a user's plaintext messages to envelopes, driven by the client (which alone holds the
//! key): fetch plaintext → encrypt locally → write with a compare-and-swap on the plaintext's
//! hash (a row changed since it was read is not overwritten, and is picked up again) → read back
//! and decrypt to verify → clear the plaintext in a separate, idempotent step. Every step can be
//! interrupted and re-run: nothing is lost and nothing is encrypted twice.
//!
//! Session texts (`chat_sessions.title`; `sessions.name`, `description`, `system_prompt`) move
//! the same way, one envelope per session (`encrypted_meta_v2`). Clearing plaintext needs the
//! proof of the master password or recovery key; no write is accepted during a key rotation.
//! Which rows the client seals is its own decision: it seals only rows listed in the manifest
//! it recorded when zero-knowledge was turned on (`crate::client::zk`).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::System;
use crate::error::{Error, Result};
use crate::zk::{self, Proofs};

/// Most rows per batch.
pub const MAX_BATCH: i64 = 500;

/// `?limit=&system=&after=` of the migration's plaintext reads: a page of one chat system's
/// rows with ids after `after` (both chat systems from the start without them).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct MigrationQuery {
    pub limit: Option<i64>,
    pub system: Option<System>,
    pub after: Option<Uuid>,
}

/// A message still in plaintext.
#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow)]
pub struct Plaintext {
    #[sqlx(skip)]
    pub system: Option<System>,
    pub id: Uuid,
    pub session_id: Uuid,
    pub role: Option<String>,
    pub created_at: Option<DateTime<Utc>>,
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
    pub session_id: Uuid,
    pub role: Option<String>,
    pub created_at: Option<DateTime<Utc>>,
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
    /// Messages not yet encrypted.
    pub plaintext: i64,
    /// Encrypted, plaintext not yet cleared.
    pub unverified: i64,
    /// Encrypted and cleared.
    pub done: i64,
    /// The same for sessions' texts.
    #[serde(default)]
    pub sessions: Counts,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Counts {
    pub plaintext: i64,
    pub unverified: i64,
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
        // Dynamic: the legacy messages and sessions tables of `system` are spliced in.
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
        // Dynamic: the legacy sessions table of `system` and its text columns are spliced in.
        let (plaintext, unverified, done): (i64, i64, i64) =
            sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT count(*) FILTER (WHERE m.encrypted_meta_v2 IS NULL AND ({texts})),
                    count(*) FILTER (WHERE m.encrypted_meta_v2 IS NOT NULL AND ({texts})),
                    count(*) FILTER (WHERE m.encrypted_meta_v2 IS NOT NULL AND NOT ({texts}))
               FROM {} m WHERE m.user_id = $1",
                system.sessions_table(),
                texts = session_texts_present(system),
            )))
            .bind(user_id)
            .fetch_one(pool)
            .await?;
        status.sessions.plaintext += plaintext;
        status.sessions.unverified += unverified;
        status.sessions.done += done;
    }
    Ok(status)
}

/// Rows of both chat systems (or of `query.system` alone, after `query.after`), up to the limit
/// in all, each tagged with its system. `select` gives the query for one system; `$1` is the
/// user, `$2` the limit left, `$3` the id to start after (the nil UUID: from the start).
async fn across_systems<T>(
    pool: &PgPool,
    user_id: Uuid,
    query: MigrationQuery,
    select: impl Fn(System) -> String,
) -> Result<Vec<T>>
where
    T: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> + Send + Unpin + Tagged,
{
    let limit = query.limit.unwrap_or(100).clamp(1, MAX_BATCH);
    let mut out = Vec::new();
    for system in SYSTEMS {
        if query.system.is_some_and(|only| only != system) {
            continue;
        }
        // Dynamic: `select` splices the legacy tables and columns of `system`.
        let rows: Vec<T> = sqlx::query_as(sqlx::AssertSqlSafe(select(system)))
            .bind(user_id)
            .bind(limit - out.len() as i64)
            .bind(query.after.unwrap_or(Uuid::nil()))
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

/// A batch of messages still in plaintext (ordered by id within each system).
pub async fn plaintext_batch(
    pool: &PgPool,
    user_id: Uuid,
    query: MigrationQuery,
) -> Result<Vec<Plaintext>> {
    require_enabled(pool, user_id).await?;
    across_systems(pool, user_id, query, |system| {
        format!(
            "SELECT m.id, m.session_id, m.role, m.created_at, m.content,
                    encode(sha256(convert_to(m.content, 'UTF8')), 'hex') AS content_sha256
               FROM {} AND NOT coalesce(m.migrated_to_zk, false) AND m.content IS NOT NULL
                AND m.id > $3
              ORDER BY m.id LIMIT $2",
            scoped(system)
        )
    })
    .await
}

/// The checks every batch of envelope writes starts with: zero-knowledge on, at most
/// [`MAX_BATCH`] rows, each envelope an item of `namespace` bound to the caller and its row;
/// then a transaction that holds the user's write state (no key rotation under way).
async fn begin_batch<'a>(
    pool: &PgPool,
    user_id: Uuid,
    envelopes: impl ExactSizeIterator<Item = (Uuid, &'a str)>,
    namespace: &str,
    max_envelope: usize,
) -> Result<sqlx::Transaction<'static, sqlx::Postgres>> {
    require_enabled(pool, user_id).await?;
    if envelopes.len() as i64 > MAX_BATCH {
        return Err(Error::TooLarge(format!(
            "at most {MAX_BATCH} rows per batch"
        )));
    }
    for (id, envelope) in envelopes {
        zk::check_envelope(
            envelope,
            polydev_zk::Kind::Item,
            user_id,
            Some(namespace),
            Some(&id.to_string()),
            max_envelope,
        )?;
    }
    let mut tx = pool.begin().await?;
    zk::write_state_locked(&mut tx, user_id)
        .await?
        .ensure_not_rotating()?;
    Ok(tx)
}

/// Writes envelopes, each only if its row is still the plaintext that was read (same hash, not
/// yet migrated). Returns the ids written with the SHA-256 (hex) of each envelope as stored; the
/// others changed meanwhile.
pub async fn write_encrypted(
    pool: &PgPool,
    user_id: Uuid,
    writes: &[EncryptedWrite],
) -> Result<Vec<(Uuid, String)>> {
    let envelopes = writes.iter().map(|w| (w.id, w.encrypted_content.as_str()));
    let mut tx = begin_batch(
        pool,
        user_id,
        envelopes,
        zk::CHAT_MESSAGE,
        zk::MAX_MESSAGE_ENVELOPE,
    )
    .await?;
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
        // Dynamic: the legacy messages and sessions tables of `system` are spliced in.
        let done: Vec<(Uuid, String)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "UPDATE {table} m SET encrypted_content_v2 = w.envelope, encryption_metadata_v2 = $5, migrated_to_zk = true
               FROM unnest($2::uuid[], $3::text[], $4::text[]) AS w(id, hash, envelope), {sessions} s
              WHERE m.id = w.id AND s.id = m.session_id AND s.user_id = $1
                AND NOT coalesce(m.migrated_to_zk, false)
                AND encode(sha256(convert_to(m.content, 'UTF8')), 'hex') = w.hash
             RETURNING m.id, encode(sha256(convert_to(m.encrypted_content_v2, 'UTF8')), 'hex')",
            table = system.messages_table(),
            sessions = system.sessions_table()
        )))
        .bind(user_id)
        .bind(&ids)
        .bind(&hashes)
        .bind(&envelopes)
        .bind(zk::envelope_metadata())
        .fetch_all(&mut *tx)
        .await?;
        written.extend(done);
    }
    tx.commit().await?;
    Ok(written)
}

/// Encrypted rows whose plaintext is still there, for the client to verify.
pub async fn unverified_batch(
    pool: &PgPool,
    user_id: Uuid,
    query: MigrationQuery,
) -> Result<Vec<Unverified>> {
    across_systems(pool, user_id, query, |system| {
        format!(
            "SELECT m.id, m.session_id, m.role, m.created_at, m.content,
                    m.encrypted_content_v2 AS encrypted_content
               FROM {} AND coalesce(m.migrated_to_zk, false) AND m.content IS NOT NULL
                AND m.encrypted_content_v2 IS NOT NULL AND m.id > $3
              ORDER BY m.id LIMIT $2",
            scoped(system)
        )
    })
    .await
}

/// Runs `set` on the caller's rows among `items`, one statement per chat system.
async fn update_items(
    conn: &mut PgConnection,
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
        // Dynamic: the legacy tables of `system` and the caller's SET and condition are spliced in.
        let done = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE {} m SET {set} FROM {} s
              WHERE m.id = ANY($2) AND s.id = m.session_id AND s.user_id = $1 AND {condition}",
            system.messages_table(),
            system.sessions_table()
        )))
        .bind(user_id)
        .bind(&ids)
        .execute(&mut *conn)
        .await?;
        changed += done.rows_affected();
    }
    Ok(changed)
}

/// Clears the plaintext of verified rows. Idempotent; only rows that hold an envelope. Needs
/// the proof of the master password or recovery key: clearing is the step that cannot be
/// undone.
pub async fn clear_plaintext(
    pool: &PgPool,
    user_id: Uuid,
    proofs: &Proofs,
    items: &[Item],
) -> Result<u64> {
    let mut tx = pool.begin().await?;
    zk::verify_proof(&mut tx, user_id, proofs).await?;
    let cleared = update_items(
        &mut tx,
        user_id,
        items,
        "content = NULL",
        "coalesce(m.migrated_to_zk, false) AND m.encrypted_content_v2 IS NOT NULL AND m.content IS NOT NULL",
    )
    .await?;
    tx.commit().await?;
    Ok(cleared)
}

/// Puts back into the queue rows whose envelope did not verify (their plaintext is kept).
pub async fn reset(pool: &PgPool, user_id: Uuid, items: &[Item]) -> Result<u64> {
    let mut conn = pool.acquire().await?;
    update_items(
        &mut conn,
        user_id,
        items,
        "migrated_to_zk = false, encrypted_content_v2 = NULL, encryption_metadata_v2 = NULL",
        "m.content IS NOT NULL",
    )
    .await
}

/// The condition "some text of the session is still in plaintext" (static: safe in SQL).
fn session_texts_present(system: System) -> &'static str {
    match system {
        System::Chat => "m.title IS NOT NULL",
        System::Sessions => {
            "m.name IS NOT NULL OR m.description IS NOT NULL OR m.system_prompt IS NOT NULL"
        }
    }
}

/// The session's texts as one JSON array, hashed: the compare-and-swap token.
fn session_texts_hash(system: System) -> &'static str {
    match system {
        System::Chat => {
            "encode(sha256(convert_to(json_build_array(m.title)::text, 'UTF8')), 'hex')"
        }
        System::Sessions => {
            "encode(sha256(convert_to(json_build_array(m.name, m.description, m.system_prompt)::text, 'UTF8')), 'hex')"
        }
    }
}

/// `title, description, system_prompt` of a session (the `sessions` system's `name` is its
/// title; `chat_sessions` has only a title).
fn session_texts(system: System) -> &'static str {
    match system {
        System::Chat => "m.title, NULL::text AS description, NULL::text AS system_prompt",
        System::Sessions => "m.name AS title, m.description, m.system_prompt",
    }
}

/// A session whose texts are still in plaintext.
#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow)]
pub struct PlaintextSession {
    #[sqlx(skip)]
    pub system: Option<System>,
    pub id: Uuid,
    pub title: Option<String>,
    pub description: Option<String>,
    pub system_prompt: Option<String>,
    /// The compare-and-swap token (computed by the server; send it back as it is).
    pub texts_sha256: String,
}

/// A sealed session whose plaintext texts are still there, for the client to verify.
#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow)]
pub struct UnverifiedSession {
    #[sqlx(skip)]
    pub system: Option<System>,
    pub id: Uuid,
    pub title: Option<String>,
    pub description: Option<String>,
    pub system_prompt: Option<String>,
    pub encrypted_meta: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EncryptedSession {
    pub system: System,
    pub id: Uuid,
    pub texts_sha256: String,
    pub encrypted_meta: String,
}

impl Tagged for PlaintextSession {
    fn tagged(self, system: System) -> Self {
        PlaintextSession {
            system: Some(system),
            ..self
        }
    }
}

impl Tagged for UnverifiedSession {
    fn tagged(self, system: System) -> Self {
        UnverifiedSession {
            system: Some(system),
            ..self
        }
    }
}

/// A batch of sessions whose texts are still in plaintext.
pub async fn plaintext_sessions(
    pool: &PgPool,
    user_id: Uuid,
    query: MigrationQuery,
) -> Result<Vec<PlaintextSession>> {
    require_enabled(pool, user_id).await?;
    across_systems(pool, user_id, query, |system| {
        format!(
            "SELECT m.id, {texts}, {hash} AS texts_sha256 FROM {table} m
              WHERE m.user_id = $1 AND m.encrypted_meta_v2 IS NULL AND ({present}) AND m.id > $3
              ORDER BY m.id LIMIT $2",
            texts = session_texts(system),
            hash = session_texts_hash(system),
            table = system.sessions_table(),
            present = session_texts_present(system),
        )
    })
    .await
}

/// Writes session envelopes, each only if the session's texts are still those read.
pub async fn write_sessions(
    pool: &PgPool,
    user_id: Uuid,
    writes: &[EncryptedSession],
) -> Result<Vec<Uuid>> {
    let envelopes = writes.iter().map(|w| (w.id, w.encrypted_meta.as_str()));
    let mut tx = begin_batch(
        pool,
        user_id,
        envelopes,
        zk::CHAT_SESSION,
        zk::MAX_SESSION_ENVELOPE,
    )
    .await?;
    let mut written = Vec::new();
    for system in SYSTEMS {
        let rows: Vec<&EncryptedSession> = writes.iter().filter(|w| w.system == system).collect();
        if rows.is_empty() {
            continue;
        }
        let ids: Vec<Uuid> = rows.iter().map(|w| w.id).collect();
        let hashes: Vec<&str> = rows.iter().map(|w| w.texts_sha256.as_str()).collect();
        let envelopes: Vec<&str> = rows.iter().map(|w| w.encrypted_meta.as_str()).collect();
        // Dynamic: the legacy sessions table of `system` and its texts' hash are spliced in.
        let done: Vec<Uuid> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "UPDATE {table} m SET encrypted_meta_v2 = w.envelope
               FROM unnest($2::uuid[], $3::text[], $4::text[]) AS w(id, hash, envelope)
              WHERE m.id = w.id AND m.user_id = $1 AND m.encrypted_meta_v2 IS NULL
                AND {hash} = w.hash
             RETURNING m.id",
            table = system.sessions_table(),
            hash = session_texts_hash(system),
        )))
        .bind(user_id)
        .bind(&ids)
        .bind(&hashes)
        .bind(&envelopes)
        .fetch_all(&mut *tx)
        .await?;
        written.extend(done);
    }
    tx.commit().await?;
    Ok(written)
}

/// Sealed sessions whose plaintext texts are still there.
pub async fn unverified_sessions(
    pool: &PgPool,
    user_id: Uuid,
    query: MigrationQuery,
) -> Result<Vec<UnverifiedSession>> {
    across_systems(pool, user_id, query, |system| {
        format!(
            "SELECT m.id, {texts}, m.encrypted_meta_v2 AS encrypted_meta FROM {table} m
              WHERE m.user_id = $1 AND m.encrypted_meta_v2 IS NOT NULL AND ({present})
                AND m.id > $3
              ORDER BY m.id LIMIT $2",
            texts = session_texts(system),
            table = system.sessions_table(),
            present = session_texts_present(system),
        )
    })
    .await
}

/// Runs `set` on the caller's sessions among `items` that meet `condition` (per system:
/// static SQL).
async fn update_sessions(
    conn: &mut PgConnection,
    user_id: Uuid,
    items: &[Item],
    change: impl Fn(System) -> (&'static str, &'static str),
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
        let (set, condition) = change(system);
        // Dynamic: the legacy sessions table of `system` and its SET and condition are spliced in.
        let done = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE {} m SET {set} WHERE m.id = ANY($2) AND m.user_id = $1 AND {condition}",
            system.sessions_table(),
        )))
        .bind(user_id)
        .bind(&ids)
        .execute(&mut *conn)
        .await?;
        changed += done.rows_affected();
    }
    Ok(changed)
}

/// Clears the plaintext texts of verified sessions (only sessions that hold an envelope).
/// Needs a proof.
pub async fn clear_sessions(
    pool: &PgPool,
    user_id: Uuid,
    proofs: &Proofs,
    items: &[Item],
) -> Result<u64> {
    let mut tx = pool.begin().await?;
    zk::verify_proof(&mut tx, user_id, proofs).await?;
    let cleared = update_sessions(&mut tx, user_id, items, |system| {
        (
            match system {
                System::Chat => "title = NULL",
                System::Sessions => "name = NULL, description = NULL, system_prompt = NULL",
            },
            match system {
                System::Chat => "m.encrypted_meta_v2 IS NOT NULL AND m.title IS NOT NULL",
                System::Sessions => {
                    "m.encrypted_meta_v2 IS NOT NULL AND (m.name IS NOT NULL OR m.description IS NOT NULL OR m.system_prompt IS NOT NULL)"
                }
            },
        )
    })
    .await?;
    tx.commit().await?;
    Ok(cleared)
}

/// Drops session envelopes that did not verify (the plaintext is kept).
pub async fn reset_sessions(pool: &PgPool, user_id: Uuid, items: &[Item]) -> Result<u64> {
    let mut conn = pool.acquire().await?;
    update_sessions(&mut conn, user_id, items, |system| {
        (
            "encrypted_meta_v2 = NULL",
            session_texts_present_paren(system),
        )
    })
    .await
}

fn session_texts_present_paren(system: System) -> &'static str {
    match system {
        System::Chat => "(m.title IS NOT NULL)",
        System::Sessions => {
            "(m.name IS NOT NULL OR m.description IS NOT NULL OR m.system_prompt IS NOT NULL)"
        }
    }
}
