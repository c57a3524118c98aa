//! The `local` driver for real: bubblewrap sandboxes running real commands, killed for memory
//! and time, reachable from outside only through the configured proxy.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use polydev::runtime::local::Limits;
use polydev::runtime::{
    ContainerSpec, ExitReason, LocalConfig, LocalDriver, NetworkPolicy, Orchestrator, Resources,
    State,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A bound against hangs, not a timing assertion.
const HANG_GUARD: Duration = Duration::from_secs(30);

pub fn agent() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_polydev-agent"))
}

pub fn driver() -> LocalDriver {
    LocalDriver::new(LocalConfig::detect(agent()))
}

pub fn spec(command: &[&str]) -> ContainerSpec {
    ContainerSpec {
        name: format!("test-{}", crate::common::random_hex(4)),
        command: command.iter().map(|s| s.to_string()).collect(),
        env: BTreeMap::new(),
        resources: Resources {
            memory_bytes: 128 * 1024 * 1024,
            max_pids: 64,
            home_bytes: 16 * 1024 * 1024,
            ..Resources::default()
        },
        network: NetworkPolicy::default(),
        binds: Vec::new(),
    }
}

async fn run(driver: &LocalDriver, spec: ContainerSpec) -> State {
    let id = driver.start(spec).await.expect("start");
    driver.wait(&id, HANG_GUARD).await.expect("known sandbox")
}

#[tokio::test]
async fn runtime_local_sandbox_is_isolated_and_reports_exit_codes() {
    let driver = driver();
    // Unprivileged inside, a private writable home and /tmp, read-only system directories,
    // none of the host's files, its own PID namespace, the environment given and no other.
    let script = r#"
        test "$(id -u)" = 1000 || exit 11
        echo hi > "$HOME/f" && test "$(cat "$HOME/f")" = hi || exit 12
        echo hi > /tmp/f || exit 13
        touch /usr/polydev-escape 2>/dev/null && exit 14
        test -e /etc/passwd && exit 15
        test -e /root && exit 16
        test "$(ls /proc | grep -c '^[0-9]')" -lt 10 || exit 17
        test "$GIVEN" = value || exit 18
        test -z "$DATABASE_URL" || exit 19
        exit 7
    "#;
    let mut spec = spec(&["/bin/sh", "-c", script]);
    spec.env.insert("GIVEN".into(), "value".into());
    assert_eq!(
        run(&driver, spec).await,
        State::Exited {
            code: 7,
            reason: ExitReason::Completed
        }
    );
}

#[tokio::test]
async fn runtime_local_memory_hog_is_killed_and_recorded() {
    let driver = driver();
    let mut spec = spec(&["/usr/bin/tail", "/dev/zero"]);
    spec.resources.memory_bytes = 32 * 1024 * 1024;
    let state = run(&driver, spec).await;
    match driver.config().limits {
        Limits::Cgroups { .. } => assert_eq!(
            state,
            State::Exited {
                code: 137,
                reason: ExitReason::OutOfMemory
            }
        ),
        // Under prlimit the allocation fails instead: tail exits with an error.
        Limits::Prlimit => assert!(matches!(state, State::Exited { code, .. } if code != 0)),
    }
}

#[tokio::test]
async fn runtime_local_wall_clock_limit_kills_a_sleep() {
    let driver = driver();
    let mut spec = spec(&["/bin/sleep", "600"]);
    spec.resources.wall_clock = Some(Duration::from_millis(300));
    assert_eq!(
        run(&driver, spec).await,
        State::Exited {
            code: 137,
            reason: ExitReason::WallClock
        }
    );
}

#[tokio::test]
async fn runtime_local_process_limit_holds() {
    let driver = driver();
    if !matches!(driver.config().limits, Limits::Cgroups { .. }) {
        return; // prlimit cannot limit the processes of root
    }
    // 40 background sleeps: within 256 processes they start; within 16 the shell cannot fork.
    let script = "for i in $(seq 40); do sleep 5 & done; exit 0";
    let mut roomy = spec(&["/bin/sh", "-c", script]);
    roomy.resources.max_pids = 256;
    assert!(matches!(
        run(&driver, roomy).await,
        State::Exited { code: 0, .. }
    ));
    let mut tight = spec(&["/bin/sh", "-c", script]);
    tight.resources.max_pids = 16;
    let state = run(&driver, tight).await;
    assert!(
        matches!(state, State::Exited { code, reason: ExitReason::Completed } if code != 0),
        "{state:?}"
    );
}

#[tokio::test]
async fn runtime_local_stop_inspect_list_and_events() {
    let driver = driver();
    let mut events = driver.events();
    let id = driver.start(spec(&["/bin/sleep", "600"])).await.unwrap();
    let first = tokio::time::timeout(HANG_GUARD, events.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (first.id.as_str(), &first.state),
        (id.as_str(), &State::Running)
    );
    let info = driver.inspect(&id).await.unwrap().expect("known");
    assert_eq!(info.state, State::Running);
    assert!(driver.list().await.unwrap().iter().any(|c| c.id == id));

    driver.stop(&id).await.unwrap();
    let ended = tokio::time::timeout(HANG_GUARD, events.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        ended.state,
        State::Exited {
            code: 137,
            reason: ExitReason::Stopped
        }
    );
    assert_eq!(
        driver.inspect(&id).await.unwrap(),
        None,
        "stopped is forgotten"
    );
    assert!(driver.list().await.unwrap().iter().all(|c| c.id != id));
    driver.stop(&id).await.expect("stopping twice is fine");
}

