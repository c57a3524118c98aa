//! The `local` driver: every container is a bubblewrap sandbox on this machine.
//!
//! - Namespaces: user, PID, mount, network, IPC, UTS (`--unshare-all`); the sandbox runs as uid
//!   1000 of its own user namespace and dies with the driver (`--die-with-parent`).
//! - Files: `/usr` read-only (and `/bin`, `/lib`, ... as links into it), a few read-only files of
//!   `/etc` (TLS roots), a private `/proc` and `/dev`, a small tmpfs `/tmp` and a tmpfs home
//!   (`/home/sandbox`, mode 0700, sized by [`Resources::home_bytes`]). Nothing of the host is
//!   writable.
//! - Limits: memory (swap included) and processes through cgroups v1 (`memory`, `pids`) under
//!   this process's own cgroups when they are writable, else `prlimit` (address space; the
//!   process count is not enforced for root that way); a wall-clock limit the driver enforces.
//! - Network: only loopback inside. Each allowed destination (the proxy, the polydev server, a
//!   login sandbox's TURN server) is a Unix socket in a per-sandbox directory bind-mounted read-only at `/run/polydev`; the
//!   agent's `init` listens on a loopback port inside for each and the driver connects the host
//!   end to the one address it was configured with. A direct connection anywhere else fails.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixListener};
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

use super::orchestrator::{
    BoxFuture, ContainerInfo, ContainerSpec, Event, ExitReason, Orchestrator, OrchestratorError,
    PROXY_INSIDE, Result, SERVER_INSIDE, State, TURN_INSIDE,
};

/// Where the agent binary is mounted inside every sandbox.
pub const AGENT_INSIDE: &str = "/opt/polydev/agent";
const HOME_INSIDE: &str = "/home/sandbox";
const SOCKETS_INSIDE: &str = "/run/polydev";
const TMP_BYTES: u64 = 64 * 1024 * 1024;

/// How memory and process limits are enforced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Limits {
    /// cgroup v1 parents (one directory per sandbox is made under each).
    Cgroups { memory: PathBuf, pids: PathBuf },
    /// `prlimit --as --nproc` on the sandbox.
    Prlimit,
}

#[derive(Debug, Clone)]
pub struct LocalConfig {
    pub bwrap: PathBuf,
    /// The `polydev-agent` binary (mounted read-only inside as [`AGENT_INSIDE`]).
    pub agent: PathBuf,
    /// Per-sandbox directories (the Unix sockets of its tunnels) go here.
    pub state_dir: PathBuf,
    pub limits: Limits,
    /// `Proxy-Authorization` the host end of the proxy tunnel adds to each connection's
    /// request (the gate's credentials): the sandbox never holds them.
    pub proxy_authorization: Option<String>,
}

impl LocalConfig {
    /// `/usr/bin/bwrap`, `agent`, a private directory under the system temp directory, and
    /// cgroups when this process may create them under its own.
    pub fn detect(agent: PathBuf) -> LocalConfig {
        let uid = nix::unistd::geteuid();
        LocalConfig {
            bwrap: PathBuf::from("/usr/bin/bwrap"),
            agent,
            state_dir: std::env::temp_dir().join(format!("polydev-sandboxes-{uid}")),
            limits: detect_cgroups().unwrap_or(Limits::Prlimit),
            proxy_authorization: None,
        }
    }

    /// The agent next to the running executable (`polydev` and `polydev-agent` ship together).
    pub fn default_agent() -> PathBuf {
        std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(|dir| dir.join("polydev-agent")))
            .unwrap_or_else(|| PathBuf::from("polydev-agent"))
    }
}

/// This process's cgroup (v1) of `controller`, from /proc/self/cgroup.
fn own_cgroup(controller: &str) -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    text.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        controllers.split(',').any(|c| c == controller).then(|| {
            Path::new("/sys/fs/cgroup")
                .join(controller)
                .join(path.trim_start_matches('/'))
        })
    })
}

