//! Plan limits (`plan_tiers`) and rate tiers (`rate_limit_tiers`).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::PgPool;

use super::{Actor, audit, begin};
use crate::error::{Error, Result};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PlanTier {
    pub tier: String,
    /// `None`: unlimited.
    pub messages_per_month: Option<i32>,
    pub premium_perspectives_limit: i32,
    pub normal_perspectives_limit: i32,
    pub eco_perspectives_limit: i32,
    pub updated_at: DateTime<Utc>,
    /// Users whose current plan this is.
    pub users: i64,
}

/// New limits for a plan. `expected_updated_at` (the `updated_at` the editor saw) makes the
/// change conditional: if someone changed the plan since, nothing is written (409).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanLimits {
    pub messages_per_month: Option<i32>,
    pub premium_perspectives_limit: i32,
    pub normal_perspectives_limit: i32,
    pub eco_perspectives_limit: i32,
    #[serde(default)]
    pub expected_updated_at: Option<DateTime<Utc>>,
}

/// Largest limit accepted (a million per month is far above any plan).
pub const MAX_LIMIT: i32 = 100_000_000;

pub async fn list_plans(pool: &PgPool) -> Result<Vec<PlanTier>> {
    Ok(sqlx::query_as!(
        PlanTier,
        r#"SELECT t.tier, t.messages_per_month, t.premium_perspectives_limit,
                  t.normal_perspectives_limit, t.eco_perspectives_limit, t.updated_at,
                  (SELECT count(*) FROM users u WHERE u.tier = t.tier) AS "users!"
             FROM plan_tiers t ORDER BY t.premium_perspectives_limit, t.tier"#
    )
    .fetch_all(pool)
    .await?)
}

