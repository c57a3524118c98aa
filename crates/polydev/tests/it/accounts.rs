//! Accounts and tokens at the domain level (no HTTP).

use polydev::accounts::{self, Plan};
use polydev::error::{AuthFailure, Error};

use crate::common::TestDb;

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

fn auth_failure(result: Result<accounts::Caller, Error>) -> AuthFailure {
    match result {
        Err(Error::Unauthorized(failure)) => failure,
        other => panic!("expected an auth failure, got {other:?}"),
    }
}

#[tokio::test]
async fn each_plan_gets_its_limits_from_one_place() {
    let db = TestDb::migrated().await;
    let expected = [
        (Plan::Free, Some(200), 10, 40, 150),
        (Plan::Plus, None, 400, 1600, 4000),
        (Plan::Pro, None, 600, 2500, 8000),
        (Plan::Enterprise, None, 1200, 5000, 20000),
    ];
    for (plan, messages, premium, normal, eco) in expected {
        let email = format!("{}@example.com", plan.as_str());
        let user = accounts::create_user(&db.pool, &email, plan).await.unwrap();
        assert_eq!(user.tier.as_deref(), Some(plan.as_str()));
        let quota = polydev::quota::for_user(&db.pool, user.user_id)
            .await
            .unwrap()
            .expect("quota row");
        assert_eq!(quota.plan_tier.as_deref(), Some(plan.as_str()));
        assert_eq!(quota.messages_per_month, messages);
        assert_eq!(
            (
                quota.premium_perspectives_limit,
                quota.normal_perspectives_limit,
                quota.eco_perspectives_limit
            ),
            (Some(premium), Some(normal), Some(eco))
        );
        assert_eq!(quota.messages_used, Some(0));
        let profile = accounts::find_profile(&db.pool, user.user_id)
            .await
            .unwrap()
            .expect("profile row");
        assert_eq!(profile.subscription_tier.as_deref(), Some(plan.as_str()));
        assert_eq!(profile.email.as_deref(), Some(email.as_str()));
    }
}

#[tokio::test]
async fn a_duplicate_or_invalid_email_is_refused_and_changes_nothing() {
    let db = TestDb::migrated().await;
    accounts::create_user(&db.pool, "Ada@Example.com", Plan::Free)
        .await
        .unwrap();
    let dup = accounts::create_user(&db.pool, " ada@example.COM", Plan::Pro).await;
    assert!(matches!(dup, Err(Error::Conflict(_))), "{dup:?}");
    let bad = accounts::create_user(&db.pool, "not-an-email", Plan::Pro).await;
    assert!(matches!(bad, Err(Error::Invalid(_))), "{bad:?}");
    let counts: (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM users), (SELECT count(*) FROM profiles), (SELECT count(*) FROM user_perspective_quotas)",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(counts, (1, 1, 1));
}

#[tokio::test]
async fn concurrent_creates_of_one_email_make_one_user() {
    let db = TestDb::migrated().await;
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let pool = db.pool.clone();
            tokio::spawn(async move {
                accounts::create_user(&pool, "race@example.com", Plan::Free).await
            })
        })
        .collect();
    let mut created = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(_) => created += 1,
            Err(Error::Conflict(_)) => {}
            Err(other) => panic!("{other:?}"),
        }
    }
    assert_eq!(created, 1);
    let users: i64 = sqlx::query_scalar("SELECT count(*) FROM users")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(users, 1);
}

#[tokio::test]
async fn only_the_hash_of_a_token_is_stored() {
    let db = TestDb::migrated().await;
    let user = accounts::create_user(&db.pool, "hash@example.com", Plan::Plus)
        .await
        .unwrap();
    let created = accounts::create_token(&db.pool, user.user_id, "laptop", None)
        .await
        .unwrap();
    let token = &created.token;
    assert!(token.starts_with("pd_") && token.len() == 67);
    assert!(token[3..].bytes().all(|b| b.is_ascii_hexdigit()));

    let (hash, preview, tier): (String, String, String) = sqlx::query_as(
        "SELECT token_hash, token_preview, rate_limit_tier FROM mcp_user_tokens WHERE id = $1",
    )
    .bind(created.info.id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    use sha2::Digest;
    assert_eq!(hash, hex::encode(sha2::Sha256::digest(token.as_bytes())));
    assert_eq!(preview, token[token.len() - 4..]);
    assert_eq!(tier, "plus", "the rate-limit tier follows the plan");
    let plaintext_anywhere: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM mcp_user_tokens t WHERE t::text LIKE '%' || $1 || '%')",
    )
    .bind(&token[3..])
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(!plaintext_anywhere);
    let count: i32 = sqlx::query_scalar("SELECT api_keys_count FROM profiles WHERE id = $1")
        .bind(user.user_id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(count, 1);
}

