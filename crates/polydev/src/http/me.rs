//! `GET /v1/me`: the caller's user, profile, plan and quota state.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};

use super::{ApiError, Authenticated};
use crate::api::{Me, TokenInUse};
use crate::app::AppState;
use crate::{accounts, quota};

pub fn routes() -> Router<AppState> {
    Router::new().route("/v1/me", get(me))
}

async fn me(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
) -> Result<Json<Me>, ApiError> {
    let user = accounts::find_user(&state.pool, caller.user_id).await?;
    let profile = accounts::find_profile(&state.pool, caller.user_id).await?;
    let quota = quota::for_user(&state.pool, caller.user_id)
        .await?
        .map(|q| q.state(chrono::Utc::now().date_naive()));
    Ok(Json(Me {
        tier: user.tier.clone(),
        user,
        profile,
        quota,
        token: TokenInUse {
            id: caller.token_id,
            rate_limit_tier: caller.rate_limit_tier,
            scope: caller.scope,
        },
    }))
}
