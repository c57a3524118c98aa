//! Login sessions across `polydev serve` processes: signalling posted on one process reaches a
//! peer streaming from another (PostgreSQL LISTEN/NOTIFY, large messages through the table),
//! and a server SIGKILLed mid-session leaves nothing behind once it is restarted.

use std::path::Path;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::process::{Child, Command};
use uuid::Uuid;

use crate::common::TestDb;
use crate::http_api::user_with_token;
use crate::login::Sse;
use crate::runtime_jobs::eventually_long;

const BIN: &str = env!("CARGO_BIN_EXE_polydev");
/// Starts `polydev serve` on `db` with `args`, and returns it with its base URL.
async fn serve(db: &TestDb, args: &[&str], tmp: Option<&Path>) -> (Child, String) {
    let mut command = Command::new(BIN);
    command
        .env("DATABASE_URL", db.url())
        .env("RUST_LOG", "warn")
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(args);
    if let Some(tmp) = tmp {
        command.env("TMPDIR", tmp);
    }
    crate::common::spawn_serve(&mut command).await
}

/// A live session of `user` in the table, with a known agent secret (the relay is what is
/// tested here; starting sandboxes is tested in login.rs).
async fn session_row(db: &TestDb, user: Uuid) -> (Uuid, String) {
    let id = Uuid::new_v4();
    let secret = crate::common::random_hex(32);
    let hash = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(secret.as_bytes()));
    sqlx::query(
        "INSERT INTO auth_sessions (session_id, user_id, provider, status, retry_count, started_at,
                                    timeout_at, agent_secret_hash)
         VALUES ($1, $2, 'openai', 'pending', 0, NOW(), NOW() + interval '10 minutes', $3)",
    )
    .bind(id)
    .bind(user)
    .bind(hash)
    .execute(&db.pool)
    .await
    .unwrap();
    (id, secret)
}

async fn post(client: &reqwest::Client, url: &str, bearer: &str, body: &Value) -> StatusCode {
    client
        .post(url)
        .bearer_auth(bearer)
        .json(body)
        .send()
        .await
        .unwrap()
        .status()
}

#[tokio::test]
async fn signalling_is_relayed_between_two_serve_processes_large_messages_included() {
    let db = TestDb::migrated().await;
    let (user, token) = user_with_token(
        &db,
        "login-replicas@example.com",
        polydev::accounts::Plan::Pro,
    )
    .await;
    let (_a, a) = serve(&db, &["--runtime", "off"], None).await;
    let (_b, b) = serve(&db, &["--runtime", "off"], None).await;
    let client = polydev::net::http_client();
    let (id, secret) = session_row(&db, user).await;

    // The browser streams from A, the agent from B.
    let mut browser = Sse::open(
        &client,
        &format!("{a}/v1/login/sessions/{id}/signal"),
        &token,
    )
    .await;
    let mut agent = Sse::open(&client, &format!("{b}/v1/login/agent/{id}/signal"), &secret).await;
    assert_eq!(browser.status().await["status"], "pending");
    assert_eq!(agent.status().await["status"], "pending");

    // A small offer posted on A reaches B (in the notification itself).
    let offer = json!({"type": "offer", "sdp": "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\n"});
    let url = format!("{a}/v1/login/sessions/{id}/signal");
    assert_eq!(
        post(&client, &url, &token, &offer).await,
        StatusCode::ACCEPTED
    );
    let got = agent.signal().await;
    assert_eq!(
        (got["type"].as_str(), got["sdp"].as_str()),
        (Some("offer"), offer["sdp"].as_str())
    );

    // An answer far above NOTIFY's 8000 bytes, posted on B, reaches A through the table; then
    // candidates, all of them, in order.
    let big = format!("v=0\r\n{}", "a=x-padding:0123456789abcdef\r\n".repeat(800));
    assert!(big.len() > 20_000);
    let url = format!("{b}/v1/login/agent/{id}/signal");
    let answer = json!({"type": "answer", "sdp": big});
    assert_eq!(
        post(&client, &url, &secret, &answer).await,
        StatusCode::ACCEPTED
    );
    for n in 0..50 {
        let candidate = json!({"type": "candidate", "candidate": {
            "candidate": format!("candidate:{n} 1 udp 1 127.0.0.1 {} typ host", 50000 + n),
            "sdpMid": "0", "sdpMLineIndex": 0}});
        assert_eq!(
            post(&client, &url, &secret, &candidate).await,
            StatusCode::ACCEPTED
        );
    }
    let got = browser.signal().await;
    assert_eq!(got["type"], "answer");
    assert_eq!(got["sdp"].as_str().unwrap().len(), big.len());
    let mut last = got["seq"].as_i64().unwrap();
    for n in 0..50 {
        let got = browser.signal().await;
        assert_eq!(got["type"], "candidate");
        assert!(
            got["candidate"]["candidate"]
                .as_str()
                .unwrap()
                .starts_with(&format!("candidate:{n} ")),
            "{got}"
        );
        let seq = got["seq"].as_i64().unwrap();
        assert!(seq > last);
        last = seq;
    }

    // Cancelled on A: the agent's stream on B hears it and ends.
    let cancel = format!("{a}/v1/login/sessions/{id}/cancel");
    assert_eq!(
        post(&client, &cancel, &token, &json!({})).await,
        StatusCode::OK
    );
    assert_eq!(agent.status().await["status"], "failed");
    assert!(agent.next().await.is_none());
}

