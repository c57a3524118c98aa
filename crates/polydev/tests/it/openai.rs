//! `POST /v1/chat/completions` and OpenAI's list shape of `/v1/models`: the official SDKs
//! (PyPI `openai`, npm `openai`) against a running `polydev serve` over the mock upstreams,
//! with the usage rows and quota counters checked in the database; and, with plain HTTP,
//! errors in OpenAI's shape, refunds, idempotency and cancellation.

use std::path::{Path, PathBuf};
use std::time::Duration;

use polydev::accounts::{Plan, Scope};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::process::{Child, Command};
use uuid::Uuid;

use crate::common::{TestDb, eventually, mock_catalogue, mock_gateway};
use crate::http_api::{TestServer, user_with_scoped_token};

const BIN: &str = env!("CARGO_BIN_EXE_polydev");

/// `polydev serve` over `db` with the mock catalogue; its base URL.
async fn serve(db: &TestDb, models: &Path) -> (Child, String) {
    crate::common::spawn_serve(
        Command::new(BIN)
            .env("DATABASE_URL", db.url())
            .env("POLYDEV_TEST_MOCK_KEY", "mock-key")
            .env("POLYDEV_MODELS", models)
            .env("RUST_LOG", "warn")
            .args(["serve", "--listen", "127.0.0.1:0"]),
    )
    .await
}

