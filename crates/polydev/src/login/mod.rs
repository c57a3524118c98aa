//! The login domain (docs/login.md): a user connects a provider subscription by logging in to
//! the provider inside a sandboxed browser that runs on our side and is streamed to them over
//! WebRTC. The server starts the sandbox, relays the WebRTC signalling between the user's
//! browser and the in-sandbox agent (across replicas, through PostgreSQL `LISTEN`/`NOTIFY`),
//! stores the credential the agent captured (sealed to the user's key; never in the clear) and
//! tears the sandbox down.
//!
//! - [`auth_sessions`]: the state machine (`pending` → `authenticating` → `completed` |
//!   `failed`), the user's and the agent's calls, the sweeper (timeouts, lost heartbeats).
//! - [`signal`]: offer, answer and trickle ICE: storage and the cross-replica relay.
//! - [`vms`]: login sandboxes through the runtime's orchestrator, recorded in `vms`.
//! - [`vm_cleanup_tasks`]: the teardown queue and its worker.
//! - [`turn`]: short-lived TURN credentials (coturn's REST-API scheme).

pub mod auth_sessions;
pub mod signal;
pub mod turn;
pub mod vm_cleanup_tasks;
pub mod vms;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub use auth_sessions::{AgentView, Session};
pub use signal::{Relay, Side, Signal, Step};
pub use turn::{IceServer, TurnConfig};

use crate::runtime::Runtime;

/// The providers one can log in to (the runtime's).
pub use crate::runtime::pool::check_provider;

/// How login sessions run.
#[derive(Debug, Clone)]
pub struct LoginConfig {
    /// The login agent binary on this machine (local driver: bind-mounted read-only into the
    /// sandbox) or on the Nomad nodes (its path there).
    pub agent_bin: PathBuf,
    /// A session not completed within this fails (`timeout_at = started_at + this`).
    pub session_timeout: Duration,
    /// A session whose agent has not sent a heartbeat for this long fails (before the first
    /// heartbeat: since the sandbox started).
    pub heartbeat_timeout: Duration,
    /// Sessions in progress per user at once.
    pub max_live_per_user: i64,
    /// Retries of one session.
    pub max_retries: i32,
    /// How often the sweeper and the cleanup worker look when nothing wakes them.
    pub sweep_interval: Duration,
    /// Longest wait between two teardown attempts of a task.
    pub max_backoff: Duration,
    /// Where the sandbox's browser may connect (the forward proxy all its egress goes
    /// through); `None`: nowhere but this server.
    pub proxy: Option<std::net::SocketAddr>,
    /// The TURN server's TCP address the local driver tunnels into a login sandbox (at
    /// 127.0.0.1:3478 inside): the sandbox has no UDP, so its agent relays through TURN over
    /// TCP. `None`: no tunnel (Nomad sandboxes reach TURN through the cluster's network).
    pub turn_forward: Option<std::net::SocketAddr>,
    /// The sandbox's limits.
    pub resources: crate::runtime::Resources,
    /// More environment for the login agent (`serve --login-agent-env`): its `POLYDEV_LOGIN_*`
    /// settings, e.g. the provider CLI's login command (docs/login.md, "The login agent").
    pub agent_env: std::collections::BTreeMap<String, String>,
    pub turn: TurnConfig,
}

impl Default for LoginConfig {
    fn default() -> Self {
        LoginConfig {
            agent_bin: default_agent_bin(),
            session_timeout: Duration::from_secs(10 * 60),
            heartbeat_timeout: Duration::from_secs(30),
            max_live_per_user: 3,
            max_retries: 5,
            sweep_interval: Duration::from_secs(1),
            max_backoff: Duration::from_secs(300),
            proxy: None,
            turn_forward: None,
            resources: crate::runtime::Resources {
                memory_bytes: 2 * 1024 * 1024 * 1024,
                max_pids: 1024,
                cpu_mhz: 2000,
                wall_clock: None,
                home_bytes: 512 * 1024 * 1024,
            },
            turn: TurnConfig::default(),
            agent_env: Default::default(),
        }
    }
}

/// `polydev-login-agent` next to the running executable.
pub fn default_agent_bin() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("polydev-login-agent")))
        .unwrap_or_else(|| PathBuf::from("polydev-login-agent"))
}

/// The login domain's handle.
#[derive(Clone)]
pub struct Login {
    pub pool: PgPool,
    /// Starts and stops sandboxes; `None` (`--runtime off`): sessions cannot be started.
    pub runtime: Option<Runtime>,
    pub config: Arc<LoginConfig>,
    pub relay: Relay,
    /// Wakes the cleanup worker of this process (a task was scheduled).
    cleanup: Arc<Notify>,
}

impl Login {
    /// Connects the relay's listener (so that nothing published after this returns is missed).
    pub async fn new(
        pool: PgPool,
        runtime: Option<Runtime>,
        config: LoginConfig,
        shutdown: CancellationToken,
    ) -> crate::error::Result<Login> {
        let relay = Relay::start(&pool, shutdown).await?;
        Ok(Login {
            pool,
            runtime,
            config: Arc::new(config),
            relay,
            cleanup: Arc::new(Notify::new()),
        })
    }

    /// Runs the sweeper and the cleanup worker until `shutdown`.
    pub fn spawn_background(&self, shutdown: CancellationToken) -> tokio::task::JoinHandle<()> {
        let login = self.clone();
        tokio::spawn(async move {
            let sweeper = login.clone().sweep_loop(shutdown.clone());
            let cleaner = login.clone().cleanup_loop(shutdown.clone());
            tokio::join!(sweeper, cleaner);
        })
    }
}

pub(crate) fn sha256_hex(secret: &str) -> String {
    crate::runtime::pool::sha256_hex(secret)
}

pub(crate) fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).expect("random");
    hex::encode(buf)
}

pub(crate) fn truncate(text: &str, max: usize) -> String {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}
