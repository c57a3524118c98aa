//! One error boundary: REST JSON, the SSE `error` event and MCP tool errors show the same code
//! and public message, and no database driver text ever reaches a client. Client mistakes that
//! PostgreSQL would catch (NUL characters, taken ids) are 4xx.

use reqwest::StatusCode;
use rmcp::ServiceExt;
use rmcp::model::CallToolRequestParams;
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use serde_json::{Value, json};
use sqlx::Executor;

use polydev::accounts::Plan;
use polydev::api::ErrorResponse;

use crate::common::{TestDb, mock_gateway};
use crate::http_api::{TestServer, user_with_token};

/// What the database says when the fault is injected; it must never reach a client.
const DRIVER_TEXT: &str = "sentinel-driver-text-4711";

/// Makes every quota reservation fail inside PostgreSQL, as a broken constraint, a bad
/// migration or a failing trigger would.
async fn break_quota_updates(db: &TestDb) {
    db.pool
        .execute(sqlx::AssertSqlSafe(format!(
            "CREATE FUNCTION fail_quota() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN RAISE EXCEPTION '{DRIVER_TEXT}'; END $$;
             CREATE TRIGGER fail_quota BEFORE UPDATE ON user_perspective_quotas
               FOR EACH ROW EXECUTE FUNCTION fail_quota();"
        )))
        .await
        .unwrap();
}

fn assert_public(body: &str) -> ErrorResponse {
    assert!(!body.contains(DRIVER_TEXT), "driver text leaked: {body}");
    assert!(
        !body.contains("database error"),
        "driver text leaked: {body}"
    );
    let error: ErrorResponse = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(error.error.code, "internal", "{body}");
    error
}

#[tokio::test]
async fn a_database_fault_shows_the_same_code_and_no_driver_text_on_every_path() {
    let db = TestDb::migrated().await;
    let mock = polydev_mock::MockUpstream::start().await;
    let (_, token) = user_with_token(&db, "fault@example.com", Plan::Pro).await;
    let server = TestServer::start_with(&db, mock_gateway(&mock.base_url())).await;
    break_quota_updates(&db).await;
    let body = json!({ "prompt": "Why?", "models": ["gpt-premium"] });
    let post = || {
        server
            .client
            .post(format!("{}/v1/perspectives", server.base))
            .bearer_auth(&token)
            .json(&body)
    };

    // REST, JSON.
    let response = post().send().await.unwrap();
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let rest = assert_public(&response.text().await.unwrap());

    // REST, server-sent events: the `error` event carries the same body.
    let stream = post()
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    let text = stream.text().await.unwrap();
    let mut lines = text.lines();
    let data = loop {
        match lines.next() {
            Some("event: error") => break lines.next().unwrap().strip_prefix("data: ").unwrap(),
            Some(_) => continue,
            None => panic!("no error event in {text}"),
        }
    };
    assert_eq!(assert_public(data), rest);

    // MCP, with the official Rust SDK's client: a tool error with the same code and message.
    let transport = StreamableHttpClientTransport::from_config(
        StreamableHttpClientTransportConfig::with_uri(format!("{}/mcp", server.base))
            .auth_header(token.clone()),
    );
    let client = ().serve(transport).await.unwrap();
    let arguments = body.as_object().unwrap().clone();
    let result = client
        .call_tool(CallToolRequestParams::new("get_perspectives").with_arguments(arguments))
        .await
        .unwrap();
    assert_eq!(result.is_error, Some(true));
    let structured = result.structured_content.clone().expect("structured error");
    assert_eq!(assert_public(&structured.to_string()), rest);
    let text = serde_json::to_string(&result.content).unwrap();
    assert!(!text.contains(DRIVER_TEXT), "{text}");
    assert!(text.contains(&rest.error.message), "{text}");
    client.cancel().await.unwrap();
}

async fn status_and_code(response: reqwest::Response) -> (StatusCode, String) {
    let status = response.status();
    let body: Value = response.json().await.unwrap();
    (
        status,
        body["error"]["code"].as_str().unwrap_or("").to_string(),
    )
}

