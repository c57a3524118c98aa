//! One chat API over the two legacy chat systems (`chat_sessions`/`chat_messages` and
//! `sessions`/`messages`). Reads follow the seed's rule: `migrated_to_zk` → the envelope in
//! `encrypted_content_v2`, else the plaintext `content`. Once a user has zero-knowledge on, every
//! write must be an envelope for that message or session (its title); plaintext is refused, and
//! so is any envelope while a key rotation is in progress.

pub mod migration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use uuid::Uuid;

use crate::error::{Error, Result, reject_nul};
use crate::zk;

/// Longest plaintext message accepted.
pub const MAX_CONTENT_CHARS: usize = 100_000;

/// Which legacy system a session lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum System {
    /// `chat_sessions` / `chat_messages`
    Chat,
    /// `sessions` / `messages`
    Sessions,
}

impl System {
    /// The messages table. Static names: safe to splice into SQL.
    pub(crate) fn messages_table(self) -> &'static str {
        match self {
            System::Chat => "chat_messages",
            System::Sessions => "messages",
        }
    }
    pub(crate) fn sessions_table(self) -> &'static str {
        match self {
            System::Chat => "chat_sessions",
            System::Sessions => "sessions",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow, schemars::JsonSchema)]
pub struct ChatSession {
    pub id: Uuid,
    #[sqlx(try_from = "String")]
    pub system: SystemName,
    /// The plaintext title (`chat_sessions.title`, `sessions.name`), for a session not sealed.
    pub title: Option<String>,
    /// The sealed session (an item envelope for `chat.session`, bound to `id`): its title, or
    /// its name, description and system prompt.
    pub encrypted_meta: Option<String>,
    /// `sessions.description` and `sessions.system_prompt` in plaintext (none for `chat`).
    pub description: Option<String>,
    pub system_prompt: Option<String>,
    pub archived: Option<bool>,
    pub created_at: Option<DateTime<Utc>>,
    pub updated_at: Option<DateTime<Utc>>,
}

/// `System` as read from SQL text.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(transparent)]
pub struct SystemName(pub System);

impl TryFrom<String> for SystemName {
    type Error = String;
    fn try_from(value: String) -> std::result::Result<Self, String> {
        match value.as_str() {
            "chat" => Ok(SystemName(System::Chat)),
            "sessions" => Ok(SystemName(System::Sessions)),
            other => Err(format!("unknown chat system {other}")),
        }
    }
}

/// Decoded from SQL text through `TryFrom<String>` (`"system!: SystemName"` in the query
/// macros).
impl sqlx::Type<sqlx::Postgres> for SystemName {
    fn type_info() -> sqlx::postgres::PgTypeInfo {
        <String as sqlx::Type<sqlx::Postgres>>::type_info()
    }
    fn compatible(ty: &sqlx::postgres::PgTypeInfo) -> bool {
        <String as sqlx::Type<sqlx::Postgres>>::compatible(ty)
    }
}

impl<'r> sqlx::Decode<'r, sqlx::Postgres> for SystemName {
    fn decode(
        value: sqlx::postgres::PgValueRef<'r>,
    ) -> std::result::Result<Self, sqlx::error::BoxDynError> {
        let text = <String as sqlx::Decode<sqlx::Postgres>>::decode(value)?;
        Ok(SystemName::try_from(text)?)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow, schemars::JsonSchema)]
pub struct ChatMessage {
    pub id: Uuid,
    pub role: Option<String>,
    /// The plaintext, for a message not migrated to zero-knowledge.
    pub content: Option<String>,
    /// The envelope (`pdz.…`), for a migrated message.
    pub encrypted_content: Option<String>,
    pub created_at: Option<DateTime<Utc>>,
    /// The catalogue model that wrote an assistant message (`chat_messages.model_id`; none in
    /// the `sessions` system).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// What the answer cost (`chat_messages.usage_info`): latency, tokens, cost. Metadata, in
    /// plaintext like the usage rows, also for zero-knowledge accounts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NewMessage {
    /// Required with `encrypted_content`: the envelope is bound to this id.
    pub id: Option<Uuid>,
    pub role: String,
    pub content: Option<String>,
    pub encrypted_content: Option<String>,
    /// The creation time to store (a client that seals a record binds it); else now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<DateTime<Utc>>,
    /// The catalogue model that wrote an assistant message (stored in the `chat` system).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The answer's latency, tokens and cost: a JSON object of at most 1 KiB (stored in the
    /// `chat` system).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<serde_json::Value>,
}

