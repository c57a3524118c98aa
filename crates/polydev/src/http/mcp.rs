//! `/mcp`: rmcp's streamable HTTP service, behind a guard that, in this order,
//! 1. refuses a browser `Origin` that is neither the server's own nor allowed (403);
//! 2. authenticates the token like every REST route (scope `mcp`, rate limits, account status);
//! 3. refuses an `Mcp-Session-Id` that another token created (404, as for an unknown session):
//!    a session belongs to the token whose `initialize` created it, for every method (POST,
//!    GET with or without `Last-Event-ID`, DELETE);
//! 4. reads a POST body of at most [`MAX_MCP_BODY`] (413).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{Method, Request, header};
use axum::middleware::{self, Next};
use axum::response::Response;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use uuid::Uuid;

use super::{ApiError, AppState, auth};
use crate::accounts::{Caller, Scope};
use crate::error::Error;
use crate::mcp::sessions::{self, DeleteSignal, McpSessions};

/// Largest `/mcp` request body: a `tools/call` of `get_perspectives` carries a prompt of up to
/// 100,000 characters, so the limit of `POST /v1/perspectives` (512 KiB), not the 64 KiB of
/// the other routes.
pub const MAX_MCP_BODY: usize = 512 * 1024;

/// Sessions whose owner is remembered at most; past it, ended sessions are forgotten first,
/// then the oldest live one is closed.
const MAX_SESSIONS: usize = 10_000;

const SESSION_HEADER: &str = "mcp-session-id";

pub fn routes(state: &AppState) -> Router<AppState> {
    let idle = state.mcp_session_idle_timeout;
    // Idle sessions are closed by `expire_idle` below (a request to one then gets 404 and the
    // client starts a new session); rmcp's own keep-alive of a live session's worker is only
    // the backstop for a session whose owner was never recorded.
    let sessions = McpSessions::new(state.clone(), idle.saturating_mul(2));
    let mut config = StreamableHttpServerConfig::default()
        .with_allowed_hosts(state.allowed_hosts.clone())
        .with_max_request_body_bytes(MAX_MCP_BODY)
        .with_cancellation_token(state.shutdown.child_token());
    // Only for its `delete` after a client's DELETE: sessions are not stored anywhere.
    config.session_store = Some(Arc::new(DeleteSignal(Arc::downgrade(&sessions))));
    let service = StreamableHttpService::new(
        // A handler per session (its log level is kept by `sessions`).
        {
            let sessions = sessions.clone();
            move || Ok(sessions.handler())
        },
        sessions.clone(),
        config,
    );
    let guard = Arc::new(McpGuard {
        state: state.clone(),
        owners: SessionOwners::new(sessions.clone(), MAX_SESSIONS),
    });
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(expire_idle(
            Arc::downgrade(&guard),
            idle,
            state.shutdown.clone(),
        ));
        runtime.spawn(hibernate_idle(
            Arc::downgrade(&sessions),
            state.shutdown.clone(),
        ));
    }
    Router::new()
        .nest_service("/mcp", service)
        .layer(middleware::from_fn_with_state(guard, mcp_guard))
}

/// Hibernates the sessions with nothing going on (see [`crate::mcp::sessions`]), until
/// shutdown or until the router is dropped.
async fn hibernate_idle(
    sessions: Weak<McpSessions>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(sessions::HIBERNATE_EVERY) => {}
            () = shutdown.cancelled() => return,
        }
        let Some(sessions) = sessions.upgrade() else {
            return;
        };
        let hibernated = sessions.hibernate_idle().await;
        if hibernated > 0 {
            tracing::trace!(hibernated, "idle MCP sessions hibernated");
        }
        let (live, hibernated) = sessions.counts();
        crate::telemetry::mcp_sessions(live, hibernated);
    }
}

struct McpGuard {
    state: AppState,
    owners: SessionOwners,
}

/// Closes the sessions that have seen no request for `idle` (checked every `idle / 4`, at
/// least every second), until shutdown or until the router is dropped.
async fn expire_idle(
    guard: Weak<McpGuard>,
    idle: Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let period = (idle / 4).max(Duration::from_secs(1));
    loop {
        tokio::select! {
            () = tokio::time::sleep(period) => {}
            () = shutdown.cancelled() => return,
        }
        let Some(guard) = guard.upgrade() else { return };
        let expired = guard.owners.expire(idle, Instant::now()).await;
        if expired > 0 {
            tracing::debug!(expired, "idle MCP sessions closed");
        }
    }
}

