//! `GET /healthz` (the process is alive) and `GET /readyz` (database reachable, migrations current).

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};

use crate::api::Health;
use crate::app::AppState;
use crate::db::migrate;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
}

fn health(status: &str) -> Json<Health> {
    Json(Health {
        status: status.to_string(),
    })
}

async fn healthz() -> Json<Health> {
    health("ok")
}

async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Health>) {
    let check = async {
        let mut conn = state.pool.acquire().await?;
        migrate::is_current(&mut conn).await
    };
    match check.await {
        Ok(true) => (StatusCode::OK, health("ready")),
        Ok(false) => (
            StatusCode::SERVICE_UNAVAILABLE,
            health("migrations_pending"),
        ),
        Err(error) => {
            tracing::warn!(%error, "readiness check failed");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                health("database_unreachable"),
            )
        }
    }
}
