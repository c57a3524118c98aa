//! `GET /metrics`: the series of docs/operations.md, scraped after real calls, with counts equal
//! to the calls made; the optional bearer token. Counts are compared as differences between two
//! scrapes (the recorder is the process's).

use std::collections::BTreeMap;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;

use polydev::accounts::Plan;
use polydev::app::AppState;
use polydev::runtime::Runtime;

use crate::common::{TestDb, eventually, mock_gateway};
use crate::http_api::{TestServer, user_with_token};
use crate::runtime_pool::{Fake, config};

/// Every sample of a scrape: `name{labels}` (labels sorted) → value.
fn parse(text: &str) -> BTreeMap<String, f64> {
    let mut samples = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, value) = line.rsplit_once(' ').expect("`series value`");
        let key = match series.split_once('{') {
            Some((name, labels)) => {
                let mut labels: Vec<&str> = labels.trim_end_matches('}').split(',').collect();
                labels.sort();
                format!("{name}{{{}}}", labels.join(","))
            }
            None => series.to_string(),
        };
        samples.insert(key, value.parse().expect("a number"));
    }
    samples
}

/// The key of a series in [`parse`]'s map.
fn series(name: &str, labels: &[(&str, &str)]) -> String {
    if labels.is_empty() {
        return name.to_string();
    }
    let mut labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    labels.sort();
    format!("{name}{{{}}}", labels.join(","))
}

async fn scrape(server: &TestServer) -> BTreeMap<String, f64> {
    let response = server.get("/metrics", None).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    parse(&response.text().await.unwrap())
}

/// How much `key` grew from `before` to `after` (absent counts as 0).
fn grew(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>, key: &str) -> f64 {
    after.get(key).copied().unwrap_or(0.0) - before.get(key).copied().unwrap_or(0.0)
}

#[tokio::test]
async fn metrics_count_the_calls_made_by_route_model_and_tier() {
    let db = TestDb::migrated().await;
    let mock = polydev_mock::MockUpstream::start().await;
    let gateway = mock_gateway(&mock.base_url()).with_idempotency_wait(Duration::from_millis(300));
    let server = TestServer::start_with(&db, gateway).await;
    let (_, token) = user_with_token(&db, "metrics@example.com", Plan::Pro).await;
    let (broke, broke_token) = user_with_token(&db, "broke@example.com", Plan::Pro).await;
    sqlx::query(
        "UPDATE user_perspective_quotas SET premium_perspectives_limit = 0 WHERE user_id = $1",
    )
    .bind(broke)
    .execute(&db.pool)
    .await
    .unwrap();
    let before = scrape(&server).await;

    // Three calls: one model answers, one fails upstream (its unit is refunded).
    const CALLS: usize = 3;
    for _ in 0..CALLS {
        let response = server
            .send_json(
                reqwest::Method::POST,
                "/v1/perspectives",
                &token,
                &json!({"prompt": "hi", "models": ["gpt-premium", "broken-premium"]}),
            )
            .await;
        assert_eq!(response.status(), StatusCode::OK);
    }
    // One call refused by the premium limit: the message unit goes back, 402.
    let refused = server
        .send_json(
            reqwest::Method::POST,
            "/v1/perspectives",
            &broke_token,
            &json!({"prompt": "hi", "models": ["gpt-premium"]}),
        )
        .await;
    assert_eq!(refused.status(), StatusCode::PAYMENT_REQUIRED);
    // A second call with the key of a call still running waits, then gets 409 in_progress.
    let body = json!({"prompt": "slow", "models": ["slow-premium"], "idempotency_key": "k1"});
    let started = mock.stats().started();
    let first = server.send_json(reqwest::Method::POST, "/v1/perspectives", &token, &body);
    let second = async {
        assert!(eventually(|| async { mock.stats().started() > started }).await);
        server
            .send_json(reqwest::Method::POST, "/v1/perspectives", &token, &body)
            .await
    };
    let (first, second) = tokio::join!(first, second);
    assert_eq!(first.status(), StatusCode::OK);
    assert_eq!(second.status(), StatusCode::CONFLICT);
    // Routes are counted by template, and paths no route matches under one label.
    let id = uuid::Uuid::new_v4();
    let missing = server
        .get(&format!("/v1/chat/sessions/{id}/messages"), Some(&token))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    let nowhere = server.get("/no/such/path", None).send().await.unwrap();
    assert_eq!(nowhere.status(), StatusCode::NOT_FOUND);

    let after = scrape(&server).await;
    let grew = |name: &str, labels: &[(&str, &str)]| grew(&before, &after, &series(name, labels));
    let requests = "polydev_http_request_duration_seconds_count";
    let route = |route, method, status| [("route", route), ("method", method), ("status", status)];
    assert_eq!(
        grew(requests, &route("/v1/perspectives", "POST", "200")),
        CALLS as f64 + 1.0
    );
    assert_eq!(
        grew(requests, &route("/v1/perspectives", "POST", "402")),
        1.0
    );
    assert_eq!(
        grew(requests, &route("/v1/perspectives", "POST", "409")),
        1.0
    );
    assert_eq!(
        grew(
            requests,
            &route("/v1/chat/sessions/{id}/messages", "GET", "404")
        ),
        1.0
    );
    assert_eq!(grew(requests, &route("unmatched", "GET", "404")), 1.0);
    assert!(
        !after.keys().any(|k| k.contains(&id.to_string())),
        "no raw path is a label"
    );

    let provider = "polydev_provider_request_duration_seconds_count";
    let model = |m, outcome| [("model", m), ("outcome", outcome)];
    assert_eq!(grew(provider, &model("gpt-premium", "ok")), CALLS as f64);
    assert_eq!(
        grew(provider, &model("broken-premium", "upstream")),
        CALLS as f64
    );
    assert_eq!(grew(provider, &model("slow-premium", "ok")), 1.0);
    assert_eq!(
        grew(
            "polydev_provider_errors_total",
            &[("model", "broken-premium"), ("class", "upstream")]
        ),
        CALLS as f64
    );

    let tier = |t| [("tier", t)];
    // Messages: the three calls, the refused call's message, the slow call.
    assert_eq!(
        grew("polydev_quota_reserved_total", &tier("messages")),
        CALLS as f64 + 2.0
    );
    assert_eq!(
        grew("polydev_quota_reserved_total", &tier("premium")),
        2.0 * CALLS as f64 + 1.0
    );
    assert_eq!(
        grew("polydev_quota_refunded_total", &tier("premium")),
        CALLS as f64
    );
    assert_eq!(grew("polydev_quota_refunded_total", &tier("messages")), 1.0);
    assert_eq!(grew("polydev_quota_refusals_total", &tier("premium")), 1.0);
    assert_eq!(
        grew(
            "polydev_idempotency_wait_seconds_count",
            &[("outcome", "in_progress")]
        ),
        1.0
    );

    // Pools are sampled at each scrape: every connection is idle or in use.
    for pool in ["durable", "relaxed"] {
        let idle = after[&series(
            "polydev_db_pool_connections",
            &[("pool", pool), ("state", "idle")],
        )];
        let in_use = after[&series(
            "polydev_db_pool_connections",
            &[("pool", pool), ("state", "in_use")],
        )];
        let max = after[&series("polydev_db_pool_max_connections", &[("pool", pool)])];
        assert!(idle + in_use >= 1.0 && idle + in_use <= max, "{pool}");
    }

    // The books agree with what the metrics say was kept.
    let (counters, usage) = crate::perspectives::ledger(&db.pool, broke).await;
    assert_eq!(counters, usage);
    assert_eq!(usage, (0, 0, 0, 0));
}

