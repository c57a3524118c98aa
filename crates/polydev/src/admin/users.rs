//! Users as an admin sees them, and the changes an admin makes to one.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::{Actor, audit, begin};
use crate::error::{Error, Result};
use crate::quota::{self, QuotaState};
use crate::{accounts, oauth};

/// Most users one page of the list returns.
pub const MAX_USER_PAGE: i64 = 200;
/// Most units one grant adds.
pub const MAX_GRANT: i32 = 1_000_000;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdminUser {
    pub user_id: Uuid,
    pub email: Option<String>,
    pub plan: Option<String>,
    pub status: Option<String>,
    pub is_admin: bool,
    /// Whether the user encrypts their content client-side. Their content itself is never
    /// readable here: the server holds only ciphertext and no key.
    pub zero_knowledge: bool,
    pub created_at: Option<DateTime<Utc>>,
    pub last_active_at: Option<DateTime<Utc>>,
}

/// One user, with what an admin may act on.
#[derive(Debug, Clone, Serialize)]
pub struct UserDetail {
    #[serde(flatten)]
    pub user: AdminUser,
    pub quota: Option<QuotaState>,
    pub live_tokens: i64,
    pub live_sessions: i64,
    pub live_oauth_grants: i64,
}

/// A user's account status as an admin sets it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum UserStatus {
    Active,
    Suspended,
}

impl UserStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            UserStatus::Active => "active",
            UserStatus::Suspended => "suspended",
        }
    }
}

/// Users whose e-mail contains `search` (case-insensitive) or whose id is `search`, newest
/// first; `limit` 1–200.
pub async fn list_users(
    pool: &PgPool,
    search: Option<&str>,
    limit: i64,
    offset: i64,
) -> Result<Vec<AdminUser>> {
    if !(1..=MAX_USER_PAGE).contains(&limit) || offset < 0 {
        return Err(Error::Invalid(format!(
            "limit must be 1 to {MAX_USER_PAGE} and offset 0 or more"
        )));
    }
    let search = search.map(str::trim).filter(|s| !s.is_empty());
    if let Some(search) = search {
        crate::error::reject_nul("q", search)?;
        if search.chars().count() > 254 {
            return Err(Error::Invalid("a search is at most 254 characters".into()));
        }
    }
    let id = search.and_then(|s| s.parse::<Uuid>().ok());
    // LIKE's wildcards in the search are taken literally.
    let pattern = search.map(|s| {
        format!(
            "%{}%",
            s.to_lowercase()
                .replace('\\', "\\\\")
                .replace('%', "\\%")
                .replace('_', "\\_")
        )
    });
    Ok(sqlx::query_as!(
        AdminUser,
        r#"SELECT u.user_id, u.email, u.tier AS plan, u.status,
                  coalesce(p.is_admin, false) AS "is_admin!",
                  coalesce(u.zero_knowledge_enabled, false) AS "zero_knowledge!",
                  u.created_at, u.last_active_at
             FROM users u LEFT JOIN profiles p ON p.id = u.user_id
            WHERE $1::text IS NULL OR lower(u.email) LIKE $1 OR u.user_id = $2
            ORDER BY u.created_at DESC NULLS LAST, u.user_id
            LIMIT $3 OFFSET $4"#,
        pattern,
        id,
        limit,
        offset
    )
    .fetch_all(pool)
    .await?)
}

pub async fn user_detail(pool: &PgPool, user_id: Uuid) -> Result<UserDetail> {
    let user = find(&mut *pool.acquire().await?, user_id, false).await?;
    let quota = quota::for_user(pool, user_id)
        .await?
        .map(|q| q.state(Utc::now().date_naive()));
    let counts = sqlx::query!(
        r#"SELECT
             (SELECT count(*) FROM mcp_user_tokens
               WHERE user_id = $1 AND active IS TRUE
                 AND (expires_at IS NULL OR expires_at > now())) AS "tokens!",
             (SELECT count(*) FROM account_web_sessions
               WHERE user_id = $1 AND revoked_at IS NULL AND expires_at > now()) AS "sessions!",
             (SELECT count(*) FROM oauth_grants
               WHERE user_id = $1 AND revoked_at IS NULL) AS "grants!""#,
        user_id
    )
    .fetch_one(pool)
    .await?;
    Ok(UserDetail {
        user,
        quota,
        live_tokens: counts.tokens,
        live_sessions: counts.sessions,
        live_oauth_grants: counts.grants,
    })
}