/// `PATCH /v1/chat/sessions/{id}`: a new title, in plaintext or (zero-knowledge) sealed.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionRename {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// The sealed session (an item envelope for `chat.session`, bound to the session id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encrypted_meta: Option<String>,
}

/// `POST /v1/chat/sessions`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NewSession {
    /// The session's id, chosen by the client (required with `encrypted_meta`, which is bound
    /// to it); else the server picks one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Uuid>,
    /// A plaintext title: refused once zero-knowledge is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// The sealed title (an item envelope for `chat.session`, bound to `id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encrypted_meta: Option<String>,
}

pub async fn list_sessions(pool: &PgPool, user_id: Uuid) -> Result<Vec<ChatSession>> {
    // A UNION's columns come from no one table: `id` and `system` are declared non-NULL.
    Ok(sqlx::query_as!(
        ChatSession,
        r#"SELECT id AS "id!", 'chat' AS "system!: SystemName", title,
                  encrypted_meta_v2 AS encrypted_meta, NULL::text AS description,
                  NULL::text AS system_prompt, archived, created_at, updated_at
             FROM chat_sessions WHERE user_id = $1
           UNION ALL
           SELECT id, 'sessions', name, encrypted_meta_v2, description, system_prompt,
                  NOT coalesce(is_active, true), created_at, updated_at
             FROM sessions WHERE user_id = $1
           ORDER BY updated_at DESC NULLS LAST, "id!" LIMIT 1000"#,
        user_id
    )
    .fetch_all(pool)
    .await?)
}

/// The system holding `session_id`, if it is the caller's (404 otherwise, whoever owns it).
async fn owning_system(pool: &PgPool, user_id: Uuid, session_id: Uuid) -> Result<System> {
    for system in [System::Chat, System::Sessions] {
        // Dynamic: the legacy sessions table of `system` is spliced in.
        let owned: bool = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT EXISTS (SELECT 1 FROM {} WHERE id = $1 AND user_id = $2)",
            system.sessions_table()
        )))
        .bind(session_id)
        .bind(user_id)
        .fetch_one(pool)
        .await?;
        if owned {
            return Ok(system);
        }
    }
    Err(Error::NotFound("session"))
}

const MESSAGE_COLUMNS: &str = "id, role,
    CASE WHEN coalesce(migrated_to_zk, false) THEN NULL ELSE content END AS content,
    CASE WHEN coalesce(migrated_to_zk, false) THEN encrypted_content_v2 END AS encrypted_content,
    created_at";

/// [`MESSAGE_COLUMNS`] with the model and usage, which only `chat_messages` has.
fn message_columns(system: System) -> String {
    match system {
        System::Chat => format!("{MESSAGE_COLUMNS}, model_id AS model, usage_info AS usage"),
        System::Sessions => format!("{MESSAGE_COLUMNS}, NULL::text AS model, NULL::jsonb AS usage"),
    }
}

/// Checks the model and usage of a new message.
fn check_metadata(message: &NewMessage) -> Result<()> {
    if let Some(model) = &message.model {
        reject_nul("model", model)?;
        if model.is_empty() || model.len() > 200 {
            return Err(Error::Invalid("`model` must be 1 to 200 characters".into()));
        }
    }
    if let Some(usage) = &message.usage
        && (!usage.is_object() || usage.to_string().len() > 1024)
    {
        return Err(Error::Invalid(
            "`usage` must be a JSON object of at most 1 KiB".into(),
        ));
    }
    Ok(())
}

pub async fn list_messages(
    pool: &PgPool,
    user_id: Uuid,
    session_id: Uuid,
) -> Result<Vec<ChatMessage>> {
    let system = owning_system(pool, user_id, session_id).await?;
    // Dynamic: the legacy messages table of `system` is spliced in.
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {} FROM {} WHERE session_id = $1 ORDER BY created_at, id",
        message_columns(system),
        system.messages_table()
    )))
    .bind(session_id)
    .fetch_all(pool)
    .await?)
}

