//! The state every request handler shares, whichever surface (REST, MCP) it serves.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::accounts::{FailedAuthLimiter, LastUsedTracker, Mailer, TokenCache};
use crate::perspectives::Gateway;

/// State shared by every handler.
#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    /// Writes that may be lost in a crash: rate-limit windows, `last_used_at`.
    pub relaxed_pool: PgPool,
    pub gateway: Arc<Gateway>,
    pub last_used: Arc<LastUsedTracker>,
    /// Token lookups kept in this process, evicted by the database's revocation notifications
    /// (`polydev serve` starts it; the default caches nothing).
    pub token_cache: TokenCache,
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
    /// An MCP session with no request for this long is closed (the client starts a new one).
    pub mcp_session_idle_timeout: Duration,
    /// Containers and sealed jobs (docs/runtime.md); `None`: the runtime routes answer 501.
    pub runtime: Option<crate::runtime::Runtime>,
    /// The server's public base URL (`--public-url`): the OAuth issuer, the MCP resource's
    /// base, and the base of links in e-mail. No trailing slash.
    pub public_url: String,
    /// Account e-mail (verification, password reset): SMTP or the log.
    pub mailer: Arc<Mailer>,
    /// Requests per client address to the OAuth token and registration endpoints.
    pub oauth_limits: Arc<OAuthLimits>,
    /// Hosts whose client ID metadata documents may be fetched from private addresses.
    pub cimd_private_hosts: Vec<String>,
    /// Extra roots trusted for client ID metadata documents (`--cimd-extra-root-ca`).
    pub cimd_extra_roots: Vec<reqwest::Certificate>,
    /// Passkeys for the public URL's host (`None` when it is an IP address, which WebAuthn
    /// does not accept as a relying party id).
    pub webauthn: Option<Arc<webauthn_rs::Webauthn>>,
    /// The bearer token `/metrics` requires (`serve --metrics-token`); `None`: open.
    pub metrics_token: Option<Arc<str>>,
    /// Login sessions (docs/login.md); `None`: the login routes answer 501.
    pub login: Option<crate::login::Login>,
}

/// Per-address request limits of the endpoints anyone can call: OAuth token and registration,
/// and those that send e-mail (sign-up, password reset), so the server cannot be used to flood
/// someone's mailbox.
#[derive(Debug)]
pub struct OAuthLimits {
    pub token: FailedAuthLimiter,
    pub register: FailedAuthLimiter,
    pub mail: FailedAuthLimiter,
}

impl Default for OAuthLimits {
    fn default() -> Self {
        OAuthLimits {
            token: FailedAuthLimiter::new(120, Duration::from_secs(60)),
            register: FailedAuthLimiter::new(30, Duration::from_secs(60)),
            mail: FailedAuthLimiter::new(10, Duration::from_secs(600)),
        }
    }
}

/// The WebAuthn relying party of a public URL: its host (a domain name, `localhost` included;
/// never an IP address) and its origin.
fn webauthn_for(public_url: &str) -> Option<webauthn_rs::Webauthn> {
    let url = url::Url::parse(public_url).ok()?;
    let host = match url.host()? {
        url::Host::Domain(name) => name.to_string(),
        _ => return None,
    };
    webauthn_rs::WebauthnBuilder::new(&host, &url)
        .ok()?
        .rp_name("Polydev")
        .build()
        .ok()
}

/// The default request timeout: longer than the longest `get_perspectives` deadline (600 s).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(660);

/// The default idle timeout of MCP sessions: longer than the longest `get_perspectives`
/// deadline, so a session is never closed under a call it is waiting for.
pub const DEFAULT_MCP_SESSION_IDLE_TIMEOUT: Duration = Duration::from_secs(900);

impl AppState {
    pub fn new(pool: PgPool, gateway: Gateway) -> Self {
        // The process's metrics recorder, before anything is recorded.
        crate::telemetry::handle();
        AppState {
            relaxed_pool: pool.clone(),
            pool,
            gateway: Arc::new(gateway),
            last_used: Arc::new(LastUsedTracker::new(Duration::from_secs(60))),
            token_cache: TokenCache::default(),
            auth_failures: Arc::new(FailedAuthLimiter::default()),
            allowed_hosts: vec!["localhost".into(), "127.0.0.1".into(), "::1".into()],
            allowed_origins: Vec::new(),
            shutdown: CancellationToken::new(),
            legacy_secret: None,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            mcp_session_idle_timeout: DEFAULT_MCP_SESSION_IDLE_TIMEOUT,
            runtime: None,
            public_url: Self::new_default_public_url().into(),
            mailer: Arc::new(Mailer::Log),
            oauth_limits: Arc::new(OAuthLimits::default()),
            cimd_private_hosts: Vec::new(),
            cimd_extra_roots: Vec::new(),
            webauthn: None,
            metrics_token: None,
            login: None,
        }
    }

    /// The public URL of a state nobody configured (`polydev serve` always sets one).
    pub fn new_default_public_url() -> &'static str {
        "http://127.0.0.1:8080"
    }

    pub fn with_public_url(mut self, url: &str) -> Self {
        self.public_url = url.trim_end_matches('/').to_string();
        self.webauthn = webauthn_for(&self.public_url).map(Arc::new);
        self
    }

    pub fn with_mailer(mut self, mailer: Mailer) -> Self {
        self.mailer = Arc::new(mailer);
        self
    }

    pub fn with_oauth_limits(mut self, limits: OAuthLimits) -> Self {
        self.oauth_limits = Arc::new(limits);
        self
    }

    pub fn with_cimd_private_hosts(mut self, hosts: Vec<String>) -> Self {
        self.cimd_private_hosts = hosts;
        self
    }

    pub fn with_cimd_extra_roots(mut self, roots: Vec<reqwest::Certificate>) -> Self {
        self.cimd_extra_roots = roots;
        self
    }

    /// The OAuth configuration (issuer and resource) of this server.
    pub fn oauth(&self) -> crate::oauth::Config {
        let mut config = crate::oauth::Config::new(&self.public_url);
        config.cimd_private_hosts = self.cimd_private_hosts.clone();
        config.cimd_extra_roots = self.cimd_extra_roots.clone();
        config
    }

    /// True when cookies must be `Secure` (the public URL is https).
    pub fn secure_cookies(&self) -> bool {
        self.public_url.starts_with("https://")
    }

    pub fn with_metrics_token(mut self, token: Option<String>) -> Self {
        self.metrics_token = token.map(Into::into);
        self
    }

    pub fn with_runtime(mut self, runtime: Option<crate::runtime::Runtime>) -> Self {
        self.runtime = runtime;
        self
    }

    pub fn with_login(mut self, login: Option<crate::login::Login>) -> Self {
        self.login = login;
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

    pub fn with_token_cache(mut self, cache: TokenCache) -> Self {
        self.token_cache = cache;
        self
    }

    pub fn with_relaxed_pool(mut self, pool: PgPool) -> Self {
        self.relaxed_pool = pool;
        self
    }

    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    pub fn with_mcp_session_idle_timeout(mut self, timeout: Duration) -> Self {
        self.mcp_session_idle_timeout = timeout;
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
