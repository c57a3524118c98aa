//! The zero-knowledge web page in a real browser (Debian's Chromium driven by playwright-core):
//! sign in (e-mail and password) → plaintext history → master password → migration → reload → unlock → the history reads
//! correctly, and the database holds no plaintext for the user.

use std::path::PathBuf;

use serde_json::Value;
use tokio::process::Command;

use crate::common::TestDb;
use crate::http_api::TestServer;
use crate::zk::seed_history;

fn web_tests() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/web");
    assert!(
        dir.join("node_modules/playwright-core").exists(),
        "playwright-core is not installed: run `npm ci` in tests/web"
    );
    dir
}

#[tokio::test]
async fn the_page_sets_a_password_migrates_and_reads_history_in_the_browser() {
    let db = TestDb::migrated().await;
    // The page signs in with e-mail and password (a session cookie), not a pasted token.
    let account = ("browser@example.com", "the account password 1");
    let user_id = crate::accounts_web::verified_user(&db, account.0, account.1).await;
    let token = format!("{}:{}", account.0, account.1);
    seed_history(&db, user_id, 12).await;
    let expected: Vec<String> = sqlx::query_scalar(
        "SELECT m.content FROM chat_messages m JOIN chat_sessions s ON s.id = m.session_id WHERE s.user_id = $1
         UNION ALL SELECT m.content FROM messages m JOIN sessions s ON s.id = m.session_id WHERE s.user_id = $1",
    )
    .bind(user_id)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let server = TestServer::start(&db).await;
    let password = "Correct Horse Battery Staple 42";
    let out = Command::new("node")
        .arg("zk-page.mjs")
        .args([
            &server.base,
            &token,
            password,
            &serde_json::to_string(&expected).unwrap(),
        ])
        .current_dir(web_tests())
        .output()
        .await
        .expect("run node");
    assert!(
        out.status.success(),
        "browser test failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));

    assert_eq!(result["pageErrors"], serde_json::json!([]), "{result}");
    assert!(
        result["weakHint"].as_str().unwrap().contains("weak"),
        "{result}"
    );
    assert!(
        result["strongHint"].as_str().unwrap().contains("strong"),
        "{result}"
    );
    let recovery = result["recoveryKey"].as_str().unwrap();
    assert_eq!(
        recovery.len(),
        64 + 7,
        "8 groups of 8 hex digits: {recovery}"
    );
    assert!(
        result["statusAfter"].as_str().unwrap().contains("24 of 24"),
        "{result}"
    );
    assert!(
        result["wrongPasswordError"]
            .as_str()
            .unwrap()
            .contains("wrong master password"),
        "{result}"
    );
    assert_eq!(
        result["allShown"], true,
        "every message reads correctly after reload and unlock: {result}"
    );
    assert_eq!(result["locks"], 24, "{result}");

    let plaintext: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM chat_messages m JOIN chat_sessions s ON s.id = m.session_id
                  WHERE s.user_id = $1 AND (m.content IS NOT NULL OR NOT m.migrated_to_zk))
              + (SELECT count(*) FROM messages m JOIN sessions s ON s.id = m.session_id
                  WHERE s.user_id = $1 AND (m.content IS NOT NULL OR NOT m.migrated_to_zk))",
    )
    .bind(user_id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        plaintext, 0,
        "the database holds no plaintext for this user"
    );
    let leaked: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM chat_messages m WHERE m::text LIKE '%chat message%')
             OR EXISTS (SELECT 1 FROM messages m WHERE m::text LIKE '%session message%')",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(!leaked);
}
