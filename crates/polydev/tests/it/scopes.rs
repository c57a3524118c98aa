//! Token scopes: an `mcp` token (the one in an IDE's configuration) reaches no `account` route
//! and changes nothing there; the scope table of docs/api.md is the one the server enforces.

use std::collections::BTreeSet;
use std::path::PathBuf;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use polydev::accounts::{self, Plan, Scope};
use polydev::http::{MCP_ROUTES, required_scope};

use crate::common::TestDb;
use crate::http_api::{TestServer, user_with_scoped_token, user_with_token};

/// `(method, path, scope)` of every row of the table under `## Scopes` in docs/api.md; `scope`
/// is `None` for the routes that need no token.
fn documented_scopes() -> Vec<(String, String, Option<Scope>)> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/api.md");
    let text = std::fs::read_to_string(path).unwrap();
    let section = text.split("## Scopes").nth(1).expect("a Scopes section");
    let section = section.split("\n## ").next().unwrap();
    let mut rows = Vec::new();
    for line in section.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // | `METHOD /path` | `scope` |
        let [_, route, scope, ..] = cells.as_slice() else {
            continue;
        };
        let Some(route) = route.strip_prefix('`') else {
            continue;
        };
        let route = route.split('`').next().unwrap();
        let Some((method, path)) = route.split_once(' ') else {
            continue;
        };
        let scope = match *scope {
            "`mcp`" => Some(Scope::Mcp),
            "`account`" => Some(Scope::Account),
            "none" => None,
            other => panic!("unknown scope {other:?} in docs/api.md"),
        };
        rows.push((method.to_string(), path.to_string(), scope));
    }
    assert!(rows.len() > 20, "the scope table was not found: {rows:?}");
    rows
}

/// Every path routed with `.route("...")` in the HTTP layer's sources.
fn routed_paths() -> BTreeSet<String> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/http");
    let mut paths = BTreeSet::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let source = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        for piece in source.split(".route(").skip(1) {
            if let Some(rest) = piece.trim_start().strip_prefix('"') {
                paths.insert(rest.split('"').next().unwrap().to_string());
            }
        }
    }
    assert!(paths.contains("/v1/tokens/{id}"), "{paths:?}");
    paths
}

#[test]
fn the_scope_table_in_the_docs_is_the_one_the_server_enforces() {
    let documented = documented_scopes();
    // Every routed path is in the table: a new route cannot go undocumented.
    let in_table: BTreeSet<&str> = documented.iter().map(|(_, p, _)| p.as_str()).collect();
    for path in routed_paths() {
        assert!(
            in_table.contains(path.as_str()),
            "{path} is routed but not in the scope table of docs/api.md"
        );
    }
    // The `mcp` rows are exactly the allow-list, and every row says what the server decides.
    let mcp_rows: BTreeSet<(&str, &str)> = documented
        .iter()
        .filter(|(_, path, scope)| *scope == Some(Scope::Mcp) && path != "/mcp")
        .map(|(m, p, _)| (m.as_str(), p.as_str()))
        .collect();
    let allowed: BTreeSet<(&str, &str)> = MCP_ROUTES.iter().copied().collect();
    assert_eq!(mcp_rows, allowed);
    for (method, path, scope) in &documented {
        if let (Some(scope), false) = (scope, path == "/mcp") {
            let method: Method = method.parse().unwrap();
            assert_eq!(
                required_scope(&method, Some(path)),
                *scope,
                "{method} {path}"
            );
        }
    }
}

/// A digest of what the account routes could change.
async fn snapshot(db: &TestDb) -> Vec<Option<String>> {
    let mut out = Vec::new();
    for table in [
        "(SELECT id, user_id, token_name, token_hash, active, expires_at, scope FROM mcp_user_tokens) t",
        "users t",
        "profiles t",
        "user_perspective_settings t",
        "chat_sessions t",
        "chat_messages t",
        "sessions t",
        "messages t",
        "provider_credentials t",
        "cli_credentials t",
    ] {
        let digest: Option<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT md5(string_agg(t::text, '|' ORDER BY t::text)) FROM {table}"
        )))
        .fetch_one(&db.pool)
        .await
        .unwrap();
        out.push(digest);
    }
    out
}

