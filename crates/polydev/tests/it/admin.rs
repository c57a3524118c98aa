//! The admin console (docs/admin.md): every admin route refuses everyone but a signed-in admin
//! (a table over the router's admin routes, so a new route cannot be forgotten); every change
//! writes one audit row in its transaction and bad input changes nothing (and writes none);
//! suspension is enforced; concurrent edits lose no update; the log is append-only; analytics
//! and the command line.

use std::collections::BTreeSet;
use std::path::PathBuf;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use uuid::Uuid;

use polydev::accounts::{self, Plan, Scope};
use polydev::admin::{self, Actor, PlanLimits, UserStatus};
use polydev::error::Error;
use polydev::http::ADMIN_ROUTES;

use crate::accounts_web::{Browser, verified_user};
use crate::common::TestDb;
use crate::http_api::{TestServer, user_with_scoped_token};

const PASSWORD: &str = "an admin's long password";

async fn make_admin(db: &TestDb, user_id: Uuid) {
    sqlx::query("UPDATE profiles SET is_admin = true WHERE id = $1")
        .bind(user_id)
        .execute(&db.pool)
        .await
        .unwrap();
}

async fn audit_rows(db: &TestDb) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM admin_audit_log")
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

/// A digest of everything the admin routes could change.
async fn snapshot(db: &TestDb) -> Vec<Option<String>> {
    sqlx::query_scalar(
        "SELECT md5(coalesce(string_agg(t, '|' ORDER BY t), '')) FROM (
            SELECT row(user_id, tier, status, subscription_plan)::text AS t FROM users
            UNION ALL SELECT row(id, is_admin, subscription_tier, current_plan_tier)::text FROM profiles
            UNION ALL SELECT row(user_id, plan_tier, messages_per_month, premium_perspectives_limit,
                                 normal_perspectives_limit, eco_perspectives_limit, messages_used,
                                 premium_perspectives_used)::text FROM user_perspective_quotas
            UNION ALL SELECT row(id, active)::text FROM mcp_user_tokens
            UNION ALL SELECT row(id, revoked_at)::text FROM account_web_sessions
            UNION ALL SELECT row(tier, messages_per_month, premium_perspectives_limit, updated_at)::text FROM plan_tiers
            UNION ALL SELECT row(tier, requests_per_minute)::text FROM rate_limit_tiers
            UNION ALL SELECT row(id)::text FROM admin_audit_log) x",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

/// `(method, path)` of the `/v1/admin` rows of the scope table in docs/api.md.
fn documented_admin_routes() -> BTreeSet<(String, String)> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/api.md");
    let text = std::fs::read_to_string(path).unwrap();
    let section = text.split("## Scopes").nth(1).unwrap();
    let section = section.split("\n## ").next().unwrap();
    section
        .lines()
        .filter_map(|line| line.split('`').nth(1))
        .filter_map(|route| route.split_once(' '))
        .filter(|(_, path)| path.starts_with("/v1/admin"))
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect()
}

/// The paths routed in src/http/admin.rs under `/v1/admin`.
fn routed_admin_paths() -> BTreeSet<String> {
    let source = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/http/admin.rs"),
    )
    .unwrap();
    source
        .split(".route(\"")
        .skip(1)
        .map(|piece| piece.split('"').next().unwrap().to_string())
        .filter(|path| path.starts_with("/v1/admin"))
        .collect()
}

/// A valid request for each admin route (the path's `{id}` is `target`, `{tier}` is `pro`).
fn request_for(method: &str, path: &str, target: Uuid) -> (Method, String, Option<Value>) {
    let concrete = path
        .replace("{id}", &target.to_string())
        .replace("{tier}", "pro");
    let body = match (method, path) {
        ("PUT", "/v1/admin/users/{id}/plan") => Some(json!({ "plan": "plus" })),
        ("POST", "/v1/admin/users/{id}/quota/grant") => {
            Some(json!({ "limit": "premium", "amount": 5 }))
        }
        ("PUT", "/v1/admin/users/{id}/status") => Some(json!({ "status": "suspended" })),
        ("PUT", "/v1/admin/users/{id}/admin") => Some(json!({ "admin": false })),
        ("PUT", "/v1/admin/plans/{tier}") => Some(json!({
            "messages_per_month": null, "premium_perspectives_limit": 700,
            "normal_perspectives_limit": 2500, "eco_perspectives_limit": 8000 })),
        ("PUT", "/v1/admin/rate-tiers/{tier}") => Some(json!({ "requests_per_minute": 333 })),
        ("POST", _) => Some(json!({})),
        _ => None,
    };
    (method.parse().unwrap(), concrete, body)
}

