//! The orchestrator: what the runtime needs from whatever runs containers. Two drivers implement
//! it: [`super::local::LocalDriver`] (bubblewrap sandboxes on this machine, the default) and
//! [`super::nomad::NomadDriver`] (HashiCorp Nomad's HTTP API).

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use futures_util::stream::BoxStream;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Limits a container runs under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resources {
    /// Memory, swap included; the container is killed when it exceeds it.
    pub memory_bytes: u64,
    /// Processes and threads at once.
    pub max_pids: u32,
    /// CPU share (Nomad's MHz; the local driver ignores it).
    pub cpu_mhz: u32,
    /// Killed when it has run this long.
    pub wall_clock: Option<Duration>,
    /// Size of the private tmpfs home (the only writable place besides a small /tmp).
    pub home_bytes: u64,
}

impl Default for Resources {
    fn default() -> Self {
        Resources {
            memory_bytes: 512 * 1024 * 1024,
            max_pids: 256,
            cpu_mhz: 500,
            wall_clock: None,
            home_bytes: 256 * 1024 * 1024,
        }
    }
}

/// Where a container may connect to. Nothing else is reachable.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetworkPolicy {
    /// The HTTP(S) forward proxy all egress goes through (the user's proxy port). Inside, it is
    /// at [`PROXY_INSIDE`] and `HTTP_PROXY`/`HTTPS_PROXY` name it. `None`: no egress at all.
    pub proxy: Option<SocketAddr>,
    /// The polydev server, for the agent (at [`SERVER_INSIDE`] inside).
    pub server: Option<SocketAddr>,
    /// A TURN server's TCP port (at [`TURN_INSIDE`] inside): a login sandbox's WebRTC media
    /// leaves through it, relayed (TURN over TCP), as the sandbox has no UDP to the outside.
    pub turn: Option<SocketAddr>,
    /// Share the host's network instead (the local driver; Nomad uses the cluster's): no
    /// tunnels, `proxy` and `server` are reached at their own addresses, and nothing confines
    /// egress. Login sandboxes need it: their WebRTC peer must be reachable by the user's
    /// browser over UDP (docs/login.md, "Limitations").
    pub host: bool,
}

/// Where the proxy is reachable from inside a local sandbox.
pub const PROXY_INSIDE: &str = "127.0.0.1:3128";
/// Where the polydev server is reachable from inside a local sandbox.
pub const SERVER_INSIDE: &str = "127.0.0.1:3129";
/// Where the TURN server (TCP) is reachable from inside a local sandbox.
pub const TURN_INSIDE: &str = "127.0.0.1:3478";

/// What to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerSpec {
    /// Unique among live containers (the local sandbox id, the Nomad job id).
    pub name: String,
    /// The program and its arguments, run inside.
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub resources: Resources,
    pub network: NetworkPolicy,
    /// Host files mounted read-only inside (the local driver; Nomad nodes have their own files,
    /// so it ignores them). A login sandbox's agent binary comes in this way.
    pub binds: Vec<Bind>,
}

/// A host path mounted read-only at `inside`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    pub host: std::path::PathBuf,
    pub inside: String,
}

/// Why a container ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitReason {
    /// Its command exited by itself.
    Completed,
    /// It went over its memory limit and the kernel killed it.
    OutOfMemory,
    /// It ran past its wall-clock limit and was killed.
    WallClock,
    /// It was stopped on request.
    Stopped,
}

impl ExitReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ExitReason::Completed => "completed",
            ExitReason::OutOfMemory => "out_of_memory",
            ExitReason::WallClock => "wall_clock",
            ExitReason::Stopped => "stopped",
        }
    }
}

/// A container's state as its orchestrator sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Accepted, not running yet (a Nomad allocation being placed or pulled).
    Pending,
    Running,
    /// Ended: its exit code (128 + signal when killed) and why.
    Exited {
        code: i32,
        reason: ExitReason,
    },
    /// Could not run or died for a reason outside it (Nomad `failed`).
    Failed(String),
    /// Its node went away (Nomad `lost`).
    Lost,
}

impl State {
    pub fn is_terminal(&self) -> bool {
        !matches!(self, State::Pending | State::Running)
    }
}

/// One container: its orchestrator id (the sandbox id, the Nomad allocation id), the name it
/// was started with, and its state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerInfo {
    pub id: String,
    pub name: String,
    pub state: State,
}

/// A change of state, as the orchestrator reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub id: String,
    pub name: String,
    pub state: State,
}

/// Why the orchestrator could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum OrchestratorError {
    /// It cannot be reached (connection refused, timed out, 5xx): try again later.
    #[error("orchestrator unreachable: {0}")]
    Unreachable(String),
    /// It refused the request (a bad spec, a missing binary, 4xx).
    #[error("orchestrator refused: {0}")]
    Refused(String),
}

impl From<OrchestratorError> for crate::error::Error {
    fn from(error: OrchestratorError) -> Self {
        match error {
            OrchestratorError::Unreachable(detail) => {
                crate::error::Error::RuntimeUnavailable(detail)
            }
            OrchestratorError::Refused(detail) => crate::error::Error::internal(detail),
        }
    }
}

pub type Result<T, E = OrchestratorError> = std::result::Result<T, E>;

/// Runs containers. Implementations are cheap to share (`Arc<dyn Orchestrator>`).
pub trait Orchestrator: Send + Sync {
    /// `local` or `nomad`.
    fn driver(&self) -> &'static str;
    /// Who runs the containers, as `runtime_containers.orchestrator` records it: a process
    /// judges, claims and reconciles only its own instance's containers. Nomad is one instance
    /// for every polydev process (`nomad`); local sandboxes belong to the process that started
    /// them (`local:<boot id>:<pid>`).
    fn instance(&self) -> String {
        self.driver().to_string()
    }
    /// Starts a container and returns its id once the orchestrator has accepted it (it may
    /// still be [`State::Pending`]).
    fn start(&self, spec: ContainerSpec) -> BoxFuture<'_, Result<String>>;
    /// Stops it and forgets it (Nomad: stop and purge). Stopping an unknown or ended container
    /// is not an error.
    fn stop<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<()>>;
    /// Its current state, or `None` if the orchestrator does not know it.
    fn inspect<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<ContainerInfo>>>;
    /// Points the container's egress at `proxy` (the claiming user's proxy port), or at nothing.
    /// A warm container starts with no egress; its user is known only when it is claimed. The
    /// local driver enforces it; on Nomad the cluster's network policy must (docs/runtime.md),
    /// and the agent hands the proxy to each job.
    fn set_proxy<'a>(&'a self, id: &'a str, proxy: Option<SocketAddr>)
    -> BoxFuture<'a, Result<()>>;
    /// Every container this orchestrator runs for polydev (live or ended but not yet purged).
    fn list(&self) -> BoxFuture<'_, Result<Vec<ContainerInfo>>>;
    /// State changes from now on. A consumer that falls behind may miss events, so it must
    /// reconcile with [`Orchestrator::list`].
    fn events(&self) -> BoxStream<'static, Event>;
    /// Removes what the ended instance `instance` (of the same driver on this machine) left
    /// behind. Its containers died with it; the local driver removes their directories and
    /// cgroups. Nothing to do for the others.
    fn clean_up_after<'a>(&'a self, instance: &'a str) -> BoxFuture<'a, Result<()>> {
        let _ = instance;
        Box::pin(async { Ok(()) })
    }
}