/// `polydev-runtime` under this process's own memory and pids cgroups, if a child made there
/// takes limits. Nested under our own so the host's accounting of this process still holds.
fn detect_cgroups() -> Option<Limits> {
    let memory = own_cgroup("memory")?.join("polydev-runtime");
    let pids = own_cgroup("pids")?.join("polydev-runtime");
    for dir in [&memory, &pids] {
        std::fs::create_dir_all(dir).ok()?;
    }
    let probe = format!("probe-{}", std::process::id());
    let (m, p) = (memory.join(&probe), pids.join(&probe));
    let works = std::fs::create_dir(&m).is_ok()
        && std::fs::create_dir(&p).is_ok()
        && std::fs::write(m.join("memory.limit_in_bytes"), "67108864").is_ok()
        && std::fs::write(p.join("pids.max"), "64").is_ok();
    let _ = std::fs::remove_dir(&m);
    let _ = std::fs::remove_dir(&p);
    works.then_some(Limits::Cgroups { memory, pids })
}

struct Sandbox {
    name: String,
    state: watch::Receiver<State>,
    stop: CancellationToken,
    /// Where the proxy tunnel leads (changed when the container is claimed).
    proxy: Target,
}

/// The host end of a tunnel: read at each connection, so it can change while the sandbox runs.
type Target = Arc<Mutex<Option<SocketAddr>>>;

struct Inner {
    config: LocalConfig,
    instance: String,
    sandboxes: Mutex<HashMap<String, Sandbox>>,
    events: broadcast::Sender<Event>,
    /// Cancelled when the driver is dropped: every sandbox is killed.
    shutdown: CancellationToken,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Bubblewrap sandboxes on this machine.
#[derive(Clone)]
pub struct LocalDriver {
    inner: Arc<Inner>,
}

impl LocalDriver {
    pub fn new(config: LocalConfig) -> LocalDriver {
        sweep(&config);
        LocalDriver {
            inner: Arc::new(Inner {
                config,
                instance: format!("local:{}:{}", boot_id(), std::process::id()),
                sandboxes: Mutex::new(HashMap::new()),
                events: broadcast::channel(1024).0,
                shutdown: CancellationToken::new(),
            }),
        }
    }

    pub fn config(&self) -> &LocalConfig {
        &self.inner.config
    }

    /// Waits (up to `bound`, a guard against hangs) until the sandbox has ended, and returns
    /// its final state.
    pub async fn wait(&self, id: &str, bound: Duration) -> Option<State> {
        let mut state = self.inner.sandboxes.lock().unwrap().get(id)?.state.clone();
        let _ = tokio::time::timeout(bound, state.wait_for(State::is_terminal)).await;
        let last = state.borrow().clone();
        Some(last)
    }