async fn call(
    browser: &mut Browser,
    csrf: Option<&str>,
    bearer: Option<&str>,
    (method, path, body): &(Method, String, Option<Value>),
) -> (StatusCode, Value) {
    let client = reqwest::Client::new();
    let mut request = client.request(method.clone(), browser.url(path));
    if let Some(body) = body {
        request = request.json(body);
    }
    if let Some(csrf) = csrf {
        request = request.header("x-csrf-token", csrf);
    }
    if let Some(bearer) = bearer {
        request = request.bearer_auth(bearer);
    }
    let response = browser.send(request).await;
    let status = response.status();
    let text = response.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

#[tokio::test]
async fn admin_every_route_refuses_everyone_but_a_signed_in_admin() {
    // The list the test walks is the router's: every /v1/admin route of the source is on it,
    // and the docs' scope table has exactly these rows.
    let listed: BTreeSet<String> = ADMIN_ROUTES.iter().map(|(_, p)| p.to_string()).collect();
    assert_eq!(routed_admin_paths(), listed);
    let listed_routes: BTreeSet<(String, String)> = ADMIN_ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(documented_admin_routes(), listed_routes);

    let db = TestDb::migrated().await;
    let server = TestServer::start(&db).await;
    let admin_id = verified_user(&db, "root@example.com", PASSWORD).await;
    make_admin(&db, admin_id).await;
    let admin_token = accounts::create_scoped_token(&db.pool, admin_id, "t", None, Scope::Account)
        .await
        .unwrap()
        .token;
    verified_user(&db, "user@example.com", PASSWORD).await;
    let (target, _) =
        user_with_scoped_token(&db, "target@example.com", Plan::Free, Scope::Mcp).await;
    // A second admin, so that taking the target's admin rights away is allowed.
    make_admin(&db, target).await;

    let mut nobody = Browser::new(&server.base);
    // The page itself is static (its data needs the admin session), under the strict CSP.
    for path in ["/admin", "/admin.js", "/admin.css"] {
        let page = nobody.get(path).await;
        assert_eq!(page.status(), StatusCode::OK, "{path}");
        let csp = page.headers()["content-security-policy"].to_str().unwrap();
        assert!(
            csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
            "{csp}"
        );
    }
    let mut user = Browser::new(&server.base);
    assert_eq!(
        user.sign_in("user@example.com", PASSWORD).await.status(),
        StatusCode::OK
    );
    let user_csrf = user.csrf().await;
    let mut root = Browser::new(&server.base);
    assert_eq!(
        root.sign_in("root@example.com", PASSWORD).await.status(),
        StatusCode::OK
    );
    let root_csrf = root.csrf().await;

    let before = snapshot(&db).await;
    for (method, path) in ADMIN_ROUTES {
        let request = request_for(method, path, target);
        let (status, body) = call(&mut nobody, None, None, &request).await;
        assert_eq!(
            status,
            StatusCode::UNAUTHORIZED,
            "{method} {path} unauthenticated: {body}"
        );
        let (status, body) = call(&mut user, Some(&user_csrf), None, &request).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (StatusCode::FORBIDDEN, Some("admin_required")),
            "{method} {path} as a signed-in non-admin: {body}"
        );
        let (status, body) = call(&mut nobody, None, Some(&admin_token), &request).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (StatusCode::FORBIDDEN, Some("admin_session_required")),
            "{method} {path} with an admin's account token: {body}"
        );
        if *method != "GET" {
            // The admin's own session without the CSRF token.
            let (status, body) = call(&mut root, None, None, &request).await;
            assert_eq!(
                (status, body["error"]["code"].as_str()),
                (StatusCode::FORBIDDEN, Some("csrf_failed")),
                "{method} {path} without CSRF: {body}"
            );
        }
    }
    assert_eq!(snapshot(&db).await, before, "refused calls changed nothing");
    assert_eq!(audit_rows(&db).await, 0);

    let mut changes = 0;
    for (method, path) in ADMIN_ROUTES {
        let request = request_for(method, path, target);
        let (status, body) = call(&mut root, Some(&root_csrf), None, &request).await;
        assert_eq!(
            status,
            StatusCode::OK,
            "{method} {path} as an admin: {body}"
        );
        if *method != "GET" {
            changes += 1;
        }
    }
    assert_eq!(audit_rows(&db).await, changes, "one audit row per change");
    let actors: Vec<String> = sqlx::query_scalar("SELECT DISTINCT actor FROM admin_audit_log")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(actors, [format!("user:{admin_id}")]);
}

