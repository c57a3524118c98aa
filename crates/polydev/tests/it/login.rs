//! Login sessions, the server's side (docs/login.md): a real server on a socket, real
//! bubblewrap sandboxes running a fake login agent (a shell script that speaks the agent's
//! wire format with curl), the user's keys from polydev-zk. The test plays the agent's WebRTC
//! side itself with the bootstrap secret it reads from the sandbox's spec. And the faults:
//! another user's session, wrong and expired secrets, oversized and too many messages,
//! timeouts, lost heartbeats, an agent that crashes, teardowns that fail and are retried,
//! concurrent appends, two `polydev serve` processes relaying, a server SIGKILLed mid-session.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use polydev::app::AppState;
use polydev::login::{Login, LoginConfig, TurnConfig};
use polydev::runtime::orchestrator::BoxFuture;
use polydev::runtime::{
    ContainerInfo, ContainerSpec, Event, LocalConfig, LocalDriver, Orchestrator, OrchestratorError,
    Runtime, RuntimeConfig,
};
use polydev_zk::{Context, KdfParams, Keyring, X25519KeyPair};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::common::TestDb;
use crate::http_api::user_with_token;
use crate::runtime_jobs::eventually_long;

/// A bound against hangs, not a timing assertion.
const HANG_GUARD: Duration = Duration::from_secs(60);

/// The fake login agent: heartbeats every 200 ms while its secret works. `MODE` varies it: `crash` exits 3 after the first heartbeat; `silent` never sends
/// one.
const FAKE_AGENT: &str = r#"#!/bin/bash
mode=MODE
url="$POLYDEV_SERVER_URL/v1/login/agent/$POLYDEV_LOGIN_SESSION_ID"
beat() { curl -s -o /dev/null -w '%{http_code}' -X POST -H "Authorization: Bearer $POLYDEV_LOGIN_SECRET" "$url/heartbeat"; }
if [ "$mode" = silent ]; then sleep 600; exit 0; fi
beat >/dev/null
if [ "$mode" = crash ]; then exit 3; fi
while [ "$(beat)" = 204 ]; do sleep 0.2; done
"#;

/// Writes the fake agent as `<dir>/agent-<mode>`, executable.
pub fn fake_agent(dir: &std::path::Path, mode: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(format!("agent-{mode}"));
    std::fs::write(&path, FAKE_AGENT.replace("MODE", mode)).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// The local driver, recording what it was asked to start (the test reads the agent's secret
/// from it) and failing the first `fail_stops` stops.
struct Recording {
    inner: LocalDriver,
    specs: Mutex<Vec<ContainerSpec>>,
    fail_stops: AtomicU32,
}

impl Orchestrator for Recording {
    fn driver(&self) -> &'static str {
        self.inner.driver()
    }
    fn instance(&self) -> String {
        self.inner.instance()
    }
    fn start(&self, spec: ContainerSpec) -> BoxFuture<'_, Result<String, OrchestratorError>> {
        self.specs.lock().unwrap().push(spec.clone());
        self.inner.start(spec)
    }
    fn stop<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), OrchestratorError>> {
        let fail = self
            .fail_stops
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if fail {
            return Box::pin(async {
                Err(OrchestratorError::Unreachable(
                    "injected stop failure".into(),
                ))
            });
        }
        self.inner.stop(id)
    }
    fn inspect<'a>(
        &'a self,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Option<ContainerInfo>, OrchestratorError>> {
        self.inner.inspect(id)
    }
    fn set_proxy<'a>(
        &'a self,
        id: &'a str,
        proxy: Option<std::net::SocketAddr>,
    ) -> BoxFuture<'a, Result<(), OrchestratorError>> {
        self.inner.set_proxy(id, proxy)
    }
    fn list(&self) -> BoxFuture<'_, Result<Vec<ContainerInfo>, OrchestratorError>> {
        self.inner.list()
    }
    fn events(&self) -> BoxStream<'static, Event> {
        self.inner.events()
    }
}

struct Stack {
    db: TestDb,
    base: String,
    client: reqwest::Client,
    driver: Arc<Recording>,
    login: Login,
    _dir: tempfile::TempDir,
    _stop: tokio::sync::oneshot::Sender<()>,
}

struct User {
    id: Uuid,
    token: String,
    keys: X25519KeyPair,
}

