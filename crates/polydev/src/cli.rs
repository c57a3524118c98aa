//! The `polydev` command line: configuration (flags and environment) and one thin function per
//! subcommand.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use uuid::Uuid;

use crate::accounts::{self, Plan, Scope};
use crate::app::AppState;
use crate::db::{Database, DbConfig, Plan as MigrationPlan};
use crate::http;
use crate::perspectives::{Catalogue, Gateway};

mod admin;

#[derive(Debug, Parser)]
#[command(
    name = "polydev",
    version,
    about = "Multi-model AI perspectives server (MCP)"
)]
pub struct Cli {
    /// Log lines as text (for a terminal) or as one JSON object per line (for a log pipeline).
    #[arg(
        long,
        env = "POLYDEV_LOG_FORMAT",
        value_enum,
        default_value_t = LogFormat::Text,
        global = true
    )]
    pub log_format: LogFormat,
    #[command(flatten)]
    pub db: DbArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct DbArgs {
    /// PostgreSQL server to use. Without it, polydev runs its own private cluster in --data-dir.
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    pub database_url: Option<String>,
    /// Where the embedded PostgreSQL cluster lives [default: /var/lib/polydev as root, else
    /// $XDG_DATA_HOME/polydev or ~/.local/share/polydev].
    #[arg(long, env = "POLYDEV_DATA_DIR", global = true)]
    pub data_dir: Option<PathBuf>,
    /// Directory holding initdb, pg_ctl and postgres [default: found on PATH, then
    /// /usr/lib/postgresql/<newest>/bin].
    #[arg(long, env = "POLYDEV_PG_BIN_DIR", global = true)]
    pub pg_bin_dir: Option<PathBuf>,
    /// Size of the database connection pool.
    #[arg(
        long,
        env = "POLYDEV_DB_MAX_CONNECTIONS",
        default_value_t = 10,
        global = true
    )]
    pub db_max_connections: u32,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Apply pending migrations, then serve HTTP until SIGINT or SIGTERM.
    Serve(Box<ServeArgs>),
    /// Apply pending migrations (adopting an existing production database first).
    Migrate {
        /// Print what would run and change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Sign in to a polydev server from this machine (OAuth device grant): shows a code and a
    /// URL, waits for approval in the browser, and stores the token (mode 0600) for
    /// `polydev mcp`.
    Login {
        /// The polydev server.
        #[arg(
            long,
            env = "POLYDEV_SERVER_URL",
            default_value = "http://127.0.0.1:8080"
        )]
        server_url: String,
    },
    /// MCP over stdio for IDEs: answers initialize and tools/list locally, forwards tool calls
    /// to a polydev server with POLYDEV_USER_TOKEN (or the token `polydev login` stored).
    Mcp {
        /// The polydev server to forward tool calls to.
        #[arg(
            long,
            env = "POLYDEV_SERVER_URL",
            default_value = "http://127.0.0.1:8080"
        )]
        server_url: String,
        /// The user's `pd_` token.
        #[arg(long, env = "POLYDEV_USER_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// The CLIs of this machine that get_perspectives asks too (their answers are added
        /// to the server's): `auto` (every one installed: claude, codex, gemini), `off`, or a
        /// list such as `claude,codex`.
        #[arg(long, env = "POLYDEV_LOCAL_CLIS", default_value = "auto")]
        local_clis: crate::mcp::local::LocalClis,
    },
    /// Zero-knowledge encryption of your stored chat history (docs/crypto.md). Talks to a
    /// polydev server with POLYDEV_USER_TOKEN (an `account` token); all cryptography happens
    /// here.
    Zk {
        /// The polydev server.
        #[arg(
            long,
            env = "POLYDEV_SERVER_URL",
            default_value = "http://127.0.0.1:8080",
            global = true
        )]
        server_url: String,
        /// Your `pd_` token.
        #[arg(
            long,
            env = "POLYDEV_USER_TOKEN",
            hide_env_values = true,
            global = true
        )]
        token: Option<String>,
        #[command(subcommand)]
        command: ZkCommand,
    },
    /// Manage users.
    #[command(subcommand)]
    User(UserCommand),
    /// Manage API tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Print the OpenAPI 3.1 description of the HTTP API (what `GET /openapi.json` serves;
    /// committed as docs/openapi.json).
    Openapi,
    /// The admin console on the server host: users, plans, quotas, rate tiers, usage, audit log
    /// (docs/admin.md). Acts as `cli:<os user>` in the audit log.
    #[command(subcommand)]
    Admin(admin::AdminCommand),
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "POLYDEV_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Model catalogue (TOML) replacing the shipped one (config/models.toml).
    #[arg(long, env = "POLYDEV_MODELS")]
    models: Option<PathBuf>,
    /// Host names the MCP endpoint accepts in `Host` (DNS-rebinding protection); add your
    /// public host name when serving beyond this machine.
    #[arg(
        long,
        env = "POLYDEV_ALLOWED_HOSTS",
        value_delimiter = ',',
        default_value = "localhost,127.0.0.1,::1"
    )]
    allowed_hosts: Vec<String>,
    /// Browser origins (`scheme://host[:port]`) whose pages may call the MCP endpoint, besides
    /// the server's own (an `Origin` equal to the request's allowed `Host`). Requests without
    /// `Origin` (IDEs, CLIs) are not affected.
    #[arg(long, env = "POLYDEV_ALLOWED_ORIGINS", value_delimiter = ',')]
    allowed_origins: Vec<String>,
    /// The server master secret the legacy credentials were encrypted with; needed only while
    /// users move their credentials to client-side keys.
    #[arg(long, env = "POLYDEV_LEGACY_CREDENTIAL_SECRET", hide_env_values = true)]
    legacy_credential_secret: Option<String>,
    /// Seconds a request may take before it is answered 408 (longer than the longest
    /// get_perspectives deadline, 600 s).
    #[arg(long, env = "POLYDEV_REQUEST_TIMEOUT", default_value_t = crate::app::DEFAULT_REQUEST_TIMEOUT.as_secs())]
    request_timeout: u64,
    /// Seconds after which an MCP session with no request is closed; the client then gets 404
    /// and starts a new session (keep it above the longest get_perspectives deadline, 600 s).
    #[arg(long, env = "POLYDEV_MCP_SESSION_IDLE_TIMEOUT", default_value_t = crate::app::DEFAULT_MCP_SESSION_IDLE_TIMEOUT.as_secs_f64())]
    mcp_session_idle_timeout: f64,
    /// Seconds a token lookup is kept in this process (0: off; at most 30). Revocations reach
    /// every replica at once by LISTEN/NOTIFY; the TTL bounds a notification lost unnoticed
    /// (docs/operations.md, "Token cache").
    #[arg(long, env = "POLYDEV_TOKEN_CACHE_TTL", default_value_t = crate::accounts::token_cache::DEFAULT_TTL.as_secs_f64())]
    token_cache_ttl: f64,
    /// The HMAC key of idempotency request hashes, the same on every replica [default: one
    /// generated once and kept in the database (`server_secrets`)].
    #[arg(long, env = "POLYDEV_IDEMPOTENCY_SECRET", hide_env_values = true)]
    idempotency_secret: Option<String>,
    /// Seconds between two runs of the sweeper (refunds quota reservations of calls that died,
    /// deletes idempotency keys older than 24 hours).
    #[arg(long, env = "POLYDEV_SWEEP_INTERVAL", default_value_t = 60.0)]
    sweep_interval: f64,
    /// Seconds after which a quota reservation that was neither settled nor refunded belongs
    /// to a call that died, and is refunded [default: the longest deadline + 30 s].
    #[arg(long, env = "POLYDEV_RESERVATION_STALE_AFTER")]
    reservation_stale_after: Option<f64>,
    /// The server's public URL as browsers and MCP clients reach it (`https://polydev.example.com`):
    /// the OAuth issuer, the MCP resource (`<url>/mcp`) and the base of e-mailed links. Default:
    /// `http://` and the listen address.
    #[arg(long, env = "POLYDEV_PUBLIC_URL")]
    public_url: Option<String>,
    /// SMTP server for account e-mail (`smtps://user:pass@mail.example.com`,
    /// `smtp://mail.example.com?tls=required`, `smtp://127.0.0.1:2525` for a local relay).
    /// Without it, e-mail (with its links) is written to the server log.
    #[arg(long, env = "POLYDEV_SMTP_URL", hide_env_values = true)]
    smtp_url: Option<String>,
    /// Host names whose client ID metadata documents (an https URL as OAuth client_id) may be
    /// fetched even though they resolve to private or loopback addresses (internal clients,
    /// tests). Others must resolve to public addresses only.
    #[arg(long, env = "POLYDEV_CIMD_PRIVATE_HOSTS", value_delimiter = ',')]
    cimd_private_hosts: Vec<String>,
    /// A PEM file of CA certificates trusted, on top of the system's roots, for client ID
    /// metadata documents (an internal CA; tests).
    #[arg(long, env = "POLYDEV_CIMD_EXTRA_ROOT_CA")]
    cimd_extra_root_ca: Option<std::path::PathBuf>,
    /// The sender of account e-mail.
    #[arg(
        long,
        env = "POLYDEV_SMTP_FROM",
        default_value = "Polydev <no-reply@polydev.local>"
    )]
    smtp_from: String,
    /// A bearer token `GET /metrics` requires (`Authorization: Bearer <token>`), compared in
    /// constant time. Without it the metrics page is open: keep it off the public network.
    #[arg(long, env = "POLYDEV_METRICS_TOKEN", hide_env_values = true)]
    metrics_token: Option<String>,
    #[command(flatten)]
    runtime: Box<RuntimeArgs>,
    #[command(flatten)]
    login: Box<LoginArgs>,
}