/// Runs a client program to completion; its stdout as JSON (it must succeed).
async fn run_client(program: &str, args: &[&str]) -> Value {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/openai");
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .await
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {:?} failed:\n{}\n{}",
        args.first(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// (usage rows, messages used, premium, normal, eco used, reservations left) of a user.
async fn ledger(db: &TestDb, user_id: Uuid) -> (i64, i32, i32, i32, i32, i64) {
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM perspective_usage WHERE user_id = $1")
        .bind(user_id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let (messages, premium, normal, eco): (i32, i32, i32, i32) = sqlx::query_as(
        "SELECT messages_used, premium_perspectives_used, normal_perspectives_used, eco_perspectives_used
           FROM user_perspective_quotas WHERE user_id = $1",
    )
    .bind(user_id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let reserved: i64 = sqlx::query_scalar("SELECT count(*) FROM quota_reservations")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    (rows, messages, premium, normal, eco, reserved)
}

#[tokio::test]
async fn openai_sdks_for_python_and_node_work_against_polydev_serve() {
    let db = TestDb::migrated().await;
    let mock = polydev_mock::MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models.toml");
    std::fs::write(&models, mock_catalogue(&mock.base_url())).unwrap();
    let (user_id, token) =
        user_with_scoped_token(&db, "sdk@example.com", Plan::Pro, Scope::Mcp).await;
    let (_server, base) = serve(&db, &models).await;

    // Python: plain, streamed (Anthropic format), tools and their result, tools streamed, errors.
    let python = run_client("python3", &["sdk_test.py", &base, &token]).await;
    assert!(
        python["sdk"]
            .as_str()
            .unwrap()
            .starts_with("openai-python "),
        "{python}"
    );
    assert_eq!(python["errors"], "ok", "{python}");
    assert_eq!(
        python["auth_error"],
        json!({ "message": "the API token is not valid", "type": "authentication_error", "param": null, "code": "token_unknown" })
    );
    // Five answers (the failing upstream's unit went back): five usage rows, five messages.
    assert_eq!(ledger(&db, user_id).await, (5, 5, 4, 1, 0, 0));
    let (input, output): (i64, i64) = sqlx::query_as(
        "SELECT input_tokens::bigint, output_tokens::bigint FROM perspective_usage
          WHERE user_id = $1 AND model_name = 'claude-normal'",
    )
    .bind(user_id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        (input, output),
        (
            python["stream"]["usage"]["prompt_tokens"].as_i64().unwrap(),
            python["stream"]["usage"]["completion_tokens"]
                .as_i64()
                .unwrap()
        ),
        "the usage chunk is the usage row: {python}"
    );

    // Node: idempotent retry, stream, tools; then over the normal tier's quota.
    sqlx::query(
        "UPDATE user_perspective_quotas SET normal_perspectives_used = normal_perspectives_limit
          WHERE user_id = $1",
    )
    .bind(user_id)
    .execute(&db.pool)
    .await
    .unwrap();
    let node = run_client("node", &["sdk-test.mjs", &base, &token]).await;
    assert!(
        node["sdk"].as_str().unwrap().starts_with("openai-node "),
        "{node}"
    );
    let message = node["quota_error"]["message"].as_str().unwrap();
    assert!(
        message.contains("monthly normal") && message.contains("resets on"),
        "the refusal names the limit and when it resets: {message}"
    );
    let (rows, messages, premium, _, eco, reserved) = ledger(&db, user_id).await;
    assert_eq!(
        (rows, messages, premium, eco, reserved),
        (8, 8, 6, 1, 0),
        "the idempotent retry and the refused call charged nothing"
    );
    let session = node["idempotent"]["request_id"].as_str().unwrap();
    let replayed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM perspective_usage WHERE session_id = $1")
            .bind(session)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(replayed, 1, "one usage row for the key: {node}");
}

/// The in-process server over the mock upstreams, and a user with an `mcp` token.
async fn setup(db: &TestDb) -> (polydev_mock::MockUpstream, TestServer, Uuid, String) {
    let mock = polydev_mock::MockUpstream::start().await;
    let server = TestServer::start_with(db, mock_gateway(&mock.base_url())).await;
    let (user_id, token) =
        user_with_scoped_token(db, "chat@example.com", Plan::Pro, Scope::Mcp).await;
    (mock, server, user_id, token)
}

async fn post(server: &TestServer, token: Option<&str>, body: Value) -> reqwest::Response {
    server
        .with_token(
            server
                .client
                .post(format!("{}/v1/chat/completions", server.base)),
            token,
        )
        .json(&body)
        .send()
        .await
        .unwrap()
}

/// Status and the `error` object, which must have OpenAI's four fields.
async fn openai_error(response: reqwest::Response) -> (StatusCode, Value) {
    let status = response.status();
    let body: Value = response.json().await.unwrap();
    let error = body["error"].clone();
    for field in ["message", "type", "param", "code"] {
        assert!(error.get(field).is_some(), "no `{field}` in {body}");
    }
    (status, error)
}

fn ask(model: &str) -> Value {
    json!({ "model": model, "messages": [{ "role": "user", "content": "hello" }] })
}

#[tokio::test]
async fn chat_completions_errors_are_in_openai_shape_and_change_nothing() {
    let db = TestDb::migrated().await;
    let (_mock, server, user_id, token) = setup(&db).await;

    let response = post(&server, None, ask("gpt-premium")).await;
    assert!(response.headers().contains_key("www-authenticate"));
    let (status, error) = openai_error(response).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        (error["type"].as_str(), error["code"].as_str()),
        (Some("authentication_error"), Some("token_missing"))
    );

    let cases = [
        (
            json!({ "messages": [] }),
            "model",
            "missing_required_parameter",
        ),
        (
            json!({ "model": "gpt-premium" }),
            "messages",
            "missing_required_parameter",
        ),
        (
            json!({ "model": "gpt-premium", "messages": [{ "role": "user", "content": "x" }], "top_p": 0.5 }),
            "top_p",
            "unsupported_parameter",
        ),
        (
            json!({ "model": "gpt-premium", "messages": [{ "role": "function", "content": "x" }] }),
            "messages[0].role",
            "invalid_value",
        ),
        (
            json!({ "model": "gpt-premium", "messages": [{ "role": "user", "content": [{ "type": "image_url", "image_url": { "url": "https://x/y.png" } }] }] }),
            "messages[0].content",
            "unsupported_content",
        ),
        (
            json!({ "model": "gpt-premium", "messages": [{ "role": "tool", "content": "x" }] }),
            "messages[0].tool_call_id",
            "missing_required_parameter",
        ),
    ];
    for (body, param, code) in cases {
        let (status, error) = openai_error(post(&server, Some(&token), body.clone()).await).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {error}");
        assert_eq!(
            (error["param"].as_str(), error["code"].as_str()),
            (Some(param), Some(code)),
            "{body}"
        );
    }
    // Tools only go to OpenAI-format providers.
    let mut tools = ask("claude-normal");
    tools["tools"] = json!([{ "type": "function", "function": { "name": "f", "parameters": {} } }]);
    let (status, error) = openai_error(post(&server, Some(&token), tools).await).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        error["message"].as_str().unwrap().contains("OpenAI-format"),
        "{error}"
    );
    // Neutral values of unsupported parameters pass.
    let mut neutral = ask("gpt-premium");
    neutral["n"] = json!(1);
    neutral["top_p"] = json!(1);
    neutral["user"] = json!("someone");
    assert_eq!(
        post(&server, Some(&token), neutral).await.status(),
        StatusCode::OK
    );
    // A malformed body.
    let response = server
        .client
        .post(format!("{}/v1/chat/completions", server.base))
        .bearer_auth(&token)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    let (status, error) = openai_error(response).await;
    assert_eq!(
        (status, error["type"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_request_error"))
    );
    // An unknown model is OpenAI's 404.
    let (status, error) = openai_error(post(&server, Some(&token), ask("gpt-9")).await).await;
    assert_eq!(
        (status, error["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("model_not_found"))
    );
    let response = server.get("/v1/models/gpt-9", None).send().await.unwrap();
    assert_eq!(openai_error(response).await.0, StatusCode::NOT_FOUND);
    // Upstream failures: 502 and 400, refunded.
    let (status, error) =
        openai_error(post(&server, Some(&token), ask("broken-premium")).await).await;
    assert_eq!(
        (status, error["code"].as_str()),
        (StatusCode::BAD_GATEWAY, Some("upstream_error"))
    );
    let (status, _) =
        openai_error(post(&server, Some(&token), ask("bad-request-normal")).await).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        ledger(&db, user_id).await,
        (1, 1, 1, 0, 0, 0),
        "only the neutral call answered and was charged"
    );

    // The rate limit: 429, the limit named, Retry-After.
    sqlx::query("UPDATE rate_limit_tiers SET requests_per_minute = 1")
        .execute(&db.pool)
        .await
        .unwrap();
    let response = post(&server, Some(&token), ask("gpt-premium")).await;
    assert!(response.headers().contains_key("retry-after"));
    let (status, error) = openai_error(response).await;
    assert_eq!(
        (status, error["code"].as_str()),
        (StatusCode::TOO_MANY_REQUESTS, Some("rate_limit_exceeded"))
    );
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("requests per minute"),
        "{error}"
    );
    assert_eq!(ledger(&db, user_id).await.0, 1);
}

#[tokio::test]
async fn a_completion_writes_the_usage_row_of_a_one_model_perspective_and_replays_by_key() {
    let db = TestDb::migrated().await;
    let (mock, server, user_id, token) = setup(&db).await;
    let send = |key: &'static str, prompt: &'static str| {
        server
            .client
            .post(format!("{}/v1/chat/completions", server.base))
            .bearer_auth(&token)
            .header("idempotency-key", key)
            .json(&json!({ "model": "gpt-premium", "messages": [{ "role": "user", "content": prompt }], "max_tokens": 50 }))
            .send()
    };
    let first: Value = send("k-1", "the question")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let (input, output, cost, session): (i32, i32, String, String) = sqlx::query_as(
        "SELECT input_tokens, output_tokens, estimated_cost::text, session_id FROM perspective_usage
          WHERE user_id = $1",
    )
    .bind(user_id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        (
            first["usage"]["prompt_tokens"].as_i64(),
            first["usage"]["completion_tokens"].as_i64()
        ),
        (Some(input.into()), Some(output.into()))
    );
    assert_eq!(session, first["polydev"]["request_id"].as_str().unwrap());
    assert!(
        cost.starts_with(
            first["polydev"]["cost_usd"]
                .as_str()
                .unwrap()
                .trim_end_matches('0')
        ),
        "{cost} vs {first}"
    );
    let upstream_calls = mock.stats().started();
    let again: Value = send("k-1", "the question")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(again["id"], first["id"]);
    assert_eq!(
        again["choices"][0]["message"],
        first["choices"][0]["message"]
    );
    assert_eq!(again["polydev"]["replayed"], true);
    assert_eq!(
        mock.stats().started(),
        upstream_calls,
        "a replay calls no model"
    );
    // The same key with another conversation is a conflict.
    let (status, error) = openai_error(send("k-1", "another question").await.unwrap()).await;
    assert_eq!(
        (status, error["type"].as_str()),
        (StatusCode::CONFLICT, Some("conflict_error"))
    );
    assert_eq!(ledger(&db, user_id).await, (1, 1, 1, 0, 0, 0));
}

#[tokio::test]
async fn a_stream_the_client_leaves_before_the_answer_is_refunded() {
    let db = TestDb::migrated().await;
    let (mock, server, user_id, token) = setup(&db).await;
    let response = server
        .client
        .post(format!("{}/v1/chat/completions", server.base))
        .bearer_auth(&token)
        .timeout(Duration::from_millis(300))
        .json(&json!({ "model": "slow-premium", "stream": true, "messages": [{ "role": "user", "content": "slow" }] }))
        .send()
        .await;
    assert!(response.is_err(), "the client gave up");
    assert!(eventually(|| async { mock.stats().abandoned() == 1 }).await);
    assert!(
        eventually(|| async { ledger(&db, user_id).await == (0, 0, 0, 0, 0, 0) }).await,
        "the unit and the message went back: {:?}",
        ledger(&db, user_id).await
    );
}

#[tokio::test]
async fn a_streamed_completion_sends_chunks_the_finish_the_usage_and_done() {
    let db = TestDb::migrated().await;
    let (_mock, server, user_id, token) = setup(&db).await;
    let body = server
        .client
        .post(format!("{}/v1/chat/completions", server.base))
        .bearer_auth(&token)
        .json(&json!({ "model": "gemini-eco", "stream": true, "stream_options": { "include_usage": true },
                        "messages": [{ "role": "system", "content": "be brief" }, { "role": "user", "content": "one" },
                                     { "role": "assistant", "content": "two" }, { "role": "user", "content": "three" }] }))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let events: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{body}");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk" && c["id"] == chunks[0]["id"])
    );
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(
        text, "gemini-eco thinks about: three (after 2 earlier messages)",
        "the conversation reached the model, the system message apart"
    );
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    let output: i32 =
        sqlx::query_scalar("SELECT output_tokens FROM perspective_usage WHERE user_id = $1")
            .bind(user_id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], output);
}