impl Stack {
    async fn start(mode: &str, tweak: impl FnOnce(&mut LoginConfig)) -> Stack {
        let db = TestDb::migrated().await;
        let dir = tempfile::tempdir().unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let runtime_config = RuntimeConfig {
            server: Some(addr),
            reconcile_interval: Duration::from_millis(200),
            ..RuntimeConfig::default()
        };
        let driver = Arc::new(Recording {
            inner: LocalDriver::new(LocalConfig::detect(crate::runtime_local::agent())),
            specs: Mutex::new(Vec::new()),
            fail_stops: AtomicU32::new(0),
        });
        let runtime = Runtime::new(db.pool.clone(), driver.clone(), runtime_config);
        let mut config = LoginConfig {
            agent_bin: fake_agent(dir.path(), mode),
            sweep_interval: Duration::from_millis(100),
            heartbeat_timeout: Duration::from_secs(5),
            turn: TurnConfig {
                stun_urls: vec!["stun:127.0.0.1:3478".into()],
                turn_urls: vec!["turn:127.0.0.1:3478?transport=tcp".into()],
                secret: Some("turn-secret".into()),
                ttl: None,
            },
            ..LoginConfig::default()
        };
        config.resources.memory_bytes = 256 * 1024 * 1024;
        config.resources.home_bytes = 16 * 1024 * 1024;
        config.resources.max_pids = 64;
        tweak(&mut config);
        let catalogue = polydev::perspectives::Catalogue::load(None).unwrap();
        let state = AppState::new(
            db.pool.clone(),
            polydev::perspectives::Gateway::new(catalogue),
        )
        .with_runtime(Some(runtime.clone()));
        let login = Login::new(
            db.pool.clone(),
            Some(runtime.clone()),
            config,
            state.shutdown.clone(),
        )
        .await
        .unwrap();
        runtime.spawn_background(state.shutdown.clone());
        login.spawn_background(state.shutdown.clone());
        let state = state.with_login(Some(login.clone()));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(polydev::http::serve(listener, state, async {
            let _ = stopped.await;
        }));
        Stack {
            db,
            base: format!("http://{addr}"),
            client: polydev::net::http_client(),
            driver,
            login,
            _dir: dir,
            _stop: stop,
        }
    }

    async fn user(&self, email: &str) -> User {
        let (id, token) = user_with_token(&self.db, email, polydev::accounts::Plan::Pro).await;
        let (keyring, _, _) =
            Keyring::setup("a master password", &id.to_string(), KdfParams::MINIMUM).unwrap();
        let keys = X25519KeyPair::generate().unwrap();
        let response = self
            .send(
                Method::PUT,
                "/v1/runtime/keys",
                Some(&token),
                &json!({"public_key": keys.public_key(), "wrapped_private_key": keys.wrap(&keyring).unwrap()}),
            )
            .await;
        assert_eq!(response.status(), StatusCode::NO_CONTENT);
        User { id, token, keys }
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        bearer: Option<&str>,
        body: &Value,
    ) -> reqwest::Response {
        let mut request = self
            .client
            .request(method, format!("{}{path}", self.base))
            .json(body);
        if let Some(bearer) = bearer {
            request = request.bearer_auth(bearer);
        }
        request.send().await.unwrap()
    }

    async fn get(&self, path: &str, bearer: &str) -> reqwest::Response {
        self.client
            .get(format!("{}{path}", self.base))
            .bearer_auth(bearer)
            .send()
            .await
            .unwrap()
    }

    /// Starts a session for `user` and returns it with its agent's secret.
    async fn start_session(&self, user: &User) -> (Value, String) {
        let response = self
            .send(
                Method::POST,
                "/v1/login/sessions",
                Some(&user.token),
                &json!({"provider": "anthropic"}),
            )
            .await;
        assert_eq!(response.status(), StatusCode::CREATED);
        let session: Value = response.json().await.unwrap();
        let secret = self.secret_of(session["id"].as_str().unwrap());
        (session, secret)
    }

    /// The bootstrap secret of the latest sandbox of `session`.
    fn secret_of(&self, session: &str) -> String {
        let specs = self.driver.specs.lock().unwrap();
        let spec = specs
            .iter()
            .rev()
            .find(|s| s.env.get("POLYDEV_LOGIN_SESSION_ID").map(String::as_str) == Some(session))
            .expect("a sandbox of the session");
        spec.env["POLYDEV_LOGIN_SECRET"].clone()
    }

    async fn session(&self, user: &User, id: &str) -> Value {
        self.get(&format!("/v1/login/sessions/{id}"), &user.token)
            .await
            .json()
            .await
            .unwrap()
    }

    async fn wait_status(&self, user: &User, id: &str, status: &str) -> Value {
        let reached =
            eventually_long(|| async { self.session(user, id).await["status"] == status }).await;
        let last = self.session(user, id).await;
        assert!(reached, "session never became {status}: {last}");
        last
    }