#[tokio::test]
async fn metrics_sample_runtime_containers_by_provider_and_state() {
    let db = TestDb::migrated().await;
    let fake = Fake::new();
    let runtime = Runtime::new(db.pool.clone(), fake.clone(), config("anthropic", 2));
    // Starts the two warm containers (`warming` until their agents register).
    runtime.reconcile().await.unwrap().expect("lock free");
    let catalogue = polydev::perspectives::Catalogue::load(None).unwrap();
    let state = AppState::new(
        db.pool.clone(),
        polydev::perspectives::Gateway::new(catalogue),
    )
    .with_runtime(Some(runtime));
    let server = TestServer::start_state(state).await;
    let samples = scrape(&server).await;
    let containers = |provider, state| {
        samples[&series(
            "polydev_runtime_containers",
            &[("provider", provider), ("state", state)],
        )]
    };
    assert_eq!(containers("anthropic", "warming"), 2.0);
    assert_eq!(containers("anthropic", "ready"), 0.0);
    assert_eq!(containers("openai", "warming"), 0.0);
}

#[tokio::test]
async fn metrics_token_is_required_when_set() {
    let db = TestDb::migrated().await;
    let catalogue = polydev::perspectives::Catalogue::load(None).unwrap();
    let state = AppState::new(
        db.pool.clone(),
        polydev::perspectives::Gateway::new(catalogue),
    )
    .with_metrics_token(Some("s3cret-metrics".into()));
    let server = TestServer::start_state(state).await;
    let missing = server.get("/metrics", None).send().await.unwrap();
    assert_eq!(missing.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        missing.headers()["www-authenticate"],
        r#"Bearer realm="polydev""#
    );
    for wrong in ["s3cret-metricz", "s3cret", "s3cret-metrics-and-more", ""] {
        let response = server.get("/metrics", Some(wrong)).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{wrong:?}");
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "token_unknown");
    }
    // A user's API token is not the metrics token.
    let (_, token) = user_with_token(&db, "not-metrics@example.com", Plan::Pro).await;
    let response = server.get("/metrics", Some(&token)).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let response = server
        .get("/metrics", Some("s3cret-metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        response
            .text()
            .await
            .unwrap()
            .contains("polydev_http_request_duration_seconds")
    );
}

#[tokio::test]
async fn metrics_count_a_timed_out_request_under_its_route() {
    let db = TestDb::migrated().await;
    let mock = polydev_mock::MockUpstream::start().await;
    let state = AppState::new(db.pool.clone(), mock_gateway(&mock.base_url()))
        .with_request_timeout(Duration::from_millis(300));
    let server = TestServer::start_state(state).await;
    let (_, token) = user_with_token(&db, "timeout@example.com", Plan::Pro).await;
    let before = scrape(&server).await;
    let response = server
        .send_json(
            reqwest::Method::POST,
            "/v1/perspectives",
            &token,
            &json!({"prompt": "slow", "models": ["slow-premium"]}),
        )
        .await;
    assert_eq!(response.status(), StatusCode::REQUEST_TIMEOUT);
    let after = scrape(&server).await;
    let key = series(
        "polydev_http_request_duration_seconds_count",
        &[
            ("route", "/v1/perspectives"),
            ("method", "POST"),
            ("status", "408"),
        ],
    );
    assert_eq!(grew(&before, &after, &key), 1.0);
}