#[tokio::test]
async fn admin_bad_input_gets_a_clear_error_and_changes_nothing() {
    let db = TestDb::migrated().await;
    let root = accounts::create_user(&db.pool, "root@example.com", Plan::Pro)
        .await
        .unwrap()
        .user_id;
    make_admin(&db, root).await;
    let user = accounts::create_user(&db.pool, "ada@example.com", Plan::Free)
        .await
        .unwrap()
        .user_id;
    let nobody_admin = accounts::create_user(&db.pool, "eve@example.com", Plan::Free)
        .await
        .unwrap()
        .user_id;
    let me = Actor::Admin(root);
    let cli = Actor::Cli("ops".into());
    let before = snapshot(&db).await;
    let pool = &db.pool;
    let limits = |premium| PlanLimits {
        messages_per_month: Some(10),
        premium_perspectives_limit: premium,
        normal_perspectives_limit: 10,
        eco_perspectives_limit: 10,
        expected_updated_at: None,
    };
    let outcomes: Vec<(&str, Error)> = vec![
        (
            "bad plan",
            admin::set_plan(pool, &me, user, "platinum")
                .await
                .unwrap_err(),
        ),
        (
            "NUL plan",
            admin::set_plan(pool, &me, user, "pro\0").await.unwrap_err(),
        ),
        (
            "negative grant",
            admin::grant_quota(pool, &me, user, "premium", -5)
                .await
                .unwrap_err(),
        ),
        (
            "zero grant",
            admin::grant_quota(pool, &me, user, "premium", 0)
                .await
                .unwrap_err(),
        ),
        (
            "huge grant",
            admin::grant_quota(pool, &me, user, "premium", 10_000_000)
                .await
                .unwrap_err(),
        ),
        (
            "unknown limit",
            admin::grant_quota(pool, &me, user, "gold", 5)
                .await
                .unwrap_err(),
        ),
        (
            "unlimited limit",
            admin::grant_quota(pool, &me, root, "messages", 5)
                .await
                .unwrap_err(),
        ),
        (
            "suspend yourself",
            admin::set_status(pool, &me, root, UserStatus::Suspended)
                .await
                .unwrap_err(),
        ),
        (
            "last admin suspended",
            admin::set_status(pool, &cli, root, UserStatus::Suspended)
                .await
                .unwrap_err(),
        ),
        (
            "last admin removed",
            admin::set_admin(pool, &me, root, false).await.unwrap_err(),
        ),
        (
            "revoke yourself",
            admin::revoke_access(pool, &me, root).await.unwrap_err(),
        ),
        (
            "unknown user",
            admin::set_plan(pool, &me, Uuid::new_v4(), "pro")
                .await
                .unwrap_err(),
        ),
        (
            "unknown user revoke",
            admin::revoke_access(pool, &me, Uuid::new_v4())
                .await
                .unwrap_err(),
        ),
        (
            "negative plan limit",
            admin::update_plan(pool, &me, "free", &limits(-1))
                .await
                .unwrap_err(),
        ),
        (
            "unknown plan",
            admin::update_plan(pool, &me, "gold", &limits(1))
                .await
                .unwrap_err(),
        ),
        (
            "zero rate",
            admin::set_rate_tier(pool, &me, "free", 0, None)
                .await
                .unwrap_err(),
        ),
        (
            "unknown rate tier",
            admin::set_rate_tier(pool, &me, "gold", 10, None)
                .await
                .unwrap_err(),
        ),
        (
            "stale rate edit",
            admin::set_rate_tier(pool, &me, "free", 10, Some(31))
                .await
                .unwrap_err(),
        ),
        (
            "not an admin",
            admin::set_plan(pool, &Actor::Admin(nobody_admin), user, "pro")
                .await
                .unwrap_err(),
        ),
        (
            "bad page",
            admin::list_users(pool, None, 0, 0).await.unwrap_err(),
        ),
        ("bad days", admin::usage(pool, 0).await.unwrap_err()),
        (
            "bad audit page",
            admin::list_audit(pool, 501, None, None).await.unwrap_err(),
        ),
    ];
    for (what, error) in &outcomes {
        let expected = match *what {
            "suspend yourself"
            | "last admin suspended"
            | "last admin removed"
            | "revoke yourself"
            | "stale rate edit" => "conflict",
            "unknown user" | "unknown user revoke" | "unknown plan" | "unknown rate tier" => {
                "not_found"
            }
            "not an admin" => "admin_required",
            _ => "invalid_request",
        };
        assert_eq!(error.code(), expected, "{what}: {error}");
        assert!(!error.public_message().is_empty());
    }
    assert!(
        outcomes[0].1.public_message().contains("free, plus, pro"),
        "{}",
        outcomes[0].1
    );
    assert_eq!(snapshot(&db).await, before, "nothing changed");
    assert_eq!(audit_rows(&db).await, 0, "and no audit row was written");

    // A change that changes nothing writes no row either.
    admin::set_plan(pool, &me, user, "free").await.unwrap();
    admin::set_status(pool, &me, user, UserStatus::Active)
        .await
        .unwrap();
    assert_eq!(audit_rows(&db).await, 0);

    // A real change: the plan, the profile and the quota's limits follow; one row, before/after.
    let changed = admin::set_plan(pool, &me, user, "pro").await.unwrap();
    assert_eq!(changed.plan.as_deref(), Some("pro"));
    let detail = admin::user_detail(pool, user).await.unwrap();
    assert_eq!(detail.quota.as_ref().unwrap().premium.limit, Some(600));
    let profile = accounts::find_profile(pool, user).await.unwrap().unwrap();
    assert_eq!(profile.current_plan_tier.as_deref(), Some("pro"));
    let entries = admin::list_audit(pool, 10, None, None).await.unwrap();
    assert_eq!(entries.len(), 1);
    let entry = &entries[0];
    assert_eq!(entry.action, "user.plan");
    assert_eq!(entry.actor, format!("user:{root}"));
    assert_eq!(entry.actor_user_id, Some(root));
    assert_eq!(entry.target_id, user.to_string());
    assert_eq!(entry.before.as_ref().unwrap()["plan"], "free");
    assert_eq!(entry.after.as_ref().unwrap()["plan"], "pro");
    assert_eq!(
        entry.after.as_ref().unwrap()["quota"]["limits"]["premium"],
        600
    );

    // With a second admin, the first may step down; then the second is the last.
    admin::set_admin(pool, &cli, user, true).await.unwrap();
    admin::set_admin(pool, &me, root, false).await.unwrap();
    let last = admin::set_admin(pool, &cli, user, false).await.unwrap_err();
    assert_eq!(last.code(), "conflict");
}