    async fn start_sandbox(&self, spec: ContainerSpec) -> Result<String> {
        let config = &self.inner.config;
        let id = format!("pd-{}", random_hex(8));
        let dir = own(&config.state_dir).join(&id);
        create_private_dir(&dir)
            .map_err(|e| OrchestratorError::Refused(format!("{}: {e}", dir.display())))?;
        let stop = self.inner.shutdown.child_token();
        let mut forwards = Vec::new();
        let proxy: Target = Arc::new(Mutex::new(spec.network.proxy));
        let server: Target = Arc::new(Mutex::new(spec.network.server));
        let turn: Target = Arc::new(Mutex::new(spec.network.turn));
        // The proxy tunnel always exists (a warm sandbox gets its user's proxy when claimed);
        // without a target it refuses every connection.
        let authorization: Option<Arc<str>> = config.proxy_authorization.as_deref().map(Into::into);
        // On the host's network the sandbox reaches them at their own addresses: no tunnels.
        let tunnels = if spec.network.host {
            Vec::new()
        } else {
            vec![
                ("proxy", Some(proxy.clone()), PROXY_INSIDE, authorization),
                (
                    "server",
                    spec.network.server.is_some().then_some(server),
                    SERVER_INSIDE,
                    None,
                ),
                (
                    "turn",
                    spec.network.turn.is_some().then_some(turn),
                    TURN_INSIDE,
                    None,
                ),
            ]
        };
        for (name, target, inside, authorization) in tunnels {
            let Some(target) = target else { continue };
            let socket = dir.join(format!("{name}.sock"));
            let listener = UnixListener::bind(&socket).map_err(|e| {
                OrchestratorError::Refused(format!("tunnel socket {}: {e}", socket.display()))
            })?;
            tokio::spawn(tunnel(listener, target, authorization, stop.clone()));
            forwards.push(format!("{inside}={SOCKETS_INSIDE}/{name}.sock"));
        }

        let cgroups = match &config.limits {
            Limits::Cgroups { memory, pids } => {
                let (m, p) = (own(memory).join(&id), own(pids).join(&id));
                let made = (|| {
                    std::fs::create_dir_all(m.parent().expect("a parent"))?;
                    std::fs::create_dir_all(p.parent().expect("a parent"))?;
                    std::fs::create_dir(&m)?;
                    std::fs::create_dir(&p)?;
                    let bytes = spec.resources.memory_bytes.to_string();
                    std::fs::write(m.join("memory.limit_in_bytes"), &bytes)?;
                    // Swap counts too where the kernel accounts it (absent without swapaccount).
                    let _ = std::fs::write(m.join("memory.memsw.limit_in_bytes"), &bytes);
                    std::fs::write(p.join("pids.max"), spec.resources.max_pids.to_string())
                })();
                if let Err(error) = made {
                    remove_cgroups(&[m, p]).await;
                    let _ = std::fs::remove_dir_all(&dir);
                    return Err(OrchestratorError::Refused(format!("cgroup: {error}")));
                }
                Some((m, p))
            }
            Limits::Prlimit => None,
        };

        let mut command = match &cgroups {
            Some((m, p)) => {
                // The shell joins both cgroups, then becomes bwrap: everything it starts is in.
                let mut c = tokio::process::Command::new("/bin/sh");
                c.arg("-c")
                    .arg(r#"echo $$ > "$1/cgroup.procs" && echo $$ > "$2/cgroup.procs" && shift 2 && exec "$@""#)
                    .arg("sh")
                    .arg(m)
                    .arg(p)
                    .arg(&config.bwrap);
                c
            }
            None => {
                let mut c = tokio::process::Command::new("prlimit");
                c.arg(format!("--as={}", spec.resources.memory_bytes))
                    .arg(format!("--nproc={}", spec.resources.max_pids))
                    .arg("--")
                    .arg(&config.bwrap);
                c
            }
        };
        command.args(bwrap_args(config, &spec, &dir));
        command.arg(AGENT_INSIDE).arg("init");
        for forward in &forwards {
            command.arg("--forward").arg(forward);
        }
        command.arg("--").args(&spec.command);
        command
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(error) => {
                stop.cancel();
                if let Some((m, p)) = cgroups {
                    remove_cgroups(&[m, p]).await;
                }
                let _ = std::fs::remove_dir_all(&dir);
                return Err(OrchestratorError::Refused(format!(
                    "start {}: {error}",
                    config.bwrap.display()
                )));
            }
        };
        if let Some(stderr) = child.stderr.take() {
            // The sandbox's own diagnostics (never job output: the agent seals that).
            let id = id.clone();
            tokio::spawn(async move {
                let mut lines = tokio::io::BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    tracing::debug!(sandbox = %id, "{}", truncate(&line, 512));
                }
            });
        }

        let (state_tx, state_rx) = watch::channel(State::Running);
        self.inner.sandboxes.lock().unwrap().insert(
            id.clone(),
            Sandbox {
                name: spec.name.clone(),
                state: state_rx,
                stop: stop.clone(),
                proxy,
            },
        );
        let _ = self.inner.events.send(Event {
            id: id.clone(),
            name: spec.name.clone(),
            state: State::Running,
        });

        let events = self.inner.events.clone();
        let wall_clock = spec.resources.wall_clock;
        let (id2, name) = (id.clone(), spec.name);
        tokio::spawn(async move {
            let deadline = async {
                match wall_clock {
                    Some(limit) => tokio::time::sleep(limit).await,
                    None => std::future::pending().await,
                }
            };
            let (status, mut reason) = tokio::select! {
                status = child.wait() => (status, ExitReason::Completed),
                () = deadline => {
                    let _ = child.start_kill();
                    (child.wait().await, ExitReason::WallClock)
                }
                () = stop.cancelled() => {
                    let _ = child.start_kill();
                    (child.wait().await, ExitReason::Stopped)
                }
            };
            stop.cancel(); // ends the tunnels
            let code = status.map(polydev_agent::exit_code).unwrap_or(255);
            if let Some((m, p)) = cgroups {
                if reason == ExitReason::Completed && oom_kills(&m) > 0 {
                    reason = ExitReason::OutOfMemory;
                }
                remove_cgroups(&[m, p]).await;
            }
            let _ = std::fs::remove_dir_all(&dir);
            let state = State::Exited { code, reason };
            let _ = state_tx.send(state.clone());
            let _ = events.send(Event {
                id: id2,
                name,
                state,
            });
        });
        Ok(id)
    }
}