/// Login sessions: provider logins in sandboxed browsers streamed over WebRTC (docs/login.md).
#[derive(Debug, Args)]
pub struct LoginArgs {
    /// The login agent binary [default: `polydev-login-agent` next to this executable].
    #[arg(long, env = "POLYDEV_LOGIN_AGENT_BIN")]
    login_agent_bin: Option<PathBuf>,
    /// Seconds a login session (each attempt) may take before it fails.
    #[arg(long, env = "POLYDEV_LOGIN_TIMEOUT", default_value_t = 600.0)]
    login_timeout: f64,
    /// Seconds without a heartbeat from the login agent after which its session fails.
    #[arg(long, env = "POLYDEV_LOGIN_HEARTBEAT_TIMEOUT", default_value_t = 30.0)]
    login_heartbeat_timeout: f64,
    /// Seconds between two passes of the login sweeper and cleanup worker (and the first
    /// retry's wait after a failed teardown; later ones double, up to 300 s).
    #[arg(long, env = "POLYDEV_LOGIN_SWEEP_INTERVAL", default_value_t = 1.0)]
    login_sweep_interval: f64,
    /// The forward proxy (`host:port`) the login sandbox's browser reaches the provider
    /// through [default: none: the sandbox reaches only this server].
    #[arg(long, env = "POLYDEV_LOGIN_PROXY")]
    login_proxy: Option<SocketAddr>,
    /// The TURN server's TCP address (`host:port`) tunnelled into local login sandboxes (at
    /// 127.0.0.1:3478 inside): their agents relay media through TURN over TCP.
    #[arg(long, env = "POLYDEV_LOGIN_TURN_FORWARD")]
    login_turn_forward: Option<SocketAddr>,
    /// coturn's `static-auth-secret`: TURN credentials per session (docs/login.md).
    #[arg(long, env = "POLYDEV_TURN_SECRET", hide_env_values = true)]
    turn_secret: Option<String>,
    /// STUN URLs handed to both peers (`stun:turn.example.com:3478`).
    #[arg(long, env = "POLYDEV_STUN_URLS", value_delimiter = ',')]
    stun_urls: Vec<String>,
    /// TURN URLs handed to both peers with a per-session credential
    /// (`turn:turn.example.com:3478?transport=udp`); needs --turn-secret.
    #[arg(long, env = "POLYDEV_TURN_URLS", value_delimiter = ',')]
    turn_urls: Vec<String>,
    /// Seconds a TURN credential is valid [default: the login timeout + 300].
    #[arg(long, env = "POLYDEV_TURN_TTL")]
    turn_ttl: Option<f64>,
    /// A setting of the login agent, `POLYDEV_LOGIN_<NAME>=value` (repeatable): the provider
    /// CLI's login command, its credential file, … (docs/login.md, "The login agent").
    #[arg(long = "login-agent-env", value_name = "KEY=VALUE")]
    login_agent_env: Vec<String>,
}