/// An HTTP origin on 127.0.0.1 that answers every request with `origin-ok` and records paths.
pub async fn origin() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                let head = read_head(&mut stream).await;
                let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
                log.lock().unwrap().push(path);
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\nConnection: close\r\n\r\norigin-ok")
                    .await;
            });
        }
    });
    (addr, seen)
}

/// A forward proxy (absolute-form requests) on 127.0.0.1 that records each request line and
/// carries it to its origin, which must be on 127.0.0.1.
pub async fn forward_proxy() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let carried = Arc::new(Mutex::new(Vec::new()));
    let log = carried.clone();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                let head = read_head(&mut client).await;
                let first = head.lines().next().unwrap_or("").to_string();
                log.lock().unwrap().push(first.clone());
                let mut parts = first.split_whitespace();
                let (method, url) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
                let Some(rest) = url.strip_prefix("http://") else {
                    return;
                };
                let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
                assert!(host.starts_with("127.0.0.1:"), "only local traffic: {host}");
                let Ok(mut upstream) = TcpStream::connect(host).await else {
                    return;
                };
                let rest_of_head = head.split_once("\r\n").map_or("", |(_, r)| r);
                let path = if path.is_empty() { "/" } else { path };
                let rewritten = format!("{method} {path} HTTP/1.1\r\n{rest_of_head}");
                let _ = upstream.write_all(rewritten.as_bytes()).await;
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            });
        }
    });
    (addr, carried)
}

async fn read_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 16 * 1024 {
        match stream.read(&mut byte).await {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

#[tokio::test]
async fn runtime_local_egress_only_through_the_configured_proxy() {
    let driver = driver();
    let (origin, origin_seen) = origin().await;
    let (proxy, carried) = forward_proxy().await;
    let port = origin.port();
    // Direct: to the origin's address (inside, 127.0.0.1 is the sandbox's own loopback) and to
    // an address off this machine's loopback (no route). Then the same origin via the proxy.
    let script = format!(
        r#"
        curl -sS -m 5 --noproxy '*' http://127.0.0.1:{port}/direct && exit 10
        curl -sS -m 5 --noproxy '*' http://192.0.2.1/direct-remote && exit 11
        test "$(curl -sS -m 5 http://127.0.0.1:{port}/via-proxy)" = origin-ok || exit 12
        exit 0
        "#
    );
    let mut spec = spec(&["/bin/sh", "-c", &script]);
    spec.network = NetworkPolicy {
        proxy: Some(proxy),
        server: None,
        turn: None,
        host: false,
    };
    assert_eq!(
        run(&driver, spec).await,
        State::Exited {
            code: 0,
            reason: ExitReason::Completed
        }
    );
    assert_eq!(
        *carried.lock().unwrap(),
        [format!("GET http://127.0.0.1:{port}/via-proxy HTTP/1.1")]
    );
    assert_eq!(*origin_seen.lock().unwrap(), ["/via-proxy"]);

    // Without a proxy there is no egress at all, even with the variables set by hand.
    let mut spec = self::spec(&[
        "/bin/sh",
        "-c",
        &format!("curl -sS -m 5 http://127.0.0.1:{port}/no-proxy && exit 10; exit 0"),
    ]);
    spec.env
        .insert("http_proxy".into(), format!("http://{proxy}"));
    assert!(matches!(
        run(&driver, spec).await,
        State::Exited { code: 0, .. }
    ));
    assert_eq!(carried.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn runtime_local_sweeps_what_dead_processes_left() {
    let config = LocalConfig::detect(agent());
    // A pid above any pid_max: its process cannot exist.
    let dead = "4194999";
    let mut left = vec![config.state_dir.join(dead).join("pd-left")];
    if let Limits::Cgroups { memory, pids } = &config.limits {
        left.push(memory.join(dead).join("pd-left"));
        left.push(pids.join(dead).join("pd-left"));
    }
    for dir in &left {
        std::fs::create_dir_all(dir).unwrap();
    }
    let _driver = LocalDriver::new(config);
    for dir in &left {
        assert!(!dir.parent().unwrap().exists(), "{} swept", dir.display());
    }
}

#[tokio::test]
async fn runtime_local_host_network_reaches_the_host_directly_without_tunnels() {
    // `NetworkPolicy.host` (login sandboxes): the host's loopback is the sandbox's, and the
    // server variable names the server's own address (no tunnel in between).
    let driver = driver();
    let (origin, origin_seen) = origin().await;
    let port = origin.port();
    let script = format!(
        r#"
        test "$(curl -sS -m 5 --noproxy '*' http://127.0.0.1:{port}/direct)" = origin-ok || exit 10
        test "$POLYDEV_SERVER" = "http://{origin}" || exit 11
        exit 0
        "#
    );
    let mut spec = spec(&["/bin/sh", "-c", &script]);
    spec.network = NetworkPolicy {
        proxy: None,
        server: Some(origin),
        turn: None,
        host: true,
    };
    assert_eq!(
        run(&driver, spec).await,
        State::Exited {
            code: 0,
            reason: ExitReason::Completed
        }
    );
    assert_eq!(*origin_seen.lock().unwrap(), ["/direct"]);
}
