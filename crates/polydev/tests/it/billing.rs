//! Billing under failure: partial answers, a database that goes away mid-call or stays down.
//! The outage tests run against a cluster of their own ([`OwnedCluster`]), never the shared one.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::json;

use polydev::accounts::{self, Plan};
use polydev::app::AppState;
use polydev::db::{Database, DbConfig};

use crate::common::{OwnedCluster, TestDb, eventually, mock_gateway, mock_gateway_with};
use crate::http_api::{TestServer, user_with_token};
use crate::perspectives::ledger;

/// A streaming model whose words arrive 300 ms apart.
const TRICKLE: &str = "[[models]]\nid = \"trickle-premium\"\nprovider = \"openai\"\ntier = \"premium\"\ninput_price = \"2.50\"\noutput_price = \"10\"\ncontext_window = 128000\nupstream = \"trickle~trickle300\"\n\n";

#[tokio::test]
async fn streamed_text_that_reached_the_client_is_charged_when_the_client_leaves() {
    let db = TestDb::migrated().await;
    let mock = polydev_mock::MockUpstream::start().await;
    let (user_id, token) = user_with_token(&db, "partial@example.com", Plan::Pro).await;
    let server = TestServer::start_with(&db, mock_gateway_with(&mock.base_url(), TRICKLE)).await;
    let mut response = server
        .with_token(
            server
                .client
                .post(format!("{}/v1/perspectives", server.base)),
            Some(&token),
        )
        .header("accept", "text/event-stream")
        .json(&json!({
            "prompt": "a question with a long enough answer to stream",
            "models": ["trickle-premium", "slow-premium"]
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    // Read until the first text delta of the trickling model has arrived, then leave.
    let mut seen = String::new();
    let delivered = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(chunk) = response.chunk().await.unwrap() {
            seen.push_str(&String::from_utf8_lossy(&chunk));
            if seen.contains("event: delta") && seen.contains("trickle-premium") {
                return true;
            }
        }
        false
    })
    .await
    .expect("a delta within the bound");
    assert!(delivered, "{seen}");
    drop(response);

    let partial_rows = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM perspective_usage
              WHERE user_id = $1 AND model_name = 'trickle-premium'
                AND (response_metadata->>'partial')::boolean",
        )
        .bind(user_id)
        .fetch_one(&db.pool)
        .await
        .unwrap()
    };
    assert!(eventually(|| async { partial_rows().await == 1 }).await);
    // slow-premium had delivered nothing: refunded. trickle-premium and the message: charged.
    let balanced = || async {
        let (counters, usage) = ledger(&db.pool, user_id).await;
        counters == usage && counters == (1, 1, 0, 0)
    };
    assert!(eventually(balanced).await);
    let (counters, usage) = ledger(&db.pool, user_id).await;
    assert_eq!((counters, usage), ((1, 1, 0, 0), (1, 1, 0, 0)));
    let output: i32 =
        sqlx::query_scalar("SELECT output_tokens FROM perspective_usage WHERE user_id = $1")
            .bind(user_id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(output >= 1, "the delivered text is paid for");
}

async fn open(cluster: &OwnedCluster) -> Database {
    Database::open(&DbConfig {
        database_url: Some(cluster.url()),
        data_dir: std::env::temp_dir(),
        pg_bin_dir: None,
        max_connections: 5,
    })
    .await
    .expect("open the database")
}

