//! The HTTP API over real HTTP, against an in-process server on a real socket.

use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::sync::oneshot;

use polydev::accounts::{self, Plan, Scope};
use polydev::app::AppState;
use polydev::http;

use crate::common::{TestDb, eventually};

pub struct TestServer {
    pub base: String,
    pub client: reqwest::Client,
    _stop: oneshot::Sender<()>,
}

impl TestServer {
    pub async fn start(db: &TestDb) -> TestServer {
        let catalogue = polydev::perspectives::Catalogue::load(None).unwrap();
        Self::start_with(db, polydev::perspectives::Gateway::new(catalogue)).await
    }

    pub async fn start_with(db: &TestDb, gateway: polydev::perspectives::Gateway) -> TestServer {
        Self::start_state(AppState::new(db.pool.clone(), gateway)).await
    }

    pub async fn start_state(state: AppState) -> TestServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        // The issuer and e-mail links point at this server unless the test chose a URL.
        let state = if state.public_url == AppState::new_default_public_url() {
            state.with_public_url(&base)
        } else {
            state
        };
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(http::serve(listener, state, async {
            let _ = stopped.await;
        }));
        TestServer {
            base,
            client: polydev::net::http_client(),
            _stop: stop,
        }
    }

    /// A server whose public URL (and base) is `http://localhost:<port>`: WebAuthn accepts a
    /// host name as relying party, never an IP address.
    pub async fn start_localhost(state: AppState) -> TestServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://localhost:{}", listener.local_addr().unwrap().port());
        let state = state.with_public_url(&base);
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(http::serve(listener, state, async {
            let _ = stopped.await;
        }));
        TestServer {
            base,
            client: polydev::net::http_client(),
            _stop: stop,
        }
    }

    pub fn get(&self, path: &str, token: Option<&str>) -> reqwest::RequestBuilder {
        self.with_token(self.client.get(format!("{}{path}", self.base)), token)
    }

    /// `GET path` with `token`, read as JSON of type `T` (whatever the status).
    pub async fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str, token: &str) -> T {
        self.get(path, Some(token))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// `method path` with `token` and a JSON `body`.
    pub async fn send_json(
        &self,
        method: reqwest::Method,
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

    pub fn with_token(
        &self,
        request: reqwest::RequestBuilder,
        token: Option<&str>,
    ) -> reqwest::RequestBuilder {
        match token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }
}

/// A new user and an `account` token (every route); tests of what an `mcp` token may do use
/// [`user_with_scoped_token`].
pub async fn user_with_token(db: &TestDb, email: &str, plan: Plan) -> (uuid::Uuid, String) {
    user_with_scoped_token(db, email, plan, Scope::Account).await
}

pub async fn user_with_scoped_token(
    db: &TestDb,
    email: &str,
    plan: Plan,
    scope: Scope,
) -> (uuid::Uuid, String) {
    let user = accounts::create_user(&db.pool, email, plan).await.unwrap();
    let token = accounts::create_scoped_token(&db.pool, user.user_id, "test", None, scope)
        .await
        .unwrap();
    (user.user_id, token.token)
}

/// A 401 with the JSON error `code`.
async fn assert_refused(response: reqwest::Response, code: &str) {
    let (status, _, got) = json_error(response).await;
    assert_eq!((status, got.as_str()), (StatusCode::UNAUTHORIZED, code));
}

async fn json_error(response: reqwest::Response) -> (StatusCode, Option<String>, String) {
    let status = response.status();
    let challenge = response
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_string());
    let body: Value = response.json().await.expect("errors are JSON");
    (
        status,
        challenge,
        body["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    )
}

#[tokio::test]
async fn health_and_readiness() {
    let db = TestDb::migrated().await;
    let server = TestServer::start(&db).await;
    let health = server.get("/healthz", None).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    assert!(health.headers().contains_key("x-request-id"));
    assert_eq!(
        server.get("/readyz", None).send().await.unwrap().status(),
        StatusCode::OK
    );

    // A migration the database has not seen makes it not ready.
    sqlx::query(
        "DELETE FROM _sqlx_migrations WHERE version = (SELECT max(version) FROM _sqlx_migrations)",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let response = server.get("/readyz", None).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        response.json::<Value>().await.unwrap()["status"],
        "migrations_pending"
    );
}

#[tokio::test]
async fn me_returns_the_callers_account_and_quota() {
    let db = TestDb::migrated().await;
    let (user_id, token) = user_with_token(&db, "me@example.com", Plan::Free).await;
    let server = TestServer::start(&db).await;
    let response = server.get("/v1/me", Some(&token)).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let me: Value = response.json().await.unwrap();
    assert_eq!(me["user"]["user_id"], json!(user_id));
    assert_eq!(me["user"]["email"], "me@example.com");
    assert_eq!(me["tier"], "free");
    assert_eq!(me["profile"]["subscription_tier"], "free");
    assert_eq!(
        me["quota"]["messages"],
        json!({ "limit": 200, "used": 0, "remaining": 200 })
    );
    assert_eq!(me["quota"]["premium"]["limit"], 10);
    assert_eq!(me["quota"]["eco"]["remaining"], 150);

    // last_used_at is written (in the background) after the first authenticated request.
    let last_used = || async {
        sqlx::query_scalar::<_, Option<chrono::DateTime<chrono::Utc>>>(
            "SELECT last_used_at FROM mcp_user_tokens WHERE user_id = $1",
        )
        .bind(user_id)
        .fetch_one(&db.pool)
        .await
        .unwrap()
        .is_some()
    };
    assert!(eventually(last_used).await, "last_used_at was recorded");
}

#[tokio::test]
async fn every_refused_token_gets_401_with_a_challenge_and_a_reason() {
    let db = TestDb::migrated().await;
    let (_, token) = user_with_token(&db, "refused@example.com", Plan::Pro).await;
    let server = TestServer::start(&db).await;

    let (status, challenge, code) =
        json_error(server.get("/v1/me", None).send().await.unwrap()).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::UNAUTHORIZED, "token_missing")
    );
    assert_eq!(challenge.as_deref(), Some(r#"Bearer realm="polydev""#));

    let unknown = format!("pd_{}", "1".repeat(64));
    let (status, challenge, code) =
        json_error(server.get("/v1/me", Some(&unknown)).send().await.unwrap()).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::UNAUTHORIZED, "token_unknown")
    );
    assert!(challenge.unwrap().contains(r#"error="invalid_token""#));

    assert_refused(
        server.get("/v1/me", Some("pd_short")).send().await.unwrap(),
        "token_malformed",
    )
    .await;

    sqlx::query("UPDATE mcp_user_tokens SET expires_at = now() - interval '1 minute'")
        .execute(&db.pool)
        .await
        .unwrap();
    assert_refused(
        server.get("/v1/me", Some(&token)).send().await.unwrap(),
        "token_expired",
    )
    .await;

    sqlx::query("UPDATE mcp_user_tokens SET expires_at = NULL, active = false")
        .execute(&db.pool)
        .await
        .unwrap();
    assert_refused(
        server.get("/v1/tokens", Some(&token)).send().await.unwrap(),
        "token_revoked",
    )
    .await;
}

#[tokio::test]
async fn users_manage_only_their_own_tokens() {
    let db = TestDb::migrated().await;
    let (_, alice) = user_with_token(&db, "alice@example.com", Plan::Free).await;
    let (_, bob) = user_with_token(&db, "bob@example.com", Plan::Free).await;
    let server = TestServer::start(&db).await;

    let created = server
        .with_token(
            server.client.post(format!("{}/v1/tokens", server.base)),
            Some(&alice),
        )
        .json(&json!({ "name": "ci", "expires_in_days": 30 }))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), StatusCode::CREATED);
    let created: Value = created.json().await.unwrap();
    let new_token = created["token"].as_str().unwrap().to_string();
    let new_id = created["id"].as_str().unwrap().to_string();
    assert!(created["expires_at"].is_string());

    let list: Vec<Value> = server
        .get("/v1/tokens", Some(&alice))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list.len(), 2);
    assert!(
        list.iter()
            .all(|t| t.get("token").is_none() && t.get("token_hash").is_none()),
        "{list:?}"
    );
    let bobs: Vec<Value> = server
        .get("/v1/tokens", Some(&bob))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(bobs.len(), 1);

    // Bob cannot revoke Alice's token, and cannot tell it from a token that does not exist.
    let delete = |token: &str, id: &str| {
        server
            .with_token(
                server
                    .client
                    .delete(format!("{}/v1/tokens/{id}", server.base)),
                Some(token),
            )
            .send()
    };
    let theirs = delete(&bob, &new_id).await.unwrap();
    let (status, _, code) = json_error(theirs).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::NOT_FOUND, "not_found")
    );
    let nobodys = delete(&bob, &uuid::Uuid::new_v4().to_string())
        .await
        .unwrap();
    assert_eq!(json_error(nobodys).await.2, "not_found");
    assert_eq!(
        server
            .get("/v1/me", Some(&new_token))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );

    let mine = delete(&alice, &new_id).await.unwrap();
    assert_eq!(mine.status(), StatusCode::OK);
    assert_eq!(mine.json::<Value>().await.unwrap()["active"], false);
    assert_refused(
        server.get("/v1/me", Some(&new_token)).send().await.unwrap(),
        "token_revoked",
    )
    .await;
}

