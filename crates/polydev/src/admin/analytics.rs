//! Usage analytics over every user: answered calls (`perspective_usage`) and calls without an
//! answer (`model_call_failures`), by UTC day, model, provider and plan.

use chrono::NaiveDate;
use serde::Serialize;
use sqlx::PgPool;

use crate::error::{Error, Result};

/// Longest period the analytics cover, in days.
pub const MAX_DAYS: i32 = 366;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct UsageRow {
    pub day: NaiveDate,
    pub model: String,
    pub provider: String,
    /// The user's plan now (`users.tier`), not at the time of the call.
    pub plan: String,
    /// Model calls: answered + failed.
    pub requests: i64,
    pub errors: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    /// Exact decimal string.
    pub cost_usd: String,
}

/// The last `days` days (1–366, today included).
pub async fn usage(pool: &PgPool, days: i32) -> Result<Vec<UsageRow>> {
    if !(1..=MAX_DAYS).contains(&days) {
        return Err(Error::Invalid(format!("days must be 1 to {MAX_DAYS}")));
    }
    Ok(sqlx::query_as!(
        UsageRow,
        r#"WITH since AS (
               SELECT (date_trunc('day', now() AT TIME ZONE 'UTC') - make_interval(days => $1 - 1))
                      AT TIME ZONE 'UTC' AS at),
           calls AS (
               SELECT pu.created_at, coalesce(pu.model_name, '?') AS model,
                      coalesce(pu.provider, '?') AS provider, pu.user_id, 0 AS errors,
                      coalesce(pu.input_tokens, 0)::bigint AS input_tokens,
                      coalesce(pu.output_tokens, 0)::bigint AS output_tokens,
                      coalesce(pu.estimated_cost, 0) AS cost
                 FROM perspective_usage pu, since WHERE pu.created_at >= since.at
               UNION ALL
               SELECT f.created_at, f.model_name, f.provider, f.user_id, 1, 0, 0, 0
                 FROM model_call_failures f, since WHERE f.created_at >= since.at)
           SELECT (c.created_at AT TIME ZONE 'UTC')::date AS "day!", c.model AS "model!",
                  c.provider AS "provider!", coalesce(u.tier, 'free') AS "plan!",
                  count(*) AS "requests!", sum(c.errors)::bigint AS "errors!",
                  sum(c.input_tokens)::bigint AS "input_tokens!",
                  sum(c.output_tokens)::bigint AS "output_tokens!",
                  sum(c.cost)::text AS "cost_usd!"
             FROM calls c LEFT JOIN users u ON u.user_id = c.user_id
            GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4"#,
        days
    )
    .fetch_all(pool)
    .await?)
}

/// The same rows as CSV (RFC 4180, a header line, `\r\n` line ends).
pub fn usage_csv(rows: &[UsageRow]) -> String {
    fn field(value: &str) -> String {
        // Quote what needs it; a leading formula character is neutralised for spreadsheets.
        let value = if value.starts_with(['=', '+', '-', '@']) {
            format!("'{value}")
        } else {
            value.to_string()
        };
        if value.contains([',', '"', '\r', '\n']) {
            format!("\"{}\"", value.replace('"', "\"\""))
        } else {
            value
        }
    }
    let mut out = String::from(
        "day,model,provider,plan,requests,errors,error_rate,input_tokens,output_tokens,cost_usd\r\n",
    );
    for r in rows {
        let rate = if r.requests == 0 {
            0.0
        } else {
            r.errors as f64 / r.requests as f64
        };
        out.push_str(&format!(
            "{},{},{},{},{},{},{:.4},{},{},{}\r\n",
            r.day,
            field(&r.model),
            field(&r.provider),
            field(&r.plan),
            r.requests,
            r.errors,
            rate,
            r.input_tokens,
            r.output_tokens,
            r.cost_usd
        ));
    }
    out
}

/// Calls and failures of one provider over the last `minutes`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ProviderHealth {
    pub provider: String,
    pub calls: i64,
    pub errors: i64,
}

pub async fn provider_health(pool: &PgPool, minutes: i32) -> Result<Vec<ProviderHealth>> {
    Ok(sqlx::query_as!(
        ProviderHealth,
        r#"SELECT provider AS "provider!", count(*) AS "calls!", sum(errors)::bigint AS "errors!"
             FROM (SELECT coalesce(provider, '?') AS provider, 0 AS errors FROM perspective_usage
                    WHERE created_at >= now() - make_interval(mins => $1)
                   UNION ALL
                   SELECT provider, 1 FROM model_call_failures
                    WHERE created_at >= now() - make_interval(mins => $1)) c
            GROUP BY 1 ORDER BY 1"#,
        minutes
    )
    .fetch_all(pool)
    .await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quotes_and_neutralises_formulas() {
        let row = UsageRow {
            day: "2026-11-30".parse().unwrap(),
            model: "a,\"b\"".into(),
            provider: "=cmd()".into(),
            plan: "free".into(),
            requests: 4,
            errors: 1,
            input_tokens: 10,
            output_tokens: 20,
            cost_usd: "0.000123".into(),
        };
        let csv = usage_csv(&[row]);
        let line = csv.lines().nth(1).unwrap();
        assert_eq!(
            line,
            "2026-11-30,\"a,\"\"b\"\"\",'=cmd(),free,4,1,0.2500,10,20,0.000123"
        );
    }
}
