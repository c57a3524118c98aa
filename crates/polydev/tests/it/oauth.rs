//! OAuth 2.1 for `/mcp`: the official MCP TypeScript SDK client runs the whole dance against
//! the real `polydev serve`; the refusals (PKCE, codes, redirects, refresh reuse, audience,
//! registration) are checked over HTTP against the in-process server.

use std::path::PathBuf;

use base64::Engine;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::process::{Child, Command};

use polydev::accounts::{self, Scope};
use polydev_mock::MockUpstream;

use crate::accounts_web::{Browser, hidden_fields, verified_user};
use crate::common::{TestDb, mock_catalogue};
use crate::http_api::TestServer;

pub const BIN: &str = env!("CARGO_BIN_EXE_polydev");

pub struct Served {
    _child: Child,
    pub base: String,
    _mock: MockUpstream,
    _dir: tempfile::TempDir,
}

/// `polydev serve` on a free port; its public URL is the default (`http://` + the address).
pub async fn serve(db: &TestDb) -> Served {
    let mock = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models.toml");
    std::fs::write(&models, mock_catalogue(&mock.base_url())).unwrap();
    let (child, base) = crate::common::spawn_serve(
        Command::new(BIN)
            .args(["serve", "--listen", "127.0.0.1:0", "--models"])
            .arg(&models)
            .env("DATABASE_URL", db.url())
            .env("POLYDEV_TEST_MOCK_KEY", "mock-key")
            .env_remove("POLYDEV_PUBLIC_URL"),
    )
    .await;
    Served {
        _child: child,
        base,
        _mock: mock,
        _dir: dir,
    }
}

pub fn client_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/mcp-client")
}