/// Adds a message to one of the caller's sessions. Returns it and whether it was created: sending
/// the same message (same id, role and content) again returns the stored one, while another
/// message under a taken id is a conflict.
pub async fn add_message(
    pool: &PgPool,
    user_id: Uuid,
    session_id: Uuid,
    message: &NewMessage,
) -> Result<(ChatMessage, bool)> {
    if !["user", "assistant", "system"].contains(&message.role.as_str()) {
        return Err(Error::Invalid(
            "`role` must be user, assistant or system".into(),
        ));
    }
    check_metadata(message)?;
    let system = owning_system(pool, user_id, session_id).await?;
    let id = message.id.unwrap_or_else(Uuid::new_v4);
    let table = system.messages_table();
    let columns = message_columns(system);
    // Only `chat_messages` has columns for the model and the usage.
    let (model, usage) = match system {
        System::Chat => (message.model.as_deref(), message.usage.as_ref()),
        System::Sessions => (None, None),
    };
    let mut tx = pool.begin().await?;
    // Read under a share lock on the user's row, so a plaintext write cannot race past a
    // concurrent `enable` (which updates that row), nor an envelope past a rotation's start.
    let state = zk::write_state_locked(&mut tx, user_id).await?;
    let zero_knowledge = state.enabled;
    let created_at = message.created_at.unwrap_or_else(Utc::now);
    let inserted: Option<ChatMessage> = match (&message.content, &message.encrypted_content) {
        (Some(_), Some(_)) => {
            return Err(Error::Invalid(
                "send `content` or `encrypted_content`, not both".into(),
            ));
        }
        (None, None) => {
            return Err(Error::Invalid(
                "send `content` or `encrypted_content`".into(),
            ));
        }
        (Some(_), None) if zero_knowledge => {
            return Err(Error::Invalid(
                "zero-knowledge is on for this account: messages must be sent as `encrypted_content` envelopes, never plaintext".into(),
            ));
        }
        (Some(content), None) => {
            reject_nul("content", content)?;
            if content.chars().count() > MAX_CONTENT_CHARS {
                return Err(Error::TooLarge(format!(
                    "a message may be at most {MAX_CONTENT_CHARS} characters"
                )));
            }
            // Dynamic: the legacy messages table of `system` is spliced in.
            sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "INSERT INTO {table} (id, session_id, role, content, created_at{})
                 VALUES ($1, $2, $3, $4, $5{})
                 ON CONFLICT (id) DO NOTHING
                 RETURNING {columns}",
                metadata_columns(system),
                metadata_values(system, 6),
            )))
            .bind(id)
            .bind(session_id)
            .bind(&message.role)
            .bind(content)
            .bind(created_at)
            .bind_metadata(system, model, usage)
            .fetch_optional(&mut *tx)
            .await?
        }
        (None, Some(envelope)) => {
            let Some(id) = message.id else {
                return Err(Error::Invalid(
                    "`id` is required with `encrypted_content` (the envelope is bound to it)"
                        .into(),
                ));
            };
            zk::check_envelope(
                envelope,
                polydev_zk::Kind::Item,
                user_id,
                Some(zk::CHAT_MESSAGE),
                Some(&id.to_string()),
                zk::MAX_MESSAGE_ENVELOPE,
            )?;
            state.ensure_not_rotating()?;
            // Dynamic: the legacy messages table of `system` is spliced in.
            sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "INSERT INTO {table} (id, session_id, role, encrypted_content_v2, encryption_metadata_v2, migrated_to_zk, created_at{})
                 VALUES ($1, $2, $3, $4, $5, true, $6{})
                 ON CONFLICT (id) DO NOTHING
                 RETURNING {columns}",
                metadata_columns(system),
                metadata_values(system, 7),
            )))
            .bind(id)
            .bind(session_id)
            .bind(&message.role)
            .bind(envelope)
            .bind(zk::envelope_metadata())
            .bind(created_at)
            .bind_metadata(system, model, usage)
            .fetch_optional(&mut *tx)
            .await?
        }
    };
    let Some(inserted) = inserted else {
        drop(tx);
        return same_message_again(pool, system, session_id, id, message).await;
    };
    if system == System::Sessions {
        // Keep the legacy counters that the old code shows.
        sqlx::query!(
            "UPDATE sessions SET message_count = coalesce(message_count, 0) + 1,
                    last_activity_at = now(), updated_at = now() WHERE id = $1",
            session_id
        )
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok((inserted, true))
}