#[tokio::test]
async fn bad_requests_get_clear_json_errors_and_change_nothing() {
    let db = TestDb::migrated().await;
    let (user_id, token) = user_with_token(&db, "bad@example.com", Plan::Free).await;
    let server = TestServer::start(&db).await;
    let post = |body: String| {
        server
            .with_token(
                server.client.post(format!("{}/v1/tokens", server.base)),
                Some(&token),
            )
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    for body in [
        "{",
        r#"{"name": 5}"#,
        r#"{"name": "x", "extra": 1}"#,
        r#"{"name": ""}"#,
        r#"{"name": "x", "expires_in_days": 0}"#,
    ] {
        let (status, _, code) = json_error(post(body.to_string()).await.unwrap()).await;
        assert_eq!(
            (status, code.as_str()),
            (StatusCode::BAD_REQUEST, "invalid_request"),
            "{body}"
        );
    }
    let huge = format!(r#"{{"name": "{}"}}"#, "x".repeat(http::MAX_BODY_BYTES));
    let (status, _, code) = json_error(post(huge).await.unwrap()).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, "too_large")
    );

    let bad_id = server
        .with_token(
            server
                .client
                .delete(format!("{}/v1/tokens/not-a-uuid", server.base)),
            Some(&token),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(json_error(bad_id).await.0, StatusCode::BAD_REQUEST);
    let (status, _, code) = json_error(server.get("/v2/nothing", None).send().await.unwrap()).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::NOT_FOUND, "not_found")
    );

    assert_eq!(
        accounts::list_tokens(&db.pool, user_id)
            .await
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test]
async fn perspectives_over_rest_as_json_and_as_server_sent_events() {
    let db = TestDb::migrated().await;
    let mock = polydev_mock::MockUpstream::start().await;
    let (_, token) = user_with_token(&db, "rest@example.com", Plan::Pro).await;
    let server = TestServer::start_with(&db, crate::common::mock_gateway(&mock.base_url())).await;
    let body = json!({ "prompt": "Monorepo?", "models": ["gpt-premium", "gemini-eco"] });
    let post = || {
        server.with_token(
            server
                .client
                .post(format!("{}/v1/perspectives", server.base)),
            Some(&token),
        )
    };

    let result: Value = post()
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(result["totals"]["succeeded"], 2, "{result}");

    let stream = post()
        .header("accept", "text/event-stream")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), StatusCode::OK);
    assert!(
        stream.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let text = stream.text().await.unwrap();
    let events: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .collect();
    assert_eq!(events.first(), Some(&"started"), "{text}");
    assert_eq!(events.last(), Some(&"result"), "{text}");
    assert_eq!(
        events.iter().filter(|e| **e == "model").count(),
        2,
        "{text}"
    );
    assert!(
        events.contains(&"delta"),
        "answers stream as deltas: {text}"
    );

    // Bad input is a JSON 400 even when an event stream was asked for.
    let bad = post()
        .header("accept", "text/event-stream")
        .json(&json!({ "prompt": "" }))
        .send()
        .await
        .unwrap();
    assert_eq!(json_error(bad).await.0, StatusCode::BAD_REQUEST);

    let models: Value = server
        .get("/v1/models", None)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["models"].as_array().unwrap().len(), 8);
    let usage: Value = server
        .get("/v1/usage", Some(&token))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(usage["usage"]["calls"], 4, "{usage}");
    assert_eq!(usage["quota"]["premium"]["used"], 2, "{usage}");
}

