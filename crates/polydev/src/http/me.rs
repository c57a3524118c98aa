//! `GET /v1/me`: the caller's user, profile, plan and quota state.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};

use super::{ApiError, AppState, Authenticated};
use crate::{accounts, quota};

pub fn routes() -> Router<AppState> {
    Router::new().route("/v1/me", get(me))
}

async fn me(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
) -> Result<Json<Value>, ApiError> {
    let user = accounts::find_user(&state.pool, caller.user_id).await?;
    let profile = accounts::find_profile(&state.pool, caller.user_id).await?;
    let quota = quota::for_user(&state.pool, caller.user_id)
        .await?
        .map(|q| q.state(chrono::Utc::now().date_naive()));
    Ok(Json(json!({
        "user": user,
        "profile": profile,
        "tier": user.tier,
        "quota": quota,
        "token": { "id": caller.token_id, "rate_limit_tier": caller.rate_limit_tier },
    })))
}
