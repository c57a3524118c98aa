//! The HTTP surface: router, shared state, middleware and graceful shutdown. Handlers are thin:
//! they extract, call a domain module and map its result.

mod auth;
mod error;
mod health;
mod me;
mod tokens;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::Request;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use crate::accounts::LastUsedTracker;
pub use auth::Authenticated;
pub use error::ApiError;

/// Largest request body accepted on any route.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// State shared by every handler.
#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    pub last_used: Arc<LastUsedTracker>,
}

impl AppState {
    pub fn new(pool: PgPool) -> Self {
        AppState {
            pool,
            last_used: Arc::new(LastUsedTracker::new(Duration::from_secs(60))),
        }
    }
}

pub fn router(state: AppState) -> Router {
    let trace = TraceLayer::new_for_http().make_span_with(|request: &Request<_>| {
        let request_id = request
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-");
        tracing::info_span!(
            "request",
            id = %request_id,
            method = %request.method(),
            path = %request.uri().path(),
            user = tracing::field::Empty,
        )
    });
    Router::new()
        .merge(health::routes())
        .merge(me::routes())
        .merge(tokens::routes())
        .fallback(error::not_found)
        .with_state(state)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        // Outermost first: assign an id, log with it, return it to the client.
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(trace)
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
}

/// Serves until `shutdown` resolves, then lets in-flight requests finish.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}
