//! The in-process token cache across replicas (docs/operations.md, "Token cache"): two
//! `polydev serve` processes on one database, each answering a token from its cache; a
//! revocation, whoever writes it, is refused by every replica within a second (the bound of
//! issue 13), because the database notifies every listener; a replica that loses its
//! listening connection drops its cache.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::Value;
use tokio::process::{Child, Command};

use polydev::accounts::{self, Plan, Scope};

use crate::common::TestDb;

const BIN: &str = env!("CARGO_BIN_EXE_polydev");
/// How long a replica may take to refuse a revoked token (issue 13).
const BOUND: Duration = Duration::from_secs(1);

/// A replica whose cache keeps answers for 30 s: a refusal within [`BOUND`] comes from the
/// broadcast, not from the TTL.
async fn replica(db: &TestDb) -> (Child, String) {
    crate::common::spawn_serve(
        Command::new(BIN)
            .env("DATABASE_URL", db.url())
            .env("RUST_LOG", "warn")
            .env("POLYDEV_TOKEN_CACHE_TTL", "30")
            .args(["serve", "--listen", "127.0.0.1:0", "--runtime", "off"]),
    )
    .await
}

/// `GET /v1/me` with `token`: the status and the error code, if any.
async fn me(client: &reqwest::Client, base: &str, token: &str) -> (StatusCode, Option<String>) {
    let response = client
        .get(format!("{base}/v1/me"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    let code = body["error"]["code"].as_str().map(str::to_string);
    (status, code)
}

/// Polls `GET /v1/me` until it is refused or [`BOUND`] has passed; the last answer.
async fn refused_within_bound(
    client: &reqwest::Client,
    base: &str,
    token: &str,
) -> (StatusCode, Option<String>) {
    let started = Instant::now();
    loop {
        let answer = me(client, base, token).await;
        if answer.0 != StatusCode::OK || started.elapsed() >= BOUND {
            return answer;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The replica's `polydev_token_cache_lookups_total` with `result`.
async fn lookups(client: &reqwest::Client, base: &str, result: &str) -> f64 {
    let result = format!(r#"result="{result}""#);
    crate::common::metric_sum(
        client,
        base,
        "polydev_token_cache_lookups_total",
        &[&result],
    )
    .await
}

struct Setup {
    db: TestDb,
    user_id: uuid::Uuid,
    /// An `mcp` token, the one revoked.
    token: String,
    token_id: uuid::Uuid,
    /// An `account` token of the same user (it revokes).
    account: String,
    a: (Child, String),
    b: (Child, String),
    client: reqwest::Client,
}

impl Setup {
    /// Runs `sql` (its `$1` is the user's id) as another program would.
    async fn write(&self, sql: &'static str) {
        sqlx::query(sql)
            .bind(self.user_id)
            .execute(&self.db.pool)
            .await
            .unwrap();
    }

    /// Both replicas refuse `token` with `code`, each within the bound.
    async fn refused_everywhere(&self, token: &str, code: &str) {
        for base in [&self.a.1, &self.b.1] {
            assert_eq!(
                refused_within_bound(&self.client, base, token).await,
                (StatusCode::UNAUTHORIZED, Some(code.into())),
                "{base}"
            );
        }
    }

    /// Both replicas accept `token`, twice each (so each caches it again).
    async fn accepted_everywhere(&self, token: &str) {
        for base in [&self.a.1, &self.b.1] {
            assert_eq!(me(&self.client, base, token).await.0, StatusCode::OK);
            assert_eq!(me(&self.client, base, token).await.0, StatusCode::OK);
        }
    }
}

/// Two replicas that both hold the user's `mcp` token in their cache.
async fn setup(email: &str) -> Setup {
    let db = TestDb::migrated().await;
    let user = accounts::create_user(&db.pool, email, Plan::Pro)
        .await
        .unwrap();
    let created = accounts::create_token(&db.pool, user.user_id, "ide", None)
        .await
        .unwrap();
    let account =
        accounts::create_scoped_token(&db.pool, user.user_id, "cli", None, Scope::Account)
            .await
            .unwrap()
            .token;
    let a = replica(&db).await;
    let b = replica(&db).await;
    let client = polydev::net::http_client();
    for base in [&a.1, &b.1] {
        for _ in 0..2 {
            assert_eq!(me(&client, base, &created.token).await.0, StatusCode::OK);
        }
        assert!(
            lookups(&client, base, "hit").await >= 1.0,
            "the second call was answered from the cache"
        );
    }
    Setup {
        db,
        user_id: user.user_id,
        token: created.token,
        token_id: created.info.id,
        account,
        a,
        b,
        client,
    }
}

#[tokio::test]
async fn a_token_revoked_on_one_replica_is_refused_by_the_other_within_a_second() {
    let s = setup("cache-revoke@example.com").await;
    let response = s
        .client
        .delete(format!("{}/v1/tokens/{}", s.a.1, s.token_id))
        .bearer_auth(&s.account)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    // The replica that revoked refuses at once; the other once the notification arrives.
    assert_eq!(
        me(&s.client, &s.a.1, &s.token).await,
        (StatusCode::UNAUTHORIZED, Some("token_revoked".into()))
    );
    assert_eq!(
        refused_within_bound(&s.client, &s.b.1, &s.token).await,
        (StatusCode::UNAUTHORIZED, Some("token_revoked".into()))
    );
    // The user's other token is unaffected (its entry was dropped, and it is looked up again).
    assert_eq!(me(&s.client, &s.b.1, &s.account).await.0, StatusCode::OK);
}

#[tokio::test]
async fn changes_written_outside_polydev_reach_every_replica_within_a_second() {
    let s = setup("cache-outside@example.com").await;
    // The legacy application (or psql) suspends the user.
    s.write("UPDATE users SET status = 'suspended' WHERE user_id = $1")
        .await;
    s.refused_everywhere(&s.token, "account_suspended").await;
    // Reinstated: accepted again (nothing stale keeps it out either).
    s.write("UPDATE users SET status = 'active' WHERE user_id = $1")
        .await;
    s.accepted_everywhere(&s.token).await;
    // Every token of the user deactivated in one statement (as admin revoke-all does).
    s.write("UPDATE mcp_user_tokens SET active = false WHERE user_id = $1")
        .await;
    s.refused_everywhere(&s.token, "token_revoked").await;
    // A `last_used_at` write notifies nobody (only columns the lookup reads do).
    let mut listener = sqlx::postgres::PgListener::connect_with(&s.db.pool)
        .await
        .unwrap();
    listener.listen("polydev_auth").await.unwrap();
    s.write("UPDATE mcp_user_tokens SET last_used_at = now() WHERE user_id = $1")
        .await;
    sqlx::query("UPDATE mcp_user_tokens SET active = true WHERE id = $1")
        .bind(s.token_id)
        .execute(&s.db.pool)
        .await
        .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(30), listener.recv())
        .await
        .expect("the reactivation notified")
        .unwrap();
    assert_eq!(
        first.payload(),
        s.user_id.to_string(),
        "the reactivation's notification is the first one"
    );
}

#[tokio::test]
async fn a_replica_that_loses_its_listening_connection_drops_its_cache() {
    let s = setup("cache-drop@example.com").await;
    // Both replicas' listening connections die...
    let killed: i64 = sqlx::query_scalar(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
          WHERE datname = current_database() AND query LIKE '%polydev_auth%'
            AND pid <> pg_backend_pid()",
    )
    .fetch_one(&s.db.pool)
    .await
    .unwrap();
    assert_eq!(killed, 2, "one listening connection per replica");
    // ...and the token is revoked without any notification (triggers off for this session).
    let mut tx = s.db.pool.begin().await.unwrap();
    sqlx::query("SET LOCAL session_replication_role = replica")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("UPDATE mcp_user_tokens SET active = false WHERE id = $1")
        .bind(s.token_id)
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    // Each replica noticed the lost connection and dropped what it held.
    s.refused_everywhere(&s.token, "token_revoked").await;
    // They listen again: a later revocation is heard.
    let reconnected = Instant::now();
    loop {
        let listening: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
              WHERE datname = current_database() AND query LIKE '%polydev_auth%'
                AND pid <> pg_backend_pid()",
        )
        .fetch_one(&s.db.pool)
        .await
        .unwrap();
        if listening == 2 {
            break;
        }
        assert!(
            reconnected.elapsed() < Duration::from_secs(30),
            "the replicas did not listen again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    s.accepted_everywhere(&s.account).await;
    s.write("UPDATE users SET status = 'deleted' WHERE user_id = $1")
        .await;
    s.refused_everywhere(&s.account, "account_deleted").await;
}
