//! The account page in a real browser (Debian's Chromium via playwright-core) with a virtual
//! WebAuthn authenticator: keyboard sign-in, usage, a token, a passkey registered, sign-out,
//! sign-in with the passkey, phone width. Screenshots go to `$POLYDEV_SCREENSHOT_DIR` (a
//! temporary directory when unset; the main ones are in docs/screenshots/).

use std::path::PathBuf;

use serde_json::Value;

use crate::accounts_web::verified_user;
use crate::common::{TestDb, run_browser_script};
use crate::http_api::TestServer;

#[tokio::test]
async fn accounts_web_page_registers_a_passkey_and_signs_in_with_it_in_chromium() {
    let db = TestDb::migrated().await;
    let email = "passkey@example.com";
    let password = "the passkey user's password";
    let user_id = verified_user(&db, email, password).await;
    // Model calls on two days of this month, of two models.
    sqlx::query(
        "INSERT INTO perspective_usage (user_id, model_name, model_tier, provider, input_tokens,
                                        output_tokens, total_tokens, estimated_cost, created_at)
         SELECT $1, m, t, 'openai', 100, 200, 300, 0.01,
                (date_trunc('month', now() AT TIME ZONE 'UTC') + interval '1 hour' + d * interval '1 day') AT TIME ZONE 'UTC'
           FROM (VALUES ('gpt-premium', 'premium', 0), ('gpt-premium', 'premium', 0),
                        ('claude-normal', 'normal', 0)) v(m, t, d)",
    )
    .bind(user_id)
    .execute(&db.pool)
    .await
    .unwrap();
    let catalogue = polydev::perspectives::Catalogue::load(None).unwrap();
    let state = polydev::app::AppState::new(
        db.pool.clone(),
        polydev::perspectives::Gateway::new(catalogue),
    );
    let server = TestServer::start_localhost(state).await;
    let shots = tempfile::tempdir().unwrap();
    let dir = std::env::var("POLYDEV_SCREENSHOT_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| shots.path().to_path_buf());
    // An MCP client registered, for the consent page.
    let registered: Value = server
        .client
        .post(format!("{}/oauth/register", server.base))
        .json(&serde_json::json!({ "client_name": "Browser Test IDE", "redirect_uris": ["http://127.0.0.1:45678/cb"], "token_endpoint_auth_method": "none" }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let authorize = format!(
        "{}/oauth/authorize?{}",
        server.base,
        serde_urlencoded::to_string([
            ("response_type", "code"),
            ("client_id", registered["client_id"].as_str().unwrap()),
            ("redirect_uri", "http://127.0.0.1:45678/cb"),
            (
                "code_challenge",
                "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
            ),
            ("code_challenge_method", "S256"),
            ("state", "browser"),
        ])
        .unwrap()
    );
    let out = run_browser_script(
        "account-page.mjs",
        &[&server.base, email, password, &authorize],
        Some(&dir),
    )
    .await;
    assert_eq!(out["focusReachedEmail"], true, "{out}");
    assert_eq!(out["whoami"], format!("Signed in as {email}"));
    assert_eq!(out["quotaRows"], 4, "{out}");
    assert_eq!(
        out["modelRows"],
        serde_json::json!(["gpt-premium", "claude-normal"]),
        "{out}"
    );
    assert_eq!(out["firstBar"], "3", "3 calls on the first day: {out}");
    assert!(
        out["newToken"].as_str().unwrap().starts_with("pd_"),
        "{out}"
    );
    assert_eq!(out["credentials"], 1, "{out}");
    assert_eq!(
        out["statusAfterPasskey"], "Signed in with a passkey.",
        "{out}"
    );
    assert_eq!(out["whoamiAfterPasskey"], format!("Signed in as {email}"));
    assert_eq!(
        out["phoneOverflow"], false,
        "readable at phone width: {out}"
    );
    for shot in out["shots"].as_array().unwrap() {
        assert!(std::path::Path::new(shot.as_str().unwrap()).exists());
    }

    let (passkeys, used): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(last_used_at) FROM account_passkeys WHERE user_id = $1",
    )
    .bind(user_id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((passkeys, used), (1, 1));
    let sessions: i64 =
        sqlx::query_scalar("SELECT count(*) FROM account_web_sessions WHERE user_id = $1")
            .bind(user_id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(sessions, 2, "a password session and a passkey session");
    let challenges: i64 = sqlx::query_scalar("SELECT count(*) FROM account_webauthn_challenges")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(challenges, 0, "ceremony state is single-use");
}

/// A user who has made no model call yet: the page says so, without a script error (it used to
/// throw on the empty model table and stop drawing the rest of the page).
#[tokio::test]
async fn accounts_web_page_of_a_new_user_without_usage_has_no_script_error() {
    let db = TestDb::migrated().await;
    let (email, password) = ("new@example.com", "the new user's password");
    verified_user(&db, email, password).await;
    let catalogue = polydev::perspectives::Catalogue::load(None).unwrap();
    let state = polydev::app::AppState::new(
        db.pool.clone(),
        polydev::perspectives::Gateway::new(catalogue),
    );
    let server = TestServer::start_localhost(state).await;
    let out = run_browser_script(
        "account-new-user.mjs",
        &[&server.base, email, password],
        None,
    )
    .await;
    assert_eq!(
        out["modelRows"],
        serde_json::json!(["No model calls yet this month."]),
        "{out}"
    );
}