impl LoginArgs {
    fn config(&self) -> anyhow::Result<crate::login::LoginConfig> {
        use std::time::Duration;
        let seconds = |name: &str, value: f64| {
            Duration::try_from_secs_f64(value)
                .ok()
                .filter(|d| !d.is_zero())
                .with_context(|| format!("--{name} must be a positive number of seconds"))
        };
        let mut config = crate::login::LoginConfig::default();
        if let Some(bin) = &self.login_agent_bin {
            config.agent_bin = bin.clone();
        }
        config.session_timeout = seconds("login-timeout", self.login_timeout)?;
        config.heartbeat_timeout =
            seconds("login-heartbeat-timeout", self.login_heartbeat_timeout)?;
        config.sweep_interval = seconds("login-sweep-interval", self.login_sweep_interval)?;
        config.proxy = self.login_proxy;
        config.turn_forward = self.login_turn_forward;
        for pair in &self.login_agent_env {
            let (key, value) = pair
                .split_once('=')
                .with_context(|| format!("--login-agent-env {pair:?}: expected KEY=VALUE"))?;
            anyhow::ensure!(
                key.starts_with("POLYDEV_LOGIN_")
                    && !matches!(
                        key,
                        "POLYDEV_LOGIN_SESSION_ID"
                            | "POLYDEV_LOGIN_SECRET"
                            | "POLYDEV_LOGIN_PROVIDER"
                    ),
                "--login-agent-env {key}: only the agent's own POLYDEV_LOGIN_* settings (not the session's)"
            );
            config.agent_env.insert(key.to_string(), value.to_string());
        }
        let urls = |list: &[String]| -> Vec<String> {
            list.iter()
                .map(|u| u.trim().to_string())
                .filter(|u| !u.is_empty())
                .collect()
        };
        config.turn.stun_urls = urls(&self.stun_urls);
        config.turn.turn_urls = urls(&self.turn_urls);
        config.turn.secret = self.turn_secret.clone().filter(|s| !s.is_empty());
        config.turn.ttl = self
            .turn_ttl
            .map(|ttl| seconds("turn-ttl", ttl))
            .transpose()?;
        anyhow::ensure!(
            config.turn.turn_urls.is_empty() || config.turn.secret.is_some(),
            "--turn-urls needs --turn-secret (coturn's static-auth-secret)"
        );
        Ok(config)
    }
}

/// The container runtime for the provider CLIs (docs/runtime.md).
#[derive(Debug, Args)]
pub struct RuntimeArgs {
    /// `local` (bubblewrap sandboxes on this machine), `nomad`, or `off`.
    #[arg(long = "runtime", env = "POLYDEV_RUNTIME", default_value = "local")]
    driver: String,
    /// Warm containers per provider, e.g. `anthropic=2,openai=1` (default: none).
    #[arg(long, env = "POLYDEV_RUNTIME_WARM", value_delimiter = ',')]
    runtime_warm: Vec<String>,
    /// The server's URL as agents on other machines see it (Nomad).
    #[arg(long, env = "POLYDEV_RUNTIME_SERVER_URL")]
    runtime_server_url: Option<String>,
    #[command(flatten)]
    proxy: ProxyArgs,
    #[arg(
        long,
        env = "POLYDEV_NOMAD_ADDR",
        default_value = "http://127.0.0.1:4646"
    )]
    nomad_addr: String,
    #[arg(long, env = "POLYDEV_NOMAD_TOKEN", hide_env_values = true)]
    nomad_token: Option<String>,
    #[arg(long, env = "POLYDEV_NOMAD_NAMESPACE", default_value = "default")]
    nomad_namespace: String,
    #[arg(long, env = "POLYDEV_NOMAD_REGION")]
    nomad_region: Option<String>,
    /// The agent binary on the Nomad client nodes.
    #[arg(
        long,
        env = "POLYDEV_NOMAD_AGENT",
        default_value = "/opt/polydev/polydev-agent"
    )]
    nomad_agent: String,
}

/// The users' Decodo proxy ports (docs/cli-backends.md, "Proxy ports").
#[derive(Args)]
pub struct ProxyArgs {
    /// The proxy gate every user's port is opened on (e.g. `gate.decodo.com`). Unset: proxy
    /// ports are off and runtime containers have no egress.
    #[arg(long, alias = "runtime-proxy-host", env = "POLYDEV_PROXY_GATE_HOST")]
    proxy_gate_host: Option<String>,
    /// Ports new users get, `START-END` (inclusive); existing `user_proxy_ports` rows keep theirs.
    #[arg(long, env = "POLYDEV_PROXY_PORT_RANGE")]
    proxy_port_range: Option<String>,
    /// The gate's username (sent as `Proxy-Authorization`, never logged).
    #[arg(long, env = "POLYDEV_PROXY_USERNAME", hide_env_values = true)]
    proxy_username: Option<String>,
    /// The gate's password (never logged; prefer the environment variable).
    #[arg(long, env = "POLYDEV_PROXY_PASSWORD", hide_env_values = true)]
    proxy_password: Option<String>,
    /// The health probe sends `CONNECT` to this URL's host and port through each port.
    #[arg(
        long,
        env = "POLYDEV_PROXY_CHECK_URL",
        default_value = "https://ip.decodo.com/json"
    )]
    proxy_check_url: String,
    /// Seconds between two health probe passes.
    #[arg(long, env = "POLYDEV_PROXY_CHECK_INTERVAL", default_value_t = 300.0)]
    proxy_check_interval: f64,
    /// Seconds a probe waits for the proxy's answer.
    #[arg(long, env = "POLYDEV_PROXY_CHECK_TIMEOUT", default_value_t = 10.0)]
    proxy_check_timeout: f64,
}

impl std::fmt::Debug for ProxyArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyArgs")
            .field("proxy_gate_host", &self.proxy_gate_host)
            .field("proxy_port_range", &self.proxy_port_range)
            .field(
                "proxy_username",
                &self.proxy_username.as_ref().map(|_| "<set>"),
            )
            .field(
                "proxy_password",
                &self.proxy_password.as_ref().map(|_| "<set>"),
            )
            .field("proxy_check_url", &self.proxy_check_url)
            .finish_non_exhaustive()
    }
}

impl ProxyArgs {
    /// The proxy configuration, or `None` when no gate is set.
    pub fn config(&self) -> anyhow::Result<Option<crate::proxy::ProxyConfig>> {
        use anyhow::Context;
        let Some(gate_host) = self.proxy_gate_host.clone().filter(|h| !h.is_empty()) else {
            return Ok(None);
        };
        let range = self
            .proxy_port_range
            .as_deref()
            .context("--proxy-gate-host needs --proxy-port-range (e.g. 10001-10100)")?;
        let ports = crate::proxy::ProxyConfig::parse_range(range)
            .map_err(|why| anyhow::anyhow!("--proxy-port-range {why}"))?;
        let credentials = match (&self.proxy_username, &self.proxy_password) {
            (None, None) => None,
            (Some(username), Some(password)) => Some(crate::proxy::Credentials {
                username: username.clone(),
                password: password.clone(),
            }),
            _ => anyhow::bail!("--proxy-username and --proxy-password go together"),
        };
        let check_url = url::Url::parse(&self.proxy_check_url)
            .with_context(|| format!("--proxy-check-url `{}`", self.proxy_check_url))?;
        let seconds = |name: &str, value: f64| {
            anyhow::ensure!(value > 0.0 && value.is_finite(), "--{name} must be > 0");
            Ok(std::time::Duration::from_secs_f64(value))
        };
        let config = crate::proxy::ProxyConfig {
            gate_host,
            ports,
            credentials,
            check_url,
            check_interval: seconds("proxy-check-interval", self.proxy_check_interval)?,
            check_timeout: seconds("proxy-check-timeout", self.proxy_check_timeout)?,
        };
        config
            .check_target()
            .map_err(|why| anyhow::anyhow!("--proxy-check-url: {why}"))?;
        Ok(Some(config))
    }
}

