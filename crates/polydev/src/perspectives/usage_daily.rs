//! Usage this month per day and model (the account page's chart and per-model table).

use sqlx::PgPool;
use uuid::Uuid;

use crate::error::Result;

/// One day's calls of one model.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DailyModelUsage {
    pub day: chrono::NaiveDate,
    pub model: String,
    pub tier: Option<String>,
    pub calls: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    /// USD, exact decimal.
    pub cost_usd: String,
}

/// The user's successful model calls since `since`, per UTC day and model.
pub async fn daily_usage(
    pool: &PgPool,
    user_id: Uuid,
    since: chrono::NaiveDate,
) -> Result<Vec<DailyModelUsage>> {
    Ok(sqlx::query_as!(
        DailyModelUsage,
        r#"SELECT (created_at AT TIME ZONE 'UTC')::date AS "day!",
                  coalesce(model_name, '?') AS "model!", model_tier AS tier,
                  count(*) AS "calls!",
                  coalesce(sum(input_tokens), 0)::int8 AS "input_tokens!",
                  coalesce(sum(output_tokens), 0)::int8 AS "output_tokens!",
                  coalesce(sum(estimated_cost), 0)::text AS "cost_usd!"
             FROM perspective_usage WHERE user_id = $1 AND created_at >= $2::date
            GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"#,
        user_id,
        since
    )
    .fetch_all(pool)
    .await?)
}
