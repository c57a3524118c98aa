//! Sealed jobs end to end on the local driver: a real server on a socket, real bubblewrap
//! sandboxes running the real agent, the user's keys from polydev-zk. And the faults: foreign
//! and unknown containers and jobs, oversized jobs and output, time and memory limits,
//! cancellation, an agent that dies mid-job.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use polydev::accounts::Plan;
use polydev::app::AppState;
use polydev::runtime::{LocalConfig, LocalDriver, Runtime, RuntimeConfig};
use polydev_agent::proto::{COMMAND_NAMESPACE, JobCommand};
use polydev_zk::{Context, KdfParams, Keyring, X25519KeyPair};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::common::{TestDb, eventually};
use crate::http_api::user_with_token;

/// A bound against hangs, not a timing assertion.
const HANG_GUARD: Duration = Duration::from_secs(60);

pub struct Stack {
    pub db: TestDb,
    pub base: String,
    pub client: reqwest::Client,
    pub runtime: Runtime,
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// A user with zero-knowledge on: key material stored, an X25519 key pair registered.
pub struct User {
    pub id: Uuid,
    pub token: String,
    pub keys: X25519KeyPair,
    /// The account keyring that wraps `keys` (what a client unlocks with the master password).
    pub keyring: Keyring,
}

impl Stack {
    /// A server with the local runtime: `warm` containers of `provider`, `tweak` applied.
    pub async fn start(provider: &str, warm: u32, tweak: impl FnOnce(&mut RuntimeConfig)) -> Stack {
        Self::start_with(provider, warm, tweak, None).await
    }

    /// Like [`Stack::start`], with the users' proxy ports of `proxy` (the sandboxes' tunnels
    /// add its credentials).
    pub async fn start_with(
        provider: &str,
        warm: u32,
        tweak: impl FnOnce(&mut RuntimeConfig),
        proxy: Option<polydev::proxy::ProxyConfig>,
    ) -> Stack {
        let catalogue = polydev::perspectives::Catalogue::load(None).unwrap();
        Self::start_full(provider, warm, tweak, proxy, catalogue).await
    }

    /// Like [`Stack::start_with`], with a model catalogue (its `cli` providers run in the
    /// runtime's containers).
    pub async fn start_full(
        provider: &str,
        warm: u32,
        tweak: impl FnOnce(&mut RuntimeConfig),
        proxy: Option<polydev::proxy::ProxyConfig>,
        catalogue: polydev::perspectives::Catalogue,
    ) -> Stack {
        let db = TestDb::migrated().await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut config = RuntimeConfig::default();
        config.warm.insert(provider.into(), warm);
        config.server = Some(addr);
        config.resources.memory_bytes = 256 * 1024 * 1024;
        config.resources.home_bytes = 32 * 1024 * 1024;
        config.reconcile_interval = Duration::from_millis(200);
        tweak(&mut config);
        let mut local = LocalConfig::detect(crate::runtime_local::agent());
        local.proxy_authorization = proxy
            .as_ref()
            .and_then(|p| p.credentials.as_ref())
            .map(polydev::proxy::Credentials::authorization);
        let driver = LocalDriver::new(local);
        let proxies = proxy.map(|p| polydev::proxy::Proxies::new(db.pool.clone(), p));
        let runtime = Runtime::new(db.pool.clone(), Arc::new(driver), config).with_proxies(proxies);
        let state = AppState::new(
            db.pool.clone(),
            polydev::perspectives::Gateway::new(catalogue).with_runtime(Some(runtime.clone())),
        )
        .with_runtime(Some(runtime.clone()));
        runtime.spawn_background(state.shutdown.clone());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(polydev::http::serve(listener, state, async {
            let _ = stopped.await;
        }));
        let stack = Stack {
            db,
            base: format!("http://{addr}"),
            client: polydev::net::http_client(),
            runtime,
            _stop: stop,
        };
        stack.wait_ready(warm).await;
        stack
    }

    /// Until `n` containers are ready (their agents registered).
    pub async fn wait_ready(&self, n: u32) {
        let pool = self.db.pool.clone();
        let ready = eventually_long(|| {
            let pool = pool.clone();
            async move {
                sqlx::query_scalar::<_, i64>(
                    "SELECT COUNT(*) FROM runtime_containers WHERE status = 'ready'",
                )
                .fetch_one(&pool)
                .await
                .unwrap()
                    >= i64::from(n)
            }
        })
        .await;
        assert!(ready, "{n} warm containers became ready");
    }