impl RuntimeArgs {
    /// The runtime, or `None` when it is off (or the local driver cannot run here).
    fn build(
        &self,
        pool: sqlx::PgPool,
        listen: SocketAddr,
    ) -> anyhow::Result<Option<crate::runtime::Runtime>> {
        use std::sync::Arc;

        use crate::runtime::{self, Orchestrator};
        let mut config = runtime::RuntimeConfig::default();
        for entry in &self.runtime_warm {
            let (provider, count) = entry
                .split_once('=')
                .with_context(|| format!("--runtime-warm `{entry}`: expected PROVIDER=COUNT"))?;
            let provider = runtime::pool::check_provider(provider.trim())?;
            config.warm.insert(provider.into(), count.trim().parse()?);
        }
        config.server_url = self.runtime_server_url.clone();
        let proxies = self
            .proxy
            .config()?
            .map(|proxy| crate::proxy::Proxies::new(pool.clone(), proxy));
        let orchestrator: Arc<dyn Orchestrator> = match self.driver.as_str() {
            "off" => return Ok(None),
            "local" => {
                let mut local = runtime::LocalConfig::detect(runtime::LocalConfig::default_agent());
                local.proxy_authorization = proxies
                    .as_ref()
                    .and_then(|p| p.config.credentials.as_ref())
                    .map(crate::proxy::Credentials::authorization);
                if !local.bwrap.exists() || !local.agent.exists() {
                    tracing::warn!(bwrap = %local.bwrap.display(), agent = %local.agent.display(),
                        "the local runtime needs bubblewrap and polydev-agent; runtime off");
                    return Ok(None);
                }
                // Agents reach this server through the sandbox's tunnel.
                let ip = if listen.ip().is_unspecified() {
                    std::net::Ipv4Addr::LOCALHOST.into()
                } else {
                    listen.ip()
                };
                config.server = Some(SocketAddr::new(ip, listen.port()));
                Arc::new(runtime::LocalDriver::new(local))
            }
            "nomad" => {
                let mut nomad = runtime::NomadConfig::new(&self.nomad_addr);
                nomad.token = self.nomad_token.clone().filter(|t| !t.is_empty());
                nomad.namespace = self.nomad_namespace.clone();
                nomad.region = self.nomad_region.clone();
                anyhow::ensure!(
                    config.server_url.is_some(),
                    "--runtime nomad needs --runtime-server-url (where agents reach this server)"
                );
                config.command = vec![self.nomad_agent.clone(), "serve".into()];
                Arc::new(runtime::NomadDriver::new(nomad, crate::net::http_client()))
            }
            other => anyhow::bail!("--runtime `{other}`: expected local, nomad or off"),
        };
        tracing::info!(driver = orchestrator.driver(), warm = ?config.warm, "container runtime");
        if let Some(proxies) = &proxies {
            let ports = &proxies.config.ports;
            tracing::info!(gate = %proxies.config.gate_host, ports = %format!("{}-{}", ports.start(), ports.end()),
                credentials = proxies.config.credentials.is_some(), "proxy ports");
        } else {
            tracing::warn!("no --proxy-gate-host: runtime containers have no egress");
        }
        Ok(Some(
            runtime::Runtime::new(pool, orchestrator, config).with_proxies(proxies),
        ))
    }
}

#[derive(Debug, Subcommand)]
pub enum ZkCommand {
    /// Set a master password and turn zero-knowledge on; prints the recovery key once.
    Enable,
    /// Encrypt your existing plaintext messages (safe to interrupt and run again).
    Migrate {
        /// Messages per batch.
        #[arg(long, default_value_t = 200)]
        batch: usize,
    },
    /// Show whether zero-knowledge is on and how far the migration is.
    Status,
    /// Connect a CLI subscription to your runtime container: claims one for the CLI's provider
    /// and grants it the credential your last login session for that provider stored, opened
    /// and sealed again to the container here (docs/cli-backends.md). The `claude-code`,
    /// `codex-cli` or `gemini-cli` model then answers with your subscription.
    Connect {
        /// `claude`, `codex` or `gemini`.
        cli: String,
    },
    /// Show your chat history, decrypted here. Items the server served that cannot be verified
    /// as yours (plaintext injected after zero-knowledge was turned on, a message moved to
    /// another session or with its role changed) are listed apart, never as yours.
    History,
    /// Change the master password. Without --rotate it re-wraps one key and re-encrypts
    /// nothing, so a copy of the old key material still opens with the old password.
    ChangePassword {
        /// Also rotate the account key (see `rotate`): the old password and old copies of the
        /// key material then open nothing written afterwards.
        #[arg(long)]
        rotate: bool,
    },
    /// Forgot the password: unlock with the recovery key and set a new password.
    Recover,
    /// Issue a new recovery key; prints it once. The server's material no longer opens with
    /// the old one, but a copy of the old material still does: `rotate` to retire it fully.
    NewRecoveryKey,
    /// Rotate the account key: a new key, every item re-encrypted under it (resumable: run it
    /// again after an interruption), then the key material swapped; prints a new recovery key.
    Rotate,
    /// Forget what this machine pinned about the account's keys (after checking that a change
    /// the client refused was yours, e.g. a server restored from a backup).
    ForgetPin,
}

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Create a user with its profile and the quota of its plan.
    Create {
        #[arg(long)]
        email: String,
        #[arg(long, value_enum, default_value = "free")]
        tier: Plan,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token and print it (this is the only time it is shown).
    Create {
        #[arg(long)]
        email: String,
        #[arg(long)]
        name: String,
        /// Days until it expires [default: never].
        #[arg(long)]
        expires_in: Option<u32>,
        /// `mcp`: MCP tools, perspectives, usage, chat (what an IDE needs). `account`: also
        /// tokens, settings writes, zero-knowledge keys and credentials (`polydev zk`, the web
        /// page).
        #[arg(long, value_enum, default_value = "mcp")]
        scope: Scope,
    },
    /// List a user's tokens.
    List {
        #[arg(long)]
        email: String,
    },
    /// Revoke a token by id.
    Revoke { id: Uuid },
}

