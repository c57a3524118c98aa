//! `/v1/zk`: zero-knowledge key material and the plaintext-to-envelope migration; `/v1/chat`:
//! one chat API over both legacy chat systems.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

use super::{ApiError, AppState, Authenticated};
use crate::chat::{self, ChatMessage, ChatSession, NewMessage};
use crate::vault;
use crate::zk::migration::{self, EncryptedWrite, Item};
use crate::zk::{self, KeyMaterial, ZkStatus};

/// A batch of up to 500 envelopes of up to 1 MiB would be too much for one request: 16 MiB.
const MAX_MIGRATION_BODY: usize = 16 * 1024 * 1024;
const MAX_MESSAGE_BODY: usize = 2 * 1024 * 1024;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/zk", get(status))
        .route("/v1/zk/enable", post(enable))
        .route("/v1/zk/password", put(password))
        .route("/v1/zk/recovery", put(recovery))
        .route("/v1/zk/migration", get(migration_status))
        .route("/v1/zk/migration/plaintext", get(plaintext))
        .route(
            "/v1/zk/migration/encrypted",
            post(encrypted).layer(DefaultBodyLimit::max(MAX_MIGRATION_BODY)),
        )
        .route("/v1/zk/migration/unverified", get(unverified))
        .route("/v1/zk/migration/clear", post(clear))
        .route("/v1/zk/migration/reset", post(reset))
        .route("/v1/zk/credentials", get(credential_envelopes))
        .route("/v1/zk/credentials/hand-over", post(hand_over))
        .route("/v1/zk/credentials/encrypted", post(store_credentials))
        .route("/v1/zk/credentials/clear", post(clear_credentials))
        .route("/v1/chat/sessions", get(sessions).post(create_session))
        .route(
            "/v1/chat/sessions/{id}/messages",
            get(messages)
                .post(add_message)
                .layer(DefaultBodyLimit::max(MAX_MESSAGE_BODY)),
        )
}

type Body<T> = Result<Json<T>, JsonRejection>;

async fn status(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
) -> Result<Json<ZkStatus>, ApiError> {
    Ok(Json(zk::status(&state.pool, caller.user_id).await?))
}

async fn enable(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    body: Body<KeyMaterial>,
) -> Result<StatusCode, ApiError> {
    let Json(material) = body?;
    zk::enable(&state.pool, caller.user_id, &material).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Replace {
    /// The envelope being replaced, exactly as fetched.
    previous: String,
    material: KeyMaterial,
}

async fn password(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    body: Body<Replace>,
) -> Result<StatusCode, ApiError> {
    let Json(r) = body?;
    zk::replace_password_envelope(&state.pool, caller.user_id, &r.previous, &r.material).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn recovery(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    body: Body<Replace>,
) -> Result<StatusCode, ApiError> {
    let Json(r) = body?;
    zk::replace_recovery_envelope(&state.pool, caller.user_id, &r.previous, &r.material).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
struct Batch {
    limit: Option<i64>,
}

async fn migration_status(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
) -> Result<Json<migration::Status>, ApiError> {
    Ok(Json(migration::status(&state.pool, caller.user_id).await?))
}

async fn plaintext(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    query: Result<Query<Batch>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(batch) = query.map_err(|e| ApiError(crate::error::Error::Invalid(e.body_text())))?;
    let rows =
        migration::plaintext_batch(&state.pool, caller.user_id, batch.limit.unwrap_or(100)).await?;
    Ok(Json(json!({ "messages": rows })))
}

async fn encrypted(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    body: Body<Vec<EncryptedWrite>>,
) -> Result<Json<Value>, ApiError> {
    let Json(writes) = body?;
    let written = migration::write_encrypted(&state.pool, caller.user_id, &writes).await?;
    Ok(Json(json!({ "written": written })))
}

async fn unverified(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    query: Result<Query<Batch>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(batch) = query.map_err(|e| ApiError(crate::error::Error::Invalid(e.body_text())))?;
    let rows = migration::unverified_batch(&state.pool, caller.user_id, batch.limit.unwrap_or(100))
        .await?;
    Ok(Json(json!({ "messages": rows })))
}

async fn clear(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    body: Body<Vec<Item>>,
) -> Result<Json<Value>, ApiError> {
    let Json(items) = body?;
    let cleared = migration::clear_plaintext(&state.pool, caller.user_id, &items).await?;
    Ok(Json(json!({ "cleared": cleared })))
}

async fn reset(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    body: Body<Vec<Item>>,
) -> Result<Json<Value>, ApiError> {
    let Json(items) = body?;
    let reset = migration::reset(&state.pool, caller.user_id, &items).await?;
    Ok(Json(json!({ "reset": reset })))
}

async fn sessions(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
) -> Result<Json<Vec<ChatSession>>, ApiError> {
    Ok(Json(
        chat::list_sessions(&state.pool, caller.user_id).await?,
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewSession {
    title: Option<String>,
}

async fn create_session(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    body: Body<NewSession>,
) -> Result<(StatusCode, Json<ChatSession>), ApiError> {
    let Json(session) = body?;
    let created =
        chat::create_session(&state.pool, caller.user_id, session.title.as_deref()).await?;
    Ok((StatusCode::CREATED, Json(created)))
}

async fn messages(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    id: Result<Path<Uuid>, PathRejection>,
) -> Result<Json<Vec<ChatMessage>>, ApiError> {
    let Path(id) = id?;
    Ok(Json(
        chat::list_messages(&state.pool, caller.user_id, id).await?,
    ))
}

async fn add_message(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    id: Result<Path<Uuid>, PathRejection>,
    body: Body<NewMessage>,
) -> Result<(StatusCode, Json<ChatMessage>), ApiError> {
    let Path(id) = id?;
    let Json(message) = body?;
    let added = chat::add_message(&state.pool, caller.user_id, id, &message).await?;
    Ok((StatusCode::CREATED, Json(added)))
}

async fn hand_over(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    query: Result<Query<Batch>, QueryRejection>,
) -> Result<Json<Vec<vault::HandedOver>>, ApiError> {
    let Query(batch) = query.map_err(|e| ApiError(crate::error::Error::Invalid(e.body_text())))?;
    let handed = vault::hand_over(
        &state.pool,
        state.legacy_secret.as_ref(),
        caller.user_id,
        batch.limit.unwrap_or(50),
    )
    .await?;
    Ok(Json(handed))
}

async fn store_credentials(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    body: Body<Vec<vault::Sealed>>,
) -> Result<Json<Value>, ApiError> {
    let Json(sealed) = body?;
    let stored = vault::store(&state.pool, caller.user_id, &sealed).await?;
    Ok(Json(json!({ "stored": stored })))
}

async fn credential_envelopes(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
) -> Result<Json<Vec<vault::Sealed>>, ApiError> {
    Ok(Json(vault::envelopes(&state.pool, caller.user_id).await?))
}

async fn clear_credentials(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    body: Body<Vec<vault::CredentialRef>>,
) -> Result<Json<Value>, ApiError> {
    let Json(items) = body?;
    let cleared = vault::clear_legacy(&state.pool, caller.user_id, &items).await?;
    Ok(Json(json!({ "cleared": cleared })))
}