/// A message whose id is taken: the stored one if it is the same message (a retried send),
/// else a conflict.
async fn same_message_again(
    pool: &PgPool,
    system: System,
    session_id: Uuid,
    id: Uuid,
    message: &NewMessage,
) -> Result<(ChatMessage, bool)> {
    // Only a message of the same session can be the same message. Dynamic: the legacy messages
    // table of `system` is spliced in.
    let stored: Option<ChatMessage> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {} FROM {} WHERE id = $1 AND session_id = $2",
        message_columns(system),
        system.messages_table()
    )))
    .bind(id)
    .bind(session_id)
    .fetch_optional(pool)
    .await?;
    match stored {
        Some(stored)
            if stored.role.as_deref() == Some(message.role.as_str())
                && stored.content == message.content
                && stored.encrypted_content == message.encrypted_content =>
        {
            Ok((stored, false))
        }
        _ => Err(Error::Conflict(format!(
            "a different message with id {id} already exists"
        ))),
    }
}

/// Creates a session in the `chat_sessions` system (the one new sessions use). With
/// zero-knowledge on, a plaintext title is refused: send `encrypted_meta`, an envelope for
/// `chat.session` bound to the session id the client chose. Sending the same session again
/// returns the stored one (`false`: not created).
pub async fn create_session(
    pool: &PgPool,
    user_id: Uuid,
    session: &NewSession,
) -> Result<(ChatSession, bool)> {
    let title = session.title.as_deref();
    if let Some(title) = title {
        reject_nul("title", title)?;
    }
    if title.is_some_and(|t| t.chars().count() > 500) {
        return Err(Error::Invalid(
            "a title may be at most 500 characters".into(),
        ));
    }
    if let Some(envelope) = &session.encrypted_meta {
        let Some(id) = session.id else {
            return Err(Error::Invalid(
                "`id` is required with `encrypted_meta` (the envelope is bound to it)".into(),
            ));
        };
        if title.is_some() {
            return Err(Error::Invalid(
                "send `title` or `encrypted_meta`, not both".into(),
            ));
        }
        zk::check_envelope(
            envelope,
            polydev_zk::Kind::Item,
            user_id,
            Some(zk::CHAT_SESSION),
            Some(&id.to_string()),
            zk::MAX_SESSION_ENVELOPE,
        )?;
    }
    let mut tx = pool.begin().await?;
    let state = zk::write_state_locked(&mut tx, user_id).await?;
    if state.enabled && title.is_some() {
        return Err(Error::Invalid(
            "zero-knowledge is on for this account: a session title must be sent as `encrypted_meta`, never plaintext".into(),
        ));
    }
    if session.encrypted_meta.is_some() {
        state.ensure_not_rotating()?;
    }
    let id = session.id.unwrap_or_else(Uuid::new_v4);
    let created = sqlx::query_as!(
        ChatSession,
        r#"INSERT INTO chat_sessions (id, user_id, title, encrypted_meta_v2, archived)
           VALUES ($1, $2, $3, $4, false)
           ON CONFLICT (id) DO NOTHING
           RETURNING id, 'chat' AS "system!: SystemName", title,
                     encrypted_meta_v2 AS encrypted_meta, NULL::text AS description,
                     NULL::text AS system_prompt, archived, created_at, updated_at"#,
        id,
        user_id,
        title,
        session.encrypted_meta.as_deref()
    )
    .fetch_optional(&mut *tx)
    .await?;
    tx.commit().await?;
    if let Some(created) = created {
        return Ok((created, true));
    }
    // A retried create: the same session of the same user.
    let stored = sqlx::query_as!(
        ChatSession,
        r#"SELECT id, 'chat' AS "system!: SystemName", title,
                  encrypted_meta_v2 AS encrypted_meta, NULL::text AS description,
                  NULL::text AS system_prompt, archived, created_at, updated_at
             FROM chat_sessions WHERE id = $1 AND user_id = $2"#,
        id,
        user_id
    )
    .fetch_optional(pool)
    .await?;
    match stored {
        Some(stored)
            if stored.title.as_deref() == title
                && stored.encrypted_meta == session.encrypted_meta =>
        {
            Ok((stored, false))
        }
        _ => Err(Error::Conflict(format!(
            "a different session with id {id} already exists"
        ))),
    }
}

/// The model and usage columns of an insert into `system`'s messages (none for `sessions`).
fn metadata_columns(system: System) -> &'static str {
    match system {
        System::Chat => ", model_id, usage_info",
        System::Sessions => "",
    }
}

