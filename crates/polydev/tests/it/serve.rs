//! The real `polydev` binary: `serve` on the embedded default, the CLI, graceful shutdown.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use reqwest::StatusCode;
use serde_json::Value;
use tokio::process::{Child, Command};

use crate::common::{TestDb, eventually};

const BIN: &str = env!("CARGO_BIN_EXE_polydev");
/// Upper bound for start-up (first start runs initdb); a guard against hangs, not a timing test.
const START_BOUND: Duration = Duration::from_secs(120);

fn polydev(data_dir: &Path) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env_remove("DATABASE_URL")
        .env("RUST_LOG", "info")
        .arg("--data-dir")
        .arg(data_dir)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// Runs a CLI command to completion and returns its stdout (it must succeed).
async fn cli(mut cmd: Command, args: &[&str]) -> String {
    let out = cmd.args(args).output().await.expect("run polydev");
    assert!(
        out.status.success(),
        "polydev {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Starts `polydev serve` on a free port and returns it with its base URL.
async fn serve(mut cmd: Command) -> (Child, String) {
    crate::common::spawn_serve(cmd.args(["serve", "--listen", "127.0.0.1:0"])).await
}

async fn terminate(mut child: Child) -> std::process::ExitStatus {
    kill(Pid::from_raw(child.id().unwrap() as i32), Signal::SIGTERM).unwrap();
    tokio::time::timeout(START_BOUND, child.wait())
        .await
        .expect("polydev did not exit after SIGTERM")
        .unwrap()
}

/// `GET /v1/me` with `token`, as JSON.
async fn get_me(client: &reqwest::Client, base: &str, token: &str) -> Value {
    client
        .get(format!("{base}/v1/me"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn data_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    // Root runs the cluster as `postgres`, which must be able to traverse into it.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

#[tokio::test]
async fn serve_on_the_embedded_default_end_to_end() {
    let dir = data_dir();
    let data = dir.path().join("data");
    let client = polydev::net::http_client();

    let (server, base) = serve(polydev(&data)).await;
    assert_eq!(
        client
            .get(format!("{base}/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );

    let user_id = cli(
        polydev(&data),
        &[
            "user",
            "create",
            "--email",
            "e2e@example.com",
            "--tier",
            "plus",
        ],
    )
    .await;
    let token = cli(
        polydev(&data),
        &[
            "token",
            "create",
            "--email",
            "e2e@example.com",
            "--name",
            "e2e",
        ],
    )
    .await;
    assert!(token.starts_with("pd_"), "{token}");

    let me: Value = get_me(&client, &base, &token).await;
    assert_eq!(me["user"]["user_id"], user_id.as_str());
    assert_eq!(me["tier"], "plus");
    assert_eq!(me["quota"]["premium"]["limit"], 400);

    let list = cli(
        polydev(&data),
        &["token", "list", "--email", "e2e@example.com"],
    )
    .await;
    let token_id = list
        .lines()
        .nth(1)
        .and_then(|l| l.split_whitespace().next())
        .expect("a listed token")
        .to_string();
    assert!(list.contains(&token[token.len() - 4..]), "{list}");
    // `token create` makes mcp tokens unless told otherwise; `token list` shows the scope.
    assert_eq!(me["token"]["scope"], "mcp");
    assert!(list.lines().next().unwrap().contains("SCOPE"), "{list}");
    let account = cli(
        polydev(&data),
        &[
            "token",
            "create",
            "--email",
            "e2e@example.com",
            "--name",
            "admin",
            "--scope",
            "account",
        ],
    )
    .await;
    let tokens_of = |token: String| {
        let client = client.clone();
        let url = format!("{base}/v1/tokens");
        async move { client.get(url).bearer_auth(token).send().await.unwrap() }
    };
    assert_eq!(
        tokens_of(token.clone()).await.status(),
        StatusCode::FORBIDDEN
    );
    assert_eq!(tokens_of(account.clone()).await.status(), StatusCode::OK);
    let list = cli(
        polydev(&data),
        &["token", "list", "--email", "e2e@example.com"],
    )
    .await;
    let scopes: Vec<&str> = list
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().nth(3).unwrap())
        .collect();
    assert_eq!(scopes, ["mcp", "account"], "{list}");
    cli(polydev(&data), &["token", "revoke", &token_id]).await;
    let revoked = client
        .get(format!("{base}/v1/me"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        revoked.json::<Value>().await.unwrap()["error"]["code"],
        "token_revoked"
    );

    let status = terminate(server).await;
    assert!(status.success(), "serve exits 0 on SIGTERM: {status}");
    assert!(
        !data.join("postgres/postmaster.pid").exists(),
        "the cluster was stopped"
    );

    // Start again: the data is still there.
    let (server, base) = serve(polydev(&data)).await;
    let second = cli(
        polydev(&data),
        &[
            "token",
            "create",
            "--email",
            "e2e@example.com",
            "--name",
            "again",
        ],
    )
    .await;
    let me: Value = get_me(&client, &base, &second).await;
    assert_eq!(me["user"]["user_id"], user_id.as_str());
    assert!(terminate(server).await.success());
}

#[tokio::test]
async fn in_flight_requests_finish_before_the_process_exits() {
    let db = TestDb::migrated().await;
    let user = polydev::accounts::create_user(
        &db.pool,
        "drain@example.com",
        polydev::accounts::Plan::Free,
    )
    .await
    .unwrap();
    let token = polydev::accounts::create_token(&db.pool, user.user_id, "t", None)
        .await
        .unwrap()
        .token;
    let dir = data_dir();
    let mut cmd = polydev(dir.path());
    cmd.env("DATABASE_URL", db.url());
    let (server, base) = serve(cmd).await;

    // Hold a lock that /v1/me needs, so the request is provably in flight when SIGTERM arrives.
    let mut locker = db.connect().await;
    sqlx::query("BEGIN").execute(&mut locker).await.unwrap();
    sqlx::query("LOCK TABLE profiles IN ACCESS EXCLUSIVE MODE")
        .execute(&mut locker)
        .await
        .unwrap();
    let request = tokio::spawn(
        polydev::net::http_client()
            .get(format!("{base}/v1/me"))
            .bearer_auth(&token)
            .send(),
    );
    let waiting = eventually(|| async {
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%FROM profiles%')")
            .fetch_one(&db.pool)
            .await
            .unwrap()
    })
    .await;
    assert!(waiting, "the request reached the database");

    let pid = Pid::from_raw(server.id().unwrap() as i32);
    kill(pid, Signal::SIGTERM).unwrap();
    // The server keeps running while the request is in flight; then the request completes.
    tokio::time::sleep(Duration::from_millis(200)).await;
    sqlx::query("ROLLBACK").execute(&mut locker).await.unwrap();
    let response = request
        .await
        .unwrap()
        .expect("the in-flight request got its response");
    assert_eq!(response.status(), StatusCode::OK);
    let mut server = server;
    let status = tokio::time::timeout(START_BOUND, server.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");
}

#[tokio::test]
async fn migrate_dry_run_prints_the_plan_and_changes_nothing() {
    let db = TestDb::empty().await;
    let dir = data_dir();
    let mut cmd = polydev(dir.path());
    cmd.env("DATABASE_URL", db.url());
    let plan = cli(cmd, &["migrate", "--dry-run"]).await;
    assert!(plan.contains("0001 baseline production schema"), "{plan}");
    assert!(plan.contains("would run"), "{plan}");
    let tables: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(tables, 0);
}

#[tokio::test]
async fn missing_postgres_binaries_explain_what_to_do() {
    let dir = data_dir();
    let out = polydev(dir.path())
        .args(["--pg-bin-dir", "/nonexistent", "serve"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("apt-get install postgresql") && stderr.contains("DATABASE_URL"),
        "{stderr}"
    );
}

async fn ready(client: &reqwest::Client, base: &str) -> bool {
    client
        .get(format!("{base}/readyz"))
        .send()
        .await
        .is_ok_and(|r| r.status() == StatusCode::OK)
}

/// Two `serve`s on one data directory: the first one leaving does not stop the cluster under
/// the second; a cluster that dies is started again; the last one out stops it.
#[tokio::test]
async fn two_servers_share_the_embedded_cluster_and_it_is_restarted_when_it_dies() {
    let dir = data_dir();
    let data = dir.path().join("data");
    let client = polydev::net::http_client();
    let (first, first_base) = serve(polydev(&data)).await;
    let (second, base) = serve(polydev(&data)).await;
    assert!(ready(&client, &first_base).await && ready(&client, &base).await);

    assert!(terminate(first).await.success());
    assert!(
        data.join("postgres/postmaster.pid").exists(),
        "the cluster stays up"
    );
    assert!(
        ready(&client, &base).await,
        "the second server is still ready"
    );
    cli(
        polydev(&data),
        &["user", "create", "--email", "shared@example.com"],
    )
    .await;

    // The postmaster dies (as with an OOM kill): the server starts it again.
    let pid_file = std::fs::read_to_string(data.join("postgres/postmaster.pid")).unwrap();
    let postmaster: i32 = pid_file.lines().next().unwrap().trim().parse().unwrap();
    kill(Pid::from_raw(postmaster), Signal::SIGKILL).unwrap();
    assert!(
        eventually(|| {
            let (client, base) = (client.clone(), base.clone());
            async move {
                !Path::new(&format!("/proc/{postmaster}")).exists() && ready(&client, &base).await
            }
        })
        .await,
        "the cluster came back"
    );
    let users = cli(
        polydev(&data),
        &["user", "create", "--email", "after@example.com"],
    )
    .await;
    assert!(!users.is_empty());

    assert!(terminate(second).await.success());
    assert!(
        !data.join("postgres/postmaster.pid").exists(),
        "the last server out stopped the cluster"
    );
}

/// `--log-format json`: one JSON object per line; the request's last line carries its id,
/// route, user, status and latency.
#[tokio::test]
async fn json_logs_carry_the_request_id_route_user_status_and_latency() {
    let db = TestDb::migrated().await;
    let user =
        polydev::accounts::create_user(&db.pool, "logs@example.com", polydev::accounts::Plan::Free)
            .await
            .unwrap();
    let token = polydev::accounts::create_token(&db.pool, user.user_id, "t", None)
        .await
        .unwrap()
        .token;
    let mut cmd = Command::new(BIN);
    cmd.env("DATABASE_URL", db.url())
        .env_remove("RUST_LOG")
        .args(["--log-format", "json"])
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let (mut server, base) = serve(cmd).await;
    let response = polydev::net::http_client()
        .get(format!("{base}/v1/me"))
        .bearer_auth(&token)
        .header("x-request-id", "req-json-log-1")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    kill(Pid::from_raw(server.id().unwrap() as i32), Signal::SIGTERM).unwrap();
    let mut stderr = String::new();
    tokio::io::AsyncReadExt::read_to_string(server.stderr.as_mut().unwrap(), &mut stderr)
        .await
        .unwrap();
    server.wait().await.unwrap();
    let lines: Vec<Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: not JSON: {l}")))
        .collect();
    let access = lines
        .iter()
        .find(|l| l["span"]["id"] == "req-json-log-1" && l["status"].is_number())
        .unwrap_or_else(|| panic!("no access line in {stderr}"));
    assert_eq!(access["status"], 200, "{access}");
    assert_eq!(access["span"]["route"], "/v1/me", "{access}");
    assert_eq!(access["span"]["user"], user.user_id.to_string(), "{access}");
    assert!(
        access["latency"].is_number() || access["latency"].is_string(),
        "{access}"
    );
}

#[tokio::test]
async fn after_serve_is_killed_mid_call_the_sweeper_brings_the_counters_back_to_the_ledger() {
    let db = TestDb::migrated().await;
    let mock = polydev_mock::MockUpstream::start().await;
    let dir = data_dir();
    let models = dir.path().join("models.toml");
    std::fs::write(&models, crate::common::mock_catalogue(&mock.base_url())).unwrap();
    let mut users = Vec::new();
    for i in 0..3 {
        let user = polydev::accounts::create_user(
            &db.pool,
            &format!("killed{i}@example.com"),
            polydev::accounts::Plan::Pro,
        )
        .await
        .unwrap();
        let token = polydev::accounts::create_token(&db.pool, user.user_id, "t", None)
            .await
            .unwrap()
            .token;
        users.push((user.user_id, token));
    }
    let start = |stale_after: &str| {
        let mut cmd = polydev(dir.path());
        cmd.env("DATABASE_URL", db.url())
            .env("POLYDEV_TEST_MOCK_KEY", "mock-key")
            .env("POLYDEV_MODELS", &models)
            .env("POLYDEV_SWEEP_INTERVAL", "0.2")
            .env("POLYDEV_RESERVATION_STALE_AFTER", stale_after);
        serve(cmd)
    };
    let (server, base) = start("600").await;
    let client = polydev::net::http_client();
    // Each call: one fast answer (charged), one slow model in flight when the process dies.
    let calls: Vec<_> = users
        .iter()
        .map(|(_, token)| {
            tokio::spawn(
                client
                    .post(format!("{base}/v1/perspectives"))
                    .bearer_auth(token)
                    .json(&serde_json::json!({
                        "prompt": "killed",
                        "models": ["gpt-premium", "slow-premium"]
                    }))
                    .send(),
            )
        })
        .collect();
    let usage_rows = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM perspective_usage")
            .fetch_one(&db.pool)
            .await
            .unwrap()
    };
    assert!(eventually(|| async { usage_rows().await == 3 && mock.stats().started() == 6 }).await);
    let mut server = server;
    kill(Pid::from_raw(server.id().unwrap() as i32), Signal::SIGKILL).unwrap();
    server.wait().await.unwrap();
    for call in calls {
        assert!(
            call.await.unwrap().is_err(),
            "the connection died with the process"
        );
    }
    let reserved: i64 = sqlx::query_scalar("SELECT count(*) FROM quota_reservations")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(reserved, 3, "the slow models' units are left reserved");

    // A restart whose sweeper treats anything older than a second as dead.
    let (server, _) = start("1").await;
    let settled = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM quota_reservations")
            .fetch_one(&db.pool)
            .await
            .unwrap()
            == 0
    };
    let mut swept = false;
    for _ in 0..5 {
        if eventually(settled).await {
            swept = true;
            break;
        }
    }
    assert!(swept, "the sweeper refunded the dead calls' units");
    for (user, _) in &users {
        let (counters, usage) = crate::perspectives::ledger(&db.pool, *user).await;
        assert_eq!(counters, usage, "user {user}");
        assert_eq!(usage, (1, 1, 0, 0));
    }
    assert!(terminate(server).await.success());
}
