//! `no_provider_configured` versus `quota_exceeded`: a call that cannot run because no provider
//! is configured says so (and what to set) on every surface, a quota error comes only when the
//! quota is the reason, and neither reserves or charges anything.

use std::collections::HashMap;
use std::sync::Arc;

use reqwest::StatusCode;
use serde_json::{Value, json};

use polydev::accounts::{self, Plan, Scope};
use polydev::db::Pools;
use polydev::error::Error;
use polydev::perspectives::provider::{ErrorClass, HttpProvider, Provider};
use polydev::perspectives::{
    Catalogue, Gateway, PerspectivesRequest, ProgressSink, Status, get_perspectives,
};
use polydev_mock::MockUpstream;
use uuid::Uuid;

use crate::common::{TestDb, mock_catalogue};
use crate::http_api::{TestServer, user_with_scoped_token};

/// A gateway over the mock catalogue in which only `configured` providers have a key.
pub fn gateway_with_only(base: &str, configured: &[&str]) -> Gateway {
    let catalogue = Catalogue::parse(&mock_catalogue(base)).expect("mock catalogue");
    let client = polydev::net::http_client();
    let providers: HashMap<String, Arc<dyn Provider>> = catalogue
        .providers
        .iter()
        .filter(|(name, _)| configured.contains(&name.as_str()))
        .map(|(name, spec)| {
            let provider = HttpProvider::new(
                name,
                spec.kind,
                &spec.base_url,
                Some("test-key".into()),
                spec.streaming,
                client.clone(),
            );
            (name.clone(), Arc::new(provider) as Arc<dyn Provider>)
        })
        .collect();
    Gateway::with_providers(catalogue, providers)
}

/// (messages, premium, normal, eco) used, reservations held, usage rows.
async fn charged(db: &TestDb, user: Uuid) -> ((i32, i32, i32, i32), i64, i64) {
    let used = sqlx::query_as(
        "SELECT messages_used, premium_perspectives_used, normal_perspectives_used, eco_perspectives_used
           FROM user_perspective_quotas WHERE user_id = $1",
    )
    .bind(user)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let reserved: i64 =
        sqlx::query_scalar("SELECT count(*) FROM quota_reservations WHERE user_id = $1")
            .bind(user)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM perspective_usage WHERE user_id = $1")
        .bind(user)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    (used, reserved, rows)
}

const NOTHING: ((i32, i32, i32, i32), i64, i64) = ((0, 0, 0, 0), 0, 0);

async fn call(
    db: &TestDb,
    gateway: &Gateway,
    user: Uuid,
    request: &PerspectivesRequest,
) -> Result<polydev::perspectives::PerspectivesResult, Error> {
    get_perspectives(
        Pools::single(&db.pool),
        gateway,
        user,
        request,
        ProgressSink::none(),
    )
    .await
}

fn chosen_by_polydev() -> PerspectivesRequest {
    PerspectivesRequest {
        prompt: "Tabs or spaces?".into(),
        ..Default::default()
    }
}

async fn exhaust_premium(db: &TestDb, user: Uuid) {
    sqlx::query(
        "UPDATE user_perspective_quotas SET premium_perspectives_limit = 0 WHERE user_id = $1",
    )
    .bind(user)
    .execute(&db.pool)
    .await
    .unwrap();
}

#[tokio::test]
async fn no_configured_provider_is_not_a_quota_error_and_says_what_to_set() {
    let db = TestDb::migrated().await;
    let mock = MockUpstream::start().await;
    let gateway = gateway_with_only(&mock.base_url(), &[]);
    let user = accounts::create_user(&db.pool, "np@example.com", Plan::Pro)
        .await
        .unwrap()
        .user_id;

    // polydev chooses: nothing is configured.
    let error = call(&db, &gateway, user, &chosen_by_polydev())
        .await
        .unwrap_err();
    assert_eq!(error.code(), "no_provider_configured", "{error}");
    let message = error.public_message();
    for what in [
        "POLYDEV_TEST_MOCK_KEY",
        "polydev mcp",
        "Claude Code",
        "`openai`",
    ] {
        assert!(message.contains(what), "{what} missing: {message}");
    }

    // Named models, none configured: the same, before anything is reserved.
    let named = PerspectivesRequest::to_models("Tabs?", &["gpt-premium", "claude-normal"]);
    let error = call(&db, &gateway, user, &named).await.unwrap_err();
    assert_eq!(error.code(), "no_provider_configured");
    assert_eq!(
        charged(&db, user).await,
        NOTHING,
        "nothing reserved or charged"
    );
}

