//! Usage records (`perspective_usage`): one row per model call that returned an answer, with
//! the provider-reported tokens and the exact cost. Never the prompt or the answer.

use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use super::catalogue::{Cost, ModelSpec};
use crate::error::Result;
use crate::quota::{self, QuotaState};

pub struct UsageRecord<'a> {
    pub user_id: Uuid,
    pub session_id: &'a str,
    pub model: &'a ModelSpec,
    pub input_tokens: u32,
    pub output_tokens: u32,
    pub cost: Cost,
    pub request_metadata: Value,
    pub response_metadata: Value,
}

/// What a usage row settles, and where the call keeps its outcome for idempotent retries.
pub struct Settles<'a> {
    /// The model's reserved unit: without it (refunded already) nothing is recorded.
    pub reservation: Uuid,
    /// The call's message unit, settled by its first usage row.
    pub message: Option<Uuid>,
    /// (idempotency key, claim token, outcome): the answer is kept with the claim.
    pub outcome: Option<(&'a str, Uuid, Value)>,
}

/// Writes the usage row, settles its reservations and keeps the outcome for retries, all in one
/// statement: a call is either charged and recorded, or neither. False when the reservation was
/// no longer there (the sweeper refunded it): then nothing is written and the call is free.
pub async fn record(pool: &PgPool, usage: &UsageRecord<'_>, settles: &Settles<'_>) -> Result<bool> {
    let (key, token, outcome) = match &settles.outcome {
        Some((key, token, outcome)) => (Some(*key), Some(*token), Some(outcome)),
        None => (None, None, None),
    };
    // The cost travels as exact decimal text (`$9::text`); sqlx has no decimal type enabled here.
    let recorded = sqlx::query_scalar!(
        r#"WITH unit AS (DELETE FROM quota_reservations WHERE id = $12 RETURNING id),
                message AS (DELETE FROM quota_reservations
                             WHERE id = $13 AND EXISTS (SELECT 1 FROM unit) RETURNING id),
                kept AS (UPDATE perspective_idempotency
                            SET outcomes = coalesce(outcomes, '[]'::jsonb) || jsonb_build_array($16::jsonb)
                          WHERE user_id = $1 AND idempotency_key = $14 AND claim_token = $15
                            AND EXISTS (SELECT 1 FROM unit)
                         RETURNING 1)
           INSERT INTO perspective_usage
               (user_id, session_id, model_name, model_tier, provider, input_tokens, output_tokens,
                total_tokens, estimated_cost, perspectives_deducted, request_metadata, response_metadata)
           SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9::text::numeric, 1, $10, $11 FROM unit
           RETURNING true AS "recorded!""#,
        usage.user_id,
        usage.session_id,
        &usage.model.id,
        usage.model.tier.as_str(),
        &usage.model.provider,
        usage.input_tokens as i32,
        usage.output_tokens as i32,
        (usage.input_tokens + usage.output_tokens) as i32,
        usage.cost.to_string(),
        &usage.request_metadata,
        &usage.response_metadata,
        settles.reservation,
        settles.message,
        key,
        token,
        outcome
    )
    .fetch_optional(pool)
    .await?;
    Ok(recorded.is_some())
}

/// What a user's successful model calls added up to since `since` (for `get_usage`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct MonthUsage {
    pub calls: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    /// USD, exact decimal.
    pub cost_usd: String,
}

pub async fn month_usage(
    pool: &PgPool,
    user_id: Uuid,
    since: chrono::NaiveDate,
) -> Result<MonthUsage> {
    Ok(sqlx::query_as!(
        MonthUsage,
        r#"SELECT count(*) AS "calls!",
                  coalesce(sum(input_tokens), 0)::int8 AS "input_tokens!",
                  coalesce(sum(output_tokens), 0)::int8 AS "output_tokens!",
                  coalesce(sum(estimated_cost), 0)::text AS "cost_usd!"
             FROM perspective_usage WHERE user_id = $1 AND created_at >= $2::date"#,
        user_id,
        since
    )
    .fetch_one(pool)
    .await?)
}

/// The caller's quota and usage this month (`GET /v1/usage`, the MCP tool `get_usage`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct UsageReport {
    pub month_start: chrono::NaiveDate,
    pub quota: Option<QuotaState>,
    pub usage: MonthUsage,
}

pub async fn usage_report(pool: &PgPool, user_id: Uuid) -> Result<UsageReport> {
    let today = chrono::Utc::now().date_naive();
    let quota = quota::for_user(pool, user_id)
        .await?
        .map(|q| q.state(today));
    let month_start = quota::month_start(today);
    let usage = month_usage(pool, user_id, month_start).await?;
    Ok(UsageReport {
        month_start,
        quota,
        usage,
    })
}
