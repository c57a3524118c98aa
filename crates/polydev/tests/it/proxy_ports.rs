//! Decodo proxy ports (`user_proxy_ports`, docs/cli-backends.md "Proxy ports"): allocation
//! (200 concurrent first uses, the same user at once, seed rows reused, a full range), the
//! health probe through a real forward proxy listening on several ports, a claim refused on an
//! unhealthy port, and a real sandbox's traffic leaving through its own user's port.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use polydev::proxy::{Credentials, Proxies, ProxyConfig};
use polydev::runtime::Runtime;
use polydev_agent::proto::JobCommand;
use reqwest::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use uuid::Uuid;

use crate::common::TestDb;
use crate::runtime_pool::{Fake, config, status_counts, user, warm_up};

/// A proxy configuration on this machine's loopback (the tests' gate).
pub fn proxy_config(ports: RangeInclusive<u16>, credentials: Option<Credentials>) -> ProxyConfig {
    ProxyConfig {
        gate_host: "127.0.0.1".into(),
        ports,
        credentials,
        check_url: "http://127.0.0.1:9/".parse().unwrap(),
        check_interval: Duration::from_secs(3600),
        check_timeout: Duration::from_secs(5),
    }
}

/// One request the gate received: on which port, its request line and its credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Carried {
    pub port: u16,
    pub request_line: String,
    pub authorization: Option<String>,
}

/// A forward proxy (HTTP `CONNECT`, and absolute-form requests) listening on several
/// consecutive loopback ports, like a Decodo gate: it records which port carried each request,
/// refuses wrong credentials with 407, answers 502 on a port marked broken, and reaches only
/// origins on 127.0.0.1.
pub struct Gate {
    pub ports: RangeInclusive<u16>,
    pub carried: Arc<Mutex<Vec<Carried>>>,
    pub broken: Arc<Mutex<HashSet<u16>>>,
}

impl Gate {
    /// `n` consecutive ports, all answering; `authorization`: the only `Proxy-Authorization`
    /// it accepts (`None`: it asks for none).
    pub async fn start(n: u16, authorization: Option<String>) -> Gate {
        let listeners = loop {
            let mut random = [0u8; 2];
            getrandom::fill(&mut random).unwrap();
            let base = 20_000 + u16::from_le_bytes(random) % 40_000;
            let mut listeners = Vec::new();
            for port in base..base + n {
                match TcpListener::bind(("127.0.0.1", port)).await {
                    Ok(listener) => listeners.push((port, listener)),
                    Err(_) => break,
                }
            }
            if listeners.len() == usize::from(n) {
                break listeners;
            }
        };
        let ports = listeners[0].0..=listeners[listeners.len() - 1].0;
        let carried = Arc::new(Mutex::new(Vec::new()));
        let broken = Arc::new(Mutex::new(HashSet::new()));
        let authorization: Option<Arc<str>> = authorization.map(Into::into);
        for (port, listener) in listeners {
            let (carried, broken, authorization) =
                (carried.clone(), broken.clone(), authorization.clone());
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    tokio::spawn(serve_one(
                        port,
                        client,
                        carried.clone(),
                        broken.clone(),
                        authorization.clone(),
                    ));
                }
            });
        }
        Gate {
            ports,
            carried,
            broken,
        }
    }

    pub fn port(&self, n: u16) -> u16 {
        self.ports.start() + n
    }

    pub fn carried(&self) -> Vec<Carried> {
        self.carried.lock().unwrap().clone()
    }
}