/// The user (locked `FOR UPDATE` when `lock`), or 404.
async fn find(conn: &mut PgConnection, user_id: Uuid, lock: bool) -> Result<AdminUser> {
    let user = if lock {
        sqlx::query_as!(
            AdminUser,
            r#"SELECT u.user_id, u.email, u.tier AS plan, u.status,
                      coalesce(p.is_admin, false) AS "is_admin!",
                      coalesce(u.zero_knowledge_enabled, false) AS "zero_knowledge!",
                      u.created_at, u.last_active_at
                 FROM users u LEFT JOIN profiles p ON p.id = u.user_id
                WHERE u.user_id = $1 FOR UPDATE OF u"#,
            user_id
        )
        .fetch_optional(conn)
        .await?
    } else {
        sqlx::query_as!(
            AdminUser,
            r#"SELECT u.user_id, u.email, u.tier AS plan, u.status,
                      coalesce(p.is_admin, false) AS "is_admin!",
                      coalesce(u.zero_knowledge_enabled, false) AS "zero_knowledge!",
                      u.created_at, u.last_active_at
                 FROM users u LEFT JOIN profiles p ON p.id = u.user_id
                WHERE u.user_id = $1"#,
            user_id
        )
        .fetch_optional(conn)
        .await?
    };
    user.ok_or(Error::NotFound("user"))
}

fn is_active(status: Option<&str>) -> bool {
    status.is_none_or(|s| s.trim().eq_ignore_ascii_case("active"))
}

/// Moves a user to `plan` (a row of `plan_tiers`): `users.tier`, the profile and the quota
/// row's limits follow; what was used this month stays used. The same plan changes nothing.
pub async fn set_plan(
    pool: &PgPool,
    actor: &Actor,
    user_id: Uuid,
    plan: &str,
) -> Result<AdminUser> {
    let plan = plan.trim();
    crate::error::reject_nul("plan", plan)?;
    let (mut tx, _) = begin(pool, actor, false).await?;
    let known = sqlx::query_scalar!("SELECT tier FROM plan_tiers ORDER BY tier")
        .fetch_all(&mut *tx)
        .await?;
    if !known.iter().any(|t| t == plan) {
        return Err(Error::Invalid(format!(
            "unknown plan `{}`: one of {}",
            plan.chars().take(50).collect::<String>(),
            known.join(", ")
        )));
    }
    let before = find(&mut tx, user_id, true).await?;
    if before.plan.as_deref() == Some(plan) {
        return Ok(before);
    }
    let quota_before = quota_row(&mut tx, user_id).await?;
    sqlx::query!(
        "UPDATE users SET tier = $2, subscription_plan = $2, updated_at = now() WHERE user_id = $1",
        user_id,
        plan
    )
    .execute(&mut *tx)
    .await?;
    sqlx::query!(
        "UPDATE profiles SET subscription_tier = $2, current_plan_tier = $2, updated_at = now()
          WHERE id = $1",
        user_id,
        plan
    )
    .execute(&mut *tx)
    .await?;
    let updated = sqlx::query!(
        "UPDATE user_perspective_quotas q
            SET plan_tier = t.tier, messages_per_month = t.messages_per_month,
                premium_perspectives_limit = t.premium_perspectives_limit,
                normal_perspectives_limit = t.normal_perspectives_limit,
                eco_perspectives_limit = t.eco_perspectives_limit, updated_at = now()
           FROM plan_tiers t
          WHERE t.tier = $2 AND q.id = (SELECT id FROM user_perspective_quotas
                                         WHERE user_id = $1 ORDER BY created_at DESC LIMIT 1)",
        user_id,
        plan
    )
    .execute(&mut *tx)
    .await?;
    if updated.rows_affected() == 0 {
        quota::create_for_user(&mut tx, user_id, plan).await?;
    }
    let after = find(&mut tx, user_id, false).await?;
    let quota_after = quota_row(&mut tx, user_id).await?;
    audit(
        &mut tx,
        actor,
        "user.plan",
        ("user", &user_id.to_string()),
        json!({ "plan": before.plan, "quota": quota_before }),
        json!({ "plan": after.plan, "quota": quota_after }),
    )
    .await?;
    tx.commit().await?;
    Ok(after)
}

/// The limits and counters of the user's quota row, as JSON for the audit log.
async fn quota_row(conn: &mut PgConnection, user_id: Uuid) -> Result<serde_json::Value> {
    let row = sqlx::query!(
        "SELECT plan_tier, messages_per_month, premium_perspectives_limit,
                normal_perspectives_limit, eco_perspectives_limit, current_month_start,
                messages_used, premium_perspectives_used, normal_perspectives_used,
                eco_perspectives_used
           FROM user_perspective_quotas WHERE user_id = $1 ORDER BY created_at DESC LIMIT 1",
        user_id
    )
    .fetch_optional(conn)
    .await?;
    Ok(match row {
        None => serde_json::Value::Null,
        Some(r) => json!({
            "plan_tier": r.plan_tier,
            "limits": { "messages": r.messages_per_month, "premium": r.premium_perspectives_limit,
                        "normal": r.normal_perspectives_limit, "eco": r.eco_perspectives_limit },
            "month_start": r.current_month_start,
            "used": { "messages": r.messages_used, "premium": r.premium_perspectives_used,
                      "normal": r.normal_perspectives_used, "eco": r.eco_perspectives_used },
        }),
    })
}