fn bwrap_args(config: &LocalConfig, spec: &ContainerSpec, dir: &Path) -> Vec<std::ffi::OsString> {
    let mut a: Vec<std::ffi::OsString> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(Into::into));
    push(&["--unshare-all"]);
    if spec.network.host {
        push(&["--share-net"]);
    }
    push(&[
        "--die-with-parent",
        "--new-session",
        "--uid",
        "1000",
        "--gid",
        "1000",
        "--ro-bind",
        "/usr",
        "/usr",
        "--symlink",
        "usr/lib",
        "/lib",
        "--symlink",
        "usr/lib64",
        "/lib64",
        "--symlink",
        "usr/bin",
        "/bin",
        "--symlink",
        "usr/sbin",
        "/sbin",
    ]);
    for etc in ["/etc/ssl", "/etc/ca-certificates", "/etc/alternatives"] {
        push(&["--ro-bind-try", etc, etc]);
    }
    let tmp = TMP_BYTES.to_string();
    let home = spec.resources.home_bytes.to_string();
    push(&["--proc", "/proc", "--dev", "/dev"]);
    push(&["--size", &tmp, "--tmpfs", "/tmp"]);
    push(&["--perms", "0700", "--size", &home, "--tmpfs", HOME_INSIDE]);
    a.push("--ro-bind".into());
    a.push(config.agent.clone().into());
    a.push(AGENT_INSIDE.into());
    a.push("--ro-bind".into());
    a.push(dir.into());
    a.push(SOCKETS_INSIDE.into());
    for bind in &spec.binds {
        a.push("--ro-bind".into());
        a.push(bind.host.clone().into());
        a.push(bind.inside.clone().into());
    }
    let mut env = vec![
        ("HOME".to_string(), HOME_INSIDE.to_string()),
        ("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into()),
        ("LANG".into(), "C.UTF-8".into()),
    ];
    // The proxy tunnel always exists (a warm sandbox gets its user's port when claimed, and
    // refuses every connection until then), so programs are always told to use it; on the
    // host's network they reach the proxy, if any, at its own address.
    let url = match (spec.network.host, spec.network.proxy) {
        (false, _) => Some(format!("http://{PROXY_INSIDE}")),
        (true, Some(proxy)) => Some(format!("http://{proxy}")),
        (true, None) => None,
    };
    if let Some(url) = url {
        for key in ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"] {
            env.push((key.into(), url.clone()));
        }
    }
    if let Some(server) = spec.network.server {
        let url = match spec.network.host {
            true => format!("http://{server}"),
            false => format!("http://{SERVER_INSIDE}"),
        };
        env.push(("POLYDEV_SERVER".into(), url));
    }
    env.extend(spec.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    a.push("--clearenv".into());
    for (key, value) in env {
        a.extend(["--setenv".into(), key.into(), value.into()]);
    }
    a.extend(["--chdir".into(), HOME_INSIDE.into(), "--".into()]);
    a
}

/// Host end of a tunnel: each connection to the sandbox's socket goes to `target`, nowhere else
/// (and is dropped while there is no target). With `authorization` (the proxy tunnel, when the
/// gate needs credentials) each connection's request head gets it: see [`authorize_head`].
async fn tunnel(
    listener: UnixListener,
    target: Target,
    authorization: Option<Arc<str>>,
    stop: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.cancelled() => return,
        };
        let Ok((mut inside, _)) = accepted else {
            continue;
        };
        let Some(target) = *target.lock().unwrap() else {
            continue;
        };
        let stop = stop.clone();
        let authorization = authorization.clone();
        tokio::spawn(async move {
            let head = match &authorization {
                Some(authorization) => match read_head(&mut inside).await {
                    Some((head, rest)) => {
                        let mut bytes = authorize_head(&head, authorization).into_bytes();
                        bytes.extend_from_slice(&rest);
                        Some(bytes)
                    }
                    None => return,
                },
                None => None,
            };
            let Ok(mut outside) = TcpStream::connect(target).await else {
                return;
            };
            let _ = outside.set_nodelay(true);
            if let Some(head) = head
                && outside.write_all(&head).await.is_err()
            {
                return;
            }
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut inside, &mut outside) => {}
                () = stop.cancelled() => {}
            }
        });
    }
}