#[tokio::test]
async fn while_the_database_is_down_requests_fail_fast_with_503_and_recover_without_restart() {
    let mut cluster = OwnedCluster::start().await;
    let db = open(&cluster).await;
    let user = accounts::create_user(&db.pool, "down@example.com", Plan::Free)
        .await
        .unwrap();
    let token = accounts::create_token(&db.pool, user.user_id, "t", None)
        .await
        .unwrap()
        .token;
    let catalogue = polydev::perspectives::Catalogue::load(None).unwrap();
    let state = AppState::new(
        db.pool.clone(),
        polydev::perspectives::Gateway::new(catalogue),
    )
    .with_relaxed_pool(db.relaxed_pool.clone());
    let server = TestServer::start_state(state).await;
    let me = || server.get("/v1/me", Some(&token)).send();
    assert_eq!(me().await.unwrap().status(), StatusCode::OK);

    // Down (connections refused), then hung (connections accepted, nothing answers): either
    // way every request answers 503 at once, not after the old 10 s acquire timeout.
    for outage in ["crashed", "frozen"] {
        match outage {
            "crashed" => cluster.crash().await,
            _ => cluster.freeze(),
        }
        for path in ["/v1/me", "/readyz"] {
            for _ in 0..2 {
                let started = Instant::now();
                let response = server.get(path, Some(&token)).send().await.unwrap();
                let elapsed = started.elapsed();
                assert_eq!(
                    response.status(),
                    StatusCode::SERVICE_UNAVAILABLE,
                    "{outage}: {path}"
                );
                // A guard against the old 10 s acquire timeout, not a performance assertion.
                assert!(
                    elapsed < Duration::from_secs(5),
                    "{outage}: {path} took {elapsed:?}"
                );
            }
        }
        let body: serde_json::Value = me().await.unwrap().json().await.unwrap();
        assert_eq!(body["error"]["code"], "database_unavailable");
        match outage {
            "crashed" => cluster.restart().await,
            _ => cluster.thaw(),
        }
        assert!(
            eventually(|| async { me().await.unwrap().status() == StatusCode::OK }).await,
            "{outage}: requests succeed again once the database is back, without a restart"
        );
        assert_eq!(
            server.get("/readyz", None).send().await.unwrap().status(),
            StatusCode::OK
        );
    }
}

#[tokio::test]
async fn after_the_database_dies_mid_call_one_sweep_brings_the_counters_back_to_the_ledger() {
    let mut cluster = OwnedCluster::start().await;
    let db = open(&cluster).await;
    let mock = polydev_mock::MockUpstream::start().await;
    let mut users = Vec::new();
    for i in 0..3 {
        let user = accounts::create_user(&db.pool, &format!("crash{i}@example.com"), Plan::Pro)
            .await
            .unwrap();
        let token = accounts::create_token(&db.pool, user.user_id, "t", None)
            .await
            .unwrap()
            .token;
        users.push((user.user_id, token));
    }
    let state = AppState::new(db.pool.clone(), mock_gateway(&mock.base_url()))
        .with_relaxed_pool(db.relaxed_pool.clone());
    let server = TestServer::start_state(state).await;
    // Each call: one fast answer (charged), one slow model still in flight at the crash.
    let calls: Vec<_> = users
        .iter()
        .map(|(_, token)| {
            server
                .with_token(
                    server
                        .client
                        .post(format!("{}/v1/perspectives", server.base)),
                    Some(token),
                )
                .json(&json!({
                    "prompt": "crash",
                    "models": ["gpt-premium", "slow-premium"],
                    "deadline_ms": 3000
                }))
                .send()
        })
        .map(tokio::spawn)
        .collect();
    let usage_rows = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM perspective_usage")
            .fetch_one(&db.pool)
            .await
            .unwrap_or(-1)
    };
    assert!(eventually(|| async { usage_rows().await == 3 && mock.stats().started() == 6 }).await);
    cluster.crash().await;
    // The calls end (at their deadline) while the database is gone: their refunds fail.
    for call in calls {
        let _ = tokio::time::timeout(Duration::from_secs(30), call)
            .await
            .expect("the call ended");
    }
    cluster.restart().await;
    let sweep = || polydev::quota::reconcile(&db.pool, Duration::ZERO);
    assert!(eventually(|| async { sweep().await.is_ok() }).await);
    for (user, _) in &users {
        let (counters, usage) = ledger(&db.pool, *user).await;
        assert_eq!(counters, usage, "user {user}");
        assert_eq!(usage, (1, 1, 0, 0));
    }
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM quota_reservations")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(left, 0);
}