/// Locks the user's quota row (creating it from their plan if a legacy user has none) and
/// returns its id.
async fn lock_quota(conn: &mut PgConnection, user_id: Uuid, plan: Option<&str>) -> Result<Uuid> {
    let id = sqlx::query_scalar!(
        "SELECT id FROM user_perspective_quotas WHERE user_id = $1
          ORDER BY created_at DESC LIMIT 1 FOR UPDATE",
        user_id
    )
    .fetch_optional(&mut *conn)
    .await?;
    match id {
        Some(id) => Ok(id),
        None => Ok(
            quota::create_for_user(conn, user_id, plan.unwrap_or("free"))
                .await?
                .id,
        ),
    }
}

/// Adds `amount` (1–1,000,000) units to one of the user's monthly limits (`messages`,
/// `premium`, `normal`, `eco`) until their plan changes. Concurrent grants add up: the
/// increment runs under the row lock.
pub async fn grant_quota(
    pool: &PgPool,
    actor: &Actor,
    user_id: Uuid,
    counter: &str,
    amount: i64,
) -> Result<UserDetail> {
    let column = match counter {
        "messages" => "messages_per_month",
        "premium" => "premium_perspectives_limit",
        "normal" => "normal_perspectives_limit",
        "eco" => "eco_perspectives_limit",
        other => {
            return Err(Error::Invalid(format!(
                "unknown limit `{}`: one of messages, premium, normal, eco",
                other.chars().take(50).collect::<String>()
            )));
        }
    };
    if !(1..=i64::from(MAX_GRANT)).contains(&amount) {
        return Err(Error::Invalid(format!(
            "a grant is 1 to {MAX_GRANT} units (to take units away, change the plan or reset)"
        )));
    }
    let (mut tx, _) = begin(pool, actor, false).await?;
    let user = find(&mut tx, user_id, true).await?;
    let quota_id = lock_quota(&mut tx, user_id, user.plan.as_deref()).await?;
    let before = quota_row(&mut tx, user_id).await?;
    // `column` is one of four fixed names above: safe to splice.
    let sql = format!(
        "UPDATE user_perspective_quotas SET {column} = {column} + $2, updated_at = now()
          WHERE id = $1 AND {column} IS NOT NULL AND {column} + $2 <= 2147483647"
    );
    let done = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(quota_id)
        .bind(amount as i32)
        .execute(&mut *tx)
        .await?;
    if done.rows_affected() == 0 {
        return Err(Error::Invalid(format!(
            "the user's {counter} limit is unlimited (or would overflow): nothing to grant"
        )));
    }
    let after = quota_row(&mut tx, user_id).await?;
    audit(
        &mut tx,
        actor,
        "user.quota.grant",
        ("user", &user_id.to_string()),
        json!({ "quota": before }),
        json!({ "quota": after, "granted": { counter: amount } }),
    )
    .await?;
    tx.commit().await?;
    user_detail(pool, user_id).await
}

/// Sets this month's counters of the user back to zero.
pub async fn reset_quota(pool: &PgPool, actor: &Actor, user_id: Uuid) -> Result<UserDetail> {
    let (mut tx, _) = begin(pool, actor, false).await?;
    let user = find(&mut tx, user_id, true).await?;
    let quota_id = lock_quota(&mut tx, user_id, user.plan.as_deref()).await?;
    let before = quota_row(&mut tx, user_id).await?;
    sqlx::query!(
        "UPDATE user_perspective_quotas
            SET messages_used = 0, premium_perspectives_used = 0, normal_perspectives_used = 0,
                eco_perspectives_used = 0,
                current_month_start = date_trunc('month', now() AT TIME ZONE 'UTC')::date,
                last_reset_date = (now() AT TIME ZONE 'UTC')::date, updated_at = now()
          WHERE id = $1",
        quota_id
    )
    .execute(&mut *tx)
    .await?;
    let after = quota_row(&mut tx, user_id).await?;
    audit(
        &mut tx,
        actor,
        "user.quota.reset",
        ("user", &user_id.to_string()),
        json!({ "quota": before }),
        json!({ "quota": after }),
    )
    .await?;
    tx.commit().await?;
    user_detail(pool, user_id).await
}

