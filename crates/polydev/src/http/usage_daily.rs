//! `GET /v1/usage/daily`: this month's usage per day and model (the account page's chart).

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};

use super::{ApiError, AppState, Authenticated};
use crate::{perspectives, quota};

pub fn routes() -> Router<AppState> {
    Router::new().route("/v1/usage/daily", get(daily))
}

async fn daily(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
) -> Result<Json<Value>, ApiError> {
    let month_start = quota::month_start(chrono::Utc::now().date_naive());
    let days = perspectives::daily_usage(&state.pool, caller.user_id, month_start).await?;
    Ok(Json(json!({ "month_start": month_start, "days": days })))
}