/// Sets a plan's limits, and the same limits on the quota row of every user of the plan (what
/// a grant had added to one of them is replaced). Returns the plan as it is now.
pub async fn update_plan(
    pool: &PgPool,
    actor: &Actor,
    tier: &str,
    limits: &PlanLimits,
) -> Result<PlanTier> {
    let values = [
        limits.messages_per_month.unwrap_or(0),
        limits.premium_perspectives_limit,
        limits.normal_perspectives_limit,
        limits.eco_perspectives_limit,
    ];
    if values.iter().any(|v| !(0..=MAX_LIMIT).contains(v)) {
        return Err(Error::Invalid(format!(
            "limits are 0 to {MAX_LIMIT} (messages_per_month may be null: unlimited)"
        )));
    }
    let (mut tx, _) = begin(pool, actor, false).await?;
    let before = sqlx::query_as!(
        PlanTier,
        r#"SELECT tier, messages_per_month, premium_perspectives_limit, normal_perspectives_limit,
                  eco_perspectives_limit, updated_at, 0::bigint AS "users!"
             FROM plan_tiers WHERE tier = $1 FOR UPDATE"#,
        tier
    )
    .fetch_optional(&mut *tx)
    .await?
    .ok_or(Error::NotFound("plan"))?;
    if let Some(expected) = limits.expected_updated_at
        && expected != before.updated_at
    {
        return Err(Error::Conflict(format!(
            "plan `{tier}` was changed by someone else since you loaded it (at {}): reload and try again",
            before.updated_at
        )));
    }
    // clock_timestamp(): two changes in one transaction-start instant still differ.
    sqlx::query!(
        "UPDATE plan_tiers SET messages_per_month = $2, premium_perspectives_limit = $3,
                normal_perspectives_limit = $4, eco_perspectives_limit = $5,
                updated_at = greatest(clock_timestamp(), updated_at + interval '1 microsecond')
          WHERE tier = $1",
        tier,
        limits.messages_per_month,
        limits.premium_perspectives_limit,
        limits.normal_perspectives_limit,
        limits.eco_perspectives_limit
    )
    .execute(&mut *tx)
    .await?;
    let users = sqlx::query!(
        "UPDATE user_perspective_quotas SET messages_per_month = $2,
                premium_perspectives_limit = $3, normal_perspectives_limit = $4,
                eco_perspectives_limit = $5, updated_at = now()
          WHERE plan_tier = $1",
        tier,
        limits.messages_per_month,
        limits.premium_perspectives_limit,
        limits.normal_perspectives_limit,
        limits.eco_perspectives_limit
    )
    .execute(&mut *tx)
    .await?
    .rows_affected();
    let after = sqlx::query_as!(
        PlanTier,
        r#"SELECT t.tier, t.messages_per_month, t.premium_perspectives_limit,
                  t.normal_perspectives_limit, t.eco_perspectives_limit, t.updated_at,
                  (SELECT count(*) FROM users u WHERE u.tier = t.tier) AS "users!"
             FROM plan_tiers t WHERE t.tier = $1"#,
        tier
    )
    .fetch_one(&mut *tx)
    .await?;
    let limits_of = |p: &PlanTier| {
        json!({ "messages_per_month": p.messages_per_month,
                "premium_perspectives_limit": p.premium_perspectives_limit,
                "normal_perspectives_limit": p.normal_perspectives_limit,
                "eco_perspectives_limit": p.eco_perspectives_limit })
    };
    audit(
        &mut tx,
        actor,
        "plan.update",
        ("plan", tier),
        limits_of(&before),
        json!({ "limits": limits_of(&after), "quota_rows_updated": users }),
    )
    .await?;
    tx.commit().await?;
    Ok(after)
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RateTier {
    pub tier: String,
    pub requests_per_minute: i32,
}

/// Largest requests per minute accepted.
pub const MAX_REQUESTS_PER_MINUTE: i32 = 1_000_000;

pub async fn list_rate_tiers(pool: &PgPool) -> Result<Vec<RateTier>> {
    Ok(sqlx::query_as!(
        RateTier,
        "SELECT tier, requests_per_minute FROM rate_limit_tiers ORDER BY requests_per_minute, tier"
    )
    .fetch_all(pool)
    .await?)
}

/// Sets a rate tier's requests per minute (1–1,000,000); every process sees it at its next
/// request. `expected` (the value the editor saw) makes it conditional (409 if it changed).
pub async fn set_rate_tier(
    pool: &PgPool,
    actor: &Actor,
    tier: &str,
    requests_per_minute: i32,
    expected: Option<i32>,
) -> Result<RateTier> {
    if !(1..=MAX_REQUESTS_PER_MINUTE).contains(&requests_per_minute) {
        return Err(Error::Invalid(format!(
            "requests_per_minute is 1 to {MAX_REQUESTS_PER_MINUTE}"
        )));
    }
    let (mut tx, _) = begin(pool, actor, false).await?;
    let before = sqlx::query_as!(
        RateTier,
        "SELECT tier, requests_per_minute FROM rate_limit_tiers WHERE tier = $1 FOR UPDATE",
        tier
    )
    .fetch_optional(&mut *tx)
    .await?
    .ok_or(Error::NotFound("rate tier"))?;
    if let Some(expected) = expected
        && expected != before.requests_per_minute
    {
        return Err(Error::Conflict(format!(
            "rate tier `{tier}` was changed by someone else since you loaded it (now {}): reload and try again",
            before.requests_per_minute
        )));
    }
    if before.requests_per_minute == requests_per_minute {
        return Ok(before);
    }
    let after = sqlx::query_as!(
        RateTier,
        "UPDATE rate_limit_tiers SET requests_per_minute = $2 WHERE tier = $1
         RETURNING tier, requests_per_minute",
        tier,
        requests_per_minute
    )
    .fetch_one(&mut *tx)
    .await?;
    audit(
        &mut tx,
        actor,
        "rate_tier.update",
        ("rate_tier", tier),
        json!({ "requests_per_minute": before.requests_per_minute }),
        json!({ "requests_per_minute": after.requests_per_minute }),
    )
    .await?;
    tx.commit().await?;
    Ok(after)
}