    pub async fn user(&self, email: &str) -> User {
        let (id, token) = user_with_token(&self.db, email, Plan::Pro).await;
        let (keyring, material, _) =
            Keyring::setup("a master password", &id.to_string(), KdfParams::MINIMUM).unwrap();
        sqlx::query(
            "UPDATE users SET zk_password_wrapped_key = $2, zk_recovery_wrapped_key = $3 WHERE user_id = $1",
        )
        .bind(id)
        .bind(&material.password_wrapped)
        .bind(&material.recovery_wrapped)
        .execute(&self.db.pool)
        .await
        .unwrap();
        let keys = X25519KeyPair::generate().unwrap();
        let response = self
            .send(
                Method::PUT,
                "/v1/runtime/keys",
                &token,
                &json!({"public_key": keys.public_key(), "wrapped_private_key": keys.wrap(&keyring).unwrap()}),
            )
            .await;
        assert_eq!(response.status(), StatusCode::NO_CONTENT);
        User {
            id,
            token,
            keys,
            keyring,
        }
    }

    pub async fn send(
        &self,
        method: Method,
        path: &str,
        token: &str,
        body: &Value,
    ) -> reqwest::Response {
        self.client
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(token)
            .json(body)
            .send()
            .await
            .unwrap()
    }

    pub async fn get(&self, path: &str, token: &str) -> reqwest::Response {
        self.client
            .get(format!("{}{path}", self.base))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
    }

    /// Claims a container: (its id, its public key).
    pub async fn claim(&self, user: &User, provider: &str) -> (Uuid, String) {
        let response = self
            .send(
                Method::POST,
                "/v1/runtime/containers",
                &user.token,
                &json!({"provider": provider}),
            )
            .await;
        let status = response.status();
        let body: Value = response.json().await.unwrap();
        assert_eq!(status, StatusCode::CREATED, "{body}");
        (
            body["id"].as_str().unwrap().parse().unwrap(),
            body["public_key"].as_str().unwrap().to_string(),
        )
    }

    /// Seals `job` to the container and submits it; returns the job id and the response.
    pub async fn submit(
        &self,
        user: &User,
        container: Uuid,
        public_key: &str,
        job: &JobCommand,
    ) -> (Uuid, reqwest::Response) {
        let id = Uuid::new_v4();
        let (user_id, row) = (user.id.to_string(), id.to_string());
        let ctx = Context {
            namespace: COMMAND_NAMESPACE,
            user_id: &user_id,
            row_id: &row,
        };
        let sealed =
            polydev_zk::seal_to(public_key, &ctx, &serde_json::to_vec(job).unwrap()).unwrap();
        let response = self
            .send(
                Method::POST,
                "/v1/runtime/jobs",
                &user.token,
                &json!({"id": id, "container_id": container, "encrypted_command": sealed}),
            )
            .await;
        (id, response)
    }