#[tokio::test]
async fn a_nul_character_is_a_400_on_every_route_and_stores_nothing() {
    let db = TestDb::migrated().await;
    let (user_id, token) = user_with_token(&db, "nul@example.com", Plan::Pro).await;
    let server = TestServer::start(&db).await;
    let send = |method: reqwest::Method, path: &str, body: Value| {
        let (server, token) = (&server, &token);
        let path = path.to_string();
        async move { server.send_json(method, &path, token, &body).await }
    };
    let session: Value = send(
        reqwest::Method::POST,
        "/v1/chat/sessions",
        json!({ "title": "fine" }),
    )
    .await
    .json()
    .await
    .unwrap();
    let session = session["id"].as_str().unwrap().to_string();

    let cases = [
        ("/v1/tokens", json!({ "name": "a\u{0}b" })),
        ("/v1/chat/sessions", json!({ "title": "a\u{0}b" })),
        (
            &format!("/v1/chat/sessions/{session}/messages") as &str,
            json!({ "role": "user", "content": "a\u{0}b" }),
        ),
        ("/v1/perspectives", json!({ "prompt": "a\u{0}b" })),
    ];
    for (path, body) in cases {
        let (status, code) = status_and_code(send(reqwest::Method::POST, path, body).await).await;
        assert_eq!(
            (status, code.as_str()),
            (StatusCode::BAD_REQUEST, "invalid_request"),
            "{path}"
        );
    }
    let (status, _) = status_and_code(
        send(
            reqwest::Method::PUT,
            "/v1/settings",
            json!({ "preferred_models": ["a\u{0}"] }),
        )
        .await,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = status_and_code(
        server
            .get("/v1/zk/migration/plaintext?limit=%00", Some(&token))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // Nothing was stored: one token (the test's), one session, no message.
    let counts: (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM mcp_user_tokens WHERE user_id = $1),
                (SELECT count(*) FROM chat_sessions WHERE user_id = $1),
                (SELECT count(*) FROM chat_messages)",
    )
    .bind(user_id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(counts, (1, 1, 0));

    // The domain refuses it too, whoever calls it.
    let error = polydev::accounts::create_token(&db.pool, user_id, "x\0y", None)
        .await
        .unwrap_err();
    assert_eq!(error.code(), "invalid_request");
}

#[tokio::test]
async fn resending_a_message_with_its_id_is_idempotent_and_another_message_is_a_conflict() {
    let db = TestDb::migrated().await;
    let (_, token) = user_with_token(&db, "resend@example.com", Plan::Pro).await;
    let (_, other_token) = user_with_token(&db, "other@example.com", Plan::Pro).await;
    let server = TestServer::start(&db).await;
    let post = |token: &str, path: &str, body: Value| {
        let server = &server;
        let (token, path) = (token.to_string(), path.to_string());
        async move {
            server
                .send_json(reqwest::Method::POST, &path, &token, &body)
                .await
        }
    };
    let session: Value = post(&token, "/v1/chat/sessions", json!({}))
        .await
        .json()
        .await
        .unwrap();
    let path = format!(
        "/v1/chat/sessions/{}/messages",
        session["id"].as_str().unwrap()
    );
    let id = uuid::Uuid::new_v4();
    let message = json!({ "id": id, "role": "user", "content": "hello" });

    let first = post(&token, &path, message.clone()).await;
    assert_eq!(first.status(), StatusCode::CREATED);
    let first: Value = first.json().await.unwrap();
    let again = post(&token, &path, message).await;
    assert_eq!(again.status(), StatusCode::OK);
    assert_eq!(again.json::<Value>().await.unwrap(), first);

    let different = post(
        &token,
        &path,
        json!({ "id": id, "role": "user", "content": "bye" }),
    )
    .await;
    assert_eq!(
        status_and_code(different).await,
        (StatusCode::CONFLICT, "conflict".into())
    );
    let flipped = post(
        &token,
        &path,
        json!({ "id": id, "role": "assistant", "content": "hello" }),
    )
    .await;
    assert_eq!(flipped.status(), StatusCode::CONFLICT);

    // Another user cannot write into the session, with or without a taken id.
    let foreign = post(
        &other_token,
        &path,
        json!({ "id": id, "role": "user", "content": "hello" }),
    )
    .await;
    assert_eq!(foreign.status(), StatusCode::NOT_FOUND);

    let stored: Vec<Value> = server.get_json(&path, &token).await;
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0]["content"], "hello");
}

#[tokio::test]
async fn a_database_that_is_gone_is_503_and_says_so_without_details() {
    let db = TestDb::migrated().await;
    let (_, token) = user_with_token(&db, "gone@example.com", Plan::Pro).await;
    let server = TestServer::start(&db).await;
    db.pool.close().await;
    let response = server.get("/v1/usage", Some(&token)).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body = response.text().await.unwrap();
    let error: ErrorResponse = serde_json::from_str(&body).unwrap();
    assert_eq!(error.error.code, "database_unavailable");
    assert!(!body.to_lowercase().contains("pool"), "{body}");
}

/// What PostgreSQL refuses is sorted by whose fault it is: the client's (4xx codes) or the
/// server's (`internal`), from real errors of a real server.
#[tokio::test]
async fn database_refusals_map_to_client_or_server_errors() {
    let db = TestDb::migrated().await;
    let refusal = |sql: &'static str| {
        let pool = db.pool.clone();
        async move {
            let error = sqlx::query(sql).execute(&pool).await.unwrap_err();
            polydev::error::Error::from(error).code()
        }
    };
    let missing_session = "INSERT INTO chat_messages (session_id, role, content)
                           VALUES ('00000000-0000-0000-0000-000000000001', 'user', 'x')";
    assert_eq!(refusal(missing_session).await, "not_found");
    let id =
        "INSERT INTO users (user_id, email) VALUES ('00000000-0000-0000-0000-000000000002', 'a@b')";
    sqlx::query(id).execute(&db.pool).await.unwrap();
    assert_eq!(refusal(id).await, "conflict");
    assert_eq!(
        refusal("INSERT INTO users (email) VALUES (E'nul\\x00')").await,
        "invalid_request"
    );
    assert_eq!(
        refusal("INSERT INTO plan_tiers (tier) VALUES (NULL)").await,
        "invalid_request"
    );
    assert_eq!(refusal("SELECT * FROM no_such_table").await, "internal");
}