impl Cli {
    pub async fn run(self) -> anyhow::Result<()> {
        // The stdio bridge needs no database: it must answer the IDE at once.
        if let Command::Mcp {
            server_url,
            token,
            local_clis,
        } = self.command
        {
            crate::net::install_tls_provider();
            let token = match token.filter(|t| !t.is_empty()) {
                Some(token) => Some(token),
                None => crate::client::login::token_for(&server_url).await,
            };
            return crate::mcp::bridge::Bridge::new(server_url, token)
                .with_local_clis(local_clis)
                .run()
                .await;
        }
        if let Command::Login { server_url } = self.command {
            let mut stdout = std::io::stdout();
            let login = crate::client::login::login(&server_url, &mut stdout).await?;
            let path = crate::client::login::save(&login)?;
            println!(
                "Signed in. The token (scope `{}`) is stored in {}; `polydev mcp` uses it when POLYDEV_USER_TOKEN is unset.",
                login.scope,
                path.display()
            );
            return Ok(());
        }
        if let Command::Openapi = self.command {
            print!("{}", crate::http::openapi_json());
            return Ok(());
        }
        if let Command::Zk {
            server_url,
            token,
            command,
        } = self.command
        {
            return zk(&server_url, token.as_deref(), command).await;
        }
        let db = Database::open(&self.db.config()).await?;
        let result = match self.command {
            Command::Serve(args) => serve(&db, *args).await,
            Command::Migrate { dry_run: true } => db
                .plan()
                .await
                .map(|plan| print!("{plan}"))
                .map_err(Into::into),
            Command::Migrate { dry_run: false } => migrate(&db).await,
            Command::Mcp { .. } | Command::Zk { .. } | Command::Login { .. } | Command::Openapi => {
                unreachable!("handled above")
            }
            Command::User(command) => match ensure_schema(&db).await {
                Ok(()) => user(&db, command).await,
                Err(e) => Err(e),
            },
            Command::Token(command) => match ensure_schema(&db).await {
                Ok(()) => token(&db, command).await,
                Err(e) => Err(e),
            },
            Command::Admin(command) => match ensure_schema(&db).await {
                Ok(()) => admin::run(&db.pool, command).await,
                Err(e) => Err(e),
            },
        };
        // Stop the embedded cluster even when the command failed.
        let closed = db.close().await;
        result?;
        Ok(closed?)
    }
}

impl DbArgs {
    pub fn config(&self) -> DbConfig {
        DbConfig {
            database_url: self.database_url.clone().filter(|url| !url.is_empty()),
            data_dir: self.data_dir.clone().unwrap_or_else(default_data_dir),
            pg_bin_dir: self.pg_bin_dir.clone(),
            max_connections: self.db_max_connections,
        }
    }
}

fn default_data_dir() -> PathBuf {
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/var/lib/polydev");
    }
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("polydev")
}

/// Logs go to stderr (stdout is for command output); `RUST_LOG` overrides the default level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Logs go to stderr (stdout carries command output). In JSON, each line is one object with
/// the event's fields and those of its spans: a request's `id`, `method`, `path`, `route` and
/// `user`, and on its last line `status` and `latency`.
pub fn init_tracing(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,tower_http=info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
}

async fn serve(db: &Database, args: ServeArgs) -> anyhow::Result<()> {
    let catalogue = Catalogue::load(args.models.as_deref())?;
    let listen = args.listen;
    migrate(db).await?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "serving HTTP");
    println!("polydev listening on http://{addr}");
    let sweeper = Sweeper::new(&args)?;
    let public_url = match args.public_url.filter(|u| !u.trim().is_empty()) {
        Some(url) => {
            let parsed = url::Url::parse(url.trim())
                .with_context(|| format!("--public-url `{url}` is not a URL"))?;
            anyhow::ensure!(
                matches!(parsed.scheme(), "http" | "https") && parsed.host().is_some(),
                "--public-url must be an http(s) URL with a host"
            );
            url.trim().trim_end_matches('/').to_string()
        }
        None => format!("http://{addr}"),
    };
    let mailer = match args.smtp_url.filter(|u| !u.is_empty()) {
        Some(url) => crate::accounts::Mailer::smtp(&url, &args.smtp_from)?,
        None => crate::accounts::Mailer::Log,
    };
    tracing::info!(%public_url, "OAuth issuer and public URL");
    let runtime = args.runtime.build(db.pool.clone(), addr)?;
    // The catalogue's `cli` providers run in the users' runtime containers.
    let mut gateway = Gateway::new(catalogue).with_runtime(runtime.clone());
    if let Some(secret) = args.idempotency_secret.as_deref().filter(|s| !s.is_empty()) {
        gateway = gateway.with_idempotency_secret(secret.as_bytes());
    }
    let state = AppState::new(db.pool.clone(), gateway)
        .with_runtime(runtime)
        .with_public_url(&public_url)
        .with_mailer(mailer)
        .with_cimd_private_hosts(
            args.cimd_private_hosts
                .into_iter()
                .map(|h| h.trim().to_string())
                .filter(|h| !h.is_empty())
                .collect(),
        )
        .with_cimd_extra_roots(cimd_extra_roots(args.cimd_extra_root_ca.as_deref())?)
        .with_relaxed_pool(db.relaxed_pool.clone())
        .with_allowed_hosts(args.allowed_hosts)
        .with_request_timeout(std::time::Duration::from_secs(args.request_timeout))
        .with_mcp_session_idle_timeout(
            std::time::Duration::try_from_secs_f64(args.mcp_session_idle_timeout)
                .ok()
                .filter(|d| !d.is_zero())
                .context("--mcp-session-idle-timeout must be a positive number of seconds")?,
        )
        .with_allowed_origins(
            args.allowed_origins
                .into_iter()
                .map(|o| o.trim().to_string())
                .filter(|o| !o.is_empty())
                .collect(),
        )
        .with_legacy_secret(
            args.legacy_credential_secret
                .filter(|s| !s.is_empty())
                .map(|s| crate::vault::LegacySecret::new(s.as_bytes())),
        )
        .with_metrics_token(args.metrics_token.filter(|t| !t.is_empty()));
    let token_cache_ttl = std::time::Duration::try_from_secs_f64(args.token_cache_ttl)
        .ok()
        .filter(|ttl| *ttl <= crate::accounts::token_cache::MAX_TTL)
        .context("--token-cache-ttl must be 0 to 30 seconds")?;
    let token_cache =
        crate::accounts::TokenCache::start(&db.pool, token_cache_ttl, state.shutdown.clone())
            .await?;
    let state = state.with_token_cache(token_cache);
    crate::telemetry::spawn_upkeep(state.shutdown.clone());
    if let Some(runtime) = &state.runtime {
        runtime.spawn_background(state.shutdown.clone());
        if let Some(proxies) = &runtime.proxies {
            proxies.spawn_background(state.shutdown.clone());
        }
    }
    let login = crate::login::Login::new(
        db.pool.clone(),
        state.runtime.clone(),
        args.login.config()?,
        state.shutdown.clone(),
    )
    .await?;
    login.spawn_background(state.shutdown.clone());
    let state = state.with_login(Some(login));
    let stop_sweeper = tokio_util::sync::CancellationToken::new();
    let sweeping = tokio::spawn(sweeper.run(db.pool.clone(), stop_sweeper.clone()));
    let served = tokio::select! {
        served = http::serve(listener, state, shutdown_signal()) => served,
        () = db.supervise(std::time::Duration::from_secs(2)) => unreachable!("supervise never returns"),
    };
    stop_sweeper.cancel();
    let _ = sweeping.await;
    served?;
    tracing::info!("in-flight requests finished; shutting down");
    Ok(())
}