/// The most of a request head the proxy tunnel reads.
const MAX_HEAD: usize = 16 * 1024;

/// A proxy request's head (up to the blank line, as text) and the bytes read past it; `None`
/// when the connection closed first or the head is too long or not text.
async fn read_head(stream: &mut tokio::net::UnixStream) -> Option<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 2048];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return String::from_utf8(buf).ok().map(|head| (head, rest));
        }
        if buf.len() > MAX_HEAD {
            return None;
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The head with the gate's `Proxy-Authorization` instead of any the sandbox sent. A request
/// other than `CONNECT` (plain HTTP through the proxy) gets `Connection: close`: the next
/// request comes on a new connection, and so has its own head rewritten too.
fn authorize_head(head: &str, authorization: &str) -> String {
    let mut lines = head.split("\r\n").filter(|l| !l.is_empty());
    let request_line = lines.next().unwrap_or_default();
    let connect = request_line
        .split_whitespace()
        .next()
        .is_some_and(|m| m.eq_ignore_ascii_case("CONNECT"));
    let mut out = format!("{request_line}\r\n");
    for line in lines {
        let name = line.split(':').next().unwrap_or_default().trim();
        let dropped = name.eq_ignore_ascii_case("proxy-authorization")
            || (!connect
                && (name.eq_ignore_ascii_case("connection")
                    || name.eq_ignore_ascii_case("proxy-connection")));
        if !dropped {
            out.push_str(line);
            out.push_str("\r\n");
        }
    }
    if !connect {
        out.push_str("Connection: close\r\n");
    }
    out.push_str(&format!("Proxy-Authorization: {authorization}\r\n\r\n"));
    out
}

/// This machine's boot id: with a pid it names a process for as long as the machine is up.
fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|id| id.trim().to_string())
        .unwrap_or_else(|_| "unknown-boot".into())
}

/// Whether the local instance `instance` (`local:<boot id>:<pid>`) still runs: `None` when
/// this machine cannot tell (another machine, or not a local instance).
pub fn instance_alive(instance: &str) -> Option<bool> {
    let rest = instance.strip_prefix("local:")?;
    let (boot, pid) = rest.rsplit_once(':')?;
    let pid: u32 = pid.parse().ok()?;
    (boot == boot_id()).then(|| Path::new("/proc").join(pid.to_string()).exists())
}

/// This process's directory under a shared parent: `<parent>/<pid>`. Sandboxes of a process
/// that died without cleaning up (its tasks never ran to the end) are swept by the next
/// driver: see [`sweep`].
fn own(parent: &Path) -> PathBuf {
    parent.join(std::process::id().to_string())
}

/// Removes what dead polydev processes left: per-process directories (cgroups, sockets) whose
/// process is gone. Their sandboxes died with them (`--die-with-parent`).
fn sweep(config: &LocalConfig) {
    for parent in own_parent_dirs(config) {
        let Ok(entries) = std::fs::read_dir(&parent) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            if Path::new("/proc").join(pid.to_string()).exists() {
                continue;
            }
            let dir = entry.path();
            if parent == config.state_dir {
                let _ = std::fs::remove_dir_all(&dir);
            } else if let Ok(children) = std::fs::read_dir(&dir) {
                // cgroup directories go with rmdir only, children first.
                for child in children.flatten().filter(|c| c.path().is_dir()) {
                    let _ = std::fs::remove_dir(child.path());
                }
                let _ = std::fs::remove_dir(&dir);
            }
        }
    }
}