    /// Until every cleanup task is completed and no sandbox is left.
    async fn wait_clean(&self) {
        let pool = self.db.pool.clone();
        let driver = self.driver.clone();
        let clean = eventually_long(|| {
            let (pool, driver) = (pool.clone(), driver.clone());
            async move {
                let pending: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) FROM vm_cleanup_tasks WHERE status <> 'completed'",
                )
                .fetch_one(&pool)
                .await
                .unwrap();
                let live: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) FROM vms WHERE destroyed_at IS NULL OR status <> 'destroyed'",
                )
                .fetch_one(&pool)
                .await
                .unwrap();
                pending == 0 && live == 0 && driver.list().await.unwrap().is_empty()
            }
        })
        .await;
        assert!(clean, "cleanup did not finish");
    }
}

/// An SSE stream, parsed: `(event, data as JSON)`.
pub struct Sse {
    stream: BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buffer: String,
}

impl Sse {
    pub async fn open(client: &reqwest::Client, url: &str, bearer: &str) -> Sse {
        let response = client.get(url).bearer_auth(bearer).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{url}");
        Sse {
            stream: response.bytes_stream().boxed(),
            buffer: String::new(),
        }
    }

    /// The next event (keep-alive comments skipped); `None` when the stream ended.
    pub async fn next(&mut self) -> Option<(String, Value)> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut event = String::from("message");
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(e) = line.strip_prefix("event:") {
                        event = e.trim().to_string();
                    } else if let Some(d) = line.strip_prefix("data:") {
                        data.push_str(d.strip_prefix(' ').unwrap_or(d));
                    }
                }
                if data.is_empty() {
                    continue;
                }
                return Some((event, serde_json::from_str(&data).unwrap()));
            }
            let chunk = tokio::time::timeout(HANG_GUARD, self.stream.next())
                .await
                .expect("an SSE event in time")?
                .ok()?;
            self.buffer.push_str(&String::from_utf8_lossy(&chunk));
        }
    }

    /// The next `signal` event's data (status events before it are skipped).
    pub async fn signal(&mut self) -> Value {
        loop {
            match self.next().await {
                Some((event, data)) if event == "signal" => return data,
                Some(_) => continue,
                None => panic!("the stream ended"),
            }
        }
    }

    /// The next `status` event's session.
    pub async fn status(&mut self) -> Value {
        loop {
            match self.next().await {
                Some((event, data)) if event == "status" => return data,
                Some(_) => continue,
                None => panic!("the stream ended"),
            }
        }
    }
}

fn candidate(n: usize) -> Value {
    json!({"type": "candidate", "candidate": {
        "candidate": format!("candidate:{n} 1 udp 2122260223 127.0.0.1 {} typ host", 40000 + n),
        "sdpMid": "0", "sdpMLineIndex": 0}})
}