/// The background upkeep of `polydev serve`. Every replica runs one; the work is safe to do
/// concurrently (reservations are taken with `FOR UPDATE SKIP LOCKED`, deletes are idempotent).
struct Sweeper {
    interval: std::time::Duration,
    stale_after: std::time::Duration,
}

impl Sweeper {
    fn new(args: &ServeArgs) -> anyhow::Result<Sweeper> {
        use std::time::Duration;
        let longest_call = Duration::from_millis(crate::perspectives::limits::MAX_DEADLINE_MS)
            + crate::perspectives::CALL_MARGIN;
        let seconds = |name: &str, value: f64| {
            Duration::try_from_secs_f64(value)
                .ok()
                .filter(|d| !d.is_zero())
                .with_context(|| format!("--{name} must be a positive number of seconds"))
        };
        let interval = seconds("sweep-interval", args.sweep_interval)?;
        let stale_after = match args.reservation_stale_after {
            Some(value) => seconds("reservation-stale-after", value)?,
            None => longest_call,
        };
        if stale_after < longest_call {
            tracing::warn!(
                ?stale_after,
                ?longest_call,
                "--reservation-stale-after is shorter than the longest call: a call still running may be refunded and then not charged"
            );
        }
        Ok(Sweeper {
            interval,
            stale_after,
        })
    }

    async fn run(self, pool: sqlx::PgPool, stop: tokio_util::sync::CancellationToken) {
        loop {
            match crate::quota::reconcile(&pool, self.stale_after).await {
                Ok(0) => {}
                Ok(refunded) => {
                    tracing::info!(refunded, "refunded quota reservations of calls that died")
                }
                Err(error) => tracing::warn!(%error, "quota reconciliation failed"),
            }
            match crate::perspectives::sweep_idempotency(&pool).await {
                Ok(0) => {}
                Ok(deleted) => tracing::info!(deleted, "deleted expired idempotency keys"),
                Err(error) => tracing::warn!(%error, "idempotency sweep failed"),
            }
            tokio::select! {
                () = tokio::time::sleep(self.interval) => {}
                () = stop.cancelled() => return,
            }
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).expect("cannot install a SIGTERM handler");
    let mut interrupt = signal(SignalKind::interrupt()).expect("cannot install a SIGINT handler");
    tokio::select! {
        _ = terminate.recv() => tracing::info!("SIGTERM received"),
        _ = interrupt.recv() => tracing::info!("SIGINT received"),
    }
}

async fn migrate(db: &Database) -> anyhow::Result<()> {
    let plan = db.migrate().await?;
    let applied = plan.pending().len();
    match plan {
        MigrationPlan::Adopt { .. } => {
            tracing::info!(applied, "adopted the existing database and migrated it")
        }
        _ if applied == 0 => tracing::info!("database schema is up to date"),
        _ => tracing::info!(applied, "database migrated"),
    }
    Ok(())
}

/// Account commands need a current schema. The embedded cluster is polydev's own, so it is
/// migrated on the spot; an external server is only migrated when asked to (`migrate`, `serve`).
async fn ensure_schema(db: &Database) -> anyhow::Result<()> {
    if db.is_embedded() {
        return migrate(db).await;
    }
    let mut conn = db.pool.acquire().await?;
    anyhow::ensure!(
        crate::db::migrate::is_current(&mut conn).await?,
        "the database schema is not current: run `polydev migrate` (or start `polydev serve`) first"
    );
    Ok(())
}

async fn user(db: &Database, command: UserCommand) -> anyhow::Result<()> {
    match command {
        UserCommand::Create { email, tier } => {
            let user = accounts::create_user(&db.pool, &email, tier).await?;
            println!("{}", user.user_id);
            eprintln!(
                "created user {} ({}) on the {} plan",
                user.user_id,
                email.trim(),
                tier.as_str()
            );
        }
    }
    Ok(())
}

async fn token(db: &Database, command: TokenCommand) -> anyhow::Result<()> {
    match command {
        TokenCommand::Create {
            email,
            name,
            expires_in,
            scope,
        } => {
            let user = accounts::find_user_by_email(&db.pool, &email).await?;
            let created =
                accounts::create_scoped_token(&db.pool, user.user_id, &name, expires_in, scope)
                    .await?;
            println!("{}", created.token);
            eprintln!(
                "created {scope} token {} for {}: store it now, it will not be shown again",
                created.info.id,
                email.trim()
            );
        }
        TokenCommand::List { email } => {
            let user = accounts::find_user_by_email(&db.pool, &email).await?;
            println!(
                "{:<36}  {:<20}  {:<8}  {:<7}  {:<7}  {:<20}  LAST USED",
                "ID", "NAME", "PREVIEW", "SCOPE", "ACTIVE", "EXPIRES"
            );
            for t in accounts::list_tokens(&db.pool, user.user_id).await? {
                let time = |t: Option<chrono::DateTime<chrono::Utc>>| {
                    t.map_or("-".to_string(), |t| t.format("%Y-%m-%d %H:%M").to_string())
                };
                println!(
                    "{:<36}  {:<20}  ...{:<5}  {:<7}  {:<7}  {:<20}  {}",
                    t.id,
                    t.token_name.unwrap_or_default(),
                    t.token_preview.unwrap_or_default(),
                    t.scope.as_str(),
                    t.active.unwrap_or(false),
                    time(t.expires_at),
                    time(t.last_used_at)
                );
            }
        }
        TokenCommand::Revoke { id } => {
            accounts::revoke_token(&db.pool, None, id).await?;
            println!("revoked token {id}");
        }
    }
    Ok(())
}

async fn rotate_with_progress(
    client: &crate::client::zk::ZkClient,
    password: &str,
    new_password: Option<&str>,
) -> anyhow::Result<crate::client::zk::rotate::RotationReport> {
    let bar = indicatif::ProgressBar::new(0).with_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} items re-encrypted")
            .expect("valid template"),
    );
    let report = client
        .rotate(
            password,
            new_password,
            polydev_zk::KdfParams::DEFAULT,
            |p| {
                bar.set_length(p.total);
                bar.set_position(p.done);
            },
        )
        .await?;
    bar.finish();
    Ok(report)
}