    /// Follows the job's SSE stream to its end: (opened stdout, opened stderr, finished row).
    pub async fn follow(&self, user: &User, job: Uuid) -> (String, String, Value) {
        let response = self
            .get(&format!("/v1/runtime/jobs/{job}/events"), &user.token)
            .await;
        assert_eq!(response.status(), StatusCode::OK);
        let mut body = response.bytes_stream();
        let mut buffer = String::new();
        let (mut stdout, mut stderr) = (String::new(), String::new());
        let mut seqs = Vec::new();
        let read = async {
            while let Some(chunk) = body.next().await {
                buffer.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
                while let Some(end) = buffer.find("\n\n") {
                    let frame: String = buffer.drain(..end + 2).collect();
                    let event = field(&frame, "event");
                    let data = field(&frame, "data");
                    match event.as_str() {
                        "output" => {
                            let output: Value = serde_json::from_str(&data).unwrap();
                            let sealed = output["sealed"].as_str().unwrap();
                            let (text, seq) = open_chunk(user, job, sealed);
                            seqs.push(seq);
                            match output["stream"].as_str().unwrap() {
                                "stdout" => stdout.push_str(&text),
                                _ => stderr.push_str(&text),
                            }
                        }
                        "finished" => return serde_json::from_str::<Value>(&data).unwrap(),
                        "error" => panic!("error event: {data}"),
                        _ => {}
                    }
                }
            }
            panic!("the stream ended without `finished`");
        };
        let finished = tokio::time::timeout(HANG_GUARD, read)
            .await
            .expect("finished in time");
        let mut sorted = seqs.clone();
        sorted.sort_unstable();
        assert_eq!(
            sorted,
            (0..seqs.len() as u64).collect::<Vec<_>>(),
            "no chunk missing"
        );
        (stdout, stderr, finished)
    }
}

fn field(frame: &str, name: &str) -> String {
    frame
        .lines()
        .filter_map(|l| l.strip_prefix(&format!("{name}:")))
        .map(|v| v.strip_prefix(' ').unwrap_or(v))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Opens one output chunk with the user's key: its namespace and row come from its header,
/// which must name this user and job.
pub fn open_chunk(user: &User, job: Uuid, sealed: &str) -> (String, u64) {
    let header = polydev_zk::inspect_sealed(sealed).unwrap();
    let (job_part, seq) = header.row_id.split_once('/').unwrap();
    assert_eq!(job_part, job.to_string());
    let user_id = user.id.to_string();
    let ctx = Context {
        namespace: &header.namespace,
        user_id: &user_id,
        row_id: &header.row_id,
    };
    let plain = user.keys.open(&ctx, sealed).unwrap();
    (String::from_utf8(plain).unwrap(), seq.parse().unwrap())
}

/// Like `eventually`, with a longer bound (sandboxes start, agents register).
pub async fn eventually_long<F, Fut>(mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..6 {
        if eventually(&mut condition).await {
            return true;
        }
    }
    false
}

fn sh(script: &str) -> JobCommand {
    JobCommand {
        command: vec!["/bin/sh".into(), "-c".into(), script.into()],
        ..JobCommand::default()
    }
}

/// A `MakeWriter` into a shared buffer: the server's log during a test.
#[derive(Clone, Default)]
pub struct LogBuffer(pub Arc<Mutex<Vec<u8>>>);

impl LogBuffer {
    /// Everything this thread logs, at every level, until the guard is dropped.
    pub fn capture() -> (LogBuffer, tracing::subscriber::DefaultGuard) {
        let log = LogBuffer::default();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(log.clone())
            .finish();
        (log, tracing::subscriber::set_default(subscriber))
    }
}

impl std::io::Write for LogBuffer {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogBuffer {
    type Writer = LogBuffer;
    fn make_writer(&'a self) -> LogBuffer {
        self.clone()
    }
}

pub async fn dump(pool: &sqlx::PgPool) -> String {
    let tables: Vec<String> =
        sqlx::query_scalar("SELECT tablename::text FROM pg_tables WHERE schemaname = 'public'")
            .fetch_all(pool)
            .await
            .unwrap();
    let mut all = String::new();
    for table in tables {
        let rows: Option<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT string_agg(t::text, E'\\n') FROM \"{table}\" t"
        )))
        .fetch_one(pool)
        .await
        .unwrap();
        all.push_str(&rows.unwrap_or_default());
    }
    all
}

#[tokio::test]
async fn runtime_sealed_job_end_to_end_leaves_no_plaintext_in_the_database_or_the_log() {
    let (log, _guard) = LogBuffer::capture();

    let stack = Stack::start("anthropic", 1, |_| {}).await;
    let alice = stack.user("alice@example.com").await;
    let (container, public_key) = stack.claim(&alice, "anthropic").await;
    let sentinel = format!("SENTINEL-{}", crate::common::random_hex(8));
    let mut job = sh(
        "printf '%s\\n' \"$WORD\"; cat \"$HOME/creds/token\"; echo err-$WORD >&2; test \"$(pwd)\" = \"$HOME\"",
    );
    job.env.insert("WORD".into(), sentinel.clone());
    job.files
        .insert("creds/token".into(), format!("cred-{sentinel}\n"));
    let (id, response) = stack.submit(&alice, container, &public_key, &job).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let (stdout, stderr, finished) = stack.follow(&alice, id).await;
    assert_eq!(stdout, format!("{sentinel}\ncred-{sentinel}\n"));
    assert_eq!(stderr, format!("err-{sentinel}\n"));
    assert_eq!(finished["status"], "succeeded");
    assert_eq!(finished["exit_code"], 0);
    assert!(finished["duration_ms"].as_i64().is_some());

    // The finished row: sealed outputs that open, exit code, duration.
    let row: Value = stack
        .get(&format!("/v1/runtime/jobs/{id}"), &alice.token)
        .await
        .json()
        .await
        .unwrap();
    let opened: String = row["encrypted_stdout"]
        .as_str()
        .unwrap()
        .lines()
        .map(|line| open_chunk(&alice, id, line).0)
        .collect();
    assert_eq!(opened, stdout);
    let status: String = sqlx::query_scalar("SELECT status FROM runtime_containers WHERE id = $1")
        .bind(container)
        .fetch_one(&stack.db.pool)
        .await
        .unwrap();
    assert_eq!(status, "assigned", "back from executing");

    // Nothing in plaintext: not in any table, not in the server's log.
    let dump = dump(&stack.db.pool).await;
    assert!(dump.contains(&id.to_string()), "the dump covers the job");
    assert!(!dump.contains(&sentinel), "the database holds no plaintext");
    let log = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
    assert!(
        log.contains("/v1/runtime/jobs"),
        "the log covers the requests"
    );
    assert!(!log.contains(&sentinel), "the log holds no plaintext");
}

