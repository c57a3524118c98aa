//! `/v1/zk`: zero-knowledge key material, and the client-driven migration of the caller's chat
//! history from plaintext to envelopes (`/v1/zk/migration/*`).

use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::routing::{get, post, put};
use axum::{Json, Router};

use super::{ApiError, ApiJson, ApiQuery, Authenticated};
use crate::api::{BatchQuery, Cleared, MessageBatch, ReplaceKeyMaterial, Reset, Written};
use crate::app::AppState;
use crate::chat::migration::{self, EncryptedWrite, Item, Plaintext, Unverified};
use crate::zk::{self, KeyMaterial, ZkStatus};

/// A batch of up to 500 envelopes of up to 1 MiB would be too much for one request: 16 MiB.
const MAX_MIGRATION_BODY: usize = 16 * 1024 * 1024;

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
}

async fn status(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
) -> Result<Json<ZkStatus>, ApiError> {
    Ok(Json(zk::status(&state.pool, caller.user_id).await?))
}

async fn enable(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    ApiJson(material): ApiJson<KeyMaterial>,
) -> Result<StatusCode, ApiError> {
    zk::enable(&state.pool, caller.user_id, &material).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn password(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    ApiJson(r): ApiJson<ReplaceKeyMaterial>,
) -> Result<StatusCode, ApiError> {
    zk::replace_password_envelope(&state.pool, caller.user_id, &r.previous, &r.material).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn recovery(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    ApiJson(r): ApiJson<ReplaceKeyMaterial>,
) -> Result<StatusCode, ApiError> {
    zk::replace_recovery_envelope(&state.pool, caller.user_id, &r.previous, &r.material).await?;
    Ok(StatusCode::NO_CONTENT)
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
    ApiQuery(batch): ApiQuery<BatchQuery>,
) -> Result<Json<MessageBatch<Plaintext>>, ApiError> {
    let messages =
        migration::plaintext_batch(&state.pool, caller.user_id, batch.limit.unwrap_or(100)).await?;
    Ok(Json(MessageBatch { messages }))
}

async fn encrypted(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    ApiJson(writes): ApiJson<Vec<EncryptedWrite>>,
) -> Result<Json<Written>, ApiError> {
    let written = migration::write_encrypted(&state.pool, caller.user_id, &writes).await?;
    Ok(Json(Written { written }))
}

async fn unverified(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    ApiQuery(batch): ApiQuery<BatchQuery>,
) -> Result<Json<MessageBatch<Unverified>>, ApiError> {
    let messages =
        migration::unverified_batch(&state.pool, caller.user_id, batch.limit.unwrap_or(100))
            .await?;
    Ok(Json(MessageBatch { messages }))
}

async fn clear(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    ApiJson(items): ApiJson<Vec<Item>>,
) -> Result<Json<Cleared>, ApiError> {
    let cleared = migration::clear_plaintext(&state.pool, caller.user_id, &items).await?;
    Ok(Json(Cleared { cleared }))
}

async fn reset(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    ApiJson(items): ApiJson<Vec<Item>>,
) -> Result<Json<Reset>, ApiError> {
    let reset = migration::reset(&state.pool, caller.user_id, &items).await?;
    Ok(Json(Reset { reset }))
}