/// The database's current minute: the window rate limits count in.
async fn db_minute(pool: &sqlx::PgPool) -> chrono::DateTime<chrono::Utc> {
    sqlx::query_scalar("SELECT date_trunc('minute', now())")
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn rate_limits_hold_across_servers_sharing_the_database() {
    let db = TestDb::migrated().await;
    sqlx::query("UPDATE rate_limit_tiers SET requests_per_minute = 5 WHERE tier = 'free'")
        .execute(&db.pool)
        .await
        .unwrap();
    let (a, b) = (TestServer::start(&db).await, TestServer::start(&db).await);
    // A one-minute window can roll over mid-run; then run again with a fresh token.
    for attempt in 0..2 {
        let (_, token) =
            user_with_token(&db, &format!("rl{attempt}@example.com"), Plan::Free).await;
        let before = db_minute(&db.pool).await;
        let mut statuses = Vec::new();
        let mut retry_after = None;
        for i in 0..8 {
            let server = if i % 2 == 0 { &a } else { &b };
            let response = server.get("/v1/me", Some(&token)).send().await.unwrap();
            if response.status() == StatusCode::TOO_MANY_REQUESTS {
                retry_after = response
                    .headers()
                    .get("retry-after")
                    .map(|v| v.to_str().unwrap().parse::<u64>().unwrap());
            }
            statuses.push(response.status().as_u16());
        }
        if db_minute(&db.pool).await != before {
            continue;
        }
        assert_eq!(
            statuses,
            [200, 200, 200, 200, 200, 429, 429, 429],
            "5 per minute across both servers"
        );
        let retry_after = retry_after.expect("Retry-After on 429");
        assert!((1..=60).contains(&retry_after), "{retry_after}");
        return;
    }
    panic!("two runs crossed a minute boundary");
}

/// `POST /v1/perspectives` counts the request against its rate limits in the statement that
/// reserves its quota: every request is counted exactly once, whichever way it ends (answered,
/// a body that cannot be read, an idempotency key, refused for the limit), and a request over
/// the limit reserves nothing.
#[tokio::test]
async fn perspectives_calls_are_counted_once_with_their_reservation() {
    let db = TestDb::migrated().await;
    let mock = polydev_mock::MockUpstream::start().await;
    sqlx::query("UPDATE rate_limit_tiers SET requests_per_minute = 4")
        .execute(&db.pool)
        .await
        .unwrap();
    let server = TestServer::start_with(&db, crate::common::mock_gateway(&mock.base_url())).await;
    // A one-minute window can roll over mid-run; then run again with a fresh user.
    for attempt in 0..2 {
        let (user_id, token) =
            user_with_token(&db, &format!("count{attempt}@example.com"), Plan::Pro).await;
        let before = db_minute(&db.pool).await;
        let call = |body: Value| {
            let token = token.clone();
            let server = &server;
            async move {
                server
                    .send_json(reqwest::Method::POST, "/v1/perspectives", &token, &body)
                    .await
            }
        };
        let unreadable = || {
            server
                .with_token(
                    server
                        .client
                        .post(format!("{}/v1/perspectives", server.base)),
                    Some(&token),
                )
                .header("content-type", "application/json")
                .body("{not json")
                .send()
        };
        let one = json!({ "prompt": "count me", "models": ["gpt-premium"] });
        let keyed =
            json!({ "prompt": "count me", "models": ["gpt-premium"], "idempotency_key": "k1" });
        let mut statuses = vec![call(one.clone()).await.status().as_u16()];
        statuses.push(unreadable().await.unwrap().status().as_u16());
        statuses.push(call(keyed).await.status().as_u16());
        statuses.push(
            call(json!({ "prompt": "", "models": ["gpt-premium"] }))
                .await
                .status()
                .as_u16(),
        );
        // Over the limit: refused for it, whatever the body.
        statuses.push(call(one.clone()).await.status().as_u16());
        statuses.push(unreadable().await.unwrap().status().as_u16());
        if db_minute(&db.pool).await != before {
            continue;
        }
        assert_eq!(statuses, [200, 400, 200, 400, 429, 429]);
        let counted: i32 =
            sqlx::query_scalar("SELECT count FROM rate_limit_user_windows WHERE user_id = $1")
                .bind(user_id)
                .fetch_one(&db.pool)
                .await
                .unwrap();
        assert_eq!(counted, 6, "every request counted once");
        let (counters, usage) = crate::perspectives::ledger(&db.pool, user_id).await;
        assert_eq!(counters, usage, "the counters equal the usage rows");
        assert_eq!(usage.1, 2, "two answered calls: {usage:?}");
        let pending: i64 =
            sqlx::query_scalar("SELECT count(*) FROM quota_reservations WHERE user_id = $1")
                .bind(user_id)
                .fetch_one(&db.pool)
                .await
                .unwrap();
        assert_eq!(pending, 0, "nothing reserved by the refused requests");
        return;
    }
    panic!("two runs crossed a minute boundary");
}

#[tokio::test]
async fn a_client_that_goes_away_cancels_the_call_and_is_not_charged() {
    let db = TestDb::migrated().await;
    let mock = polydev_mock::MockUpstream::start().await;
    let (user_id, token) = user_with_token(&db, "gone@example.com", Plan::Pro).await;
    let server = TestServer::start_with(&db, crate::common::mock_gateway(&mock.base_url())).await;
    for sse in [true, false] {
        let mut request = server
            .with_token(
                server
                    .client
                    .post(format!("{}/v1/perspectives", server.base)),
                Some(&token),
            )
            .json(&json!({ "prompt": "slow", "models": ["slow-premium"] }));
        if sse {
            request = request.header("accept", "text/event-stream");
        }
        // Give up on the request once the upstream call is in flight.
        let before = mock.stats().started();
        let call = tokio::spawn(async move {
            let mut response = request.send().await.unwrap();
            while let Ok(Some(_)) = response.chunk().await {}
        });
        eventually(|| async { mock.stats().started() > before }).await;
        call.abort();
        let _ = call.await;
        let counters = || async {
            sqlx::query_as::<_, (i32, i32)>(
                "SELECT messages_used, premium_perspectives_used FROM user_perspective_quotas WHERE user_id = $1",
            )
            .bind(user_id)
            .fetch_one(&db.pool)
            .await
            .unwrap()
        };
        eventually(|| async { counters().await == (0, 0) }).await;
        assert_eq!(counters().await, (0, 0), "sse={sse}: nothing charged");
    }
    eventually(|| async { mock.stats().abandoned() == 2 }).await;
    assert_eq!(
        mock.stats().abandoned(),
        2,
        "both upstream calls were aborted"
    );
}

/// A request that outlives the server's request timeout gets 408, and the model call it was
/// waiting on is cancelled and not charged.
#[tokio::test]
async fn a_request_past_the_timeout_is_answered_408_and_not_charged() {
    let db = TestDb::migrated().await;
    let mock = polydev_mock::MockUpstream::start().await;
    let (user_id, token) = user_with_token(&db, "slow@example.com", Plan::Pro).await;
    let state = AppState::new(
        db.pool.clone(),
        crate::common::mock_gateway(&mock.base_url()),
    )
    .with_request_timeout(std::time::Duration::from_millis(300));
    let server = TestServer::start_state(state).await;
    let response = server
        .send_json(
            reqwest::Method::POST,
            "/v1/perspectives",
            &token,
            &json!({ "prompt": "slow?", "models": ["slow-premium"] }),
        )
        .await;
    assert_eq!(response.status(), StatusCode::REQUEST_TIMEOUT);
    let used = || async {
        sqlx::query_scalar::<_, Option<i32>>(
            "SELECT premium_perspectives_used FROM user_perspective_quotas WHERE user_id = $1",
        )
        .bind(user_id)
        .fetch_one(&db.pool)
        .await
        .unwrap()
    };
    assert!(eventually(|| async { used().await == Some(0) }).await);
}

#[tokio::test]
async fn many_tokens_of_one_user_share_the_users_rate_limit() {
    let db = TestDb::migrated().await;
    sqlx::query("UPDATE rate_limit_tiers SET requests_per_minute = 5 WHERE tier = 'free'")
        .execute(&db.pool)
        .await
        .unwrap();
    let server = TestServer::start(&db).await;
    // A one-minute window can roll over mid-run; then run again with a fresh user.
    for attempt in 0..2 {
        let (user_id, first) =
            user_with_token(&db, &format!("many{attempt}@example.com"), Plan::Free).await;
        let mut tokens = vec![first];
        for i in 0..3 {
            tokens.push(
                accounts::create_token(&db.pool, user_id, &format!("t{i}"), None)
                    .await
                    .unwrap()
                    .token,
            );
        }
        let before = db_minute(&db.pool).await;
        let mut statuses = Vec::new();
        for i in 0..12 {
            let response = server
                .get("/v1/me", Some(&tokens[i % tokens.len()]))
                .send()
                .await
                .unwrap();
            statuses.push(response.status().as_u16());
        }
        if db_minute(&db.pool).await != before {
            continue;
        }
        let ok = statuses.iter().filter(|s| **s == 200).count();
        assert_eq!(
            ok, 5,
            "4 tokens together get the user's 5 per minute: {statuses:?}"
        );
        assert!(statuses[5..].iter().all(|s| *s == 429), "{statuses:?}");
        return;
    }
    panic!("two runs crossed a minute boundary");
}

#[tokio::test]
async fn suspended_and_deleted_users_are_refused_everywhere() {
    let db = TestDb::migrated().await;
    let (user_id, token) = user_with_token(&db, "suspended@example.com", Plan::Pro).await;
    let server = TestServer::start(&db).await;
    let initialize = || {
        server
            .client
            .post(format!("{}/mcp", server.base))
            .bearer_auth(&token)
            .header("accept", "application/json, text/event-stream")
            .json(
                &json!({ "jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
                "protocolVersion": "2025-06-18", "capabilities": {},
                "clientInfo": { "name": "raw", "version": "1" } } }),
            )
            .send()
    };
    for (status, code) in [
        ("suspended", "account_suspended"),
        ("deleted", "account_deleted"),
    ] {
        sqlx::query("UPDATE users SET status = $2 WHERE user_id = $1")
            .bind(user_id)
            .bind(status)
            .execute(&db.pool)
            .await
            .unwrap();
        for path in ["/v1/me", "/v1/tokens", "/v1/zk", "/v1/usage"] {
            let (got, challenge, got_code) =
                json_error(server.get(path, Some(&token)).send().await.unwrap()).await;
            assert_eq!(
                (got, got_code.as_str()),
                (StatusCode::UNAUTHORIZED, code),
                "{path}"
            );
            assert!(challenge.unwrap().contains("invalid_token"));
        }
        let (got, _, got_code) = json_error(initialize().await.unwrap()).await;
        assert_eq!(
            (got, got_code.as_str()),
            (StatusCode::UNAUTHORIZED, code),
            "/mcp"
        );
    }
    sqlx::query("UPDATE users SET status = 'active' WHERE user_id = $1")
        .bind(user_id)
        .execute(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        server
            .get("/v1/me", Some(&token))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    assert_eq!(initialize().await.unwrap().status(), StatusCode::OK);
}

/// A flood of made-up tokens from one address is refused in memory after 30 failures: the
/// refused requests never reach the database (it is locked while they are sent), and other
/// addresses are not affected.
#[tokio::test]
async fn failed_authentications_are_limited_per_address_without_the_database() {
    let db = TestDb::migrated().await;
    let (_, token) = user_with_token(&db, "flood@example.com", Plan::Pro).await;
    let server = TestServer::start(&db).await;
    let unknown = format!("pd_{}", "2".repeat(64));
    // Requests without a token are not guesses: they do not count.
    for _ in 0..5 {
        let response = server.get("/v1/me", None).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    }
    for i in 0..accounts::AUTH_FAILURES_PER_MINUTE {
        let fake = if i % 2 == 0 {
            unknown.as_str()
        } else {
            "pd_nope"
        };
        let status = server
            .get("/v1/me", Some(fake))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, StatusCode::UNAUTHORIZED, "failure {i}");
    }

    let mut locker = db.connect().await;
    sqlx::query("BEGIN").execute(&mut locker).await.unwrap();
    sqlx::query("LOCK TABLE mcp_user_tokens, users IN ACCESS EXCLUSIVE MODE")
        .execute(&mut locker)
        .await
        .unwrap();
    for presented in [unknown.as_str(), token.as_str()] {
        let response = tokio::time::timeout(
            std::time::Duration::from_secs(20),
            server.get("/v1/me", Some(presented)).send(),
        )
        .await
        .expect("refused without waiting for the locked tables")
        .unwrap();
        let retry_after = response
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().parse::<u64>().unwrap());
        let (status, _, code) = json_error(response).await;
        assert_eq!(
            (status, code.as_str()),
            (StatusCode::TOO_MANY_REQUESTS, "auth_rate_limited")
        );
        assert!((1..=60).contains(&retry_after.unwrap()), "{retry_after:?}");
    }
    let mcp = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        server
            .client
            .post(format!("{}/mcp", server.base))
            .bearer_auth(&unknown)
            .send(),
    )
    .await
    .expect("/mcp too")
    .unwrap();
    assert_eq!(mcp.status(), StatusCode::TOO_MANY_REQUESTS);
    sqlx::query("ROLLBACK").execute(&mut locker).await.unwrap();

    // Another address (all of 127/8 is loopback) still gets in.
    let other = reqwest::Client::builder()
        .local_address(std::net::IpAddr::from([127, 0, 0, 2]))
        .build()
        .unwrap();
    let response = other
        .get(format!("{}/v1/me", server.base))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}