/// Processes (of any user) whose environment names login session `id`.
fn sandbox_processes(id: &str) -> Vec<u32> {
    let needle = format!("POLYDEV_LOGIN_SESSION_ID={id}");
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if let Ok(environ) = std::fs::read(entry.path().join("environ"))
            && environ
                .split(|b| *b == 0)
                .any(|var| var == needle.as_bytes())
        {
            found.push(pid);
        }
    }
    found
}

#[tokio::test]
async fn after_a_server_sigkill_the_restarted_server_fails_the_session_and_nothing_is_left() {
    let db = TestDb::migrated().await;
    let dir = tempfile::tempdir().unwrap();
    let tmp = dir.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let agent = crate::login::fake_agent(dir.path(), "ok");
    let agent = agent.to_str().unwrap();
    let args = [
        "--runtime",
        "local",
        "--login-agent-bin",
        agent,
        "--login-sweep-interval",
        "0.2",
    ];
    let (_, token) = user_with_token(
        &db,
        "login-sigkill@example.com",
        polydev::accounts::Plan::Pro,
    )
    .await;
    let (mut first, base) = serve(&db, &args, Some(&tmp)).await;
    let client = polydev::net::http_client();
    let response = client
        .post(format!("{base}/v1/login/sessions"))
        .bearer_auth(&token)
        .json(&json!({"provider": "google"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let session: Value = response.json().await.unwrap();
    let id = session["id"].as_str().unwrap().to_string();
    let status = |base: String| {
        let (client, token, id) = (client.clone(), token.clone(), id.clone());
        async move {
            client
                .get(format!("{base}/v1/login/sessions/{id}"))
                .bearer_auth(&token)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    };
    assert!(
        eventually_long(|| async { status(base.clone()).await["status"] == "authenticating" })
            .await
    );
    let pid = first.id().unwrap();
    let sandboxes = tmp.join(format!("polydev-sandboxes-{}", nix::unistd::geteuid()));
    let own_dir = sandboxes.join(pid.to_string());
    assert!(
        own_dir.read_dir().unwrap().next().is_some(),
        "a sandbox directory"
    );
    assert!(!sandbox_processes(&id).is_empty(), "the sandbox runs");

    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    first.wait().await.unwrap();
    // The sandbox dies with its server (`--die-with-parent`).
    assert!(eventually_long(|| async { sandbox_processes(&id).is_empty() }).await);

    // The restarted server fails the session, takes the dead process's cleanup task and
    // removes what it left on disk.
    let (_second, base) = serve(&db, &args, Some(&tmp)).await;
    assert!(eventually_long(|| async { status(base.clone()).await["status"] == "failed" }).await);
    let failed = status(base.clone()).await;
    assert_eq!(
        failed["error_message"],
        "the polydev process running the login sandbox ended"
    );
    let pool = db.pool.clone();
    let cleaned = eventually_long(|| {
        let pool = pool.clone();
        async move {
            let (tasks, open): (i64, i64) = sqlx::query_as(
                "SELECT COUNT(*), COUNT(*) FILTER (WHERE status <> 'completed') FROM vm_cleanup_tasks",
            )
            .fetch_one(&pool)
            .await
            .unwrap();
            tasks == 1 && open == 0
        }
    })
    .await;
    assert!(cleaned, "the cleanup task completed");
    let vm: (String, bool) =
        sqlx::query_as("SELECT status, destroyed_at IS NOT NULL FROM vms WHERE session_id = $1")
            .bind(Uuid::parse_str(&id).unwrap())
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(vm, ("destroyed".to_string(), true));
    assert!(!own_dir.exists(), "{} is left", own_dir.display());
    assert!(sandbox_processes(&id).is_empty());
}
