//! The HTTP surface: router, shared state, middleware and graceful shutdown. Handlers are thin:
//! they extract, call a domain module and map its result.

mod auth;
mod chat;
mod credentials;
mod error;
mod extract;
mod health;
mod mcp;
mod me;
mod perspectives;
mod tokens;
mod web;
mod zk;

use std::future::Future;
use std::net::SocketAddr;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::Request;
use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use crate::app::AppState;
pub use auth::{Authenticated, MCP_ROUTES, required_scope};
pub use error::{ApiError, status};
pub use extract::{ApiJson, ApiPath, ApiQuery};
pub use mcp::MAX_MCP_BODY;

/// Largest request body accepted on any route.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

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
        // `/mcp`: streamable HTTP (stateful sessions for 2025-06-18 and 2025-11-25; rmcp serves
        // 2026-07-28 requests statelessly), behind the same token check as the REST API.
        .merge(mcp::routes(&state))
        .merge(health::routes())
        .merge(me::routes())
        .merge(tokens::routes())
        .merge(perspectives::routes())
        .merge(zk::routes())
        .merge(chat::routes())
        .merge(credentials::routes())
        .merge(web::routes())
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
    let cancel = state.shutdown.clone();
    // Without TCP_NODELAY a small response can wait ~40 ms for the peer's delayed ACK.
    let listener = listener.tap_io(|tcp| {
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!(%error, "TCP_NODELAY not set");
        }
    });
    // The peer address reaches handlers as `ConnectInfo` (failed authentications are limited
    // per address; behind a reverse proxy that is the proxy's address).
    let app = router(state).into_make_service_with_connect_info::<SocketAddr>();
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            cancel.cancel();
        })
        .await
}
