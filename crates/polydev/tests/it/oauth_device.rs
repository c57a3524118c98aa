//! The device authorization grant (RFC 8628): `polydev login` against `polydev serve`, approved
//! in the browser, then `polydev mcp` with the stored token; deny, expiry and slow_down.

use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use crate::accounts_web::{Browser, hidden_fields, verified_user};
use crate::common::TestDb;
use crate::http_api::TestServer;
use crate::oauth::{BIN, client_dir, mcp_status, register, serve, token};

const DEVICE: &str = "urn:ietf:params:oauth:grant-type:device_code";

async fn approve_in_browser(browser: &mut Browser, url: &str, decision: &str) -> String {
    let page = browser.get(url).await;
    assert_eq!(page.status(), StatusCode::OK, "{url}");
    let html = page.text().await.unwrap();
    assert!(
        html.contains("polydev CLI") || html.contains("Device tool"),
        "{html}"
    );
    let mut fields = hidden_fields(&html);
    fields.push(("decision".into(), decision.into()));
    let done = browser.form("/device", &fields).await;
    assert_eq!(done.status(), StatusCode::OK);
    done.text().await.unwrap()
}

#[tokio::test]
async fn oauth_device_login_is_approved_in_the_browser_and_polydev_mcp_uses_the_stored_token() {
    let db = TestDb::migrated().await;
    let email = "cli@example.com";
    let password = "the CLI user's password";
    verified_user(&db, email, password).await;
    let server = serve(&db).await;
    let config = tempfile::tempdir().unwrap();
    let mut login = Command::new(BIN)
        .args(["login", "--server-url", &server.base])
        .env("POLYDEV_CONFIG_DIR", config.path())
        .env("POLYDEV_LOCAL_CLIS", "off")
        .env_remove("POLYDEV_USER_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(login.stdout.take().unwrap()).lines();
    let first = lines.next_line().await.unwrap().expect("instructions");
    let url = first
        .strip_prefix("To sign in, open ")
        .unwrap_or_else(|| panic!("{first}"))
        .to_string();
    assert!(
        url.starts_with(&format!("{}/device?user_code=", server.base)),
        "{url}"
    );
    let code_line = lines.next_line().await.unwrap().unwrap();
    assert!(code_line.contains("enter the code"), "{code_line}");

    // The person: not signed in → sign-in form → back to the code's page → Allow.
    let mut browser = Browser::new(&server.base);
    let response = browser.get(&url).await;
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    assert!(browser.sign_in(email, password).await.status().is_success());
    let done = approve_in_browser(&mut browser, &url, "approve").await;
    assert!(done.contains("go back to your terminal"), "{done}");

    let mut rest = String::new();
    while let Some(line) = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
        .await
        .expect("login finishes")
        .unwrap()
    {
        rest.push_str(&line);
        rest.push('\n');
    }
    let status = login.wait().await.unwrap();
    assert!(status.success(), "{rest}");
    assert!(rest.contains("Signed in"), "{rest}");
    let path = config.path().join("credentials.json");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let stored: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert!(stored["access_token"].as_str().unwrap().starts_with("pd_"));
    assert_eq!(stored["scope"], "mcp");
    assert_eq!(stored["server_url"], server.base.as_str());

    // `polydev mcp` without POLYDEV_USER_TOKEN uses it (driven by the official SDK over stdio).
    let args = json!({ "prompt": "Tabs or spaces?", "models": ["gpt-premium", "claude-normal"] });
    let out = Command::new("node")
        .arg("client.mjs")
        .args(["stdio", BIN, &server.base, "-", &args.to_string()])
        .env("POLYDEV_CONFIG_DIR", config.path())
        .env("POLYDEV_LOCAL_CLIS", "off")
        .env_remove("POLYDEV_USER_TOKEN")
        .current_dir(client_dir())
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out["isError"], false, "{out}");
    assert_eq!(out["structured"]["totals"]["succeeded"], 2, "{out}");
}

