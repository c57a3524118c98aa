//! `/v1/tokens`: the caller lists, creates and revokes their own API tokens.

use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{delete, get};
use axum::{Json, Router};
use serde::Deserialize;
use uuid::Uuid;

use super::{ApiError, AppState, Authenticated};
use crate::accounts::{self, ApiToken, CreatedToken};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/tokens", get(list).post(create))
        .route("/v1/tokens/{id}", delete(revoke))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateToken {
    name: String,
    expires_in_days: Option<u32>,
}

async fn list(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
) -> Result<Json<Vec<ApiToken>>, ApiError> {
    Ok(Json(
        accounts::list_tokens(&state.pool, caller.user_id).await?,
    ))
}

async fn create(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    body: Result<Json<CreateToken>, JsonRejection>,
) -> Result<(StatusCode, Json<CreatedToken>), ApiError> {
    let Json(body) = body?;
    let created = accounts::create_token(
        &state.pool,
        caller.user_id,
        &body.name,
        body.expires_in_days,
    )
    .await?;
    Ok((StatusCode::CREATED, Json(created)))
}

async fn revoke(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    id: Result<Path<Uuid>, PathRejection>,
) -> Result<Json<ApiToken>, ApiError> {
    let Path(id) = id?;
    Ok(Json(
        accounts::revoke_token(&state.pool, Some(caller.user_id), id).await?,
    ))
}
