//! Reading the audit log (writing is `super::audit`, inside each change's transaction).

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use crate::error::{Error, Result};

/// Most rows one page of the audit log returns.
pub const MAX_AUDIT_PAGE: i64 = 500;

#[derive(Debug, Clone, Serialize)]
pub struct AuditEntry {
    pub id: i64,
    pub at: DateTime<Utc>,
    pub actor_user_id: Option<Uuid>,
    pub actor: String,
    pub action: String,
    pub target_type: String,
    pub target_id: String,
    pub before: Option<serde_json::Value>,
    pub after: Option<serde_json::Value>,
}

/// The newest `limit` rows (1–500), older than row `before` when given; optionally only those
/// about one target (`target_id`, e.g. a user id or a plan name).
pub async fn list_audit(
    pool: &PgPool,
    limit: i64,
    before: Option<i64>,
    target_id: Option<&str>,
) -> Result<Vec<AuditEntry>> {
    if !(1..=MAX_AUDIT_PAGE).contains(&limit) {
        return Err(Error::Invalid(format!(
            "limit must be 1 to {MAX_AUDIT_PAGE}"
        )));
    }
    Ok(sqlx::query_as!(
        AuditEntry,
        "SELECT id, at, actor_user_id, actor, action, target_type, target_id, before, after
           FROM admin_audit_log
          WHERE ($2::bigint IS NULL OR id < $2) AND ($3::text IS NULL OR target_id = $3)
          ORDER BY id DESC LIMIT $1",
        limit,
        before,
        target_id
    )
    .fetch_all(pool)
    .await?)
}