fn warn_unreadable(report: &crate::client::zk::rotate::RotationReport) {
    if !report.unreadable.is_empty() {
        eprintln!(
            "WARNING: {} stored items open with neither key (not yours, or corrupt) and were left as they are: {:?}",
            report.unreadable.len(),
            report.unreadable
        );
    }
}

fn print_history(history: &crate::client::zk::history::History) {
    use crate::client::zk::history::Trust;
    let flag = |trust: Trust| match trust {
        Trust::Sealed | Trust::Plaintext => "",
        Trust::OlderFormat => {
            "  [older format, not bound: its session, role and order are not verified]"
        }
        Trust::NotYetEncrypted => "  [not yet encrypted: run `polydev zk migrate`]",
    };
    for session in &history.sessions {
        println!(
            "== {}{}",
            session.title.as_deref().unwrap_or("(untitled)"),
            session.title_trust.map(flag).unwrap_or("")
        );
        for message in &session.messages {
            println!("[{}] {}{}", message.role, message.text, flag(message.trust));
        }
    }
    if !history.quarantined.is_empty() {
        println!();
        println!(
            "QUARANTINED: {} items the server served that are not verified as yours (not shown above):",
            history.quarantined.len()
        );
        for q in &history.quarantined {
            println!(
                "  {} {} (session {}): {}{}",
                q.what,
                q.id,
                q.session_id,
                q.reason,
                q.served_text
                    .as_deref()
                    .map(|t| format!(" — served text: {t:?}"))
                    .unwrap_or_default()
            );
        }
    }
}

/// The master password: `POLYDEV_MASTER_PASSWORD` (for scripts), else a prompt without echo.
fn master_password(prompt: &str) -> anyhow::Result<String> {
    if let Ok(password) = std::env::var("POLYDEV_MASTER_PASSWORD") {
        return Ok(password);
    }
    Ok(rpassword::prompt_password(prompt)?)
}

/// A new master password, asked twice (or `POLYDEV_MASTER_PASSWORD`), of at least 10 characters.
fn new_master_password() -> anyhow::Result<String> {
    let password = master_password("new master password: ")?;
    if std::env::var("POLYDEV_MASTER_PASSWORD").is_err() {
        anyhow::ensure!(
            password == master_password("again: ")?,
            "the passwords differ"
        );
    }
    anyhow::ensure!(
        password.chars().count() >= 10,
        "use at least 10 characters (a passphrase of several words is best)"
    );
    Ok(password)
}

async fn zk(server_url: &str, token: Option<&str>, command: ZkCommand) -> anyhow::Result<()> {
    let token = token.filter(|t| !t.is_empty()).context(
        "POLYDEV_USER_TOKEN is not set: create one with `polydev token create --scope account`",
    )?;
    let client = crate::client::zk::ZkClient::new(server_url, token);
    match command {
        ZkCommand::Status => {
            let status = client.status().await?;
            println!(
                "zero-knowledge: {}",
                if status.enabled { "on" } else { "off" }
            );
            if status.enabled {
                println!("key material version: {}", status.version);
                let m = client.migration_status().await?;
                println!(
                    "messages: {} encrypted, {} encrypted but not yet verified, {} still plaintext",
                    m.done, m.unverified, m.plaintext
                );
                println!(
                    "session titles: {} encrypted, {} not yet verified, {} still plaintext",
                    m.sessions.done, m.sessions.unverified, m.sessions.plaintext
                );
                if status.rotation.is_some() {
                    println!("a key rotation is in progress: run `polydev zk rotate` to finish it");
                }
            }
        }
        ZkCommand::Connect { cli } => {
            let keyring = client
                .unlock(&master_password("master password: ")?)
                .await?;
            let granted = client.connect_cli(&keyring, &cli).await?;
            println!(
                "{} is connected: container {}, granted {}",
                granted.cli, granted.container_id, granted.granted_at
            );
        }
        ZkCommand::Enable => {
            eprintln!(
                "Choose a master password. It never leaves this machine. If you lose BOTH the \
                 password and the recovery key printed next, your encrypted data is lost for good."
            );
            let password = new_master_password()?;
            let (_, recovery) = client
                .enable(&password, polydev_zk::KdfParams::DEFAULT)
                .await?;
            println!("{}", recovery.display());
            eprintln!(
                "That is your recovery key, shown only this once: store it offline. Next: `polydev zk migrate`."
            );
        }
        ZkCommand::History => {
            let keyring = if client.status().await?.enabled {
                Some(
                    client
                        .unlock(&master_password("master password: ")?)
                        .await?,
                )
            } else {
                None
            };
            print_history(&client.history(keyring.as_ref()).await?);
        }
        ZkCommand::ChangePassword { rotate: true } => {
            let current = master_password("current master password: ")?;
            let new_password = new_master_password()?;
            let report = rotate_with_progress(&client, &current, Some(&new_password)).await?;
            println!("{}", report.recovery_key.display());
            eprintln!(
                "Master password changed and account key rotated ({} items re-encrypted). That is your new recovery key, shown only this once: store it offline. The old password, the old recovery key and any copy of the old key material open nothing written from now on, nor anything re-encrypted.",
                report.resealed + report.already
            );
            warn_unreadable(&report);
        }
        ZkCommand::ChangePassword { rotate: false } | ZkCommand::Recover => {
            let recover = matches!(command, ZkCommand::Recover);
            let current = if recover {
                rpassword::prompt_password("recovery key: ")?
            } else {
                master_password("current master password: ")?
            };
            let unlock = if recover {
                crate::client::zk::Unlock::RecoveryKey(&current)
            } else {
                crate::client::zk::Unlock::Password(&current)
            };
            let new_password = new_master_password()?;
            client.set_password(unlock, &new_password).await?;
            eprintln!(
                "Master password changed: the key material on the server opens only with the new one. Your data was not re-encrypted, so a copy of the old key material (a backup) still opens with the old password; `polydev zk rotate` retires it."
            );
        }
        ZkCommand::NewRecoveryKey => {
            let password = master_password("master password: ")?;
            let recovery = client.new_recovery_key(&password).await?;
            println!("{}", recovery.display());
            eprintln!(
                "That is your new recovery key, shown only this once. The old one no longer opens the key material on the server; a copy of the old material (a backup) still opens with it: `polydev zk rotate` retires it."
            );
        }
        ZkCommand::Rotate => {
            let password = master_password("master password: ")?;
            let report = rotate_with_progress(&client, &password, None).await?;
            println!("{}", report.recovery_key.display());
            eprintln!(
                "Account key rotated{} ({} items re-encrypted). That is your new recovery key, shown only this once: store it offline. The old recovery key and any copy of the old key material open nothing written from now on, nor anything re-encrypted.",
                if report.resumed { " (resumed)" } else { "" },
                report.resealed + report.already
            );
            warn_unreadable(&report);
        }
        ZkCommand::ForgetPin => {
            let user_id = client.user_id().await?;
            let forgotten = client.pins().forget(server_url, &user_id)?;
            eprintln!(
                "{}",
                if forgotten {
                    "Forgotten: the next command pins what the server serves now."
                } else {
                    "Nothing was pinned for this account on this server."
                }
            );
        }
        ZkCommand::Migrate { batch } => {
            let password = master_password("master password: ")?;
            let keyring = client.unlock(&password).await?;
            let bar = indicatif::ProgressBar::new(0).with_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:40} {pos}/{len} messages encrypted and verified {msg}",
                )
                .expect("valid template"),
            );
            let report = client
                .migrate(
                    &keyring,
                    batch.clamp(1, 500),
                    |s| {
                        bar.set_length(s.total() as u64);
                        bar.set_position(s.done as u64);
                        bar.set_message(format!("({} awaiting verification)", s.unverified));
                    },
                    |_| std::ops::ControlFlow::Continue(()),
                )
                .await?;
            bar.finish();
            println!(
                "messages: encrypted {}, verified and cleared {}, re-queued {}, changed meanwhile {}",
                report.encrypted, report.verified_and_cleared, report.reset, report.retried
            );
            println!(
                "session titles: encrypted {}, verified and cleared {}",
                report.sessions_encrypted, report.sessions_verified_and_cleared
            );
            if !report.not_in_manifest.is_empty() {
                eprintln!(
                    "WARNING: {} plaintext rows were not there (or not as they are now) when zero-knowledge was turned on; they were NOT encrypted and are not shown as yours: {}",
                    report.not_in_manifest.len(),
                    report
                        .not_in_manifest
                        .iter()
                        .map(Uuid::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            let credentials = client.migrate_credentials(&keyring).await?;
            println!(
                "credentials: moved to client-side keys {}, verified and cleared {}",
                credentials.moved, credentials.verified_and_cleared
            );
            for unreadable in &credentials.unreadable {
                println!(
                    "credentials: {} {} was not moved: {} (left as it is; ask your operator)",
                    unreadable.table.as_str(),
                    unreadable.credential_id,
                    unreadable.reason
                );
            }
        }
    }
    Ok(())
}

