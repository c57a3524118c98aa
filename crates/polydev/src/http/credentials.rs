//! `/v1/zk/credentials`: provider and CLI credentials move from server-held keys to the owner's
//! client-side keys (hand-over, sealed store, verify, clear).

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};

use super::zk::ZkProofs;
use super::{ApiError, ApiJson, ApiQuery, Authenticated};
use crate::api::{Cleared, HandOverQuery, Stored};
use crate::app::AppState;
use crate::vault::{self, CredentialRef, HandOver, Sealed};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/zk/credentials", get(envelopes))
        .route("/v1/zk/credentials/hand-over", post(hand_over))
        .route("/v1/zk/credentials/encrypted", post(store))
        .route("/v1/zk/credentials/clear", post(clear))
}

async fn hand_over(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    ZkProofs(proofs): ZkProofs,
    ApiQuery(batch): ApiQuery<HandOverQuery>,
) -> Result<Json<HandOver>, ApiError> {
    let handed = vault::hand_over(
        &state.pool,
        state.legacy_secret.as_ref(),
        caller.user_id,
        &proofs,
        batch.limit.unwrap_or(50),
        batch.position(),
    )
    .await?;
    Ok(Json(handed))
}

async fn store(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    ApiJson(sealed): ApiJson<Vec<Sealed>>,
) -> Result<Json<Stored>, ApiError> {
    let stored = vault::store(&state.pool, caller.user_id, &sealed).await?;
    Ok(Json(Stored { stored }))
}

async fn envelopes(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
) -> Result<Json<Vec<Sealed>>, ApiError> {
    Ok(Json(vault::envelopes(&state.pool, caller.user_id).await?))
}

async fn clear(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    ApiJson(items): ApiJson<Vec<CredentialRef>>,
) -> Result<Json<Cleared>, ApiError> {
    let cleared = vault::clear_legacy(&state.pool, caller.user_id, &items).await?;
    Ok(Json(Cleared { cleared }))
}
