//! Renaming and deleting chat sessions (`PATCH`/`DELETE /v1/chat/sessions/{id}`) in both legacy
//! systems, and a message's model and usage: only the owner, really deleted, plaintext refused
//! once zero-knowledge is on.

use polydev::accounts::Plan;
use reqwest::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::common::TestDb;
use crate::http_api::{TestServer, user_with_token};

async fn sessions(db: &TestDb, user_id: Uuid) -> (Uuid, Uuid) {
    crate::zk::seed_history(db, user_id, 3).await;
    let chat = sqlx::query_scalar("SELECT id FROM chat_sessions WHERE user_id = $1")
        .bind(user_id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let legacy = sqlx::query_scalar("SELECT id FROM sessions WHERE user_id = $1")
        .bind(user_id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    (chat, legacy)
}

#[tokio::test]
async fn sessions_are_renamed_and_deleted_for_good_in_both_systems_by_their_owner_only() {
    let db = TestDb::migrated().await;
    let server = TestServer::start(&db).await;
    let (owner, token) = user_with_token(&db, "owner@example.com", Plan::Pro).await;
    let (_, other) = user_with_token(&db, "other@example.com", Plan::Pro).await;
    let (chat, legacy) = sessions(&db, owner).await;
    let request = |method: &str, id: Uuid, token: &str| {
        server
            .client
            .request(
                method.parse().unwrap(),
                format!("{}/v1/chat/sessions/{id}", server.base),
            )
            .bearer_auth(token)
    };

    for id in [chat, legacy] {
        // Another user's session is not found, and stays as it was.
        let response = request("PATCH", id, &other)
            .json(&json!({ "title": "stolen" }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        let response = request("DELETE", id, &other).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        // Bad renames.
        for body in [
            json!({}),
            json!({ "title": "" }),
            json!({ "title": "a", "encrypted_meta": "pdz.x" }),
        ] {
            let response = request("PATCH", id, &token)
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{body}");
        }
        let renamed: Value = request("PATCH", id, &token)
            .json(&json!({ "title": "Renamed" }))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(renamed["title"], "Renamed");
    }
    let titles: (String, String) = sqlx::query_as(
        "SELECT (SELECT title FROM chat_sessions WHERE id = $1), (SELECT name FROM sessions WHERE id = $2)",
    )
    .bind(chat)
    .bind(legacy)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(titles, ("Renamed".into(), "Renamed".into()));

    // A message's model and usage are kept (chat system) and read back.
    let stored: Value = server
        .client
        .post(format!("{}/v1/chat/sessions/{chat}/messages", server.base))
        .bearer_auth(&token)
        .json(
            &json!({ "role": "assistant", "content": "an answer", "model": "gpt-4.1",
                        "usage": { "latency_ms": 12, "cost_usd": "0.001" } }),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stored["model"], "gpt-4.1");
    assert_eq!(stored["usage"]["latency_ms"], 12);
    let too_big =
        json!({ "role": "assistant", "content": "x", "usage": { "pad": "y".repeat(2000) } });
    let response = server
        .client
        .post(format!("{}/v1/chat/sessions/{chat}/messages", server.base))
        .bearer_auth(&token)
        .json(&too_big)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);

    for (id, messages) in [(chat, 4), (legacy, 3)] {
        let deleted: Value = request("DELETE", id, &token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(deleted["deleted_messages"], messages);
        let again = request("DELETE", id, &token).send().await.unwrap();
        assert_eq!(again.status(), StatusCode::NOT_FOUND);
    }
    let left: (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM chat_sessions), (SELECT count(*) FROM chat_messages),
                (SELECT count(*) FROM sessions), (SELECT count(*) FROM messages)",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(left, (0, 0, 0, 0), "nothing left behind");
}

#[tokio::test]
async fn with_zero_knowledge_on_a_rename_must_be_sealed() {
    let db = TestDb::migrated().await;
    let server = TestServer::start(&db).await;
    let (owner, token) = user_with_token(&db, "zk-rename@example.com", Plan::Pro).await;
    let (chat, _) = sessions(&db, owner).await;
    crate::zk::zk_client(&server.base, &token)
        .enable(crate::zk::PASSWORD, polydev_zk::KdfParams::MINIMUM)
        .await
        .unwrap();
    let response = server
        .client
        .patch(format!("{}/v1/chat/sessions/{chat}", server.base))
        .bearer_auth(&token)
        .json(&json!({ "title": "plaintext" }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    // Nor is anything that is not an envelope for this session.
    let response = server
        .client
        .patch(format!("{}/v1/chat/sessions/{chat}", server.base))
        .bearer_auth(&token)
        .json(&json!({ "encrypted_meta": "pdz.not-an-envelope" }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let title: Option<String> = sqlx::query_scalar("SELECT title FROM chat_sessions WHERE id = $1")
        .bind(chat)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(title.as_deref(), Some("old chat"), "unchanged");
}

#[tokio::test]
async fn perspectives_history_gives_each_model_its_own_earlier_turns() {
    let db = TestDb::migrated().await;
    let mock = polydev_mock::MockUpstream::start().await;
    let server = TestServer::start_with(&db, crate::common::mock_gateway(&mock.base_url())).await;
    let (_, token) = user_with_token(&db, "history@example.com", Plan::Pro).await;
    let ask = |body: Value| {
        server
            .client
            .post(format!("{}/v1/perspectives", server.base))
            .bearer_auth(&token)
            .json(&body)
            .send()
    };
    let turns = json!([{ "role": "user", "content": "first" }, { "role": "assistant", "content": "its answer" }]);
    let result: Value = ask(
        json!({ "prompt": "next", "models": ["gpt-premium", "claude-normal", "gemini-eco"],
                                     "history": { "claude-normal": turns, "gemini-eco": turns } }),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let texts: Vec<&str> = result["perspectives"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["text"].as_str().unwrap())
        .collect();
    assert_eq!(
        texts,
        [
            "gpt-premium thinks about: next",
            "claude-normal thinks about: next (after 2 earlier messages)",
            "gemini-eco thinks about: next (after 2 earlier messages)",
        ]
    );
    for (body, what) in [
        (
            json!({ "prompt": "x", "history": { "gpt-9": [] } }),
            "unknown model",
        ),
        (
            json!({ "prompt": "x", "history": { "gpt-premium": [{ "role": "system", "content": "y" }] } }),
            "a role other than user or assistant",
        ),
        (
            json!({ "prompt": "x", "history": { "gpt-premium": vec![json!({ "role": "user", "content": "y" }); 201] } }),
            "too many turns",
        ),
    ] {
        let response = ask(body).await.unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{what}");
    }
    assert_eq!(mock.stats().started(), 3, "refused calls reach no model");
}