/// A client of the device grant, and a started authorization: (client_id, device_code, user_code).
async fn start(server: &TestServer, client_id: Option<&str>) -> (String, String, String) {
    let client_id = match client_id {
        Some(id) => id.to_string(),
        None => {
            let (status, body) = register(
                server,
                json!({ "client_name": "Device tool", "grant_types": [DEVICE, "refresh_token"], "token_endpoint_auth_method": "none" }),
            )
            .await;
            assert_eq!(status, StatusCode::CREATED, "{body}");
            body["client_id"].as_str().unwrap().to_string()
        }
    };
    let response = server
        .client
        .post(format!("{}/oauth/device_authorization", server.base))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(serde_urlencoded::to_string([("client_id", client_id.as_str())]).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["interval"], 5);
    assert_eq!(body["verification_uri"], format!("{}/device", server.base));
    (
        client_id,
        body["device_code"].as_str().unwrap().to_string(),
        body["user_code"].as_str().unwrap().to_string(),
    )
}

async fn poll(server: &TestServer, client_id: &str, device_code: &str) -> (StatusCode, Value) {
    token(
        server,
        &[
            ("grant_type", DEVICE),
            ("client_id", client_id),
            ("device_code", device_code),
        ],
    )
    .await
}

/// Lets the next poll through without waiting out the interval: the last poll moves back.
async fn age_last_poll(db: &TestDb) {
    sqlx::query("UPDATE oauth_device_codes SET last_polled_at = now() - interval '1 minute'")
        .execute(&db.pool)
        .await
        .unwrap();
}

#[tokio::test]
async fn oauth_device_grant_pending_slow_down_deny_expire_and_approve() {
    let db = TestDb::migrated().await;
    let server = TestServer::start(&db).await;
    verified_user(&db, "device@example.com", "the device password").await;
    let mut browser = Browser::new(&server.base);
    assert!(
        browser
            .sign_in("device@example.com", "the device password")
            .await
            .status()
            .is_success()
    );

    // Pending, then polling too fast: slow_down, and the interval grows.
    let (client_id, device_code, user_code) = start(&server, None).await;
    let (status, body) = poll(&server, &client_id, &device_code).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("authorization_pending"))
    );
    let (status, body) = poll(&server, &client_id, &device_code).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("slow_down"))
    );
    assert!(
        body["error_description"].as_str().unwrap().contains("10 s"),
        "{body}"
    );

    // Deny.
    let url = format!("/device?user_code={}", user_code.to_lowercase());
    let page = approve_in_browser(&mut browser, &url, "deny").await;
    assert!(page.contains("Denied"), "{page}");
    age_last_poll(&db).await;
    let (status, body) = poll(&server, &client_id, &device_code).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("access_denied"))
    );
    age_last_poll(&db).await;
    let (_, body) = poll(&server, &client_id, &device_code).await;
    assert_eq!(body["error"], "invalid_grant", "a denied code is spent");

    // Expire.
    let (_, device_code, user_code) = start(&server, Some(&client_id)).await;
    sqlx::query("UPDATE oauth_device_codes SET expires_at = now() - interval '1 second' WHERE user_code = $1")
        .bind(user_code.replace('-', ""))
        .execute(&db.pool)
        .await
        .unwrap();
    let (status, body) = poll(&server, &client_id, &device_code).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("expired_token"))
    );
    let expired = browser.get(&format!("/device?user_code={user_code}")).await;
    assert_eq!(
        expired.status(),
        StatusCode::BAD_REQUEST,
        "an expired code cannot be approved"
    );

    // Approve: tokens once, with the `mcp` scope; the device code then is spent.
    let (_, device_code, user_code) = start(&server, Some(&client_id)).await;
    // A form without the CSRF token changes nothing.
    let refused = browser
        .form(
            "/device",
            &[
                ("user_code".into(), user_code.clone()),
                ("decision".into(), "approve".into()),
            ],
        )
        .await;
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    approve_in_browser(
        &mut browser,
        &format!("/device?user_code={user_code}"),
        "approve",
    )
    .await;
    let (status, body) = poll(&server, &client_id, &device_code).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["scope"], "mcp");
    assert!(body["refresh_token"].as_str().unwrap().starts_with("pdr_"));
    assert_eq!(
        mcp_status(&server, body["access_token"].as_str().unwrap())
            .await
            .0,
        200
    );
    age_last_poll(&db).await;
    let (_, again) = poll(&server, &client_id, &device_code).await;
    assert_eq!(again["error"], "invalid_grant");
    // Another client cannot poll this client's code; the device grant needs registering.
    let (status, body) = register(
        &server,
        json!({ "redirect_uris": ["http://127.0.0.1:1/cb"], "token_endpoint_auth_method": "none" }),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let other = body["client_id"].as_str().unwrap();
    let (_, body) = poll(&server, other, &device_code).await;
    assert_eq!(body["error"], "unauthorized_client");
}