fn oom_kills(memory: &Path) -> u64 {
    std::fs::read_to_string(memory.join("memory.oom_control"))
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("oom_kill "))
                .and_then(|n| n.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Kills whatever is left in the cgroups, then removes them (bounded retries: a killed process
/// leaves its cgroup a moment after the signal).
async fn remove_cgroups(dirs: &[PathBuf]) {
    for _ in 0..100 {
        let mut left = false;
        for dir in dirs {
            if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
                for pid in procs.lines().filter_map(|p| p.trim().parse::<i32>().ok()) {
                    left = true;
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
        if !left
            && dirs
                .iter()
                .all(|d| std::fs::remove_dir(d).is_ok() || !d.exists())
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tracing::warn!(?dirs, "sandbox cgroups not removed");
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if let Some(parent) = dir.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)?;
    }
    std::fs::DirBuilder::new().mode(0o700).create(dir)
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).expect("random");
    hex::encode(buf)
}

fn truncate(line: &str, max: usize) -> &str {
    let mut end = line.len().min(max);
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    &line[..end]
}

impl Orchestrator for LocalDriver {
    fn driver(&self) -> &'static str {
        "local"
    }

    fn instance(&self) -> String {
        self.inner.instance.clone()
    }

    fn start(&self, spec: ContainerSpec) -> BoxFuture<'_, Result<String>> {
        Box::pin(self.start_sandbox(spec))
    }

    fn stop<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let sandbox = self.inner.sandboxes.lock().unwrap().remove(id);
            if let Some(sandbox) = sandbox {
                sandbox.stop.cancel();
                let mut state = sandbox.state;
                let _ = tokio::time::timeout(
                    Duration::from_secs(10),
                    state.wait_for(State::is_terminal),
                )
                .await;
            }
            Ok(())
        })
    }

    fn set_proxy<'a>(
        &'a self,
        id: &'a str,
        proxy: Option<SocketAddr>,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let sandboxes = self.inner.sandboxes.lock().unwrap();
            let sandbox = sandboxes
                .get(id)
                .ok_or_else(|| OrchestratorError::Refused(format!("no sandbox {id}")))?;
            *sandbox.proxy.lock().unwrap() = proxy;
            Ok(())
        })
    }

    fn inspect<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<ContainerInfo>>> {
        Box::pin(async move {
            Ok(self
                .inner
                .sandboxes
                .lock()
                .unwrap()
                .get(id)
                .map(|s| ContainerInfo {
                    id: id.to_string(),
                    name: s.name.clone(),
                    state: s.state.borrow().clone(),
                }))
        })
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<ContainerInfo>>> {
        Box::pin(async move {
            Ok(self
                .inner
                .sandboxes
                .lock()
                .unwrap()
                .iter()
                .map(|(id, s)| ContainerInfo {
                    id: id.clone(),
                    name: s.name.clone(),
                    state: s.state.borrow().clone(),
                })
                .collect())
        })
    }

    fn events(&self) -> BoxStream<'static, Event> {
        broadcast_stream(self.inner.events.subscribe())
    }

    fn clean_up_after<'a>(&'a self, instance: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            if instance_alive(instance) != Some(false) {
                return Err(OrchestratorError::Refused(format!(
                    "{instance} is not an ended local instance of this machine"
                )));
            }
            sweep(&self.inner.config);
            let pid = instance.rsplit(':').next().unwrap_or_default();
            let left = own_parent_dirs(&self.inner.config)
                .into_iter()
                .map(|parent| parent.join(pid))
                .find(|dir| dir.exists());
            match left {
                Some(dir) => Err(OrchestratorError::Refused(format!(
                    "{} is still there",
                    dir.display()
                ))),
                None => Ok(()),
            }
        })
    }
}

/// The parents of every instance's per-process directories: sockets, and cgroups when used.
fn own_parent_dirs(config: &LocalConfig) -> Vec<PathBuf> {
    let mut parents = vec![config.state_dir.clone()];
    if let Limits::Cgroups { memory, pids } = &config.limits {
        parents.extend([memory.clone(), pids.clone()]);
    }
    parents
}

/// A broadcast receiver as a stream that skips what it missed (consumers reconcile).
pub(crate) fn broadcast_stream(receiver: broadcast::Receiver<Event>) -> BoxStream<'static, Event> {
    futures_util::stream::unfold(receiver, |mut receiver| async move {
        loop {
            match receiver.recv().await {
                Ok(event) => return Some((event, receiver)),
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    })
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::authorize_head;

    #[test]
    fn the_gate_credentials_replace_the_sandboxes_own() {
        let head = "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\nproxy-authorization: Basic Zm9vOmJhcg==\r\n\r\n";
        assert_eq!(
            authorize_head(head, "Basic Z2F0ZTpzZWNyZXQ="),
            "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\nProxy-Authorization: Basic Z2F0ZTpzZWNyZXQ=\r\n\r\n"
        );
        let head = "GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\nProxy-Connection: keep-alive\r\nConnection: keep-alive\r\n\r\n";
        assert_eq!(
            authorize_head(head, "Basic eA=="),
            "GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\nProxy-Authorization: Basic eA==\r\n\r\n"
        );
    }
}