/// Their placeholders, from `$first`.
fn metadata_values(system: System, first: usize) -> String {
    match system {
        System::Chat => format!(", ${first}, ${}", first + 1),
        System::Sessions => String::new(),
    }
}

/// Binds the model and usage where [`metadata_values`] put placeholders for them.
trait BindMetadata {
    fn bind_metadata(
        self,
        system: System,
        model: Option<&str>,
        usage: Option<&serde_json::Value>,
    ) -> Self;
}

impl<'q> BindMetadata
    for sqlx::query::QueryAs<'q, sqlx::Postgres, ChatMessage, sqlx::postgres::PgArguments>
{
    fn bind_metadata(
        self,
        system: System,
        model: Option<&str>,
        usage: Option<&serde_json::Value>,
    ) -> Self {
        match system {
            System::Chat => self.bind(model.map(str::to_string)).bind(usage.cloned()),
            System::Sessions => self,
        }
    }
}

/// Renames one of the caller's sessions, in either system. With zero-knowledge on, the title
/// must be sealed (`encrypted_meta`, bound to the session id) and any plaintext title is
/// cleared; without, a plaintext `title`.
pub async fn rename_session(
    pool: &PgPool,
    user_id: Uuid,
    session_id: Uuid,
    rename: &SessionRename,
) -> Result<ChatSession> {
    let system = owning_system(pool, user_id, session_id).await?;
    match (&rename.title, &rename.encrypted_meta) {
        (Some(_), Some(_)) | (None, None) => {
            return Err(Error::Invalid(
                "send `title` or `encrypted_meta`, one of them".into(),
            ));
        }
        (Some(title), None) => {
            reject_nul("title", title)?;
            if title.trim().is_empty() || title.chars().count() > 500 {
                return Err(Error::Invalid("a title must be 1 to 500 characters".into()));
            }
        }
        (None, Some(envelope)) => {
            zk::check_envelope(
                envelope,
                polydev_zk::Kind::Item,
                user_id,
                Some(zk::CHAT_SESSION),
                Some(&session_id.to_string()),
                zk::MAX_SESSION_ENVELOPE,
            )?;
        }
    }
    let mut tx = pool.begin().await?;
    let state = zk::write_state_locked(&mut tx, user_id).await?;
    if state.enabled && rename.title.is_some() {
        return Err(Error::Invalid(
            "zero-knowledge is on for this account: a session title must be sent as `encrypted_meta`, never plaintext".into(),
        ));
    }
    if rename.encrypted_meta.is_some() {
        state.ensure_not_rotating()?;
    }
    let title_column = match system {
        System::Chat => "title",
        System::Sessions => "name",
    };
    // Dynamic: the legacy sessions table of `system` and its title column are spliced in.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE {} SET {title_column} = $3, encrypted_meta_v2 = $4, updated_at = now()
          WHERE id = $1 AND user_id = $2",
        system.sessions_table()
    )))
    .bind(session_id)
    .bind(user_id)
    .bind(rename.title.as_deref())
    .bind(rename.encrypted_meta.as_deref())
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    list_sessions(pool, user_id)
        .await?
        .into_iter()
        .find(|s| s.id == session_id)
        .ok_or(Error::NotFound("session"))
}

/// Deletes one of the caller's sessions and all its messages, in either system, for good (in
/// one transaction). Returns how many messages went.
pub async fn delete_session(pool: &PgPool, user_id: Uuid, session_id: Uuid) -> Result<u64> {
    let system = owning_system(pool, user_id, session_id).await?;
    let mut tx = pool.begin().await?;
    // Dynamic: the legacy tables of `system` are spliced in. The session's row is deleted
    // only if it is still the caller's, after its messages.
    let messages = sqlx::query(sqlx::AssertSqlSafe(format!(
        "DELETE FROM {} m USING {} s
          WHERE m.session_id = s.id AND s.id = $1 AND s.user_id = $2",
        system.messages_table(),
        system.sessions_table()
    )))
    .bind(session_id)
    .bind(user_id)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    let sessions = sqlx::query(sqlx::AssertSqlSafe(format!(
        "DELETE FROM {} WHERE id = $1 AND user_id = $2",
        system.sessions_table()
    )))
    .bind(session_id)
    .bind(user_id)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if sessions == 0 {
        return Err(Error::NotFound("session"));
    }
    tx.commit().await?;
    Ok(messages)
}
