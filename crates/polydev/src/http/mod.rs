//! The HTTP surface: router, shared state, middleware and graceful shutdown. Handlers are thin:
//! they extract, call a domain module and map its result.

mod account_web;
mod admin;
mod auth;
mod chat;
mod credentials;
mod error;
mod extract;
mod health;
mod login;
mod mcp;
mod me;
mod metrics;
mod oauth;
mod openai;
mod openapi;
mod pages;
mod passkeys;
mod perspectives;
mod runtime;
mod tokens;
mod usage_daily;
mod web;
mod zk;

use std::future::Future;
use std::net::SocketAddr;

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, MatchedPath};
use axum::http::Request;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::timeout::{RequestBodyTimeoutLayer, TimeoutLayer};
use tower_http::trace::TraceLayer;

use crate::app::AppState;
pub use admin::ADMIN_ROUTES;
pub use auth::{Authenticated, MCP_ROUTES, required_scope};
pub use error::{ApiError, status};
pub use extract::{ApiForm, ApiJson, ApiPath, ApiQuery};
pub use mcp::MAX_MCP_BODY;
pub use openapi::{document as openapi_document, text as openapi_json};

/// Largest request body accepted on any route.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Longest wait for a request's body to arrive.
pub const REQUEST_BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

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
            route = tracing::field::Empty,
            user = tracing::field::Empty,
        )
    });
    // One line per request when it is answered (status, latency): the access log.
    let trace = trace.on_response(
        tower_http::trace::DefaultOnResponse::new()
            .level(tracing::Level::INFO)
            .latency_unit(tower_http::LatencyUnit::Micros),
    );
    let timeout = state.request_timeout;
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
        .merge(runtime::routes())
        .merge(login::routes())
        .merge(web::routes())
        .merge(account_web::routes())
        .merge(oauth::routes())
        .merge(passkeys::routes())
        .merge(usage_daily::routes())
        .merge(metrics::routes())
        .merge(openapi::routes())
        .merge(admin::routes())
        .merge(openai::routes())
        .route_layer(middleware::from_fn(record_route))
        .fallback(error::not_found)
        .with_state(state)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        // A slow client cannot hold a connection by trickling its body, nor a request run
        // forever (streams, once started, are bounded by their own deadlines).
        .layer(RequestBodyTimeoutLayer::new(REQUEST_BODY_TIMEOUT))
        .layer(TimeoutLayer::with_status_code(
            axum::http::StatusCode::REQUEST_TIMEOUT,
            timeout,
        ))
        // Outside the timeout, so a 408 is counted under its route too.
        .layer(middleware::from_fn(measure))
        // Outermost first: assign an id, log with it, return it to the client.
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(trace)
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
}

/// Puts the matched route (`/v1/chat/sessions/{id}/messages`, not the path) on the request's
/// span, and in the slot [`measure`] reads, for logs and metrics with few distinct values.
async fn record_route(request: Request<Body>, next: Next) -> Response {
    if let Some(route) = request.extensions().get::<MatchedPath>() {
        tracing::Span::current().record("route", route.as_str());
        if let Some(slot) = request.extensions().get::<RouteSlot>() {
            let _ = slot.0.set(route.clone());
        }
    }
    next.run(request).await
}

/// Where the routed request leaves its matched route for [`measure`], which runs outside the
/// router (and the timeout) and so cannot see the request's extensions after routing.
#[derive(Clone, Default)]
struct RouteSlot(std::sync::Arc<std::sync::OnceLock<MatchedPath>>);

/// Records each request's latency (to its response head) by route template, method and status;
/// requests no route matched count under `unmatched`.
async fn measure(mut request: Request<Body>, next: Next) -> Response {
    let started = std::time::Instant::now();
    let method = request.method().clone();
    let slot = RouteSlot::default();
    request.extensions_mut().insert(slot.clone());
    let response = next.run(request).await;
    let route = slot.0.get().map_or("unmatched", MatchedPath::as_str);
    crate::telemetry::http_request(
        route,
        method.as_str(),
        response.status().as_u16(),
        started.elapsed(),
    );
    response
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