#[tokio::test]
async fn an_mcp_token_reaches_no_account_route_and_changes_nothing() {
    let db = TestDb::migrated().await;
    let (user_id, ide) =
        user_with_scoped_token(&db, "ide@example.com", Plan::Pro, Scope::Mcp).await;
    let owner = accounts::create_scoped_token(&db.pool, user_id, "owner", None, Scope::Account)
        .await
        .unwrap();
    crate::zk::seed_history(&db, user_id, 2).await;
    let server = TestServer::start(&db).await;
    let before = snapshot(&db).await;

    // Bodies a thief would send (they are never read: the scope is refused first).
    let body = |method: &str, path: &str| match (method, path) {
        ("POST", "/v1/tokens") => json!({ "name": "stolen", "scope": "account" }),
        ("PUT", "/v1/settings") => json!({ "preferred_models": [], "max_perspectives": 1 }),
        (_, p) if p.ends_with("/clear") || p.ends_with("/reset") || p.ends_with("/encrypted") => {
            json!([])
        }
        _ => json!({}),
    };
    let send = |method: &str, path: &str| {
        let url = format!(
            "{}{}",
            server.base,
            path.replace("{id}", &owner.info.id.to_string())
        );
        let request = server
            .client
            .request(method.parse().unwrap(), url)
            .bearer_auth(&ide);
        match method {
            "GET" | "DELETE" => request,
            _ => request.json(&body(method, path)),
        }
        .send()
    };
    let routes = documented_scopes();
    let mut refused = 0;
    for (method, path, _) in routes.iter().filter(|r| r.2 == Some(Scope::Account)) {
        let response = send(method, path).await.unwrap();
        let status = response.status();
        let challenge = response
            .headers()
            .get("www-authenticate")
            .map(|v| v.to_str().unwrap().to_string());
        let error: Value = response.json().await.unwrap_or_default();
        assert_eq!(
            (status, error["error"]["code"].as_str()),
            (StatusCode::FORBIDDEN, Some("insufficient_scope")),
            "{method} {path}: {error}"
        );
        let challenge = challenge.expect("a challenge");
        assert!(
            challenge.contains(r#"error="insufficient_scope""#)
                && challenge.contains(r#"scope="account""#),
            "{challenge}"
        );
        refused += 1;
    }
    assert_eq!(refused, 21, "every account route was tried");
    assert_eq!(snapshot(&db).await, before, "nothing changed");

    // The mcp routes are open to it.
    for (method, path, _) in routes
        .iter()
        .filter(|(_, path, scope)| *scope == Some(Scope::Mcp) && path != "/mcp")
    {
        let status = send(method, path).await.unwrap().status();
        assert!(
            ![StatusCode::FORBIDDEN, StatusCode::UNAUTHORIZED].contains(&status),
            "{method} {path}: {status}"
        );
    }

    // The owner's account token reaches them.
    let list = server.get("/v1/tokens", Some(&owner.token)).send().await;
    assert_eq!(list.unwrap().status(), StatusCode::OK);
}

#[tokio::test]
async fn tokens_carry_a_scope_and_are_never_minted_wider() {
    let db = TestDb::migrated().await;
    let (user_id, owner) = user_with_token(&db, "scopes@example.com", Plan::Pro).await;
    let server = TestServer::start(&db).await;
    let mint = |token: &str, body: Value| {
        server
            .with_token(
                server.client.post(format!("{}/v1/tokens", server.base)),
                Some(token),
            )
            .json(&body)
            .send()
    };

    let ide = mint(&owner, json!({ "name": "ide" })).await.unwrap();
    assert_eq!(ide.status(), StatusCode::CREATED);
    let ide: Value = ide.json().await.unwrap();
    assert_eq!(ide["scope"], "mcp", "mcp unless asked: {ide}");
    let ide = ide["token"].as_str().unwrap().to_string();
    let admin = mint(&owner, json!({ "name": "admin", "scope": "account" }))
        .await
        .unwrap();
    assert_eq!(admin.status(), StatusCode::CREATED);
    assert_eq!(admin.json::<Value>().await.unwrap()["scope"], "account");
    let bad = mint(&owner, json!({ "name": "root", "scope": "root" }))
        .await
        .unwrap();
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);

    // The mcp token cannot mint any token, of either scope, nor list them.
    for body in [
        json!({ "name": "more" }),
        json!({ "name": "wider", "scope": "account" }),
    ] {
        assert_eq!(
            mint(&ide, body).await.unwrap().status(),
            StatusCode::FORBIDDEN
        );
    }
    let me: Value = server
        .get("/v1/me", Some(&ide))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(me["token"]["scope"], "mcp");

    // A token written by the legacy application (no scope given) is an mcp token.
    let legacy = format!("pd_{}", "a".repeat(64));
    use sha2::Digest;
    sqlx::query(
        "INSERT INTO mcp_user_tokens (user_id, token_name, token_hash, token_preview, active, rate_limit_tier)
         VALUES ($1, 'legacy', $2, 'aaaa', true, 'pro')",
    )
    .bind(user_id)
    .bind(hex::encode(sha2::Sha256::digest(legacy.as_bytes())))
    .execute(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        server
            .get("/v1/me", Some(&legacy))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    assert_eq!(
        server
            .get("/v1/tokens", Some(&legacy))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::FORBIDDEN
    );

    let list: Vec<Value> = server
        .get("/v1/tokens", Some(&owner))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let scopes: Vec<(&str, &str)> = list
        .iter()
        .map(|t| {
            (
                t["token_name"].as_str().unwrap(),
                t["scope"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        scopes,
        [
            ("test", "account"),
            ("ide", "mcp"),
            ("admin", "account"),
            ("legacy", "mcp")
        ]
    );

    // The cap on live tokens: 50, over HTTP too.
    for i in list.len()..accounts::MAX_LIVE_TOKENS_PER_USER as usize {
        accounts::create_token(&db.pool, user_id, &format!("t{i}"), None)
            .await
            .unwrap();
    }
    let over = mint(&owner, json!({ "name": "one too many" }))
        .await
        .unwrap();
    assert_eq!(over.status(), StatusCode::CONFLICT);
    let message = over.json::<Value>().await.unwrap()["error"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        message.contains("50") && message.contains("revoke"),
        "{message}"
    );
}
