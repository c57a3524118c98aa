//! The state every request handler shares, whichever surface (REST, MCP) it serves.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::accounts::{FailedAuthLimiter, LastUsedTracker};
use crate::perspectives::Gateway;

/// State shared by every handler.
#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    /// Writes that may be lost in a crash: rate-limit windows, `last_used_at`.
    pub relaxed_pool: PgPool,
    pub gateway: Arc<Gateway>,
    pub last_used: Arc<LastUsedTracker>,
    /// Failed authentications per client address (refused before the database is asked).
    pub auth_failures: Arc<FailedAuthLimiter>,
    /// `Host` values the MCP endpoint accepts.
    pub allowed_hosts: Vec<String>,
    /// Browser `Origin`s the MCP endpoint accepts besides the server's own.
    pub allowed_origins: Vec<String>,
    /// Cancelled at shutdown: ends MCP sessions so open SSE streams do not hold the drain.
    pub shutdown: CancellationToken,
    /// Decrypts legacy server-encrypted credentials while they move to client-side keys.
    pub legacy_secret: Option<crate::vault::LegacySecret>,
    /// Longest time a request may take to be answered (408 after it).
    pub request_timeout: Duration,
    /// Containers and sealed jobs (docs/runtime.md); `None`: the runtime routes answer 501.
    pub runtime: Option<crate::runtime::Runtime>,
}

/// The default request timeout: longer than the longest `get_perspectives` deadline (600 s).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(660);

impl AppState {
    pub fn new(pool: PgPool, gateway: Gateway) -> Self {
        AppState {
            relaxed_pool: pool.clone(),
            pool,
            gateway: Arc::new(gateway),
            last_used: Arc::new(LastUsedTracker::new(Duration::from_secs(60))),
            auth_failures: Arc::new(FailedAuthLimiter::default()),
            allowed_hosts: vec!["localhost".into(), "127.0.0.1".into(), "::1".into()],
            allowed_origins: Vec::new(),
            shutdown: CancellationToken::new(),
            legacy_secret: None,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            runtime: None,
        }
    }

    pub fn with_runtime(mut self, runtime: Option<crate::runtime::Runtime>) -> Self {
        self.runtime = runtime;
        self
    }

    pub fn with_legacy_secret(mut self, secret: Option<crate::vault::LegacySecret>) -> Self {
        self.legacy_secret = secret;
        self
    }

    pub fn pools(&self) -> crate::db::Pools<'_> {
        crate::db::Pools {
            durable: &self.pool,
            relaxed: &self.relaxed_pool,
        }
    }

    pub fn with_relaxed_pool(mut self, pool: PgPool) -> Self {
        self.relaxed_pool = pool;
        self
    }

    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    pub fn with_allowed_hosts(mut self, hosts: Vec<String>) -> Self {
        self.allowed_hosts = hosts;
        self
    }

    pub fn with_allowed_origins(mut self, origins: Vec<String>) -> Self {
        self.allowed_origins = origins;
        self
    }
}