async fn mcp_guard(
    State(guard): State<Arc<McpGuard>>,
    request: Request<Body>,
    next: Next,
) -> Result<Response, ApiError> {
    let (mut parts, body) = request.into_parts();
    let state = &guard.state;
    auth::check_origin(&parts.headers, &state.allowed_hosts, &state.allowed_origins)?;
    let caller = match auth::authenticate(&parts, state, Scope::Mcp).await {
        Ok(caller) => caller,
        // The challenge points MCP clients at the authorization server (RFC 9728).
        Err(error) => return Ok(super::oauth::with_resource_metadata(error, state)),
    };
    let session = match parts.headers.get(SESSION_HEADER) {
        None => None,
        Some(value) => {
            let id = value.to_str().ok().map(str::to_string);
            match id {
                Some(id) if guard.owners.owned_by(&id, &caller) => Some(id),
                // Another token's session looks exactly like one that does not exist.
                _ => return Err(ApiError(Error::NotFound("session"))),
            }
        }
    };
    let body = if parts.method == Method::POST {
        let too_large = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|length| length > MAX_MCP_BODY as u64);
        let bytes = match too_large {
            true => None,
            false => axum::body::to_bytes(body, MAX_MCP_BODY).await.ok(),
        };
        match bytes {
            Some(bytes) => Body::from(bytes),
            None => {
                return Err(ApiError(Error::TooLarge(format!(
                    "an MCP request body may be at most {} KiB",
                    MAX_MCP_BODY / 1024
                ))));
            }
        }
    } else {
        body
    };
    let method = parts.method.clone();
    parts.extensions.insert(caller.clone());
    let response = next.run(Request::from_parts(parts, body)).await;
    match session {
        // `initialize` answered with a new session: it is this token's.
        None => {
            if let Some(id) = response
                .headers()
                .get(SESSION_HEADER)
                .and_then(|v| v.to_str().ok())
            {
                guard.owners.remember(id, &caller).await;
            }
        }
        Some(id) if method == Method::DELETE && response.status().is_success() => {
            guard.owners.forget(&id);
        }
        Some(_) => {}
    }
    Ok(response)
}

/// Which token created each MCP session. Bounded; entries go when the session is deleted, and
/// ended sessions (rmcp's manager no longer has them) are dropped when room is needed.
struct SessionOwners {
    manager: Arc<McpSessions>,
    max: usize,
    owners: Mutex<HashMap<String, Owner>>,
}

#[derive(Clone, Copy)]
struct Owner {
    user_id: Uuid,
    token_id: Uuid,
    since: Instant,
    /// The start of the session's last request.
    last_seen: Instant,
}

impl SessionOwners {
    fn new(manager: Arc<McpSessions>, max: usize) -> Self {
        SessionOwners {
            manager,
            max,
            owners: Mutex::new(HashMap::new()),
        }
    }

    /// True when `id` is a session `caller`'s token created. An unknown id is not: rmcp would
    /// answer 404 for it anyway, and a session whose owner is not known must not be served.
    /// A request of the owner counts as activity.
    fn owned_by(&self, id: &str, caller: &Caller) -> bool {
        let mut owners = self.owners.lock().expect("session owners lock");
        match owners.get_mut(id) {
            Some(o) if o.token_id == caller.token_id && o.user_id == caller.user_id => {
                o.last_seen = Instant::now();
                true
            }
            _ => false,
        }
    }

    /// Closes and forgets the sessions with no request for `idle`; returns how many.
    async fn expire(&self, idle: Duration, now: Instant) -> usize {
        let expired: Vec<String> = {
            let mut owners = self.owners.lock().expect("session owners lock");
            let expired: Vec<String> = owners
                .iter()
                .filter(|(_, o)| now.saturating_duration_since(o.last_seen) >= idle)
                .map(|(id, _)| id.clone())
                .collect();
            for id in &expired {
                owners.remove(id);
            }
            expired
        };
        for id in &expired {
            self.manager.end(id).await;
        }
        expired.len()
    }

    async fn remember(&self, id: &str, caller: &Caller) {
        let full = self.owners.lock().expect("session owners lock").len() >= self.max;
        if full {
            self.make_room().await;
        }
        self.owners.lock().expect("session owners lock").insert(
            id.to_string(),
            Owner {
                user_id: caller.user_id,
                token_id: caller.token_id,
                since: Instant::now(),
                last_seen: Instant::now(),
            },
        );
    }

    fn forget(&self, id: &str) {
        self.owners.lock().expect("session owners lock").remove(id);
    }

    /// Drops the owners of sessions that have ended; if none had, closes the oldest session.
    async fn make_room(&self) {
        let live: std::collections::HashSet<String> = self.manager.ids().into_iter().collect();
        let oldest = {
            let mut owners = self.owners.lock().expect("session owners lock");
            owners.retain(|id, _| live.contains(id));
            if owners.len() < self.max {
                return;
            }
            let oldest = owners
                .iter()
                .min_by_key(|(_, o)| o.since)
                .map(|(id, _)| id.clone());
            if let Some(id) = &oldest {
                owners.remove(id);
            }
            oldest
        };
        if let Some(id) = oldest {
            tracing::warn!(session = %id, "too many MCP sessions: closing the oldest");
            self.manager.end(&id).await;
        }
    }
}