#[tokio::test]
async fn admin_suspension_and_revocation_are_enforced_at_once() {
    let db = TestDb::migrated().await;
    let server = TestServer::start(&db).await;
    let root = verified_user(&db, "root@example.com", PASSWORD).await;
    make_admin(&db, root).await;
    let ada = verified_user(&db, "ada@example.com", PASSWORD).await;
    let token = accounts::create_scoped_token(&db.pool, ada, "ide", None, Scope::Mcp)
        .await
        .unwrap()
        .token;
    let mut ada_browser = Browser::new(&server.base);
    assert_eq!(
        ada_browser
            .sign_in("ada@example.com", PASSWORD)
            .await
            .status(),
        StatusCode::OK
    );
    let me = |token: String| {
        let client = server.client.clone();
        let url = format!("{}/v1/me", server.base);
        async move {
            let response = client.get(url).bearer_auth(token).send().await.unwrap();
            let status = response.status();
            let body: Value = response.json().await.unwrap();
            (
                status,
                body["error"]["code"].as_str().unwrap_or("").to_string(),
            )
        }
    };
    assert_eq!(me(token.clone()).await.0, StatusCode::OK);

    let mut root_browser = Browser::new(&server.base);
    root_browser.sign_in("root@example.com", PASSWORD).await;
    let csrf = root_browser.csrf().await;
    let suspended = root_browser
        .json(
            Method::PUT,
            &format!("/v1/admin/users/{ada}/status"),
            Some(&csrf),
            &json!({ "status": "suspended" }),
        )
        .await;
    assert_eq!(suspended.status(), StatusCode::OK);
    assert_eq!(
        me(token.clone()).await,
        (StatusCode::UNAUTHORIZED, "account_suspended".into())
    );
    let session = ada_browser.get("/v1/tokens").await;
    assert_eq!(
        session.status(),
        StatusCode::UNAUTHORIZED,
        "the web session is refused too"
    );

    let reactivated = root_browser
        .json(
            Method::PUT,
            &format!("/v1/admin/users/{ada}/status"),
            Some(&csrf),
            &json!({ "status": "active" }),
        )
        .await;
    assert_eq!(reactivated.status(), StatusCode::OK);
    assert_eq!(me(token.clone()).await.0, StatusCode::OK);
    assert_eq!(ada_browser.get("/v1/tokens").await.status(), StatusCode::OK);

    // Invalid input over HTTP: 400 and nothing changes.
    let before = snapshot(&db).await;
    let bad = root_browser
        .json(
            Method::PUT,
            &format!("/v1/admin/users/{ada}/status"),
            Some(&csrf),
            &json!({ "status": "banned" }),
        )
        .await;
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    let bad = root_browser
        .json(
            Method::POST,
            &format!("/v1/admin/users/{ada}/quota/grant"),
            Some(&csrf),
            &json!({ "limit": "premium", "amount": -1 }),
        )
        .await;
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    let own = root_browser
        .json(
            Method::PUT,
            &format!("/v1/admin/users/{root}/status"),
            Some(&csrf),
            &json!({ "status": "suspended" }),
        )
        .await;
    assert_eq!(own.status(), StatusCode::CONFLICT);
    let not_uuid = root_browser.get("/v1/admin/users/not-a-uuid").await;
    assert_eq!(not_uuid.status(), StatusCode::BAD_REQUEST);
    assert_eq!(snapshot(&db).await, before);

    let revoked: Value = root_browser
        .json(
            Method::POST,
            &format!("/v1/admin/users/{ada}/revoke"),
            Some(&csrf),
            &json!({}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(revoked["tokens"], 1, "{revoked}");
    assert_eq!(revoked["sessions"], 1, "{revoked}");
    assert_eq!(
        me(token).await,
        (StatusCode::UNAUTHORIZED, "token_revoked".into())
    );
    assert_eq!(
        ada_browser.get("/v1/tokens").await.status(),
        StatusCode::UNAUTHORIZED
    );

    // Demoted while signed in: the next admin request is refused.
    let (other, _) = user_with_scoped_token(&db, "other@example.com", Plan::Free, Scope::Mcp).await;
    admin::set_admin(&db.pool, &Actor::Cli("ops".into()), other, true)
        .await
        .unwrap();
    admin::set_admin(&db.pool, &Actor::Cli("ops".into()), root, false)
        .await
        .unwrap();
    let refused = root_browser.get("/v1/admin/users").await;
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn admin_concurrent_edits_lose_no_update() {
    let db = TestDb::migrated().await;
    let root = accounts::create_user(&db.pool, "root@example.com", Plan::Pro)
        .await
        .unwrap()
        .user_id;
    make_admin(&db, root).await;
    let second = accounts::create_user(&db.pool, "second@example.com", Plan::Pro)
        .await
        .unwrap()
        .user_id;
    make_admin(&db, second).await;
    let user = accounts::create_user(&db.pool, "ada@example.com", Plan::Free)
        .await
        .unwrap()
        .user_id;
    let me = Actor::Admin(root);

    // Twenty grants at once all count.
    let grants = (0..20).map(|_| {
        let pool = db.pool.clone();
        let me = me.clone();
        async move { admin::grant_quota(&pool, &me, user, "premium", 1).await }
    });
    for result in futures_util::future::join_all(grants).await {
        result.unwrap();
    }
    let detail = admin::user_detail(&db.pool, user).await.unwrap();
    assert_eq!(detail.quota.unwrap().premium.limit, Some(10 + 20));
    assert_eq!(audit_rows(&db).await, 20);

    // Two editors who loaded the same plan: one wins, the other is told, nothing is lost.
    let plans = admin::list_plans(&db.pool).await.unwrap();
    let free = plans.iter().find(|p| p.tier == "free").unwrap();
    let edit = |premium| PlanLimits {
        messages_per_month: free.messages_per_month,
        premium_perspectives_limit: premium,
        normal_perspectives_limit: free.normal_perspectives_limit,
        eco_perspectives_limit: free.eco_perspectives_limit,
        expected_updated_at: Some(free.updated_at),
    };
    let (edit_a, edit_b, other) = (edit(11), edit(12), Actor::Admin(second));
    let (a, b) = tokio::join!(
        admin::update_plan(&db.pool, &me, "free", &edit_a),
        admin::update_plan(&db.pool, &other, "free", &edit_b),
    );
    let (won, lost) = match (a, b) {
        (Ok(won), Err(lost)) | (Err(lost), Ok(won)) => (won, lost),
        other => panic!("exactly one edit must win: {other:?}"),
    };
    assert_eq!(lost.code(), "conflict");
    let now = admin::list_plans(&db.pool).await.unwrap();
    let free_now = now.iter().find(|p| p.tier == "free").unwrap();
    assert_eq!(
        free_now.premium_perspectives_limit,
        won.premium_perspectives_limit
    );
    assert_eq!(audit_rows(&db).await, 21);
    // The plan's users follow (the user's grant is replaced by the plan's new limit).
    let detail = admin::user_detail(&db.pool, user).await.unwrap();
    assert_eq!(
        detail.quota.unwrap().premium.limit,
        Some(won.premium_perspectives_limit)
    );

    // Two admins suspending each other at once: never both (one must remain).
    let (a, b) = tokio::join!(
        admin::set_status(&db.pool, &me, second, UserStatus::Suspended),
        admin::set_status(&db.pool, &other, root, UserStatus::Suspended),
    );
    assert!(a.is_ok() != b.is_ok(), "{a:?} {b:?}");
    let active_admins: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM profiles p JOIN users u ON u.user_id = p.id
          WHERE p.is_admin AND u.status = 'active'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(active_admins, 1);
}

#[tokio::test]
async fn admin_audit_log_is_append_only_in_the_database() {
    let db = TestDb::migrated().await;
    let user = accounts::create_user(&db.pool, "ada@example.com", Plan::Free)
        .await
        .unwrap()
        .user_id;
    admin::reset_quota(&db.pool, &Actor::Cli("ops".into()), user)
        .await
        .unwrap();
    for sql in [
        "UPDATE admin_audit_log SET action = 'nothing'",
        "DELETE FROM admin_audit_log",
        "TRUNCATE admin_audit_log",
    ] {
        let error = sqlx::query(sql).execute(&db.pool).await.unwrap_err();
        assert!(error.to_string().contains("append-only"), "{sql}: {error}");
    }
    let entries = admin::list_audit(&db.pool, 10, None, None).await.unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].action, "user.quota.reset");
    assert_eq!(entries[0].actor, "cli:ops");
    assert_eq!(entries[0].actor_user_id, None);
}

#[tokio::test]
async fn admin_usage_counts_calls_errors_tokens_and_cost_by_day_model_provider_and_plan() {
    let db = TestDb::migrated().await;
    let server = TestServer::start(&db).await;
    let root = verified_user(&db, "root@example.com", PASSWORD).await;
    make_admin(&db, root).await;
    let (ada, _) = user_with_scoped_token(&db, "ada@example.com", Plan::Free, Scope::Mcp).await;
    sqlx::query(
        "INSERT INTO perspective_usage (user_id, model_name, model_tier, provider, input_tokens,
                                        output_tokens, total_tokens, estimated_cost, created_at)
         VALUES ($1, 'gpt-x', 'premium', 'openai', 10, 20, 30, 0.001, now()),
                ($1, 'gpt-x', 'premium', 'openai', 5, 5, 10, 0.0005, now()),
                ($2, 'gpt-x', 'premium', 'openai', 1, 1, 2, 0.0001, now()),
                ($1, 'gpt-x', 'premium', 'openai', 1, 1, 2, 1, now() - interval '40 days')",
    )
    .bind(ada)
    .bind(root)
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO model_call_failures (user_id, model_name, model_tier, provider, status, error_class)
         VALUES ($1, 'gpt-x', 'premium', 'openai', 'error', 'upstream'),
                ($1, 'claude-y', 'normal', 'anthropic', 'timeout', 'timeout')",
    )
    .bind(ada)
    .execute(&db.pool)
    .await
    .unwrap();
    let rows = admin::usage(&db.pool, 30).await.unwrap();
    let today = chrono::Utc::now().date_naive();
    let find = |model: &str, plan: &str| {
        rows.iter()
            .find(|r| r.model == model && r.plan == plan)
            .unwrap_or_else(|| panic!("{model} {plan}: {rows:?}"))
    };
    let free = find("gpt-x", "free");
    assert_eq!((free.day, free.requests, free.errors), (today, 3, 1));
    assert_eq!((free.input_tokens, free.output_tokens), (15, 25));
    assert_eq!(free.cost_usd.parse::<f64>().unwrap(), 0.0015);
    let pro = find("gpt-x", "pro");
    assert_eq!((pro.requests, pro.errors), (1, 0));
    let claude = find("claude-y", "free");
    assert_eq!(
        (claude.provider.as_str(), claude.requests, claude.errors),
        ("anthropic", 1, 1)
    );
    assert_eq!(
        rows.len(),
        3,
        "the call of 40 days ago is outside 30 days: {rows:?}"
    );
    assert_eq!(admin::usage(&db.pool, 60).await.unwrap().len(), 4);

    let mut browser = Browser::new(&server.base);
    browser.sign_in("root@example.com", PASSWORD).await;
    let csv = browser.get("/v1/admin/usage.csv?days=30").await;
    assert_eq!(csv.status(), StatusCode::OK);
    assert_eq!(csv.headers()["content-type"], "text/csv; charset=utf-8");
    let text = csv.text().await.unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    assert!(lines[0].starts_with("day,model,provider,plan,requests,errors,error_rate"));
    assert!(
        text.contains(&format!("{today},gpt-x,openai,free,3,1,0.3333,15,25,")),
        "{text}"
    );

    // The catalogue: configured providers and their health over the last 15 minutes.
    let catalogue: Value = browser
        .get("/v1/admin/catalogue")
        .await
        .json()
        .await
        .unwrap();
    let providers = catalogue["providers"].as_array().unwrap();
    assert!(!providers.is_empty(), "{catalogue}");
    let anthropic = providers
        .iter()
        .find(|p| p["provider"] == "anthropic")
        .unwrap();
    assert_eq!(anthropic["calls"], 1);
    assert_eq!(anthropic["errors"], 1);
    assert_eq!(anthropic["healthy"], false);
    assert!(catalogue["models"].as_array().unwrap().len() > 1);

    // Bad queries: 400.
    assert_eq!(
        browser.get("/v1/admin/usage?days=0").await.status(),
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        browser.get("/v1/admin/usage?days=x").await.status(),
        StatusCode::BAD_REQUEST
    );
}

