//! `/v1/tokens`: the caller lists, creates and revokes their own API tokens (scope `account`,
//! like every route not open to `mcp` tokens: see `auth::MCP_ROUTES`).

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{delete, get};
use axum::{Json, Router};
use uuid::Uuid;

use super::{ApiError, ApiJson, ApiPath, Authenticated};
use crate::accounts::{self, ApiToken, CreatedToken};
use crate::api::CreateToken;
use crate::app::AppState;
use crate::error::Error;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/tokens", get(list).post(create))
        .route("/v1/tokens/{id}", delete(revoke))
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
    ApiJson(body): ApiJson<CreateToken>,
) -> Result<(StatusCode, Json<CreatedToken>), ApiError> {
    let scope = body.scope.unwrap_or_default();
    // Never wider than the caller's own (today only `account` tokens reach this route).
    if !caller.scope.includes(scope) {
        return Err(ApiError(Error::InsufficientScope {
            required: scope.as_str(),
            held: caller.scope.as_str(),
        }));
    }
    let created = accounts::create_scoped_token(
        &state.pool,
        caller.user_id,
        &body.name,
        body.expires_in_days,
        scope,
    )
    .await?;
    Ok((StatusCode::CREATED, Json(created)))
}

async fn revoke(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<ApiToken>, ApiError> {
    let revoked = accounts::revoke_token(&state.pool, Some(caller.user_id), id).await?;
    // Every replica hears of it from the database; this one need not wait for that.
    state.token_cache.evict_user(caller.user_id);
    Ok(Json(revoked))
}
