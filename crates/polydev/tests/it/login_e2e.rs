//! Login sessions end to end (docs/login.md): headless Chromium runs the web app as the user
//! (playwright-core, tests/web/login-viewer.mjs), starts a session, connects over WebRTC through
//! the server's signalling to the real `polydev-login-agent` in a local-driver sandbox, and signs
//! in to the fake provider site (polydev-mock) inside the sandboxed browser through the data
//! channels only: keys typed, a clipboard paste, a mouse click. The fake provider CLI writes its
//! credential file; the agent seals it to the user's key. Checked: the sealed credential is in
//! `cli_credentials` and opens with the user's key to what the site issued, and no table holds
//! it (or the site password) in plaintext. Measured and printed: the data channels' round trip
//! (ping/pong p50/p99) and the frame rate. And the negative: the agent killed mid-session fails
//! the session with a reason.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use polydev::accounts::{self, Scope};
use polydev::app::AppState;
use polydev::login::{Login, LoginConfig};
use polydev::runtime::{LocalConfig, LocalDriver, Runtime, RuntimeConfig};
use polydev_mock::login_site::MockLoginSite;
use polydev_zk::{Context, KdfParams, Keyring, X25519KeyPair};
use serde_json::{Value, json};
use tokio::process::Command;
use uuid::Uuid;

use crate::accounts_web::verified_user;
use crate::common::TestDb;

const SITE_EMAIL: &str = "someone@fake-provider.test";

/// The login agent binary: built next to `polydev` by `cargo build --workspace` (and by
/// `cargo nextest run --workspace`, through the agent crate's own binary tests).
fn login_agent() -> PathBuf {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_polydev")).with_file_name("polydev-login-agent");
    assert!(
        bin.exists(),
        "{} is missing: build it with `cargo build -p polydev-login-agent` (the workspace test run builds it)",
        bin.display()
    );
    bin
}

/// The fake provider CLI (a Python script, passed inline: the sandbox sees only /usr).
fn fake_cli(site: &str, credential_file: &str) -> String {
    let script = include_str!("fixtures/fake_provider_cli.py");
    assert!(!script.contains('\''));
    format!("exec python3 -c '{script}' login {site} {credential_file}")
}

