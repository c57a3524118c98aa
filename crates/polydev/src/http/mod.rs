//! The HTTP surface: router, shared state, middleware and graceful shutdown. Handlers are thin:
//! they extract, call a domain module and map its result.

mod auth;
mod chat;
mod credentials;
mod error;
mod extract;
mod health;
mod me;
mod perspectives;
mod runtime;
mod tokens;
mod web;
mod zk;

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, FromRequestParts, State};
use axum::http::Request;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::serve::ListenerExt;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use tokio::net::TcpListener;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use crate::app::AppState;
use crate::mcp::server::PolydevMcp;
pub use auth::Authenticated;
pub use error::{ApiError, status};
pub use extract::{ApiJson, ApiPath, ApiQuery};

/// Largest request body accepted on any route.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// `/mcp`: streamable HTTP (stateful sessions for 2025-06-18 and 2025-11-25; rmcp serves
/// 2026-07-28 requests statelessly), behind the same token check as the REST API.
fn mcp_routes(state: &AppState) -> Router<AppState> {
    let mcp_state = state.clone();
    let config = StreamableHttpServerConfig::default()
        .with_allowed_hosts(state.allowed_hosts.clone())
        .with_cancellation_token(state.shutdown.child_token());
    let service = StreamableHttpService::new(
        // A handler per session: each keeps its own log level.
        move || Ok(PolydevMcp::new(mcp_state.clone())),
        Arc::new(LocalSessionManager::default()),
        config,
    );
    Router::new()
        .nest_service("/mcp", service)
        .layer(middleware::from_fn_with_state(state.clone(), mcp_auth))
}

async fn mcp_auth(
    State(state): State<AppState>,
    request: Request<Body>,
    next: Next,
) -> Result<Response, ApiError> {
    let (mut parts, body) = request.into_parts();
    let Authenticated(caller) = Authenticated::from_request_parts(&mut parts, &state).await?;
    parts.extensions.insert(caller);
    Ok(next.run(Request::from_parts(parts, body)).await)
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
        .merge(mcp_routes(&state))
        .merge(health::routes())
        .merge(me::routes())
        .merge(tokens::routes())
        .merge(perspectives::routes())
        .merge(zk::routes())
        .merge(chat::routes())
        .merge(credentials::routes())
        .merge(runtime::routes())
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
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move {
            shutdown.await;
            cancel.cancel();
        })
        .await
}