#[tokio::test]
async fn authentication_tells_each_failure_apart() {
    let db = TestDb::migrated().await;
    let user = accounts::create_user(&db.pool, "auth@example.com", Plan::Free)
        .await
        .unwrap();
    let good = accounts::create_token(&db.pool, user.user_id, "good", None)
        .await
        .unwrap();
    let caller = accounts::authenticate(&db.pool, Some(&bearer(&good.token)))
        .await
        .unwrap();
    assert_eq!(
        (caller.user_id, caller.token_id),
        (user.user_id, good.info.id)
    );

    assert_eq!(
        auth_failure(accounts::authenticate(&db.pool, None).await),
        AuthFailure::Missing
    );
    assert_eq!(
        auth_failure(accounts::authenticate(&db.pool, Some("Bearer nope")).await),
        AuthFailure::Malformed
    );
    let unknown = format!("pd_{}", "0".repeat(64));
    assert_eq!(
        auth_failure(accounts::authenticate(&db.pool, Some(&bearer(&unknown))).await),
        AuthFailure::Unknown
    );

    let expiring = accounts::create_token(&db.pool, user.user_id, "expiring", Some(1))
        .await
        .unwrap();
    sqlx::query(
        "UPDATE mcp_user_tokens SET expires_at = now() - interval '1 second' WHERE id = $1",
    )
    .bind(expiring.info.id)
    .execute(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        auth_failure(accounts::authenticate(&db.pool, Some(&bearer(&expiring.token))).await),
        AuthFailure::Expired
    );

    accounts::revoke_token(&db.pool, None, good.info.id)
        .await
        .unwrap();
    assert_eq!(
        auth_failure(accounts::authenticate(&db.pool, Some(&bearer(&good.token))).await),
        AuthFailure::Revoked
    );
    let count: i32 = sqlx::query_scalar("SELECT api_keys_count FROM profiles WHERE id = $1")
        .bind(user.user_id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(count, 1, "only the expiring token is still active");
}

#[tokio::test]
async fn token_input_is_validated() {
    let db = TestDb::migrated().await;
    let user = accounts::create_user(&db.pool, "v@example.com", Plan::Free)
        .await
        .unwrap();
    for (name, days) in [
        ("", None),
        ("   ", None),
        (&*"x".repeat(101), None),
        ("ok", Some(0)),
        ("ok", Some(3651)),
    ] {
        let result = accounts::create_token(&db.pool, user.user_id, name, days).await;
        assert!(
            matches!(result, Err(Error::Invalid(_))),
            "{name:?} {days:?}: {result:?}"
        );
    }
    let missing = accounts::create_token(&db.pool, uuid::Uuid::new_v4(), "ok", None).await;
    assert!(
        matches!(missing, Err(Error::NotFound("user"))),
        "{missing:?}"
    );
    assert!(
        accounts::list_tokens(&db.pool, user.user_id)
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn concurrent_creates_never_exceed_the_cap_on_live_tokens() {
    let db = TestDb::migrated().await;
    let user = accounts::create_user(&db.pool, "cap@example.com", Plan::Pro)
        .await
        .unwrap();
    let cap = accounts::MAX_LIVE_TOKENS_PER_USER as usize;
    // Revoked and expired tokens do not count.
    for i in 0..3 {
        let t = accounts::create_token(&db.pool, user.user_id, &format!("old{i}"), Some(1))
            .await
            .unwrap();
        if i == 0 {
            accounts::revoke_token(&db.pool, None, t.info.id)
                .await
                .unwrap();
        }
    }
    sqlx::query("UPDATE mcp_user_tokens SET expires_at = now() - interval '1 second' WHERE active")
        .execute(&db.pool)
        .await
        .unwrap();
    for i in 0..cap - 5 {
        accounts::create_token(&db.pool, user.user_id, &format!("t{i}"), None)
            .await
            .unwrap();
    }
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let pool = db.pool.clone();
            let user_id = user.user_id;
            tokio::spawn(async move {
                accounts::create_token(&pool, user_id, &format!("race{i}"), None).await
            })
        })
        .collect();
    let (mut created, mut refused) = (0, 0);
    for task in tasks {
        match task.await.unwrap() {
            Ok(_) => created += 1,
            Err(Error::Conflict(message)) => {
                assert!(message.contains("revoke"), "{message}");
                refused += 1;
            }
            Err(other) => panic!("{other:?}"),
        }
    }
    assert_eq!((created, refused), (5, 15));
    let live: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM mcp_user_tokens WHERE user_id = $1 AND active AND (expires_at IS NULL OR expires_at > now())",
    )
    .bind(user.user_id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(live, cap as i64);

    // Revoking one makes room for one.
    let first = accounts::list_tokens(&db.pool, user.user_id).await.unwrap();
    let live_one = first
        .iter()
        .find(|t| t.token_name.as_deref() == Some("t0"))
        .unwrap();
    accounts::revoke_token(&db.pool, Some(user.user_id), live_one.id)
        .await
        .unwrap();
    accounts::create_token(&db.pool, user.user_id, "after", None)
        .await
        .unwrap();
    assert!(matches!(
        accounts::create_token(&db.pool, user.user_id, "again", None).await,
        Err(Error::Conflict(_))
    ));
}

#[tokio::test]
async fn suspended_and_deleted_accounts_cannot_authenticate() {
    let db = TestDb::migrated().await;
    let user = accounts::create_user(&db.pool, "status@example.com", Plan::Free)
        .await
        .unwrap();
    let token = accounts::create_token(&db.pool, user.user_id, "t", None)
        .await
        .unwrap();
    let set = |status: Option<&'static str>| {
        sqlx::query("UPDATE users SET status = $2 WHERE user_id = $1")
            .bind(user.user_id)
            .bind(status)
            .execute(&db.pool)
    };
    for (status, expected) in [
        (Some("suspended"), Some(AuthFailure::AccountSuspended)),
        (Some("deleted"), Some(AuthFailure::AccountDeleted)),
        (None, None),
        (Some("active"), None),
    ] {
        set(status).await.unwrap();
        let result = accounts::authenticate(&db.pool, Some(&bearer(&token.token))).await;
        match expected {
            Some(failure) => assert_eq!(auth_failure(result), failure, "{status:?}"),
            None => assert_eq!(result.unwrap().user_id, user.user_id, "{status:?}"),
        }
    }
}