#[tokio::test]
async fn runtime_other_users_containers_and_jobs_are_not_found() {
    let stack = Stack::start("openai", 1, |_| {}).await;
    let alice = stack.user("alice@example.com").await;
    let bob = stack.user("bob@example.com").await;
    let (container, public_key) = stack.claim(&alice, "openai").await;
    let (job, response) = stack
        .submit(&alice, container, &public_key, &sh("true"))
        .await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let (_, _, finished) = stack.follow(&alice, job).await;
    assert_eq!(finished["status"], "succeeded");

    for path in [
        format!("/v1/runtime/containers/{container}"),
        format!("/v1/runtime/jobs/{job}"),
        format!("/v1/runtime/jobs/{job}/events"),
        format!("/v1/runtime/containers/{}", Uuid::new_v4()),
        format!("/v1/runtime/jobs/{}", Uuid::new_v4()),
    ] {
        assert_eq!(
            stack.get(&path, &bob.token).await.status(),
            StatusCode::NOT_FOUND,
            "{path}"
        );
    }
    // Bob cannot run a job on Alice's container, even one sealed to its key, nor cancel hers.
    let (_, response) = stack
        .submit(&bob, container, &public_key, &sh("true"))
        .await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let (_, response) = stack
        .submit(&bob, Uuid::new_v4(), &public_key, &sh("true"))
        .await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let response = stack
        .send(
            Method::POST,
            &format!("/v1/runtime/jobs/{job}/cancel"),
            &bob.token,
            &json!({}),
        )
        .await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let response = stack
        .client
        .delete(format!("{}/v1/runtime/containers/{container}", stack.base))
        .bearer_auth(&bob.token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    // A command sealed for another job id, or to another key, is refused.
    let user_id = alice.id.to_string();
    let other_row = Uuid::new_v4().to_string();
    let wrong_row = polydev_zk::seal_to(
        &public_key,
        &Context {
            namespace: COMMAND_NAMESPACE,
            user_id: &user_id,
            row_id: &other_row,
        },
        b"{}",
    )
    .unwrap();
    let response = stack
        .send(
            Method::POST,
            "/v1/runtime/jobs",
            &alice.token,
            &json!({"id": Uuid::new_v4(), "container_id": container, "encrypted_command": wrong_row}),
        )
        .await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    // Agent calls without the container's secret are refused.
    let response = stack
        .client
        .get(format!("{}/v1/runtime/agent/next", stack.base))
        .bearer_auth(format!("{container}.guess"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn runtime_faults_limits_cancellation_and_an_agent_crash() {
    let stack = Stack::start("google", 1, |config| {
        config.job_wall_clock = Duration::from_secs(2);
        config.max_output_bytes = 10_000;
        config.resources.memory_bytes = 96 * 1024 * 1024;
    })
    .await;
    let alice = stack.user("alice@example.com").await;
    let (container, key) = stack.claim(&alice, "google").await;

    // Oversized: a sealed command over the documented 48 KiB limit, and a body over 64 KiB.
    let big = JobCommand {
        command: vec!["true".into()],
        env: [("PAD".to_string(), "x".repeat(40_000))].into(),
        ..JobCommand::default()
    };
    let (_, response) = stack.submit(&alice, container, &key, &big).await;
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let huge = JobCommand {
        command: vec!["true".into()],
        env: [("PAD".to_string(), "x".repeat(70_000))].into(),
        ..JobCommand::default()
    };
    let (_, response) = stack.submit(&alice, container, &key, &huge).await;
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);

    // Output over the limit: cut at 10 000 bytes, then the marker.
    let (job, _) = stack
        .submit(
            &alice,
            container,
            &key,
            &sh("head -c 100000 /dev/zero | tr '\\0' a"),
        )
        .await;
    let (stdout, _, finished) = stack.follow(&alice, job).await;
    assert_eq!(
        stdout,
        format!(
            "{}{}",
            "a".repeat(10_000),
            polydev_agent::proto::truncation_marker(10_000)
        )
    );
    assert_eq!(
        (
            finished["status"].as_str(),
            finished["output_truncated"].as_bool()
        ),
        (Some("succeeded"), Some(true))
    );

    // Time: killed at the wall clock, status recorded.
    let (job, _) = stack
        .submit(&alice, container, &key, &sh("sleep 600"))
        .await;
    let (_, _, finished) = stack.follow(&alice, job).await;
    assert_eq!(finished["status"], "failed");
    assert_eq!(finished["exit_code"], 137);
    assert!(
        finished["failure_reason"]
            .as_str()
            .unwrap()
            .contains("wall-clock")
    );

    // Memory: the job is the cgroup's preferred victim; killed, status recorded.
    let (job, _) = stack
        .submit(&alice, container, &key, &sh("tail /dev/zero"))
        .await;
    let (_, _, finished) = stack.follow(&alice, job).await;
    assert_eq!(finished["status"], "failed");
    assert_eq!(finished["exit_code"], 137, "{finished}");

    // Cancel: a running job is killed; the row says cancelled.
    let (job, _) = stack
        .submit(&alice, container, &key, &sh("echo started; sleep 600"))
        .await;
    let started = eventually(|| async {
        let row: Value = stack
            .get(&format!("/v1/runtime/jobs/{job}"), &alice.token)
            .await
            .json()
            .await
            .unwrap();
        row["status"] == "running" && row["encrypted_stdout"].is_string()
    })
    .await;
    assert!(started);
    let response = stack
        .send(
            Method::POST,
            &format!("/v1/runtime/jobs/{job}/cancel"),
            &alice.token,
            &json!({}),
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let (_, _, finished) = stack.follow(&alice, job).await;
    assert_eq!(finished["status"], "cancelled");
    let killed = eventually_long(|| async {
        let row: Value = stack
            .get(&format!("/v1/runtime/jobs/{job}"), &alice.token)
            .await
            .json()
            .await
            .unwrap();
        row["exit_code"] == 137
    })
    .await;
    assert!(killed, "the agent killed it and reported");
    let response = stack
        .send(
            Method::POST,
            &format!("/v1/runtime/jobs/{job}/cancel"),
            &alice.token,
            &json!({}),
        )
        .await;
    assert_eq!(response.status(), StatusCode::CONFLICT);

    // What a job leaves behind dies with it: the cancelled job's `sleep 600` (a child of its
    // shell), and the `sleep` a finished job left in the background, are gone before the next
    // job runs.
    let (job, _) = stack
        .submit(&alice, container, &key, &sh("sleep 300 & echo left"))
        .await;
    let (stdout, _, finished) = stack.follow(&alice, job).await;
    assert_eq!(
        (stdout.as_str(), finished["status"].as_str()),
        ("left\n", Some("succeeded"))
    );
    let (job, _) = stack
        .submit(&alice, container, &key, &sh("cat /proc/[0-9]*/comm"))
        .await;
    let (processes, _, _) = stack.follow(&alice, job).await;
    // The listing sees the container's other processes (the agent's own), so it would see a
    // `sleep`.
    assert!(processes.lines().any(|name| name == "agent"), "{processes}");
    assert!(
        !processes.lines().any(|name| name == "sleep"),
        "left running in the container: {processes}"
    );

    // The agent dies mid-job: the job fails with a reason, the container is destroyed and the
    // pool refilled.
    let (job, _) = stack
        .submit(
            &alice,
            container,
            &key,
            &sh("echo before; kill -9 $PPID; sleep 600"),
        )
        .await;
    let (_, _, finished) = stack.follow(&alice, job).await;
    assert_eq!(finished["status"], "failed");
    assert!(
        finished["failure_reason"]
            .as_str()
            .unwrap()
            .contains("container destroyed"),
        "{finished}"
    );
    let container_row: (String, Option<String>) =
        sqlx::query_as("SELECT status, destroy_reason FROM runtime_containers WHERE id = $1")
            .bind(container)
            .fetch_one(&stack.db.pool)
            .await
            .unwrap();
    assert_eq!(container_row.0, "destroyed");
    stack.wait_ready(1).await; // refilled
    let (_, response) = stack.submit(&alice, container, &key, &sh("true")).await;
    assert_eq!(
        response.status(),
        StatusCode::NOT_FOUND,
        "a destroyed container takes no jobs"
    );
}