struct Stack {
    db: TestDb,
    base: String,
    client: reqwest::Client,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn stack(site: &MockLoginSite, tweak: impl FnOnce(&mut LoginConfig)) -> Stack {
    let db = TestDb::migrated().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let runtime_config = RuntimeConfig {
        server: Some(addr),
        reconcile_interval: Duration::from_millis(500),
        ..RuntimeConfig::default()
    };
    let driver = LocalDriver::new(LocalConfig::detect(crate::runtime_local::agent()));
    let runtime = Runtime::new(db.pool.clone(), Arc::new(driver), runtime_config);
    let credential_file = ".fake-provider/credentials.json";
    let mut config = LoginConfig {
        agent_bin: login_agent(),
        session_timeout: Duration::from_secs(240),
        heartbeat_timeout: Duration::from_secs(20),
        sweep_interval: Duration::from_millis(200),
        ..LoginConfig::default()
    };
    config.agent_env = BTreeMap::from([
        (
            "POLYDEV_LOGIN_CLI".to_string(),
            fake_cli(&site.base_url(), credential_file),
        ),
        (
            "POLYDEV_LOGIN_CREDENTIAL_FILE".to_string(),
            credential_file.to_string(),
        ),
        ("POLYDEV_LOGIN_UDP".to_string(), "127.0.0.1:0".to_string()),
    ]);
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
    login.spawn_background(state.shutdown.clone());
    runtime.spawn_background(state.shutdown.clone());
    // `localhost`, not 127.0.0.1: the browser keeps the session's `Secure` cookie for it.
    let base = format!("http://localhost:{}", addr.port());
    let state = state.with_login(Some(login)).with_public_url(&base);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(polydev::http::serve(listener, state, async {
        let _ = stopped.await;
    }));
    Stack {
        db,
        base,
        client: polydev::net::http_client(),
        _stop: stop,
    }
}

/// A user who signs in with a password, has zero-knowledge key material and a runtime X25519
/// key pair (registered through the API, as the web app does).
async fn user(stack: &Stack, email: &str, password: &str) -> (Uuid, X25519KeyPair) {
    let id = verified_user(&stack.db, email, password).await;
    let token = accounts::create_scoped_token(&stack.db.pool, id, "test", None, Scope::Account)
        .await
        .unwrap()
        .token;
    let (keyring, material, _) =
        Keyring::setup("a master password", &id.to_string(), KdfParams::MINIMUM).unwrap();
    sqlx::query(
        "UPDATE users SET zk_password_wrapped_key = $2, zk_recovery_wrapped_key = $3 WHERE user_id = $1",
    )
    .bind(id)
    .bind(&material.password_wrapped)
    .bind(&material.recovery_wrapped)
    .execute(&stack.db.pool)
    .await
    .unwrap();
    let keys = X25519KeyPair::generate().unwrap();
    let response = stack
        .client
        .put(format!("{}/v1/runtime/keys", stack.base))
        .bearer_auth(&token)
        .json(&json!({"public_key": keys.public_key(), "wrapped_private_key": keys.wrap(&keyring).unwrap()}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    (id, keys)
}

async fn viewer(stack: &Stack, args: [&str; 5], mode: &str) -> Value {
    let web = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/web");
    let shots = std::env::var("POLYDEV_SCREENSHOT_DIR")
        .unwrap_or_else(|_| std::env::temp_dir().to_string_lossy().into_owned());
    let out = tokio::time::timeout(
        Duration::from_secs(300),
        Command::new("node")
            .arg("login-viewer.mjs")
            .arg(&stack.base)
            .args(args)
            .env("MODE", mode)
            .env("SCREENSHOT_DIR", shots)
            .current_dir(web)
            .output(),
    )
    .await
    .expect("the viewer script ends")
    .expect("run node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|_| {
        panic!(
            "viewer output: {stdout}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn percentile(values: &[f64], p: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[((p / 100.0) * sorted.len() as f64) as usize].min(sorted[sorted.len() - 1])
}

async fn dump(pool: &sqlx::PgPool) -> String {
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
async fn login_e2e_signs_in_through_the_streamed_browser_and_stores_only_the_sealed_credential() {
    let site_password = format!("site-password-{}", crate::common::random_hex(6));
    let site = MockLoginSite::start(SITE_EMAIL, &site_password).await;
    let stack = stack(&site, |_| {}).await;
    let (email, password) = ("login-e2e@example.com", "the user's own password");
    let (user_id, keys) = user(&stack, email, password).await;

    let out = viewer(
        &stack,
        [email, password, "openai", SITE_EMAIL, &site_password],
        "full",
    )
    .await;
    // The agent exits after delivering: it takes Chromium and the CLI with it.
    assert!(
        crate::common::eventually(|| async { sandbox_processes().is_empty() }).await,
        "left behind: {:?}",
        sandbox_processes()
    );
    assert!(out.get("error").is_none(), "{out:#}");
    assert_eq!(out["stats"]["status"], "completed", "{out:#}");
    assert_eq!(out["pageErrors"], json!([]), "{out:#}");
    assert_eq!(site.failed_sign_ins(), 0, "the credentials arrived intact");
    let issued = site.issued_tokens();
    assert_eq!(issued.len(), 1, "the fake CLI exchanged one code");

    // The session, its sealed credential, and nothing in the clear.
    let session: Uuid = out["session"].as_str().unwrap().parse().unwrap();
    let row: (String, Option<chrono::DateTime<chrono::Utc>>, Option<chrono::DateTime<chrono::Utc>>) =
        sqlx::query_as(
            "SELECT status, completed_at, signaling_completed_at FROM auth_sessions WHERE session_id = $1",
        )
        .bind(session)
        .fetch_one(&stack.db.pool)
        .await
        .unwrap();
    assert_eq!(row.0, "completed");
    assert!(row.1.is_some() && row.2.is_some(), "{row:?}");
    let sealed: String = sqlx::query_scalar(
        "SELECT encrypted_data_v2 FROM cli_credentials WHERE credential_id = $1 AND user_id = $2",
    )
    .bind(session)
    .bind(user_id)
    .fetch_one(&stack.db.pool)
    .await
    .unwrap();
    let ctx = Context {
        namespace: "login.credential",
        user_id: &user_id.to_string(),
        row_id: &session.to_string(),
    };
    let opened: Value = serde_json::from_slice(&keys.open(&ctx, &sealed).unwrap()).unwrap();
    assert_eq!(opened["access_token"], issued[0].as_str());
    let dump = dump(&stack.db.pool).await;
    assert!(dump.contains(&sealed), "the dump covers the credential");
    for secret in [
        issued[0].as_str(),
        opened["refresh_token"].as_str().unwrap(),
        &site_password,
    ] {
        assert!(!dump.contains(secret), "the database holds no plaintext");
    }

    // What the user saw: figures for the closing note (no wall-clock assertion).
    let rtts: Vec<f64> = out["stats"]["rtts"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_f64)
        .collect();
    assert!(
        !rtts.is_empty(),
        "pings were answered over the control channel"
    );
    let frames: Vec<f64> = out["stats"]["frameTimes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_f64)
        .collect();
    let (from, to) = (
        out["window"]["startedAt"].as_f64().unwrap(),
        out["window"]["endedAt"].as_f64().unwrap(),
    );
    let in_window = frames.iter().filter(|t| (from..=to).contains(*t)).count();
    println!(
        "login stream: round trip p50 {:.1} ms, p99 {:.1} ms over {} pings; {} frames drawn, {:.1} frames/s while signing in ({} frames in {:.1} s); {} bytes of frames",
        percentile(&rtts, 50.0),
        percentile(&rtts, 99.0),
        rtts.len(),
        out["stats"]["frames"],
        in_window as f64 / ((to - from) / 1000.0),
        in_window,
        (to - from) / 1000.0,
        out["stats"]["bytes"],
    );
}

/// This test's login agents, browsers and provider CLIs still running.
fn sandbox_processes() -> Vec<u32> {
    ["login-agent", "chromium", "python3"]
        .into_iter()
        .flat_map(|name| descendants_named(std::process::id(), name))
        .collect()
}

/// Processes under `root` (this test's own sandboxes only: other tests' are not ours to kill)
/// whose command name is `name`.
fn descendants_named(root: u32, name: &str) -> Vec<u32> {
    let mut parent = BTreeMap::new();
    let mut comm = BTreeMap::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // `pid (comm) state ppid …`: the name may hold spaces, so split at the last ')'.
        let Some((head, tail)) = stat.rsplit_once(')') else {
            continue;
        };
        let ppid = tail
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<u32>().ok());
        if let (Some(ppid), Some((_, c))) = (ppid, head.split_once('(')) {
            parent.insert(pid, ppid);
            comm.insert(pid, c.to_string());
        }
    }
    let under_root = |mut pid: u32| {
        while let Some(&p) = parent.get(&pid) {
            if p == root {
                return true;
            }
            pid = p;
        }
        false
    };
    comm.iter()
        .filter(|(pid, c)| c.as_str() == name && under_root(**pid))
        .map(|(pid, _)| *pid)
        .collect()
}

#[tokio::test]
async fn login_e2e_an_agent_killed_mid_session_fails_the_session_with_a_reason() {
    let site = MockLoginSite::start(SITE_EMAIL, "unused").await;
    // The heartbeat timeout stays above the agent's 5 s period: the session fails because the
    // sandbox ended with its agent (or, failing that, because the heartbeats stopped).
    let stack = stack(&site, |_| {}).await;
    let (email, password) = ("login-crash@example.com", "the user's own password");
    let _ = user(&stack, email, password).await;
    // The viewer connects (frames drawn), then waits for the session to end; meanwhile the
    // agent is killed.
    let pool = stack.db.pool.clone();
    let killer = tokio::spawn(async move {
        for _ in 0..600 {
            let connected: Option<Uuid> = sqlx::query_scalar(
                "SELECT session_id FROM auth_sessions WHERE signaling_completed_at IS NOT NULL",
            )
            .fetch_optional(&pool)
            .await
            .unwrap();
            if connected.is_some() {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let agents = descendants_named(std::process::id(), "login-agent");
                for pid in &agents {
                    let _ = std::process::Command::new("kill")
                        .args(["-KILL", &pid.to_string()])
                        .status();
                }
                let killed = !agents.is_empty();
                return killed;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        false
    });
    let out = viewer(
        &stack,
        [email, password, "anthropic", SITE_EMAIL, "x"],
        "connect",
    )
    .await;
    assert!(
        killer.await.unwrap(),
        "the agent was found and killed: {out:#}"
    );
    assert!(out.get("error").is_none(), "{out:#}");
    assert_eq!(out["final"]["status"], "failed", "{out:#}");
    let reason = out["final"]["error"].as_str().unwrap_or_default();
    assert!(!reason.is_empty(), "{out:#}");
    let session: Uuid = out["session"].as_str().unwrap().parse().unwrap();
    let (status, message): (String, Option<String>) =
        sqlx::query_as("SELECT status, error_message FROM auth_sessions WHERE session_id = $1")
            .bind(session)
            .fetch_one(&stack.db.pool)
            .await
            .unwrap();
    assert_eq!(status, "failed");
    assert_eq!(message.as_deref(), Some(reason));
    // The sandbox went with its agent: no browser, no CLI left.
    assert!(
        crate::common::eventually(|| async { sandbox_processes().is_empty() }).await,
        "left behind: {:?}",
        sandbox_processes()
    );
    println!("agent killed mid-session: failed with {reason:?}");
}