/// The certificates of `--cimd-extra-root-ca` (none without it).
fn cimd_extra_roots(path: Option<&std::path::Path>) -> anyhow::Result<Vec<reqwest::Certificate>> {
    use anyhow::Context;
    let Some(path) = path else {
        return Ok(Vec::new());
    };
    let pem =
        std::fs::read(path).with_context(|| format!("--cimd-extra-root-ca {}", path.display()))?;
    let roots = reqwest::Certificate::from_pem_bundle(&pem).with_context(|| {
        format!(
            "--cimd-extra-root-ca {}: not PEM certificates",
            path.display()
        )
    })?;
    anyhow::ensure!(
        !roots.is_empty(),
        "--cimd-extra-root-ca {}: no certificate in it",
        path.display()
    );
    Ok(roots)
}

#[cfg(test)]
mod cimd_extra_root_tests {
    #[test]
    fn a_missing_or_empty_root_file_is_a_clear_error() {
        assert!(super::cimd_extra_roots(None).unwrap().is_empty());
        let missing = super::cimd_extra_roots(Some(std::path::Path::new("/nonexistent/ca.pem")));
        assert!(format!("{:#}", missing.unwrap_err()).contains("--cimd-extra-root-ca"));
        let dir = std::env::temp_dir().join(format!("polydev-ca-{}", std::process::id()));
        std::fs::write(&dir, "not a certificate\n").unwrap();
        let empty = super::cimd_extra_roots(Some(&dir));
        let _ = std::fs::remove_file(&dir);
        assert!(format!("{:#}", empty.unwrap_err()).contains("no certificate"));
    }
}

#[cfg(test)]
mod proxy_args_tests {
    use super::ProxyArgs;

    fn args(
        gate: Option<&str>,
        range: Option<&str>,
        user: Option<&str>,
        pass: Option<&str>,
    ) -> ProxyArgs {
        ProxyArgs {
            proxy_gate_host: gate.map(Into::into),
            proxy_port_range: range.map(Into::into),
            proxy_username: user.map(Into::into),
            proxy_password: pass.map(Into::into),
            proxy_check_url: "https://ip.decodo.com/json".into(),
            proxy_check_interval: 300.0,
            proxy_check_timeout: 10.0,
        }
    }

    #[test]
    fn proxy_flags_are_checked_and_the_password_never_shown() {
        assert!(args(None, None, None, None).config().unwrap().is_none());
        let error = |a: ProxyArgs| format!("{:#}", a.config().unwrap_err());
        assert!(
            error(args(Some("gate.decodo.com"), None, None, None)).contains("--proxy-port-range")
        );
        assert!(error(args(Some("gate.decodo.com"), Some("9-1"), None, None)).contains("empty"));
        assert!(
            error(args(
                Some("gate.decodo.com"),
                Some("10001-10002"),
                Some("u"),
                None
            ))
            .contains("go together")
        );
        let full = args(
            Some("gate.decodo.com"),
            Some("10001-10002"),
            Some("u"),
            Some("hunter2"),
        );
        let config = full.config().unwrap().unwrap();
        assert_eq!(config.ports, 10001..=10002);
        assert!(!format!("{full:?}{config:?}").contains("hunter2"));
    }
}

#[cfg(test)]
mod login_agent_env_tests {
    use super::*;

    fn login_config(args: &[&str]) -> anyhow::Result<crate::login::LoginConfig> {
        let cli = Cli::try_parse_from(["polydev", "serve"].iter().chain(args))?;
        match cli.command {
            Command::Serve(serve) => serve.login.config(),
            _ => unreachable!(),
        }
    }

    #[test]
    fn login_agent_env_takes_the_agents_own_settings_only() {
        let config = login_config(&[
            "--login-agent-env",
            "POLYDEV_LOGIN_CLI=codex login --device-auth",
            "--login-agent-env",
            "POLYDEV_LOGIN_UDP=0.0.0.0:0",
        ])
        .unwrap();
        assert_eq!(
            config
                .agent_env
                .get("POLYDEV_LOGIN_CLI")
                .map(String::as_str),
            Some("codex login --device-auth")
        );
        assert_eq!(config.agent_env.len(), 2);
        for bad in [
            "POLYDEV_LOGIN_SECRET=x",
            "POLYDEV_LOGIN_SESSION_ID=x",
            "PATH=/tmp",
            "POLYDEV_LOGIN_CLI",
        ] {
            assert!(login_config(&["--login-agent-env", bad]).is_err(), "{bad}");
        }
    }
}