/// `polydev serve` SIGKILLed under load: every call answered 200 has its usage row (a response
/// is sent only after its row is committed), and once the dead process's reservations are
/// swept the counters equal the rows.
#[tokio::test]
async fn a_server_killed_under_load_lost_no_usage_row_of_an_answered_call() {
    use std::sync::{Arc, Mutex};

    let db = TestDb::migrated().await;
    let mock = polydev_mock::MockUpstream::start().await;
    // Measure the billing, not the limits: no rate limit or quota stops the load.
    sqlx::query("UPDATE rate_limit_tiers SET requests_per_minute = 1000000")
        .execute(&db.pool)
        .await
        .unwrap();
    let (user_id, token) = user_with_token(&db, "killed@example.com", Plan::Enterprise).await;
    sqlx::query(
        "UPDATE user_perspective_quotas SET premium_perspectives_limit = NULL, normal_perspectives_limit = NULL, messages_per_month = NULL WHERE user_id = $1",
    )
    .bind(user_id)
    .execute(&db.pool)
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models.toml");
    std::fs::write(&models, crate::common::mock_catalogue(&mock.base_url())).unwrap();
    let (mut child, base) = crate::common::spawn_serve(
        tokio::process::Command::new(env!("CARGO_BIN_EXE_polydev"))
            .args(["serve", "--listen", "127.0.0.1:0", "--models"])
            .arg(&models)
            .env("DATABASE_URL", db.url())
            .env("POLYDEV_TEST_MOCK_KEY", "mock-key"),
    )
    .await;

    let answered = Arc::new(Mutex::new(Vec::<String>::new()));
    let client = polydev::net::http_client();
    let workers: Vec<_> = (0..8)
        .map(|i| {
            let (client, base, token, answered) = (
                client.clone(),
                base.clone(),
                token.clone(),
                answered.clone(),
            );
            tokio::spawn(async move {
                let models = if i % 2 == 0 {
                    json!(["gpt-premium"])
                } else {
                    json!(["gpt-premium", "claude-normal"])
                };
                loop {
                    let response = client
                        .post(format!("{base}/v1/perspectives"))
                        .bearer_auth(&token)
                        .json(&json!({ "prompt": "count me", "models": models }))
                        .send()
                        .await;
                    let Ok(response) = response else { return };
                    if response.status() != StatusCode::OK {
                        return;
                    }
                    let Ok(body) = response.json::<serde_json::Value>().await else {
                        return;
                    };
                    let id = body["request_id"].as_str().unwrap().to_string();
                    answered.lock().unwrap().push(id);
                }
            })
        })
        .collect();
    // Kill it mid-load (once calls are flowing), not at a quiet moment.
    assert!(
        eventually(|| async { answered.lock().unwrap().len() >= 40 }).await,
        "the load is running"
    );
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    for worker in workers {
        worker.await.unwrap();
    }
    let answered = answered.lock().unwrap().clone();
    let recorded: Vec<String> =
        sqlx::query_scalar("SELECT DISTINCT session_id FROM perspective_usage WHERE user_id = $1")
            .bind(user_id)
            .fetch_all(&db.pool)
            .await
            .unwrap();
    let missing: Vec<&String> = answered
        .iter()
        .filter(|id| !recorded.contains(id))
        .collect();
    assert!(
        missing.is_empty(),
        "answered without a usage row: {missing:?}"
    );
    // The killed calls' reservations are the sweeper's: swept, counters equal rows.
    polydev::quota::reconcile(&db.pool, Duration::ZERO)
        .await
        .unwrap();
    let (counters, usage) = ledger(&db.pool, user_id).await;
    assert_eq!(counters, usage);
}