#[tokio::test]
async fn login_session_signals_both_ways_stores_the_sealed_credential_and_is_torn_down() {
    let stack = Stack::start("ok", |_| {}).await;
    let user = stack.user("login-happy@example.com").await;
    let (session, secret) = stack.start_session(&user).await;
    let id = session["id"].as_str().unwrap().to_string();
    assert_eq!(session["provider"], "anthropic");
    assert_eq!(session["retry_count"], 0);
    assert!(session["started_at"].is_string() && session["timeout_at"].is_string());
    assert!(session["completed_at"].is_null());
    // STUN as configured; TURN with a coturn REST credential for this session.
    let turn = &session["ice_servers"][1];
    let username = turn["username"].as_str().unwrap();
    assert!(username.ends_with(&format!(":{id}")), "{username}");
    assert_eq!(
        turn["credential"].as_str().unwrap(),
        polydev::login::turn::credential("turn-secret", username)
    );
    // The sandbox is in vms, and its agent's heartbeats move the session on.
    let vm: (String, String, String, Option<i32>) =
        sqlx::query_as("SELECT type, vm_type, provider, memory_mb FROM vms WHERE session_id = $1")
            .bind(Uuid::parse_str(&id).unwrap())
            .fetch_one(&stack.db.pool)
            .await
            .unwrap();
    assert_eq!(
        (vm.0.as_str(), vm.1.as_str(), vm.2.as_str()),
        ("login", "login", "anthropic")
    );
    assert_eq!(vm.3, Some(256));
    let authenticating = stack.wait_status(&user, &id, "authenticating").await;
    assert!(authenticating["last_heartbeat"].is_string());

    // The agent reads what it needs.
    let view: Value = stack
        .get(&format!("/v1/login/agent/{id}"), &secret)
        .await
        .json()
        .await
        .unwrap();
    assert!(view["error"].is_null(), "{view}");
    assert_eq!(view["user_public_key"], user.keys.public_key());
    assert_eq!(view["provider"], "anthropic");
    assert_eq!(view["credential_namespace"], "login.credential");

    // The user offers before the agent listens: the agent gets it as a replay.
    let offer = json!({"type": "offer", "sdp": "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\n"});
    let posted = stack
        .send(
            Method::POST,
            &format!("/v1/login/sessions/{id}/signal"),
            Some(&user.token),
            &offer,
        )
        .await;
    assert_eq!(posted.status(), StatusCode::ACCEPTED);
    let mut agent = Sse::open(
        &stack.client,
        &format!("{}/v1/login/agent/{id}/signal", stack.base),
        &secret,
    )
    .await;
    let got = agent.signal().await;
    assert_eq!(got["from"], "user");
    assert_eq!(got["type"], "offer");
    assert_eq!(got["sdp"], offer["sdp"]);
    let mut browser = Sse::open(
        &stack.client,
        &format!("{}/v1/login/sessions/{id}/signal", stack.base),
        &user.token,
    )
    .await;
    let status = browser.status().await;
    assert!(
        matches!(
            status["status"].as_str(),
            Some("pending" | "authenticating")
        ),
        "{status}"
    );

    // The answer and trickled candidates reach the browser live, in order.
    let answer = json!({"type": "answer", "sdp": "v=0\r\no=- 3 4 IN IP4 127.0.0.1\r\n"});
    for message in [answer.clone(), candidate(1), candidate(2)] {
        let posted = stack
            .send(
                Method::POST,
                &format!("/v1/login/agent/{id}/signal"),
                Some(&secret),
                &message,
            )
            .await;
        assert_eq!(posted.status(), StatusCode::ACCEPTED);
    }
    let mut seqs = Vec::new();
    for expected in [answer, candidate(1), candidate(2)] {
        let got = browser.signal().await;
        assert_eq!(got["from"], "agent");
        assert_eq!(got["type"], expected["type"]);
        if expected["type"] == "candidate" {
            assert_eq!(got["candidate"], expected["candidate"]);
        }
        seqs.push(got["seq"].as_i64().unwrap());
    }
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    // The browser's own messages never come back to it; the agent's candidate from the user
    // does reach the agent.
    stack
        .send(
            Method::POST,
            &format!("/v1/login/sessions/{id}/signal"),
            Some(&user.token),
            &candidate(7),
        )
        .await;
    assert_eq!(agent.signal().await["candidate"], candidate(7)["candidate"]);

    // Connected.
    let connected = stack
        .send(
            Method::POST,
            &format!("/v1/login/agent/{id}/connected"),
            Some(&secret),
            &json!({}),
        )
        .await;
    assert_eq!(connected.status(), StatusCode::NO_CONTENT);
    assert!(stack.session(&user, &id).await["signaling_completed_at"].is_string());

    // A credential sealed to someone else, or for another row, is refused.
    let other = X25519KeyPair::generate().unwrap();
    let user_id = user.id.to_string();
    let plaintext = br#"{"claudeAiOauth":{"accessToken":"sk-ant-oat-fake"}}"#;
    for (key, row) in [
        (other.public_key(), id.as_str()),
        (user.keys.public_key(), "another-row"),
    ] {
        let ctx = Context {
            namespace: "login.credential",
            user_id: &user_id,
            row_id: row,
        };
        let sealed = polydev_zk::seal_to(&key, &ctx, plaintext).unwrap();
        let refused = stack
            .send(
                Method::POST,
                &format!("/v1/login/agent/{id}/credential"),
                Some(&secret),
                &json!({"sealed": sealed, "kind": "claude-code"}),
            )
            .await;
        assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
    }
    let ctx = Context {
        namespace: "login.credential",
        user_id: &user_id,
        row_id: &id,
    };
    let sealed = polydev_zk::seal_to(&user.keys.public_key(), &ctx, plaintext).unwrap();
    let stored = stack
        .send(
            Method::POST,
            &format!("/v1/login/agent/{id}/credential"),
            Some(&secret),
            &json!({"sealed": sealed, "kind": "claude-code"}),
        )
        .await;
    assert_eq!(stored.status(), StatusCode::NO_CONTENT);

    // Both streams see the session complete, then end.
    assert_eq!(browser.status().await["status"], "completed");
    assert!(browser.next().await.is_none());
    assert_eq!(agent.status().await["status"], "completed");
    let done = stack.session(&user, &id).await;
    assert!(done["completed_at"].is_string());
    assert!(done["error_message"].is_null());

    // The credential row holds the sealed box only, and the user's key opens it.
    type CredentialRow = (
        Option<String>,
        Option<String>,
        Option<bool>,
        Option<String>,
        Option<String>,
    );
    let row: CredentialRow = sqlx::query_as(
        "SELECT encrypted_data, encrypted_data_v2, migrated_to_zk, kind, provider
             FROM cli_credentials WHERE credential_id = $1 AND user_id = $2",
    )
    .bind(Uuid::parse_str(&id).unwrap())
    .bind(user.id)
    .fetch_one(&stack.db.pool)
    .await
    .unwrap();
    assert_eq!(row.0, None);
    assert_eq!(row.2, Some(true));
    assert_eq!(row.3.as_deref(), Some("claude-code"));
    assert_eq!(row.4.as_deref(), Some("anthropic"));
    let opened = user.keys.open(&ctx, row.1.as_deref().unwrap()).unwrap();
    assert_eq!(opened.as_slice(), plaintext);
    let dump: String = sqlx::query_scalar(
        "SELECT string_agg(t::text, ' ') FROM (SELECT * FROM cli_credentials) t",
    )
    .fetch_one(&stack.db.pool)
    .await
    .unwrap();
    assert!(
        !dump.contains("sk-ant-oat-fake"),
        "plaintext in the database"
    );

    // The finished session's secret works no more; its sandbox is gone.
    let late = stack
        .send(
            Method::POST,
            &format!("/v1/login/agent/{id}/heartbeat"),
            Some(&secret),
            &json!({}),
        )
        .await;
    assert_eq!(late.status(), StatusCode::UNAUTHORIZED);
    stack.wait_clean().await;
}