#[tokio::test]
async fn oauth_the_sdk_client_runs_the_whole_dance_against_polydev_serve() {
    let db = TestDb::migrated().await;
    let email = "ide-user@example.com";
    let password = "a password for the IDE";
    let user_id = verified_user(&db, email, password).await;
    let server = serve(&db).await;
    let args = json!({ "prompt": "Tabs or spaces?", "models": ["gpt-premium", "claude-normal"] });
    let out = Command::new("node")
        .arg("oauth-client.mjs")
        .args([&server.base, email, password, &args.to_string()])
        .current_dir(client_dir())
        .output()
        .await
        .expect("run node");
    assert!(
        out.status.success(),
        "node failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    let out: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    let base = &server.base;

    // 401 → discovery → registration → authorization.
    let challenge = out["firstChallenge"].as_str().unwrap();
    assert!(
        challenge.contains(&format!(
            r#"resource_metadata="{base}/.well-known/oauth-protected-resource/mcp""#
        )),
        "{challenge}"
    );
    assert_eq!(out["firstError"], "UnauthorizedError", "{out}");
    assert!(
        out["clientId"].as_str().unwrap().starts_with("pdc_"),
        "{out}"
    );
    let authorization = out["authorizationUrl"].as_str().unwrap();
    assert!(
        authorization.starts_with(&format!("{base}/oauth/authorize?")),
        "{out}"
    );
    assert!(
        authorization.contains("code_challenge_method=S256"),
        "{out}"
    );
    assert!(authorization.contains("resource="), "{out}");
    // Sign-in, then consent naming the client and where it goes back to.
    assert_eq!(out["beforeSignIn"]["status"], 303, "{out}");
    assert!(
        out["beforeSignIn"]["location"]
            .as_str()
            .unwrap()
            .starts_with("/account/signin?next=%2Foauth%2Fauthorize"),
        "{out}"
    );
    assert_eq!(out["afterSignIn"]["status"], 303, "{out}");
    assert_eq!(out["consent"]["status"], 200, "{out}");
    assert_eq!(out["consent"]["client"], "Polydev SDK test client");
    assert_eq!(out["consent"]["redirectHost"], "http://127.0.0.1:33418");
    assert_eq!(out["callback"]["status"], 303);
    assert_eq!(out["callback"]["origin"], "http://127.0.0.1:33418/callback");
    assert_eq!(out["callback"]["stateEchoed"], true);
    assert_eq!(out["callback"]["iss"], base.as_str(), "RFC 9207");
    assert_eq!(out["callback"]["hasCode"], true);
    // Token → tools/call.
    assert_eq!(out["tokenScope"], "mcp", "an MCP client gets `mcp`");
    assert_eq!(out["hasRefreshToken"], true);
    assert_eq!(
        out["tools"],
        json!(["get_perspectives", "list_available_models", "get_usage"])
    );
    assert_eq!(out["isError"], false, "{out}");
    assert_eq!(out["structured"]["totals"]["succeeded"], 2, "{out}");
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM perspective_usage WHERE user_id = $1")
        .bind(user_id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(rows, 2);
    // Refresh → the old access token is retired, the new one works.
    assert_eq!(out["refreshResult"], "AUTHORIZED", "{out}");
    assert_eq!(out["refreshed"], true, "{out}");
    assert_eq!(out["oldAccessAfterRefresh"]["status"], 401, "{out}");
    assert_eq!(out["newAccessAfterRefresh"]["status"], 200, "{out}");
    assert_eq!(out["toolsAfterRefresh"], 3);
    // Revoke → 401 at once.
    assert_eq!(out["revokeStatus"], 200);
    assert_eq!(out["afterRevoke"]["status"], 401, "{out}");
    assert!(
        out["afterRevoke"]["challenge"]
            .as_str()
            .unwrap()
            .contains("token_revoked")
            || out["afterRevoke"]["challenge"]
                .as_str()
                .unwrap()
                .contains("revoked"),
        "{out}"
    );

    // What the database holds: hashes, never the secrets; the registration has no plaintext.
    let plaintext: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM mcp_registered_clients
          WHERE client_secret IS NOT NULL OR registration_access_token IS NOT NULL",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(plaintext, 0);
    let live_refresh: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM oauth_refresh_tokens WHERE revoked_at IS NULL AND used_at IS NULL",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(live_refresh, 0, "the family is revoked");
}

// ---- the protocol over HTTP --------------------------------------------------------------------

const REDIRECT: &str = "http://127.0.0.1:45678/cb";

fn pkce() -> (String, String) {
    let verifier = format!("v{}", crate::common::random_hex(32));
    let challenge = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(Sha256::digest(verifier.as_bytes()));
    (verifier, challenge)
}

pub async fn register(server: &TestServer, body: Value) -> (StatusCode, Value) {
    let response = server
        .client
        .post(format!("{}/oauth/register", server.base))
        .json(&body)
        .send()
        .await
        .unwrap();
    (response.status(), response.json().await.unwrap())
}

async fn public_client(server: &TestServer) -> String {
    let (status, body) = register(
        server,
        json!({ "client_name": "Test IDE", "redirect_uris": [REDIRECT], "token_endpoint_auth_method": "none" }),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    body["client_id"].as_str().unwrap().to_string()
}

async fn signed_in(server: &TestServer, db: &TestDb, email: &str) -> (Browser, uuid::Uuid) {
    let user_id = verified_user(db, email, "the user's password 1").await;
    let mut browser = Browser::new(&server.base);
    assert_eq!(
        browser
            .sign_in(email, "the user's password 1")
            .await
            .status(),
        StatusCode::OK
    );
    (browser, user_id)
}

fn authorize_path(
    client_id: &str,
    redirect: &str,
    challenge: &str,
    extra: &[(&str, &str)],
) -> String {
    let mut params: Vec<(&str, &str)> = vec![
        ("response_type", "code"),
        ("client_id", client_id),
        ("redirect_uri", redirect),
        ("code_challenge", challenge),
        ("code_challenge_method", "S256"),
        ("state", "xyz-state"),
    ];
    params.extend_from_slice(extra);
    format!(
        "/oauth/authorize?{}",
        serde_urlencoded::to_string(&params).unwrap()
    )
}

/// The query parameters of a redirect.
fn redirect_params(response: &reqwest::Response) -> Vec<(String, String)> {
    let location = response.headers()["location"].to_str().unwrap();
    let url = url::Url::parse(location).unwrap();
    url.query_pairs().into_owned().collect()
}

fn param(params: &[(String, String)], name: &str) -> Option<String> {
    params
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.clone())
}

/// Authorizes (consent page → approve, or remembered consent) and returns the code.
async fn code(browser: &mut Browser, path: &str, grant_account: bool) -> String {
    let response = browser.get(path).await;
    let response = if response.status() == StatusCode::OK {
        let html = response.text().await.unwrap();
        let mut fields = hidden_fields(&html);
        fields.push(("decision".into(), "approve".into()));
        if grant_account {
            fields.push(("grant_account".into(), "yes".into()));
        }
        browser.form("/oauth/authorize", &fields).await
    } else {
        response
    };
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    let params = redirect_params(&response);
    assert_eq!(param(&params, "state").as_deref(), Some("xyz-state"));
    param(&params, "code").unwrap_or_else(|| panic!("{params:?}"))
}

pub async fn token(server: &TestServer, form: &[(&str, &str)]) -> (StatusCode, Value) {
    let response = server
        .client
        .post(format!("{}/oauth/token", server.base))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(serde_urlencoded::to_string(form).unwrap())
        .send()
        .await
        .unwrap();
    let status = response.status();
    assert_eq!(response.headers()["cache-control"], "no-store");
    (status, response.json().await.unwrap())
}

async fn exchange(
    server: &TestServer,
    client_id: &str,
    code: &str,
    verifier: &str,
) -> (StatusCode, Value) {
    token(
        server,
        &[
            ("grant_type", "authorization_code"),
            ("client_id", client_id),
            ("code", code),
            ("redirect_uri", REDIRECT),
            ("code_verifier", verifier),
        ],
    )
    .await
}

pub async fn mcp_status(server: &TestServer, access_token: &str) -> (u16, String) {
    let response = server
        .client
        .post(format!("{}/mcp", server.base))
        .bearer_auth(access_token)
        .header("accept", "application/json, text/event-stream")
        .json(&json!({ "jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": { "name": "t", "version": "1" } } }))
        .send()
        .await
        .unwrap();
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

#[tokio::test]
async fn oauth_metadata_and_the_mcp_challenge_point_at_each_other() {
    let db = TestDb::migrated().await;
    let server = TestServer::start(&db).await;
    let base = &server.base;
    let response = server
        .client
        .post(format!("{base}/mcp"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let challenge = response.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(
        challenge,
        format!(
            r#"Bearer resource_metadata="{base}/.well-known/oauth-protected-resource/mcp", scope="mcp""#
        )
    );
    for path in [
        "/.well-known/oauth-protected-resource/mcp",
        "/.well-known/oauth-protected-resource",
    ] {
        let prm: Value = server
            .get(path, None)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(prm["resource"], format!("{base}/mcp"));
        assert_eq!(prm["authorization_servers"], json!([base]));
    }
    for path in [
        "/.well-known/oauth-authorization-server",
        "/.well-known/openid-configuration",
    ] {
        let meta: Value = server
            .get(path, None)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(meta["issuer"], base.as_str());
        assert_eq!(meta["code_challenge_methods_supported"], json!(["S256"]));
        assert_eq!(meta["authorization_response_iss_parameter_supported"], true);
        assert_eq!(meta["token_endpoint"], format!("{base}/oauth/token"));
        assert_eq!(
            meta["registration_endpoint"],
            format!("{base}/oauth/register")
        );
    }
    // A configured public URL is the issuer, whatever the Host header says.
    let catalogue = polydev::perspectives::Catalogue::load(None).unwrap();
    let state = polydev::app::AppState::new(
        db.pool.clone(),
        polydev::perspectives::Gateway::new(catalogue),
    )
    .with_public_url("https://polydev.example.com/");
    let other = TestServer::start_state(state).await;
    let meta: Value = other
        .get("/.well-known/oauth-authorization-server", None)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(meta["issuer"], "https://polydev.example.com");
}

#[tokio::test]
async fn oauth_registration_refuses_dangerous_redirects_and_hashes_its_secrets() {
    let db = TestDb::migrated().await;
    let server = TestServer::start(&db).await;
    for bad in [
        "javascript:alert(1)",
        "http://evil.example/cb",
        "data:text/html,x",
        "https://a.example/cb#f",
    ] {
        let (status, body) = register(&server, json!({ "redirect_uris": [bad] })).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
        assert_eq!(body["error"], "invalid_redirect_uri", "{bad}: {body}");
        assert!(body["error_description"].as_str().unwrap().len() > 10);
    }
    let (status, body) = register(
        &server,
        json!({ "redirect_uris": [REDIRECT], "grant_types": ["password"] }),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_client_metadata"))
    );
    let (status, body) = register(
        &server,
        json!({ "redirect_uris": [REDIRECT], "scope": "admin" }),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_scope"))
    );
    let nothing: i64 = sqlx::query_scalar("SELECT count(*) FROM mcp_registered_clients")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(nothing, 0, "refused registrations store nothing");

    // A confidential client: secret and registration token shown once, stored hashed.
    let (status, body) = register(
        &server,
        json!({ "client_name": "Server app", "redirect_uris": ["https://app.example.com/cb"] }),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let secret = body["client_secret"].as_str().unwrap().to_string();
    let registration_token = body["registration_access_token"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(body["token_endpoint_auth_method"], "client_secret_basic");
    let dump: String =
        sqlx::query_scalar("SELECT row_to_json(c)::text FROM mcp_registered_clients c")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(
        !dump.contains(&secret) && !dump.contains(&registration_token),
        "{dump}"
    );

    // RFC 7592: read and update with the registration token; nothing without it.
    let uri = body["registration_client_uri"]
        .as_str()
        .unwrap()
        .to_string();
    let read = server
        .client
        .get(&uri)
        .bearer_auth(&registration_token)
        .send()
        .await
        .unwrap();
    assert_eq!(read.status(), 200);
    let read: Value = read.json().await.unwrap();
    assert_eq!(read["client_name"], "Server app");
    assert!(read.get("client_secret").is_none());
    let refused = server
        .client
        .get(&uri)
        .bearer_auth("pdrat_wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    let updated = server
        .client
        .put(&uri)
        .bearer_auth(&registration_token)
        .json(
            &json!({ "client_name": "Renamed", "redirect_uris": ["https://app.example.com/cb2"] }),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(updated.status(), 200);
    let deleted = server
        .client
        .delete(&uri)
        .bearer_auth(&registration_token)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
    assert_eq!(
        server
            .client
            .get(&uri)
            .bearer_auth(&registration_token)
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
}

#[tokio::test]
async fn oauth_pkce_plain_and_a_wrong_verifier_are_refused() {
    let db = TestDb::migrated().await;
    let server = TestServer::start(&db).await;
    let client_id = public_client(&server).await;
    let (mut browser, _) = signed_in(&server, &db, "pkce@example.com").await;
    let (verifier, challenge) = pkce();

    // `plain`: refused with a redirect carrying the error (the client and redirect are fine).
    let plain = format!(
        "/oauth/authorize?{}",
        serde_urlencoded::to_string([
            ("response_type", "code"),
            ("client_id", client_id.as_str()),
            ("redirect_uri", REDIRECT),
            ("code_challenge", verifier.as_str()),
            ("code_challenge_method", "plain"),
            ("state", "s1"),
        ])
        .unwrap()
    );
    let response = browser.get(&plain).await;
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    let params = redirect_params(&response);
    assert_eq!(param(&params, "error").as_deref(), Some("invalid_request"));
    assert!(
        param(&params, "error_description")
            .unwrap()
            .contains("plain")
    );
    assert_eq!(param(&params, "state").as_deref(), Some("s1"));
    assert_eq!(param(&params, "iss").as_deref(), Some(server.base.as_str()));
    // No PKCE at all: refused too.
    let none = format!(
        "/oauth/authorize?{}",
        serde_urlencoded::to_string([
            ("response_type", "code"),
            ("client_id", client_id.as_str()),
            ("redirect_uri", REDIRECT),
        ])
        .unwrap()
    );
    let params = redirect_params(&browser.get(&none).await);
    assert_eq!(param(&params, "error").as_deref(), Some("invalid_request"));

    // A wrong verifier: invalid_grant, and the code is spent.
    let code = code(
        &mut browser,
        &authorize_path(&client_id, REDIRECT, &challenge, &[]),
        false,
    )
    .await;
    let (wrong, _) = pkce();
    let (status, body) = exchange(&server, &client_id, &code, &wrong).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_grant"))
    );
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .contains("code_verifier")
    );
    let (status, _) = exchange(&server, &client_id, &code, &verifier).await;
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "a code is spent by its first use"
    );
}

#[tokio::test]
async fn oauth_a_code_used_twice_revokes_what_it_issued() {
    let db = TestDb::migrated().await;
    let server = TestServer::start(&db).await;
    let client_id = public_client(&server).await;
    let (mut browser, _) = signed_in(&server, &db, "twice@example.com").await;
    let (verifier, challenge) = pkce();
    let code = code(
        &mut browser,
        &authorize_path(&client_id, REDIRECT, &challenge, &[]),
        false,
    )
    .await;
    let (status, first) = exchange(&server, &client_id, &code, &verifier).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    assert_eq!(first["token_type"], "Bearer");
    assert_eq!(first["scope"], "mcp");
    let access = first["access_token"].as_str().unwrap();
    assert_eq!(mcp_status(&server, access).await.0, 200);

    let (status, second) = exchange(&server, &client_id, &code, &verifier).await;
    assert_eq!(
        (status, second["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_grant"))
    );
    assert!(
        second["error_description"]
            .as_str()
            .unwrap()
            .contains("already used")
    );
    assert_eq!(
        mcp_status(&server, access).await,
        (401, "token_revoked".into())
    );
    let (status, refreshed) = token(
        &server,
        &[
            ("grant_type", "refresh_token"),
            ("client_id", &client_id),
            ("refresh_token", first["refresh_token"].as_str().unwrap()),
        ],
    )
    .await;
    assert_eq!(
        (status, refreshed["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_grant"))
    );
}

#[tokio::test]
async fn oauth_a_redirect_uri_mismatch_shows_an_error_page_and_never_redirects() {
    let db = TestDb::migrated().await;
    let server = TestServer::start(&db).await;
    let client_id = public_client(&server).await;
    let (mut browser, _) = signed_in(&server, &db, "redirect@example.com").await;
    let (_, challenge) = pkce();
    for (client, redirect) in [
        (client_id.as_str(), "https://evil.example/cb"),
        (client_id.as_str(), "http://127.0.0.1:45678/other"),
        (client_id.as_str(), "http://localhost:45678/cb"),
        ("pdc_unknown", REDIRECT),
    ] {
        let response = browser
            .get(&authorize_path(client, redirect, &challenge, &[]))
            .await;
        assert_eq!(
            response.status(),
            StatusCode::BAD_REQUEST,
            "{client} {redirect}"
        );
        assert!(response.headers().get("location").is_none());
        let html = response.text().await.unwrap();
        assert!(html.contains("cannot connect"), "{html}");
    }
    // A loopback redirect on another port is the same app (RFC 8252): accepted.
    let code = code(
        &mut browser,
        &authorize_path(&client_id, "http://127.0.0.1:9999/cb", &challenge, &[]),
        false,
    )
    .await;
    assert_eq!(code.len(), 64);
    // The token request must repeat the same redirect URI.
    let (status, body) = token(
        &server,
        &[
            ("grant_type", "authorization_code"),
            ("client_id", &client_id),
            ("code", &code),
            ("redirect_uri", REDIRECT),
            ("code_verifier", "x"),
        ],
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_grant"))
    );
}

#[tokio::test]
async fn oauth_a_reused_refresh_token_revokes_the_family() {
    let db = TestDb::migrated().await;
    let server = TestServer::start(&db).await;
    let client_id = public_client(&server).await;
    let (mut browser, _) = signed_in(&server, &db, "family@example.com").await;
    let (verifier, challenge) = pkce();
    let code = code(
        &mut browser,
        &authorize_path(&client_id, REDIRECT, &challenge, &[]),
        false,
    )
    .await;
    let (_, first) = exchange(&server, &client_id, &code, &verifier).await;
    let old_refresh = first["refresh_token"].as_str().unwrap().to_string();
    let refresh = |refresh_token: String| {
        let server = &server;
        let client_id = client_id.clone();
        async move {
            token(
                server,
                &[
                    ("grant_type", "refresh_token"),
                    ("client_id", &client_id),
                    ("refresh_token", &refresh_token),
                ],
            )
            .await
        }
    };
    let (status, second) = refresh(old_refresh.clone()).await;
    assert_eq!(status, StatusCode::OK, "{second}");
    let new_access = second["access_token"].as_str().unwrap().to_string();
    assert_ne!(second["refresh_token"], first["refresh_token"], "rotated");
    assert_eq!(mcp_status(&server, &new_access).await.0, 200);
    assert_eq!(
        mcp_status(&server, first["access_token"].as_str().unwrap())
            .await
            .0,
        401,
        "one live access token per family"
    );

    // The old refresh token again: someone has a copy. The whole family goes.
    let (status, reused) = refresh(old_refresh).await;
    assert_eq!(
        (status, reused["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_grant"))
    );
    assert!(
        reused["error_description"]
            .as_str()
            .unwrap()
            .contains("family")
    );
    assert_eq!(
        mcp_status(&server, &new_access).await,
        (401, "token_revoked".into())
    );
    let (status, _) = refresh(second["refresh_token"].as_str().unwrap().to_string()).await;
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "the newest refresh token is revoked too"
    );

    // Another client cannot use or revoke this client's tokens; a wrong grant type is named.
    let other = public_client(&server).await;
    let (status, body) = token(
        &server,
        &[("grant_type", "password"), ("client_id", &other)],
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("unsupported_grant_type"))
    );
    let (status, body) = token(
        &server,
        &[("grant_type", "refresh_token"), ("refresh_token", "x")],
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("invalid_client"))
    );
}

#[tokio::test]
async fn oauth_a_token_for_another_audience_is_refused_at_mcp() {
    let db = TestDb::migrated().await;
    let server = TestServer::start(&db).await;
    let client_id = public_client(&server).await;
    let (mut browser, user_id) = signed_in(&server, &db, "audience@example.com").await;
    let (verifier, challenge) = pkce();
    // Asking for another resource is refused at the authorization endpoint (RFC 8707).
    let response = browser
        .get(&authorize_path(
            &client_id,
            REDIRECT,
            &challenge,
            &[("resource", "https://other.example/mcp")],
        ))
        .await;
    let params = redirect_params(&response);
    assert_eq!(param(&params, "error").as_deref(), Some("invalid_target"));
    // This server's resource is bound into the token.
    let resource = format!("{}/mcp", server.base);
    let code = code(
        &mut browser,
        &authorize_path(&client_id, REDIRECT, &challenge, &[("resource", &resource)]),
        false,
    )
    .await;
    let (status, issued) = exchange(&server, &client_id, &code, &verifier).await;
    assert_eq!(status, StatusCode::OK);
    let audience: Option<String> = sqlx::query_scalar(
        "SELECT audience FROM mcp_user_tokens WHERE oauth_grant_id IS NOT NULL AND active",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(audience, Some(resource));
    assert_eq!(
        mcp_status(&server, issued["access_token"].as_str().unwrap())
            .await
            .0,
        200
    );

    // A token another authorization server's resource was given: refused here.
    let grant: uuid::Uuid = sqlx::query_scalar("SELECT id FROM oauth_grants WHERE user_id = $1")
        .bind(user_id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let mut conn = db.connect().await;
    let foreign = accounts::issue_oauth_access_token(
        &mut conn,
        user_id,
        "foreign",
        Scope::Mcp,
        3600,
        "https://other.example/mcp",
        grant,
        uuid::Uuid::new_v4(),
    )
    .await
    .unwrap();
    assert_eq!(
        mcp_status(&server, &foreign.token).await,
        (401, "token_wrong_audience".into())
    );
    let me = server
        .get("/v1/me", Some(&foreign.token))
        .send()
        .await
        .unwrap();
    assert_eq!(me.status(), 401);
}

#[tokio::test]
async fn oauth_consent_is_remembered_scoped_and_revocable() {
    let db = TestDb::migrated().await;
    let server = TestServer::start(&db).await;
    let client_id = public_client(&server).await;
    let (mut browser, _) = signed_in(&server, &db, "consent@example.com").await;
    let (verifier, challenge) = pkce();
    // The client asks for `mcp account`; the user leaves `account` unticked: `mcp` only.
    let path = authorize_path(
        &client_id,
        REDIRECT,
        &challenge,
        &[("scope", "mcp account")],
    );
    let page = browser.get(&path).await.text().await.unwrap();
    assert!(
        page.contains("Test IDE") && page.contains("http://127.0.0.1:45678"),
        "{page}"
    );
    assert!(page.contains("grant-account"), "{page}");
    // Consent without the CSRF token: 403.
    let fields: Vec<(String, String)> = hidden_fields(&page)
        .into_iter()
        .filter(|(k, _)| k != "csrf_token")
        .collect();
    assert_eq!(
        browser.form("/oauth/authorize", &fields).await.status(),
        StatusCode::FORBIDDEN
    );
    let first = code(&mut browser, &path, false).await;
    let (_, issued) = exchange(&server, &client_id, &first, &verifier).await;
    assert_eq!(issued["scope"], "mcp");
    let access = issued["access_token"].as_str().unwrap().to_string();
    let tokens = server
        .get("/v1/tokens", Some(&access))
        .send()
        .await
        .unwrap();
    assert_eq!(
        tokens.status(),
        403,
        "an mcp token reaches no account route"
    );

    // Remembered: the next authorization redirects at once, with no page.
    let (verifier2, challenge2) = pkce();
    let response = browser
        .get(&authorize_path(&client_id, REDIRECT, &challenge2, &[]))
        .await;
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    let code2 = param(&redirect_params(&response), "code").unwrap();
    let (status, _) = exchange(&server, &client_id, &code2, &verifier2).await;
    assert_eq!(status, StatusCode::OK);

    // Connected apps: listed, and revoking one stops its tokens at once.
    let csrf = browser.csrf().await;
    let grants: Value = browser.get("/v1/oauth/grants").await.json().await.unwrap();
    let grants = grants["grants"].as_array().unwrap().clone();
    assert_eq!(grants.len(), 1);
    assert_eq!(grants[0]["client_name"], "Test IDE");
    let id = grants[0]["id"].as_str().unwrap();
    let revoked = browser
        .json(
            Method::DELETE,
            &format!("/v1/oauth/grants/{id}"),
            Some(&csrf),
            &json!({}),
        )
        .await;
    assert_eq!(revoked.status(), StatusCode::NO_CONTENT);
    assert_eq!(mcp_status(&server, &access).await.0, 401);
    let live: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM mcp_user_tokens WHERE oauth_grant_id IS NOT NULL AND active",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(live, 0);
    // And the consent page is shown again.
    assert_eq!(
        browser
            .get(&authorize_path(&client_id, REDIRECT, &challenge2, &[]))
            .await
            .status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn oauth_cimd_pointing_at_a_private_address_is_refused() {
    let db = TestDb::migrated().await;
    let server = TestServer::start(&db).await;
    let (mut browser, _) = signed_in(&server, &db, "cimd@example.com").await;
    let (_, challenge) = pkce();
    for client_id in [
        "https://127.0.0.1:9/client.json",
        "https://localhost:9/client.json",
        "https://169.254.169.254/latest/meta-data.json",
        "https://[::1]:9/client.json",
        "http://app.example.com/client.json",
    ] {
        let response = browser
            .get(&authorize_path(client_id, REDIRECT, &challenge, &[]))
            .await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{client_id}");
        assert!(response.headers().get("location").is_none());
        let html = response.text().await.unwrap();
        assert!(
            html.contains("private") || html.contains("https"),
            "{client_id}: {html}"
        );
    }
    let cached: i64 = sqlx::query_scalar("SELECT count(*) FROM mcp_registered_clients")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(cached, 0);

    // Listed in --cimd-private-hosts, the host passes the address check (the fetch itself
    // then fails: nothing listens there).
    let catalogue = polydev::perspectives::Catalogue::load(None).unwrap();
    let state = polydev::app::AppState::new(
        db.pool.clone(),
        polydev::perspectives::Gateway::new(catalogue),
    )
    .with_cimd_private_hosts(vec!["127.0.0.1".into()]);
    let allowed = TestServer::start_state(state).await;
    let mut browser = Browser::new(&allowed.base);
    let html = browser
        .get(&authorize_path(
            "https://127.0.0.1:9/client.json",
            REDIRECT,
            &challenge,
            &[],
        ))
        .await
        .text()
        .await
        .unwrap();
    assert!(html.contains("cannot fetch"), "{html}");
    let meta: Value = server
        .get("/.well-known/oauth-authorization-server", None)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(meta["client_id_metadata_document_supported"], true);
}

/// A TLS server on 127.0.0.1 (certificate for `localhost`, issued by a fresh test CA) that
/// serves `document` at any path and counts the fetches. Returns its port, the CA (PEM) and
/// the counter.
async fn metadata_document_server(
    document: impl Fn(u16) -> Value + Send + Sync + 'static,
) -> (u16, String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::rustls;

    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Polydev test CA");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let server_key = rcgen::KeyPair::generate().unwrap();
    let server_cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&server_key, &ca)
        .unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![server_cert.der().clone()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(server_key.serialize_der().into()),
    )
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let fetches = Arc::new(AtomicUsize::new(0));
    let counter = fetches.clone();
    let document = Arc::new(document);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, counter, document) =
                (acceptor.clone(), counter.clone(), document.clone());
            tokio::spawn(async move {
                // A client that does not trust the CA ends the handshake: nothing is served.
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                counter.fetch_add(1, Ordering::SeqCst);
                let body = document(port).to_string();
                let response = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tls.write_all(response.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    (port, ca.pem(), fetches)
}

#[tokio::test]
async fn oauth_cimd_document_over_tls_authorizes_end_to_end_and_is_cached() {
    use std::sync::atomic::Ordering;

    let db = TestDb::migrated().await;
    let (port, ca_pem, fetches) = metadata_document_server(|port| {
        json!({
            "client_id": format!("https://localhost:{port}/oauth/client.json"),
            "client_name": "Metadata IDE",
            "redirect_uris": [REDIRECT],
            "grant_types": ["authorization_code", "refresh_token"],
            "response_types": ["code"],
        })
    })
    .await;
    let client_id = format!("https://localhost:{port}/oauth/client.json");
    let (verifier, challenge) = pkce();

    // Without the test CA among its roots, the server refuses the document's certificate.
    let untrusting = TestServer::start_state(
        polydev::app::AppState::new(
            db.pool.clone(),
            polydev::perspectives::Gateway::new(
                polydev::perspectives::Catalogue::load(None).unwrap(),
            ),
        )
        .with_cimd_private_hosts(vec!["localhost".into()]),
    )
    .await;
    let (mut browser, _) = signed_in(&untrusting, &db, "cimd-tls@example.com").await;
    let response = browser
        .get(&authorize_path(&client_id, REDIRECT, &challenge, &[]))
        .await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert!(response.text().await.unwrap().contains("cannot fetch"));
    assert_eq!(fetches.load(Ordering::SeqCst), 0, "no request was served");

    // With it (what `--cimd-extra-root-ca FILE` loads), the whole flow works.
    let ca_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(ca_file.path(), &ca_pem).unwrap();
    let roots =
        reqwest::Certificate::from_pem_bundle(&std::fs::read(ca_file.path()).unwrap()).unwrap();
    let server = TestServer::start_state(
        polydev::app::AppState::new(
            db.pool.clone(),
            polydev::perspectives::Gateway::new(
                polydev::perspectives::Catalogue::load(None).unwrap(),
            ),
        )
        .with_cimd_private_hosts(vec!["localhost".into()])
        .with_cimd_extra_roots(roots),
    )
    .await;
    let mut browser = Browser::new(&server.base);
    assert_eq!(
        browser
            .sign_in("cimd-tls@example.com", "the user's password 1")
            .await
            .status(),
        StatusCode::OK
    );
    let consent = browser
        .get(&authorize_path(&client_id, REDIRECT, &challenge, &[]))
        .await;
    assert_eq!(consent.status(), StatusCode::OK);
    let html = consent.text().await.unwrap();
    assert!(
        html.contains("Metadata IDE"),
        "the consent page names the client"
    );
    assert_eq!(fetches.load(Ordering::SeqCst), 1);
    let first = code(
        &mut browser,
        &authorize_path(&client_id, REDIRECT, &challenge, &[]),
        false,
    )
    .await;
    let (status, tokens) = exchange(&server, &client_id, &first, &verifier).await;
    assert_eq!(status, StatusCode::OK, "{tokens}");
    let access = tokens["access_token"].as_str().unwrap();
    assert_eq!(mcp_status(&server, access).await.0, 200);
    let kind: (String, bool) = sqlx::query_as(
        "SELECT registration_kind, fetched_at IS NOT NULL FROM mcp_registered_clients WHERE client_id = $1",
    )
    .bind(&client_id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(kind, ("metadata_document".to_string(), true));

    // Within the cache's hour the document is not fetched again, by any step of the flow.
    assert_eq!(
        fetches.load(Ordering::SeqCst),
        1,
        "the token step used the cache"
    );
    let (verifier2, challenge2) = pkce();
    let code2 = code(
        &mut browser,
        &authorize_path(&client_id, REDIRECT, &challenge2, &[]),
        false,
    )
    .await;
    assert_eq!(
        exchange(&server, &client_id, &code2, &verifier2).await.0,
        StatusCode::OK
    );
    assert_eq!(fetches.load(Ordering::SeqCst), 1, "cached");

    // Past it, the next use fetches the document again.
    sqlx::query(
        "UPDATE mcp_registered_clients SET fetched_at = now() - interval '2 hours' WHERE client_id = $1",
    )
    .bind(&client_id)
    .execute(&db.pool)
    .await
    .unwrap();
    let (_, challenge3) = pkce();
    let _ = browser
        .get(&authorize_path(&client_id, REDIRECT, &challenge3, &[]))
        .await;
    assert_eq!(fetches.load(Ordering::SeqCst), 2, "refetched after the TTL");
}