async fn serve_one(
    port: u16,
    mut client: TcpStream,
    carried: Arc<Mutex<Vec<Carried>>>,
    broken: Arc<Mutex<HashSet<u16>>>,
    authorization: Option<Arc<str>>,
) {
    let head = read_head(&mut client).await;
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default().to_string();
    let sent = lines.find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case("proxy-authorization")
            .then(|| value.trim().to_string())
    });
    carried.lock().unwrap().push(Carried {
        port,
        request_line: request_line.clone(),
        authorization: sent.clone(),
    });
    if broken.lock().unwrap().contains(&port) {
        let _ = client
            .write_all(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
            .await;
        return;
    }
    if authorization.as_deref() != sent.as_deref() && authorization.is_some() {
        let _ = client
            .write_all(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n")
            .await;
        return;
    }
    let mut parts = request_line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if method == "CONNECT" {
        if !target.starts_with("127.0.0.1:") {
            let _ = client.write_all(b"HTTP/1.1 403 Forbidden\r\n\r\n").await;
            return;
        }
        let Ok(mut upstream) = TcpStream::connect(target).await else {
            let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await;
            return;
        };
        let _ = client
            .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
            .await;
        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
        return;
    }
    let Some(rest) = target.strip_prefix("http://127.0.0.1:") else {
        let _ = client.write_all(b"HTTP/1.1 403 Forbidden\r\n\r\n").await;
        return;
    };
    let (host_port, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let Ok(mut upstream) = TcpStream::connect(format!("127.0.0.1:{host_port}")).await else {
        return;
    };
    let rest_of_head = head.split_once("\r\n").map_or("", |(_, r)| r);
    let path = if path.is_empty() { "/" } else { path };
    let _ = upstream
        .write_all(format!("{method} {path} HTTP/1.1\r\n{rest_of_head}").as_bytes())
        .await;
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
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

fn credentials() -> Credentials {
    Credentials {
        username: "gate-user".into(),
        password: format!("pw-{}", crate::common::random_hex(8)),
    }
}

async fn rows(pool: &sqlx::PgPool) -> BTreeMap<Uuid, Option<i32>> {
    sqlx::query_as::<_, (Uuid, Option<i32>)>("SELECT user_id, proxy_port FROM user_proxy_ports")
        .fetch_all(pool)
        .await
        .unwrap()
        .into_iter()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn proxy_ports_200_concurrent_first_uses_get_200_distinct_ports_and_seed_rows_are_kept() {
    let db = TestDb::migrated().await;
    // Seed rows: one with a port outside the range, one inside it, one without a port.
    let (outside, inside, portless) = (
        user(&db.pool).await,
        user(&db.pool).await,
        user(&db.pool).await,
    );
    sqlx::query(
        "INSERT INTO user_proxy_ports (user_id, proxy_port, proxy_ip) VALUES
             ($1, 10001, '203.0.113.10'), ($2, 20000, NULL), ($3, NULL, NULL)",
    )
    .bind(outside)
    .bind(inside)
    .bind(portless)
    .execute(&db.pool)
    .await
    .unwrap();
    let proxies = Proxies::new(db.pool.clone(), proxy_config(20000..=20300, None));

    let mut users = Vec::new();
    for _ in 0..200 {
        users.push(user(&db.pool).await);
    }
    let allocated = futures_util::future::join_all(users.iter().map(|&u| {
        let proxies = proxies.clone();
        tokio::spawn(async move { (u, proxies.port_for(u).await.unwrap().port) })
    }))
    .await;
    let ports: HashSet<u16> = allocated.iter().map(|r| r.as_ref().unwrap().1).collect();
    assert_eq!(ports.len(), 200, "200 first uses, 200 distinct ports");
    assert!(ports.iter().all(|p| (20001..=20300).contains(p)));
    assert!(
        !ports.contains(&20000),
        "a seed row's port is never handed out again"
    );

    // Seed rows are reused as they are; a row without a port gets one.
    assert_eq!(proxies.port_for(outside).await.unwrap().port, 10001);
    assert_eq!(
        proxies
            .port_for(outside)
            .await
            .unwrap()
            .egress_ip
            .as_deref(),
        Some("203.0.113.10")
    );
    assert_eq!(proxies.port_for(inside).await.unwrap().port, 20000);
    let given = proxies.port_for(portless).await.unwrap().port;
    assert!(!ports.contains(&given) && (20001..=20300).contains(&given));

    // The same new user 50 times at once: one row, one port.
    let alice = user(&db.pool).await;
    let same = futures_util::future::join_all((0..50).map(|_| {
        let proxies = proxies.clone();
        tokio::spawn(async move { proxies.port_for(alice).await.unwrap().port })
    }))
    .await;
    let same: HashSet<u16> = same.into_iter().map(Result::unwrap).collect();
    assert_eq!(same.len(), 1);
    let all = rows(&db.pool).await;
    assert_eq!(all.len(), 204, "one row per user, none duplicated");
    let distinct: HashSet<i32> = all.values().flatten().copied().collect();
    assert_eq!(distinct.len(), 204, "no two users share a port");
}

#[tokio::test]
async fn proxy_ports_a_full_range_is_a_clear_error_and_writes_nothing() {
    let db = TestDb::migrated().await;
    let proxies = Proxies::new(db.pool.clone(), proxy_config(30000..=30001, None));
    let (a, b, c) = (
        user(&db.pool).await,
        user(&db.pool).await,
        user(&db.pool).await,
    );
    proxies.port_for(a).await.unwrap();
    proxies.port_for(b).await.unwrap();
    let error = proxies.port_for(c).await.unwrap_err();
    assert_eq!(error.code(), "proxy_ports_exhausted");
    assert_eq!(polydev::http::status(&error).as_u16(), 503);
    assert!(
        error.public_message().contains("30000-30001")
            && error.public_message().contains("--proxy-port-range"),
        "{}",
        error.public_message()
    );
    assert_eq!(rows(&db.pool).await.len(), 2, "nothing written for c");

    // A claim for c says the same, and takes no container.
    let fake = Fake::new();
    let runtime = Runtime::new(db.pool.clone(), fake.clone(), config("openai", 1))
        .with_proxies(Some(proxies));
    warm_up(&runtime, &fake).await;
    let error = runtime.claim(c, "openai").await.unwrap_err();
    assert_eq!(error.code(), "proxy_ports_exhausted");
    assert_eq!(status_counts(&db.pool).await["ready"], 1);
}

#[tokio::test]
async fn proxy_probe_records_healthy_and_unhealthy_ports_through_a_real_connect() {
    let db = TestDb::migrated().await;
    let (origin, _) = crate::runtime_local::origin().await;
    let credentials = credentials();
    let gate = Gate::start(3, Some(credentials.authorization())).await;
    let mut config = proxy_config(gate.ports.clone(), Some(credentials.clone()));
    config.check_url = format!("http://{origin}/check").parse().unwrap();
    let proxies = Proxies::new(db.pool.clone(), config);
    let users = [
        user(&db.pool).await,
        user(&db.pool).await,
        user(&db.pool).await,
    ];
    for u in users {
        proxies.port_for(u).await.unwrap();
    }
    // A port of a seed row on which nothing listens.
    let dead_port = {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap().port()
    };
    let dead = user(&db.pool).await;
    sqlx::query("INSERT INTO user_proxy_ports (user_id, proxy_port) VALUES ($1, $2)")
        .bind(dead)
        .bind(i32::from(dead_port))
        .execute(&db.pool)
        .await
        .unwrap();
    gate.broken.lock().unwrap().insert(gate.port(1));

    let checked = proxies.check_all().await.unwrap().expect("no other pass");
    let mut healthy = vec![gate.port(0), gate.port(2)];
    healthy.sort_unstable();
    assert_eq!(checked.healthy, healthy);
    let unhealthy: Vec<u16> = checked.unhealthy.iter().map(|(p, _)| *p).collect();
    let mut expected = vec![gate.port(1), dead_port];
    expected.sort_unstable();
    assert_eq!(unhealthy, expected);

    // What the gate saw: a CONNECT to the check URL's host and port on each port, with the
    // gate's credentials.
    let carried = gate.carried();
    assert_eq!(carried.len(), 3);
    for c in &carried {
        assert_eq!(c.request_line, format!("CONNECT {origin} HTTP/1.1"));
        assert_eq!(c.authorization, Some(credentials.authorization()));
    }

    let port_of = |u| {
        let proxies = proxies.clone();
        async move { proxies.port_of(u).await.unwrap().unwrap() }
    };
    let good = port_of(users[0]).await;
    assert_eq!(good.healthy, Some(true));
    assert!(good.last_checked_at.is_some() && good.last_verified_at.is_some());
    assert_eq!(good.last_error, None);
    let bad = port_of(users[1]).await;
    assert_eq!(bad.healthy, Some(false));
    assert!(bad.last_checked_at.is_some());
    assert_eq!(bad.last_verified_at, None, "never verified");
    assert!(
        bad.last_error.as_deref().unwrap().contains("502"),
        "{:?}",
        bad.last_error
    );
    let gone = port_of(dead).await;
    assert_eq!(gone.healthy, Some(false));
    assert!(gone.last_error.as_deref().unwrap().contains("connecting"));
    for port in [&good, &bad, &gone] {
        assert!(
            !format!("{port:?}").contains(&credentials.password),
            "no credentials in what is stored"
        );
    }

    // Wrong credentials are unhealthy too (407), and say so.
    let mut wrong = proxy_config(
        gate.ports.clone(),
        Some(Credentials {
            username: "gate-user".into(),
            password: "wrong".into(),
        }),
    );
    wrong.check_url = format!("http://{origin}/").parse().unwrap();
    let wrong = Proxies::new(db.pool.clone(), wrong);
    let why = wrong.check_port(gate.port(0)).await.unwrap_err();
    assert!(why.contains("407"), "{why}");

    // One pass at a time across replicas.
    let mut other = db.pool.begin().await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(polydev::proxy::probe::PROBE_LOCK)
        .execute(&mut *other)
        .await
        .unwrap();
    assert_eq!(proxies.check_all().await.unwrap(), None);
}

#[tokio::test]
async fn proxy_unhealthy_port_refuses_the_claim_and_says_so() {
    let db = TestDb::migrated().await;
    let (origin, _) = crate::runtime_local::origin().await;
    let gate = Gate::start(2, None).await;
    let mut proxy = proxy_config(gate.ports.clone(), None);
    proxy.check_url = format!("http://{origin}/").parse().unwrap();
    let proxies = Proxies::new(db.pool.clone(), proxy);
    let fake = Fake::new();
    let runtime = Runtime::new(db.pool.clone(), fake.clone(), config("anthropic", 1))
        .with_proxies(Some(proxies.clone()));
    warm_up(&runtime, &fake).await;
    let catalogue = polydev::perspectives::Catalogue::load(None).unwrap();
    let state = polydev::app::AppState::new(
        db.pool.clone(),
        polydev::perspectives::Gateway::new(catalogue),
    )
    .with_runtime(Some(runtime.clone()));
    let server = crate::http_api::TestServer::start_state(state).await;
    let (alice, token) =
        crate::http_api::user_with_token(&db, "alice@example.com", polydev::accounts::Plan::Pro)
            .await;
    let port = proxies.port_for(alice).await.unwrap().port;
    gate.broken.lock().unwrap().insert(port);
    proxies.check_all().await.unwrap().unwrap();

    let response = server
        .send_json(
            reqwest::Method::POST,
            "/v1/runtime/containers",
            &token,
            &serde_json::json!({"provider": "anthropic"}),
        )
        .await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "proxy_unhealthy");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("proxy port {port}")) && message.contains("502"),
        "{message}"
    );
    assert_eq!(
        status_counts(&db.pool).await["ready"],
        1,
        "no container was taken, and none bypasses the port"
    );
    assert!(fake.proxies.lock().unwrap().is_empty());
    // The user can read their port's state.
    let response = server
        .client
        .get(format!("{}/v1/runtime/proxy", server.base))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let state: serde_json::Value = response.json().await.unwrap();
    assert_eq!(state["port"], port);
    assert_eq!(state["healthy"], false);
    assert!(state["last_error"].as_str().unwrap().contains("502"));
    assert!(state["last_checked_at"].is_string() && state["last_verified_at"].is_null());
    let (_, bob_token) =
        crate::http_api::user_with_token(&db, "bob@example.com", polydev::accounts::Plan::Pro)
            .await;
    let response = server
        .client
        .get(format!("{}/v1/runtime/proxy", server.base))
        .bearer_auth(&bob_token)
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        StatusCode::NOT_FOUND,
        "no port before a first claim"
    );

    // The port recovers: the next probe says so, and the claim goes through it.
    gate.broken.lock().unwrap().clear();
    proxies.check_all().await.unwrap().unwrap();
    let claimed = runtime.claim(alice, "anthropic").await.unwrap();
    assert_eq!(claimed.decodo_port, Some(i32::from(port)));
    let container: String =
        sqlx::query_scalar("SELECT container_id FROM runtime_containers WHERE id = $1")
            .bind(claimed.id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    let expected: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    assert_eq!(fake.proxies.lock().unwrap()[&container], Some(expected));
}

#[tokio::test]
async fn proxy_a_containers_traffic_leaves_through_its_own_users_port() {
    let (origin, origin_seen) = crate::runtime_local::origin().await;
    let credentials = credentials();
    let gate = Gate::start(4, Some(credentials.authorization())).await;
    let mut proxy = proxy_config(gate.ports.clone(), Some(credentials.clone()));
    proxy.check_url = format!("http://{origin}/").parse().unwrap();
    let stack =
        crate::runtime_jobs::Stack::start_with("openai", 2, |_| {}, Some(proxy.clone())).await;
    let proxies = stack.runtime.proxies.clone().unwrap();
    let alice = stack.user("alice@example.com").await;
    let bob = stack.user("bob@example.com").await;
    // Bob has an earlier port; alice gets one at her first claim.
    let bob_port = proxies.port_for(bob.id).await.unwrap().port;
    let (alice_container, alice_key) = stack.claim(&alice, "openai").await;
    let (bob_container, bob_key) = stack.claim(&bob, "openai").await;
    let alice_port = proxies.port_of(alice.id).await.unwrap().unwrap().port;
    assert_ne!(alice_port, bob_port);

    // Each job: the sandbox does not hold the gate's password; curl tunnels (CONNECT) through
    // the proxy its environment names, and plain HTTP goes through it too.
    let job = |who: &str| JobCommand {
        command: vec![
            "/bin/sh".into(),
            "-c".into(),
            format!(
                r#"case "$(env)" in *{password}*) exit 20;; esac
                   test "$HTTPS_PROXY" = http://127.0.0.1:3128 || exit 21
                   curl -sS -m 10 -p http://{origin}/tunnel-{who} || exit 22
                   curl -sS -m 10 http://{origin}/plain-{who} || exit 23"#,
                password = credentials.password
            ),
        ],
        ..JobCommand::default()
    };
    for (user, container, key, who) in [
        (&alice, alice_container, &alice_key, "alice"),
        (&bob, bob_container, &bob_key, "bob"),
    ] {
        let (id, response) = stack.submit(user, container, key, &job(who)).await;
        assert_eq!(response.status(), StatusCode::CREATED);
        let (stdout, stderr, finished) = stack.follow(user, id).await;
        assert_eq!(finished["exit_code"], 0, "{who}: {stdout} {stderr}");
        assert_eq!(stdout, "origin-okorigin-ok");
    }

    let carried = gate.carried();
    let through = |port: u16| -> Vec<String> {
        carried
            .iter()
            .filter(|c| c.port == port)
            .map(|c| c.request_line.clone())
            .collect()
    };
    assert_eq!(
        through(alice_port),
        [
            format!("CONNECT {origin} HTTP/1.1"),
            format!("GET http://{origin}/plain-alice HTTP/1.1")
        ]
    );
    assert_eq!(
        through(bob_port),
        [
            format!("CONNECT {origin} HTTP/1.1"),
            format!("GET http://{origin}/plain-bob HTTP/1.1")
        ]
    );
    assert_eq!(carried.len(), 4, "nothing through any other port");
    assert!(
        carried
            .iter()
            .all(|c| c.authorization == Some(credentials.authorization())),
        "the host end of the tunnel added the gate's credentials"
    );
    let seen = origin_seen.lock().unwrap().clone();
    for path in ["/tunnel-alice", "/plain-alice", "/tunnel-bob", "/plain-bob"] {
        assert!(seen.iter().any(|p| p == path), "{path} reached the origin");
    }

    // Alice's port fails its check: her next claim is refused, bob's still goes through.
    gate.broken.lock().unwrap().insert(alice_port);
    let checked = proxies.check_all().await.unwrap().unwrap();
    assert_eq!(checked.unhealthy.len(), 1);
    let response = stack
        .send(
            reqwest::Method::POST,
            "/v1/runtime/containers",
            &alice.token,
            &serde_json::json!({"provider": "openai"}),
        )
        .await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "proxy_unhealthy");
    assert_eq!(stack.claim(&bob, "openai").await.0, bob_container);
}