#[tokio::test]
async fn login_signalling_is_for_the_owner_and_the_agent_only_and_bounded() {
    let stack = Stack::start("ok", |_| {}).await;
    let owner = stack.user("login-owner@example.com").await;
    let stranger = stack.user("login-stranger@example.com").await;
    let (session, secret) = stack.start_session(&owner).await;
    let id = session["id"].as_str().unwrap().to_string();
    let signal = format!("/v1/login/sessions/{id}/signal");

    // Another user's session does not exist for them.
    for response in [
        stack
            .get(&format!("/v1/login/sessions/{id}"), &stranger.token)
            .await,
        stack.get(&signal, &stranger.token).await,
        stack
            .send(Method::POST, &signal, Some(&stranger.token), &candidate(1))
            .await,
        stack
            .send(
                Method::POST,
                &format!("/v1/login/sessions/{id}/cancel"),
                Some(&stranger.token),
                &json!({}),
            )
            .await,
    ] {
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
    }
    let listed: Value = stack
        .get("/v1/login/sessions", &stranger.token)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(listed["sessions"], json!([]));
    // A wrong secret, another session's secret, none at all: 401.
    let (other_session, other_secret) = stack.start_session(&stranger).await;
    for bearer in [Some("0".repeat(64)), Some(other_secret.clone()), None] {
        let response = stack
            .send(
                Method::POST,
                &format!("/v1/login/agent/{id}/signal"),
                bearer.as_deref(),
                &candidate(1),
            )
            .await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    }
    let _ = other_session;
    // Sizes and counts are bounded.
    let huge = json!({"type": "offer", "sdp": "a".repeat(polydev::login::signal::MAX_SDP + 1)});
    let response = stack
        .send(Method::POST, &signal, Some(&owner.token), &huge)
        .await;
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let long = json!({"type": "candidate", "candidate": {"candidate": "c".repeat(2000), "sdpMid": "0", "sdpMLineIndex": 0}});
    let response = stack
        .send(Method::POST, &signal, Some(&owner.token), &long)
        .await;
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let unknown = json!({"type": "bye"});
    let response = stack
        .send(Method::POST, &signal, Some(&owner.token), &unknown)
        .await;
    assert_eq!(response.status().as_u16() / 100, 4);
    let max = polydev::login::signal::MAX_CANDIDATES_PER_SIDE as usize;
    for n in 0..max {
        let response = stack
            .send(Method::POST, &signal, Some(&owner.token), &candidate(n))
            .await;
        assert_eq!(response.status(), StatusCode::ACCEPTED);
    }
    let response = stack
        .send(Method::POST, &signal, Some(&owner.token), &candidate(max))
        .await;
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    // The agent's side has its own allowance.
    let response = stack
        .send(
            Method::POST,
            &format!("/v1/login/agent/{id}/signal"),
            Some(&secret),
            &candidate(1),
        )
        .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);

    // Cancelled: no more signalling from either side, and the secret stops working.
    let cancelled: Value = stack
        .send(
            Method::POST,
            &format!("/v1/login/sessions/{id}/cancel"),
            Some(&owner.token),
            &json!({}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(cancelled["status"], "failed");
    assert_eq!(cancelled["error_message"], "cancelled by the user");
    let offer = json!({"type": "offer", "sdp": "v=0"});
    let response = stack
        .send(Method::POST, &signal, Some(&owner.token), &offer)
        .await;
    assert_eq!(response.status(), StatusCode::CONFLICT);
    assert_eq!(
        stack.get(&signal, &owner.token).await.status(),
        StatusCode::CONFLICT
    );
    let response = stack
        .send(
            Method::POST,
            &format!("/v1/login/agent/{id}/signal"),
            Some(&secret),
            &offer,
        )
        .await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let again = stack
        .send(
            Method::POST,
            &format!("/v1/login/sessions/{id}/cancel"),
            Some(&owner.token),
            &json!({}),
        )
        .await;
    assert_eq!(again.status(), StatusCode::CONFLICT);
    // Unknown providers, and more sessions at once than allowed, are refused.
    let response = stack
        .send(
            Method::POST,
            "/v1/login/sessions",
            Some(&owner.token),
            &json!({"provider": "acme"}),
        )
        .await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    for _ in 0..3 {
        stack.start_session(&owner).await;
    }
    let response = stack
        .send(
            Method::POST,
            "/v1/login/sessions",
            Some(&owner.token),
            &json!({"provider": "openai"}),
        )
        .await;
    assert_eq!(response.status(), StatusCode::CONFLICT);
}

#[tokio::test]
async fn two_hundred_concurrent_candidate_appends_are_all_kept_in_one_order() {
    let stack = Stack::start("ok", |_| {}).await;
    let user = stack.user("login-concurrent@example.com").await;
    let (session, secret) = stack.start_session(&user).await;
    let id = session["id"].as_str().unwrap().to_string();
    let stack = Arc::new(stack);
    let mut tasks = Vec::new();
    for n in 0..200 {
        let (stack, token, secret, id) = (
            stack.clone(),
            user.token.clone(),
            secret.clone(),
            id.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let (path, bearer) = if n % 2 == 0 {
                (format!("/v1/login/sessions/{id}/signal"), token)
            } else {
                (format!("/v1/login/agent/{id}/signal"), secret)
            };
            let response = stack
                .send(Method::POST, &path, Some(&bearer), &candidate(n))
                .await;
            assert_eq!(
                response.status(),
                StatusCode::ACCEPTED,
                "{:?}",
                response.text().await
            );
            let posted: Value = response.json().await.unwrap();
            posted["seq"].as_i64().unwrap()
        }));
    }
    let mut seqs = BTreeSet::new();
    for task in tasks {
        assert!(seqs.insert(task.await.unwrap()), "a number given twice");
    }
    let stored: Value =
        sqlx::query_scalar("SELECT ice_candidates FROM auth_sessions WHERE session_id = $1")
            .bind(Uuid::parse_str(&id).unwrap())
            .fetch_one(&stack.db.pool)
            .await
            .unwrap();
    let stored = stored.as_array().unwrap();
    assert_eq!(stored.len(), 200);
    let stored_seqs: BTreeSet<i64> = stored.iter().map(|c| c["seq"].as_i64().unwrap()).collect();
    assert_eq!(stored_seqs, seqs);
    let lines: BTreeSet<String> = stored
        .iter()
        .map(|c| c["candidate"]["candidate"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(lines.len(), 200);
    // A late follower on each side replays exactly the other side's 100, in order.
    let mut browser = Sse::open(
        &stack.client,
        &format!("{}/v1/login/sessions/{id}/signal", stack.base),
        &user.token,
    )
    .await;
    let mut last = 0;
    for _ in 0..100 {
        let got = browser.signal().await;
        assert_eq!(got["from"], "agent");
        let seq = got["seq"].as_i64().unwrap();
        assert!(seq > last);
        last = seq;
    }
    let status = browser.status().await;
    assert!(
        matches!(
            status["status"].as_str(),
            Some("pending" | "authenticating")
        ),
        "{status}"
    );
}

#[tokio::test]
async fn a_crashed_agent_a_silent_agent_and_a_timeout_fail_the_session_with_a_reason() {
    // The agent exits after its first heartbeat: the sandbox ended.
    let stack = Stack::start("crash", |_| {}).await;
    let user = stack.user("login-crash@example.com").await;
    let (session, _) = stack.start_session(&user).await;
    let id = session["id"].as_str().unwrap();
    let failed = stack.wait_status(&user, id, "failed").await;
    let reason = failed["error_message"].as_str().unwrap();
    assert!(
        reason.contains("login sandbox ended") && reason.contains("exit code 3"),
        "{reason}"
    );
    assert!(failed["completed_at"].is_string());
    stack.wait_clean().await;

    // Retry: a new sandbox, a new secret, the count goes up.
    let old_secret = stack.secret_of(id);
    let retried: Value = stack
        .send(
            Method::POST,
            &format!("/v1/login/sessions/{id}/retry"),
            Some(&user.token),
            &json!({}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(retried["status"], "pending");
    assert_eq!(retried["retry_count"], 1);
    assert!(retried["error_message"].is_null() && retried["completed_at"].is_null());
    let new_secret = stack.secret_of(id);
    assert_ne!(old_secret, new_secret);
    let old = stack
        .send(
            Method::POST,
            &format!("/v1/login/agent/{id}/heartbeat"),
            Some(&old_secret),
            &json!({}),
        )
        .await;
    assert_eq!(old.status(), StatusCode::UNAUTHORIZED);
    stack.wait_status(&user, id, "failed").await;
    let vms: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM vms WHERE session_id = $1")
        .bind(Uuid::parse_str(id).unwrap())
        .fetch_one(&stack.db.pool)
        .await
        .unwrap();
    assert_eq!(vms, 2);
    stack.wait_clean().await;

    // An agent that never sends a heartbeat.
    let stack = Stack::start("silent", |c| c.heartbeat_timeout = Duration::from_secs(1)).await;
    let user = stack.user("login-silent@example.com").await;
    let (session, _) = stack.start_session(&user).await;
    let failed = stack
        .wait_status(&user, session["id"].as_str().unwrap(), "failed")
        .await;
    let reason = failed["error_message"].as_str().unwrap();
    assert!(reason.contains("did not start (no heartbeat"), "{reason}");
    stack.wait_clean().await;

    // A live agent, but the login takes longer than the session may.
    let stack = Stack::start("ok", |c| c.session_timeout = Duration::from_secs(2)).await;
    let user = stack.user("login-timeout@example.com").await;
    let (session, _) = stack.start_session(&user).await;
    let id = session["id"].as_str().unwrap();
    let mut browser = Sse::open(
        &stack.client,
        &format!("{}/v1/login/sessions/{id}/signal", stack.base),
        &user.token,
    )
    .await;
    let failed = loop {
        let status = browser.status().await;
        if status["status"] == "failed" {
            break status;
        }
    };
    assert!(
        failed["error_message"]
            .as_str()
            .unwrap()
            .starts_with("timed out"),
        "{failed}"
    );
    stack.wait_clean().await;
}

#[tokio::test]
async fn a_failing_teardown_is_retried_with_backoff_and_its_error_recorded() {
    let stack = Stack::start("ok", |_| {}).await;
    stack.driver.fail_stops.store(2, Ordering::SeqCst);
    let user = stack.user("login-teardown@example.com").await;
    let (session, _) = stack.start_session(&user).await;
    let id = session["id"].as_str().unwrap();
    stack.wait_status(&user, id, "authenticating").await;
    stack
        .send(
            Method::POST,
            &format!("/v1/login/sessions/{id}/cancel"),
            Some(&user.token),
            &json!({}),
        )
        .await;
    stack.wait_clean().await;
    let task: (String, i64, Option<String>, bool) = sqlx::query_as(
        "SELECT status, attempts, error_message, completed_at IS NOT NULL FROM vm_cleanup_tasks
         WHERE session_id = $1",
    )
    .bind(id)
    .fetch_one(&stack.db.pool)
    .await
    .unwrap();
    assert_eq!(task.0, "completed");
    assert_eq!(task.1, 3);
    assert!(task.2.unwrap().contains("injected stop failure"));
    assert!(task.3);
    let _ = &stack.login;
}

#[tokio::test]
async fn without_the_runtime_starting_a_session_is_a_clear_501() {
    let db = TestDb::migrated().await;
    let (_, token) =
        user_with_token(&db, "login-off@example.com", polydev::accounts::Plan::Pro).await;
    let catalogue = polydev::perspectives::Catalogue::load(None).unwrap();
    let state = AppState::new(
        db.pool.clone(),
        polydev::perspectives::Gateway::new(catalogue),
    );
    let login = Login::new(
        db.pool.clone(),
        None,
        LoginConfig::default(),
        state.shutdown.clone(),
    )
    .await
    .unwrap();
    let state = state.with_login(Some(login));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(polydev::http::serve(
        listener,
        state,
        std::future::pending(),
    ));
    let response = polydev::net::http_client()
        .post(format!("{base}/v1/login/sessions"))
        .bearer_auth(&token)
        .json(&json!({"provider": "google"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_IMPLEMENTED);
    let body: Value = response.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or(&body.to_string())
            .contains("--runtime"),
        "{body}"
    );
}

/// A UDP and TCP port nobody listens on now.
fn free_port() -> u16 {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.local_addr().unwrap().port()
}

/// `turnutils_uclient` allocating a relay on `port` with `username` / `credential` and sending a
/// few packets through it: true when the allocation succeeded and packets came back.
async fn turn_allocates(port: u16, username: &str, credential: &str) -> bool {
    let peer = free_port().to_string();
    let output = tokio::process::Command::new("/usr/bin/turnutils_uclient")
        .args(["-u", username, "-w", credential, "-p", &port.to_string()])
        .args([
            "-e",
            "127.0.0.1",
            "-r",
            &peer,
            "-n",
            "3",
            "-m",
            "1",
            "-l",
            "100",
            "-y",
        ])
        .arg("127.0.0.1")
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(HANG_GUARD, output)
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    output.status.success() && text.contains("Total lost packets 0")
}

#[tokio::test]
async fn coturn_allocates_a_relay_with_the_session_credential_and_refuses_expired_or_forged_ones() {
    if !std::path::Path::new("/usr/bin/turnserver").exists() {
        eprintln!("coturn is not installed (apt-get install coturn): skipped");
        return;
    }
    let port = free_port();
    let mut coturn = tokio::process::Command::new("/usr/bin/turnserver")
        .args(["-n", "--listening-ip=127.0.0.1", "--relay-ip=127.0.0.1"])
        .arg(format!("--listening-port={port}"))
        .args(["--min-port=51000", "--max-port=51999", "--use-auth-secret"])
        .args([
            "--static-auth-secret=coturn-shared-secret",
            "--realm=polydev.test",
        ])
        .args([
            "--allow-loopback-peers",
            "--no-cli",
            "--no-tls",
            "--no-dtls",
        ])
        .args(["--log-file=stdout", "--simple-log"])
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stack = Stack::start("ok", |c| {
        c.turn = TurnConfig {
            stun_urls: vec![format!("stun:127.0.0.1:{port}")],
            turn_urls: vec![format!("turn:127.0.0.1:{port}?transport=udp")],
            secret: Some("coturn-shared-secret".into()),
            ttl: Some(Duration::from_secs(120)),
        };
        c.turn_forward = Some(([127, 0, 0, 1], port).into());
    })
    .await;
    let user = stack.user("login-turn@example.com").await;
    let (session, secret) = stack.start_session(&user).await;
    // The agent in its local sandbox gets TURN over TCP through its tunnel, same credential.
    let view: Value = stack
        .get(
            &format!("/v1/login/agent/{}", session["id"].as_str().unwrap()),
            &secret,
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        view["ice_servers"],
        json!([{"urls": ["turn:127.0.0.1:3478?transport=tcp"],
                "username": session["ice_servers"][1]["username"],
                "credential": session["ice_servers"][1]["credential"]}])
    );
    let turn = &session["ice_servers"][1];
    let (username, credential) = (
        turn["username"].as_str().unwrap(),
        turn["credential"].as_str().unwrap(),
    );
    // coturn may take a moment to listen.
    assert!(
        eventually_long(|| turn_allocates(port, username, credential)).await,
        "coturn refused the session's credential"
    );
    // The same scheme with an expiry in the past, or under another secret: refused.
    let id = session["id"].as_str().unwrap();
    let expired = format!("1000:{id}");
    let expired_credential = polydev::login::turn::credential("coturn-shared-secret", &expired);
    assert!(!turn_allocates(port, &expired, &expired_credential).await);
    let forged = polydev::login::turn::credential("another-secret", username);
    assert!(!turn_allocates(port, username, &forged).await);
    coturn.kill().await.unwrap();
}

#[tokio::test]
async fn a_local_sandbox_reaches_the_turn_server_only_through_its_tunnel() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let turn = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = turn.local_addr().unwrap();
    let driver = crate::runtime_local::driver();
    let mut spec = crate::runtime_local::spec(&[
        "/bin/bash",
        "-c",
        // The tunnel (127.0.0.1:3478 inside) reaches it, both ways (the sandbox waits for the
        // answer: a sandbox that ends takes its tunnels' connections with it); the host's
        // address itself does not.
        &format!(
            "exec 3<>/dev/tcp/127.0.0.1/3478 || exit 11; echo allocate >&3; \
             read -r -t 10 reply <&3; [ \"$reply\" = ok ] || exit 13; \
             (echo direct >/dev/tcp/127.0.0.1/{}) 2>/dev/null && exit 12; exit 0",
            addr.port()
        ),
    ]);
    spec.network.turn = Some(addr);
    let id = driver.start(spec).await.unwrap();
    let (stream, _) = tokio::time::timeout(HANG_GUARD, turn.accept())
        .await
        .unwrap()
        .unwrap();
    let mut stream = tokio::io::BufReader::new(stream);
    let mut received = String::new();
    stream.read_line(&mut received).await.unwrap();
    assert_eq!(received, "allocate\n");
    stream.get_mut().write_all(b"ok\n").await.unwrap();
    assert_eq!(
        driver.wait(&id, HANG_GUARD).await,
        Some(polydev::runtime::State::Exited {
            code: 0,
            reason: polydev::runtime::ExitReason::Completed
        })
    );
}