/// Suspends or reactivates a user. A suspended user's tokens and sessions are refused at once
/// (`account_suspended`), and work again after reactivation. Refused: suspending yourself, and
/// suspending the last active admin.
pub async fn set_status(
    pool: &PgPool,
    actor: &Actor,
    user_id: Uuid,
    status: UserStatus,
) -> Result<AdminUser> {
    if status == UserStatus::Suspended && actor.user_id() == Some(user_id) {
        return Err(Error::Conflict(
            "you cannot suspend yourself: ask another admin".into(),
        ));
    }
    let (mut tx, admins) = begin(pool, actor, true).await?;
    let before = find(&mut tx, user_id, true).await?;
    let active = is_active(before.status.as_deref());
    if active == (status == UserStatus::Active) {
        return Ok(before);
    }
    if status == UserStatus::Suspended && admins == [user_id] {
        return Err(Error::Conflict(
            "this is the last active admin: make another user admin first".into(),
        ));
    }
    sqlx::query!(
        "UPDATE users SET status = $2, updated_at = now() WHERE user_id = $1",
        user_id,
        status.as_str()
    )
    .execute(&mut *tx)
    .await?;
    // Written so that a change this user is making as an admin finishes first (it holds a
    // share lock on the row; see `begin`).
    sqlx::query!(
        "UPDATE profiles SET updated_at = now() WHERE id = $1",
        user_id
    )
    .execute(&mut *tx)
    .await?;
    let after = find(&mut tx, user_id, false).await?;
    audit(
        &mut tx,
        actor,
        if status == UserStatus::Active {
            "user.reactivate"
        } else {
            "user.suspend"
        },
        ("user", &user_id.to_string()),
        json!({ "status": before.status }),
        json!({ "status": after.status }),
    )
    .await?;
    tx.commit().await?;
    Ok(after)
}

/// Makes a user an admin or takes it away. Refused: removing the last active admin.
pub async fn set_admin(
    pool: &PgPool,
    actor: &Actor,
    user_id: Uuid,
    admin: bool,
) -> Result<AdminUser> {
    let (mut tx, admins) = begin(pool, actor, true).await?;
    let before = find(&mut tx, user_id, true).await?;
    if before.is_admin == admin {
        return Ok(before);
    }
    if !admin && admins == [user_id] {
        return Err(Error::Conflict(
            "this is the last active admin: make another user admin first".into(),
        ));
    }
    let updated = sqlx::query!(
        "UPDATE profiles SET is_admin = $2, updated_at = now() WHERE id = $1",
        user_id,
        admin
    )
    .execute(&mut *tx)
    .await?;
    if updated.rows_affected() == 0 {
        return Err(Error::Invalid(
            "this user has no profile row (a legacy user): create it first".into(),
        ));
    }
    let after = find(&mut tx, user_id, false).await?;
    audit(
        &mut tx,
        actor,
        if admin {
            "user.admin.grant"
        } else {
            "user.admin.revoke"
        },
        ("user", &user_id.to_string()),
        json!({ "is_admin": before.is_admin }),
        json!({ "is_admin": after.is_admin }),
    )
    .await?;
    tx.commit().await?;
    Ok(after)
}

/// What [`revoke_access`] ended.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Revoked {
    pub tokens: u64,
    pub sessions: u64,
    pub oauth_grants: u64,
    pub refresh_tokens: u64,
}

/// Ends every way the user is signed in: API tokens (OAuth access tokens included), web
/// sessions, OAuth grants and their refresh tokens. The account itself stays as it was (they
/// can sign in again unless suspended). Refused for yourself (use "sign out everywhere").
pub async fn revoke_access(pool: &PgPool, actor: &Actor, user_id: Uuid) -> Result<Revoked> {
    if actor.user_id() == Some(user_id) {
        return Err(Error::Conflict(
            "you cannot revoke your own access here: use sign out everywhere on /account".into(),
        ));
    }
    let (mut tx, _) = begin(pool, actor, false).await?;
    find(&mut tx, user_id, true).await?;
    let tokens = accounts::revoke_all_tokens_in(&mut tx, user_id).await?;
    let sessions = accounts::end_all_sessions_in(&mut tx, user_id).await?;
    let (oauth_grants, refresh_tokens) =
        oauth::flow::revoke_all_grants_in(&mut tx, user_id).await?;
    let revoked = Revoked {
        tokens,
        sessions,
        oauth_grants,
        refresh_tokens,
    };
    audit(
        &mut tx,
        actor,
        "user.revoke_access",
        ("user", &user_id.to_string()),
        serde_json::Value::Null,
        json!({ "revoked": revoked }),
    )
    .await?;
    tx.commit().await?;
    Ok(revoked)
}