#[tokio::test]
async fn admin_cli_changes_a_plan_as_the_os_user_and_refuses_bad_input() {
    const BIN: &str = env!("CARGO_BIN_EXE_polydev");
    let db = TestDb::migrated().await;
    let user = accounts::create_user(&db.pool, "ada@example.com", Plan::Free)
        .await
        .unwrap()
        .user_id;
    let run = |args: &[&str]| {
        std::process::Command::new(BIN)
            .arg("admin")
            .args(args)
            .env("DATABASE_URL", db.url())
            .env("RUST_LOG", "warn")
            .output()
            .unwrap()
    };
    let out = run(&["set-plan", "ada@example.com", "plus"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("plan=plus"));
    let out = run(&["set-plan", "ada@example.com", "platinum"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unknown plan `platinum`"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&[
        "grant",
        &user.to_string(),
        "--limit",
        "premium",
        "--amount",
        "-3",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("a grant is 1 to"));
    let out = run(&["audit"]);
    assert!(out.status.success());
    let audit = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(audit.lines().count(), 1, "{audit}");
    let os_user = nix::unistd::User::from_uid(nix::unistd::geteuid())
        .unwrap()
        .unwrap()
        .name;
    assert!(audit.contains(&format!("cli:{os_user}")), "{audit}");
    assert!(audit.contains("user.plan"), "{audit}");
    let out = run(&["usage", "--csv"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("day,model,"));
}

#[tokio::test]
async fn admin_page_in_chromium_changes_a_plan_and_shows_the_audit_row() {
    let db = TestDb::migrated().await;
    let root = verified_user(&db, "root@example.com", PASSWORD).await;
    make_admin(&db, root).await;
    let ada = verified_user(&db, "ada@example.com", PASSWORD).await;
    verified_user(&db, "plain@example.com", PASSWORD).await;
    sqlx::query("UPDATE users SET tier = 'free', zero_knowledge_enabled = true WHERE user_id = $1")
        .bind(ada)
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO perspective_usage (user_id, model_name, model_tier, provider, input_tokens,
                                        output_tokens, total_tokens, estimated_cost, created_at)
         SELECT $1, m, t, p, 100, 200, 300, 0.01, now() - d * interval '1 day'
           FROM generate_series(0, 6) d, generate_series(1, 3) n,
                (VALUES ('gpt-premium', 'premium', 'openai'), ('claude-normal', 'normal', 'anthropic')) v(m, t, p)
          WHERE n <= 1 + d % 3",
    )
    .bind(ada)
    .execute(&db.pool)
    .await
    .unwrap();
    // A failure two days ago, and one now that makes `google` unhealthy.
    sqlx::query(
        "INSERT INTO model_call_failures (user_id, model_name, model_tier, provider, status, error_class, created_at)
         VALUES ($1, 'broken-premium', 'premium', 'openai', 'error', 'upstream', now() - interval '2 days'),
                ($1, 'bad-request-normal', 'normal', 'google', 'error', 'bad_request', now())",
    )
    .bind(ada)
    .execute(&db.pool)
    .await
    .unwrap();
    let server =
        TestServer::start_with(&db, crate::common::mock_gateway("http://127.0.0.1:9")).await;
    let shots = tempfile::tempdir().unwrap();
    let dir = std::env::var("POLYDEV_SCREENSHOT_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| shots.path().to_path_buf());
    let out = crate::common::run_browser_script(
        "admin-page.mjs",
        &[
            &server.base,
            "root@example.com",
            PASSWORD,
            "ada@example.com",
            "plain@example.com",
        ],
        Some(&dir),
    )
    .await;
    assert_eq!(out["consoleErrorsBeforeBadInput"], json!([]), "{out}");
    assert_eq!(out["plainConsoleHidden"], true, "{out}");
    assert_eq!(
        out["whoami"],
        "Signed in as root@example.com (administrator)"
    );
    assert_eq!(out["userRows"], 3, "{out}");
    assert_eq!(out["chartBars"], 7, "a bar per day with calls: {out}");
    assert_eq!(out["errorBars"], 2, "{out}");
    assert!(
        out["providers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p == "googleconfigured11failing"),
        "{out}"
    );
    assert!(
        out["zkNote"]
            .as_str()
            .unwrap()
            .starts_with("Zero-knowledge is on")
            && out["zkNote"]
                .as_str()
                .unwrap()
                .contains("nothing an administrator can read"),
        "{out}"
    );
    assert_eq!(out["planBefore"], "free");
    assert!(
        out["detailMeta"].as_str().unwrap().contains("plan pro"),
        "{out}"
    );
    assert_eq!(out["auditFirst"][1], format!("user:{root}"), "{out}");
    assert_eq!(out["auditFirst"][2], "user.plan", "{out}");
    assert_eq!(out["auditFirst"][3], format!("user {ada}"), "{out}");
    assert!(
        out["auditFirst"][4]
            .as_str()
            .unwrap()
            .contains("\"plan\":\"free\""),
        "{out}"
    );
    assert_eq!(out["detailAudit"].as_array().unwrap().len(), 1, "{out}");
    assert!(
        out["detailAudit"][0]
            .as_str()
            .unwrap()
            .ends_with("user.plan"),
        "{out}"
    );
    assert_eq!(out["badPlan"]["status"], 400, "{out}");
    assert_eq!(out["badPlan"]["body"]["error"]["code"], "invalid_request");
    for shot in out["shots"].as_array().unwrap() {
        assert!(std::path::Path::new(shot.as_str().unwrap()).exists());
    }
    // In the database: the plan changed, with exactly one audit row.
    let tier: String = sqlx::query_scalar("SELECT tier FROM users WHERE user_id = $1")
        .bind(ada)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(tier, "pro");
    assert_eq!(audit_rows(&db).await, 1);
}

#[tokio::test]
async fn admin_error_rate_counts_the_model_calls_that_failed_upstream() {
    let db = TestDb::migrated().await;
    let mock = polydev_mock::MockUpstream::start().await;
    let server = TestServer::start_with(&db, crate::common::mock_gateway(&mock.base_url())).await;
    let (_, token) = user_with_scoped_token(&db, "ada@example.com", Plan::Pro, Scope::Mcp).await;
    let response = server
        .client
        .post(format!("{}/v1/perspectives", server.base))
        .bearer_auth(&token)
        .json(&json!({ "prompt": "hello", "models": ["gemini-eco", "broken-premium"] }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let rows = admin::usage(&db.pool, 1).await.unwrap();
    let of = |model: &str| rows.iter().find(|r| r.model == model).unwrap();
    assert_eq!((of("gemini-eco").requests, of("gemini-eco").errors), (1, 0));
    assert_eq!(
        (of("broken-premium").requests, of("broken-premium").errors),
        (1, 1)
    );
    assert_eq!(of("broken-premium").cost_usd.parse::<f64>().unwrap(), 0.0);
    let class: String = sqlx::query_scalar("SELECT error_class FROM model_call_failures")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(class, "upstream");
}
