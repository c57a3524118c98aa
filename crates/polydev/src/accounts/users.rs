use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::quota;

pub const MAX_EMAIL_LEN: usize = 254;

/// A subscription plan. Its limits live in the `plan_tiers` table (docs/operations.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Plan {
    Free,
    Plus,
    Pro,
    Enterprise,
}

impl Plan {
    pub fn as_str(self) -> &'static str {
        match self {
            Plan::Free => "free",
            Plan::Plus => "plus",
            Plan::Pro => "pro",
            Plan::Enterprise => "enterprise",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct User {
    pub user_id: Uuid,
    pub email: Option<String>,
    pub tier: Option<String>,
    pub status: Option<String>,
    pub created_at: Option<DateTime<Utc>>,
}

/// Creates a user with its profile and its quota row for `plan`, in one transaction.
pub async fn create_user(pool: &PgPool, email: &str, plan: Plan) -> Result<User> {
    let email = normalize_email(email)?;
    let mut tx = pool.begin().await?;
    // Serialises concurrent creates of the same address (there is no unique index on legacy data).
    sqlx::query!(
        "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
        &email
    )
    .execute(&mut *tx)
    .await?;
    let exists = sqlx::query_scalar!(
        r#"SELECT EXISTS (SELECT 1 FROM users WHERE lower(email) = $1) AS "exists!""#,
        &email
    )
    .fetch_one(&mut *tx)
    .await?;
    if exists {
        return Err(Error::Conflict(format!(
            "a user with e-mail {email} already exists"
        )));
    }
    let user = sqlx::query_as!(
        User,
        "INSERT INTO users (email, tier, status, subscription_plan, last_active_at)
         VALUES ($1, $2, 'active', $2, now())
         RETURNING user_id, email, tier, status, created_at",
        &email,
        plan.as_str()
    )
    .fetch_one(&mut *tx)
    .await?;
    let quota = quota::create_for_user(&mut tx, user.user_id, plan.as_str()).await?;
    sqlx::query!(
        "INSERT INTO profiles (id, email, subscription_tier, current_plan_tier, perspective_quota_id,
                               is_admin, monthly_queries, queries_used, api_keys_count)
         VALUES ($1, $2, $3, $3, $4, false, $5, 0, 0)",
        user.user_id,
        &email,
        plan.as_str(),
        quota.id,
        quota.messages_per_month
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    tracing::info!(user_id = %user.user_id, plan = plan.as_str(), "user created");
    Ok(user)
}

pub async fn find_user_by_email(pool: &PgPool, email: &str) -> Result<User> {
    let email = normalize_email(email)?;
    sqlx::query_as!(
        User,
        "SELECT user_id, email, tier, status, created_at
           FROM users WHERE lower(email) = $1 ORDER BY created_at LIMIT 1",
        &email
    )
    .fetch_optional(pool)
    .await?
    .ok_or(Error::NotFound("user"))
}

/// The legacy `profiles` row (users created outside polydev may have none).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Profile {
    pub email: Option<String>,
    pub full_name: Option<String>,
    pub display_name: Option<String>,
    pub company: Option<String>,
    pub subscription_tier: Option<String>,
    pub current_plan_tier: Option<String>,
    pub is_admin: Option<bool>,
    pub timezone: Option<String>,
    pub api_keys_count: Option<i32>,
}

pub async fn find_profile(pool: &PgPool, user_id: Uuid) -> Result<Option<Profile>> {
    Ok(sqlx::query_as!(
        Profile,
        "SELECT email, full_name, display_name, company, subscription_tier, current_plan_tier,
                is_admin, timezone, api_keys_count
           FROM profiles WHERE id = $1",
        user_id
    )
    .fetch_optional(pool)
    .await?)
}

pub async fn find_user(pool: &PgPool, user_id: Uuid) -> Result<User> {
    sqlx::query_as!(
        User,
        "SELECT user_id, email, tier, status, created_at FROM users WHERE user_id = $1",
        user_id
    )
    .fetch_optional(pool)
    .await?
    .ok_or(Error::NotFound("user"))
}

/// Trimmed and lower-cased; a plausible address of at most 254 characters.
pub(super) fn normalize_email(email: &str) -> Result<String> {
    let email = email.trim().to_lowercase();
    let valid = email.len() <= MAX_EMAIL_LEN
        && !email.chars().any(char::is_whitespace)
        && matches!(email.split_once('@'), Some((local, domain))
            if !local.is_empty() && !domain.is_empty() && !domain.contains('@'));
    if valid {
        Ok(email)
    } else {
        Err(Error::Invalid(format!(
            "`{}` is not a valid e-mail address",
            email.chars().take(80).collect::<String>()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_normalized_and_checked() {
        assert_eq!(
            normalize_email("  Ada@Example.COM ").unwrap(),
            "ada@example.com"
        );
        for bad in [
            "",
            "ada",
            "@example.com",
            "ada@",
            "a b@example.com",
            "a@b@c",
        ] {
            assert!(
                matches!(normalize_email(bad), Err(Error::Invalid(_))),
                "{bad}"
            );
        }
        let long = format!("{}@example.com", "a".repeat(250));
        assert!(normalize_email(&long).is_err());
    }
}
