//! The chat page (`/chat`) in a real browser (Debian's Chromium via playwright-core) over the
//! mock upstreams: answers side by side with their latency, tokens and cost, each model's own
//! context on a follow-up, rename, client-side search, Markdown/JSON export, a quota refusal
//! that names the limit and its reset, history reopened, delete for good; and for a
//! zero-knowledge account, everything sealed in the browser and opened there again.
//! Screenshots go to `$POLYDEV_SCREENSHOT_DIR` (a temporary directory when unset; the ones in
//! docs/screenshots/ come from here).

use std::path::PathBuf;

use polydev::accounts::{self, Scope};
use polydev_zk::KdfParams;
use serde_json::Value;

use crate::accounts_web::verified_user;
use crate::common::{TestDb, mock_gateway, run_browser_script};
use crate::http_api::TestServer;

/// `content`, `encrypted_content_v2`, `migrated_to_zk`, `model_id` of a `chat_messages` row.
type StoredMessage = (Option<String>, Option<String>, Option<bool>, Option<String>);

async fn drive(server: &TestServer, args: &[&str], shots: &std::path::Path) -> Value {
    let dir = std::env::var("POLYDEV_SCREENSHOT_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| shots.to_path_buf());
    let mut all = vec![server.base.as_str()];
    all.extend_from_slice(args);
    let out = run_browser_script("chat-page.mjs", &all, Some(&dir)).await;
    for shot in out["shots"].as_array().unwrap() {
        assert!(std::path::Path::new(shot.as_str().unwrap()).exists());
    }
    out
}

fn texts(answers: &Value) -> Vec<(String, String)> {
    answers
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["model"].as_str().unwrap().to_string(),
                a["text"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[tokio::test]
async fn chat_page_streams_models_side_by_side_and_keeps_history_in_chromium() {
    let db = TestDb::migrated().await;
    let mock = polydev_mock::MockUpstream::start().await;
    let server = TestServer::start_with(&db, mock_gateway(&mock.base_url())).await;
    let (email, password) = ("chat@example.com", "the chat user's password");
    let user_id = verified_user(&db, email, password).await;
    sqlx::query(
        "UPDATE user_perspective_quotas SET eco_perspectives_used = eco_perspectives_limit WHERE user_id = $1",
    )
    .bind(user_id)
    .execute(&db.pool)
    .await
    .unwrap();
    let shots = tempfile::tempdir().unwrap();
    let out = drive(&server, &[email, password], shots.path()).await;

    assert_eq!(out["signedOut"], true);
    assert_eq!(
        texts(&out["first"]),
        [
            (
                "gpt-premium".into(),
                "gpt-premium thinks about: Should we shard the orders table?".into()
            ),
            (
                "claude-normal".into(),
                "claude-normal thinks about: Should we shard the orders table?".into()
            ),
        ],
        "{out}"
    );
    for answer in out["first"].as_array().unwrap() {
        let meta = answer["meta"].as_str().unwrap();
        assert!(
            meta.contains(" ms") && meta.contains("out tokens") && meta.contains('$'),
            "latency, tokens and cost: {meta}"
        );
    }
    // Each model saw its own first question and answer before the follow-up.
    for (model, text) in texts(&out["second"]) {
        assert_eq!(
            text,
            format!("{model} thinks about: And with a read replica? (after 2 earlier messages)")
        );
    }
    assert_ne!(
        out["quotaBefore"], out["quotaAfter"],
        "quota shown as spent"
    );
    assert!(
        out["quotaAfter"].as_str().unwrap().contains("premium 1 of"),
        "{out}"
    );
    assert_eq!(out["titles"], serde_json::json!(["Sharding orders"]));
    let markdown = out["markdown"].as_str().unwrap();
    assert!(
        markdown.starts_with("# Sharding orders\n")
            && markdown.contains("### claude-normal")
            && markdown.contains("(after 2 earlier messages)"),
        "{markdown}"
    );
    assert_eq!(out["markdownName"], "Sharding-orders.md");
    assert_eq!(out["json"]["turns"].as_array().unwrap().len(), 2);
    assert_eq!(
        out["json"]["turns"][1]["answers"][0]["model"],
        "gpt-premium"
    );
    let refusal = out["refusal"].as_str().unwrap();
    assert!(
        refusal.contains("monthly eco perspectives limit reached") && refusal.contains("resets on"),
        "the refusal names the limit and when it resets: {refusal}"
    );
    assert_eq!(out["reopenedTurns"], 2, "the refused turn was not stored");
    assert!(
        out["reopenedMeta"].as_str().unwrap().contains("out tokens"),
        "{out}"
    );
    assert_eq!(out["phoneOverflow"], false, "{out}");
    assert_eq!(out["deleted"], true);

    // Four answers were charged and recorded; the conversation is gone from the database.
    let usage: i64 =
        sqlx::query_scalar("SELECT count(*) FROM perspective_usage WHERE user_id = $1")
            .bind(user_id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(usage, 4);
    let (sessions, messages): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM chat_sessions WHERE user_id = $1),
                (SELECT count(*) FROM chat_messages)",
    )
    .bind(user_id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((sessions, messages), (0, 0), "deleted for good");
}

#[tokio::test]
async fn chat_page_seals_every_message_and_title_for_a_zero_knowledge_account() {
    let db = TestDb::migrated().await;
    let mock = polydev_mock::MockUpstream::start().await;
    let server = TestServer::start_with(&db, mock_gateway(&mock.base_url())).await;
    let (email, password) = ("zk-chat@example.com", "the zk chat user's password");
    let user_id = verified_user(&db, email, password).await;
    let token = accounts::create_scoped_token(&db.pool, user_id, "zk", None, Scope::Account)
        .await
        .unwrap()
        .token;
    crate::zk::zk_client(&server.base, &token)
        .enable(crate::zk::PASSWORD, KdfParams::MINIMUM)
        .await
        .unwrap();
    let shots = tempfile::tempdir().unwrap();
    let out = drive(
        &server,
        &[email, password, crate::zk::PASSWORD],
        shots.path(),
    )
    .await;

    let answered = texts(&out["zkAnswers"]);
    assert_eq!(answered.len(), 2, "{out}");
    assert_eq!(
        texts(&out["zkHistory"]),
        answered,
        "opened in the browser again"
    );
    assert_eq!(
        out["zkTitles"],
        serde_json::json!(["A secret question about our roadmap"])
    );
    assert_eq!(out["zkSearch"], "ok");

    // The server holds envelopes only: no title, no message text.
    let (title, meta): (Option<String>, Option<String>) =
        sqlx::query_as("SELECT title, encrypted_meta_v2 FROM chat_sessions WHERE user_id = $1")
            .bind(user_id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(title, None);
    assert!(meta.unwrap().starts_with("pdz."));
    let rows: Vec<StoredMessage> = sqlx::query_as(
        "SELECT content, encrypted_content_v2, migrated_to_zk, model_id FROM chat_messages
              ORDER BY created_at",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), 3, "the prompt and two answers");
    for (content, envelope, migrated, _) in &rows {
        assert_eq!(content, &None);
        assert!(envelope.as_deref().unwrap().starts_with("pdz."));
        assert_eq!(migrated, &Some(true));
    }
    let mut models: Vec<_> = rows[1..].iter().map(|r| r.3.clone().unwrap()).collect();
    models.sort();
    assert_eq!(models, ["gemini-eco", "gpt-premium"]);
}
