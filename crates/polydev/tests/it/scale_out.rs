//! Two `polydev serve` replicas on one database under concurrent load (docs/operations.md,
//! "Running several replicas"): the same users' calls alternate between them, and the quotas
//! hold exactly (never overspent; counters equal the usage rows), an idempotency key is
//! honoured across replicas, and the replicas' metrics add up to the calls made.

use futures_util::future::join_all;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::process::{Child, Command};

use polydev::accounts::{self, Plan};

use crate::common::{TestDb, mock_catalogue};

const BIN: &str = env!("CARGO_BIN_EXE_polydev");
const USERS: usize = 4;
const PREMIUM_LIMIT: i32 = 6;
const CALLS_PER_USER: usize = 10;

/// Starts a replica on a free port; returns it with its base URL.
async fn replica(db: &TestDb, models: &std::path::Path) -> (Child, String) {
    crate::common::spawn_serve(
        Command::new(BIN)
            .env("DATABASE_URL", db.url())
            .env("RUST_LOG", "warn")
            .env("POLYDEV_TEST_MOCK_KEY", "mock-key")
            .env("POLYDEV_MODELS", models)
            .args(["serve", "--listen", "127.0.0.1:0"]),
    )
    .await
}

/// The `_count` of the request histogram for `POST /v1/perspectives` with `status`.
async fn perspectives_count(client: &reqwest::Client, base: &str, status: &str) -> f64 {
    let status = format!(r#"status="{status}""#);
    crate::common::metric_sum(
        client,
        base,
        "polydev_http_request_duration_seconds_count",
        &[r#"route="/v1/perspectives""#, &status],
    )
    .await
}

#[tokio::test]
async fn two_replicas_on_one_database_keep_quotas_exact_under_concurrent_load() {
    let db = TestDb::migrated().await;
    let mock = polydev_mock::MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models.toml");
    std::fs::write(&models, mock_catalogue(&mock.base_url())).unwrap();
    let mut users = Vec::new();
    for i in 0..USERS {
        let user = accounts::create_user(&db.pool, &format!("replica{i}@example.com"), Plan::Pro)
            .await
            .unwrap();
        let token = accounts::create_token(&db.pool, user.user_id, "t", None)
            .await
            .unwrap()
            .token;
        users.push((user.user_id, token));
    }
    sqlx::query("UPDATE user_perspective_quotas SET premium_perspectives_limit = $1")
        .bind(PREMIUM_LIMIT)
        .execute(&db.pool)
        .await
        .unwrap();
    let (_a, base_a) = replica(&db, &models).await;
    let (_b, base_b) = replica(&db, &models).await;
    let bases = [base_a.as_str(), base_b.as_str()];
    let client = polydev::net::http_client();

    // Every user's calls alternate between the replicas, all at once: more calls than the
    // premium limit allows.
    let calls = users.iter().flat_map(|(user, token)| {
        (0..CALLS_PER_USER).map(move |n| (*user, token.clone(), bases[n % 2]))
    });
    let results = join_all(calls.map(|(user, token, base)| {
        let client = client.clone();
        async move {
            let response = client
                .post(format!("{base}/v1/perspectives"))
                .bearer_auth(&token)
                .json(&json!({"prompt": "scale", "models": ["gpt-premium"]}))
                .send()
                .await
                .unwrap();
            (user, response.status())
        }
    }))
    .await;
    for (user, _) in &users {
        let answered = results
            .iter()
            .filter(|(u, s)| u == user && *s == StatusCode::OK)
            .count();
        let refused = results
            .iter()
            .filter(|(u, s)| u == user && *s == StatusCode::PAYMENT_REQUIRED)
            .count();
        assert_eq!(
            answered, PREMIUM_LIMIT as usize,
            "user {user}: exactly the limit"
        );
        assert_eq!(
            refused,
            CALLS_PER_USER - PREMIUM_LIMIT as usize,
            "user {user}"
        );
        let (counters, usage) = crate::perspectives::ledger(&db.pool, *user).await;
        assert_eq!(
            counters, usage,
            "user {user}: counters equal the usage rows"
        );
        assert_eq!(usage, (PREMIUM_LIMIT, PREMIUM_LIMIT, 0, 0), "user {user}");
    }
    let in_flight: i64 = sqlx::query_scalar("SELECT count(*) FROM quota_reservations")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(in_flight, 0, "every reservation settled or refunded");

    // One idempotency key sent to both replicas at once: one call is charged, and whoever
    // answers gives the same result.
    let (user, token) = &users[0];
    sqlx::query("UPDATE user_perspective_quotas SET premium_perspectives_limit = NULL")
        .execute(&db.pool)
        .await
        .unwrap();
    let body = json!({"prompt": "once", "models": ["fast-premium"], "idempotency_key": "across"});
    let both = join_all(bases.iter().map(|base| {
        client
            .post(format!("{base}/v1/perspectives"))
            .bearer_auth(token)
            .json(&body)
            .send()
    }))
    .await;
    let mut request_ids = Vec::new();
    for response in both {
        let response = response.unwrap();
        match response.status() {
            StatusCode::OK => {
                let result: Value = response.json().await.unwrap();
                request_ids.push(result["request_id"].as_str().unwrap().to_string());
            }
            // The other replica's call was still running when this one stopped waiting.
            StatusCode::CONFLICT => {}
            other => panic!("unexpected {other}"),
        }
    }
    assert!(!request_ids.is_empty());
    assert!(request_ids.iter().all(|id| *id == request_ids[0]));
    let (counters, usage) = crate::perspectives::ledger(&db.pool, *user).await;
    assert_eq!(counters, usage);
    assert_eq!(
        usage,
        (PREMIUM_LIMIT + 1, PREMIUM_LIMIT + 1, 0, 0),
        "charged once"
    );

    // Each replica counts its own requests; together they are every call made.
    let mut ok = 0.0;
    let mut refused = 0.0;
    for base in bases {
        let served = perspectives_count(&client, base, "200").await;
        assert!(served > 0.0, "{base} served calls");
        ok += served;
        refused += perspectives_count(&client, base, "402").await;
    }
    assert_eq!(
        ok,
        (USERS * PREMIUM_LIMIT as usize + request_ids.len()) as f64
    );
    assert_eq!(
        refused,
        (USERS * (CALLS_PER_USER - PREMIUM_LIMIT as usize)) as f64
    );
}