#[tokio::test]
async fn quota_is_the_reason_only_when_the_configured_models_are_out_of_it() {
    let db = TestDb::migrated().await;
    let mock = MockUpstream::start().await;
    // openai is configured (premium models only), anthropic and google are not.
    let gateway = gateway_with_only(&mock.base_url(), &["openai"]);
    let user = accounts::create_user(&db.pool, "mixed@example.com", Plan::Pro)
        .await
        .unwrap()
        .user_id;
    exhaust_premium(&db, user).await;

    // polydev chooses: the configured provider's tier is used up -> quota.
    let error = call(&db, &gateway, user, &chosen_by_polydev())
        .await
        .unwrap_err();
    assert_eq!(error.code(), "quota_exceeded", "{error}");
    assert!(!error.public_message().contains("no provider"), "{error}");

    // Named: one unconfigured model, one configured whose tier is used up -> quota, and the
    // result says which limit.
    let named = PerspectivesRequest::to_models("Tabs?", &["gpt-premium", "claude-normal"]);
    let error = call(&db, &gateway, user, &named).await.unwrap_err();
    assert_eq!(error.code(), "quota_exceeded", "{error}");
    assert!(
        error
            .public_message()
            .contains("premium perspectives limit"),
        "{error}"
    );
    assert_eq!(
        charged(&db, user).await,
        NOTHING,
        "nothing reserved or charged"
    );

    // Asking only for providers that are not configured is not a quota matter either.
    let mut anthropic_only = chosen_by_polydev();
    anthropic_only.request_providers = vec!["anthropic".into()];
    let error = call(&db, &gateway, user, &anthropic_only)
        .await
        .unwrap_err();
    assert_eq!(error.code(), "no_provider_configured", "{error}");
    assert!(error.public_message().contains("`anthropic`"), "{error}");
}

#[tokio::test]
async fn an_unconfigured_model_beside_a_configured_one_reserves_nothing() {
    let db = TestDb::migrated().await;
    let mock = MockUpstream::start().await;
    let gateway = gateway_with_only(&mock.base_url(), &["openai"]);
    let user = accounts::create_user(&db.pool, "half@example.com", Plan::Pro)
        .await
        .unwrap()
        .user_id;
    let named = PerspectivesRequest::to_models("Tabs?", &["claude-normal", "gpt-premium"]);
    let result = call(&db, &gateway, user, &named).await.unwrap();
    let claude = &result.perspectives[0];
    assert_eq!(claude.model, "claude-normal");
    assert_eq!(claude.status, Status::Error);
    assert_eq!(
        claude.error.as_ref().unwrap().class,
        ErrorClass::NotConfigured
    );
    assert_eq!(result.perspectives[1].status, Status::Ok);
    // One message and one premium unit; the normal tier was never touched.
    assert_eq!(charged(&db, user).await, ((1, 1, 0, 0), 0, 1));
}

#[tokio::test]
async fn every_surface_reports_no_provider_configured() {
    let db = TestDb::migrated().await;
    let mock = MockUpstream::start().await;
    let server = TestServer::start_with(&db, gateway_with_only(&mock.base_url(), &[])).await;
    let (user, token) =
        user_with_scoped_token(&db, "surfaces@example.com", Plan::Pro, Scope::Mcp).await;
    let body = json!({ "prompt": "Tabs or spaces?" });

    // REST JSON.
    let response = server
        .client
        .post(format!("{}/v1/perspectives", server.base))
        .bearer_auth(&token)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_IMPLEMENTED);
    let json: Value = response.json().await.unwrap();
    assert_eq!(json["error"]["code"], "no_provider_configured", "{json}");
    let message = json["error"]["message"].as_str().unwrap().to_string();

    // SSE: the `error` event carries the same body.
    let text = server
        .client
        .post(format!("{}/v1/perspectives", server.base))
        .bearer_auth(&token)
        .header("accept", "text/event-stream")
        .json(&body)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let data = text
        .split("\n\n")
        .find(|event| event.contains("event: error"))
        .and_then(|event| event.lines().find_map(|l| l.strip_prefix("data: ")))
        .unwrap_or_else(|| panic!("no error event in {text}"));
    let sse: Value = serde_json::from_str(data).unwrap();
    assert_eq!(sse["error"]["code"], "no_provider_configured");
    assert_eq!(sse["error"]["message"], message.as_str());

    // MCP (official SDK client over streamable HTTP): a tool error with the same code.
    let out = crate::mcp::sdk_client(&["http", &server.base, &token, &body.to_string()]).await;
    assert_eq!(out["isError"], true, "{out}");
    assert_eq!(
        out["structured"]["error"]["code"], "no_provider_configured",
        "{out}"
    );
    assert!(
        out["text"]
            .as_str()
            .unwrap()
            .contains("(no_provider_configured)")
    );

    assert_eq!(
        charged(&db, user).await,
        NOTHING,
        "nothing reserved or charged"
    );
}
