//! The admin console's domain (docs/admin.md): what `profiles.is_admin` users (web) and
//! operators on the server host (`polydev admin`) may see and change, and the append-only audit
//! log every change writes in its own transaction.
//!
//! Every change follows the same steps, in one transaction: check the input (nothing is
//! opened for bad input), re-check that the acting admin is still an active admin (row lock),
//! lock the target row, read "before", change, write the audit row with "before" and "after",
//! commit. A refused change writes no audit row. Zero-knowledge content is never read here:
//! the console shows whether a user has zero-knowledge on, and nothing of what they stored.

mod analytics;
mod audit;
mod plans;
mod users;

pub use analytics::{ProviderHealth, UsageRow, provider_health, usage, usage_csv};
pub use audit::{AuditEntry, MAX_AUDIT_PAGE, list_audit};
pub use plans::{
    PlanLimits, PlanTier, RateTier, list_plans, list_rate_tiers, set_rate_tier, update_plan,
};
pub use users::{
    AdminUser, Revoked, UserDetail, UserStatus, grant_quota, list_users, reset_quota,
    revoke_access, set_admin, set_plan, set_status, user_detail,
};

use sqlx::{PgConnection, PgPool, Postgres, Transaction};
use uuid::Uuid;

use crate::error::{Error, Result};

/// Who acts: an admin signed in on the web, or the command line on the server host (whoever
/// can run it there can already read the database).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Actor {
    Admin(Uuid),
    Cli(String),
}

impl Actor {
    /// The command line, named after the operating-system user running it.
    pub fn cli() -> Actor {
        let name = nix::unistd::User::from_uid(nix::unistd::geteuid())
            .ok()
            .flatten()
            .map(|u| u.name)
            .or_else(|| std::env::var("USER").ok())
            .unwrap_or_else(|| format!("uid{}", nix::unistd::geteuid()));
        Actor::Cli(name.chars().take(100).collect())
    }

    /// `user:<uuid>` or `cli:<os user>`, as the audit log shows it.
    pub fn label(&self) -> String {
        match self {
            Actor::Admin(id) => format!("user:{id}"),
            Actor::Cli(name) => format!("cli:{name}"),
        }
    }

    pub fn user_id(&self) -> Option<Uuid> {
        match self {
            Actor::Admin(id) => Some(*id),
            Actor::Cli(_) => None,
        }
    }
}

/// Whether `user_id` is an active admin (`profiles.is_admin`). `users.status` counts as active
/// when it is unset (legacy rows) or `active`, as accounts' `account_status` decides.
pub async fn is_admin(pool: &PgPool, user_id: Uuid) -> Result<bool> {
    Ok(sqlx::query_scalar!(
        r#"SELECT EXISTS (
               SELECT 1 FROM profiles p JOIN users u ON u.user_id = p.id
                WHERE p.id = $1 AND p.is_admin IS TRUE
                  AND (u.status IS NULL OR lower(trim(u.status)) = 'active')) AS "admin!""#,
        user_id
    )
    .fetch_one(pool)
    .await?)
}

/// The advisory lock key of changes to the set of active admins ("admins" in ASCII).
const ADMIN_SET_LOCK: i64 = 0x61_64_6d_69_6e_73;

/// The refusal every admin route gives a signed-in user who is not an admin.
pub fn not_admin() -> Error {
    Error::Forbidden {
        code: "admin_required",
        message: "this needs an administrator (profiles.is_admin)".into(),
    }
}

/// Opens the transaction of a change. With `lock_admins`, changes that could remove an admin
/// (suspend, remove admin) run one at a time (a transaction-scoped advisory lock), and the list
/// of active admins is read after the lock is held, so the "last admin" check sees every
/// earlier such change. An `Admin` actor must still be an active admin inside the transaction:
/// its profile row is share-locked first, and suspension and demotion write that row, so they
/// wait for the change in flight, and a later change sees them.
pub(crate) async fn begin(
    pool: &PgPool,
    actor: &Actor,
    lock_admins: bool,
) -> Result<(Transaction<'static, Postgres>, Vec<Uuid>)> {
    let mut tx = pool.begin().await?;
    let admins = if lock_admins {
        sqlx::query!("SELECT pg_advisory_xact_lock($1)", ADMIN_SET_LOCK)
            .execute(&mut *tx)
            .await?;
        sqlx::query_scalar!(
            "SELECT p.id FROM profiles p JOIN users u ON u.user_id = p.id
              WHERE p.is_admin IS TRUE AND (u.status IS NULL OR lower(trim(u.status)) = 'active')
              ORDER BY p.id",
        )
        .fetch_all(&mut *tx)
        .await?
    } else {
        Vec::new()
    };
    if let Actor::Admin(id) = actor {
        let still = if lock_admins {
            admins.contains(id)
        } else {
            // First wait for (and hold off) a change of this admin's profile; suspension and
            // demotion write it. Then read in a new statement, which sees what they committed.
            sqlx::query!("SELECT id FROM profiles WHERE id = $1 FOR SHARE", id)
                .fetch_optional(&mut *tx)
                .await?;
            sqlx::query_scalar!(
                r#"SELECT EXISTS (
                       SELECT 1 FROM profiles p JOIN users u ON u.user_id = p.id
                        WHERE p.id = $1 AND p.is_admin IS TRUE
                          AND (u.status IS NULL OR lower(trim(u.status)) = 'active')) AS "admin!""#,
                id
            )
            .fetch_one(&mut *tx)
            .await?
        };
        if !still {
            return Err(not_admin());
        }
    }
    Ok((tx, admins))
}

/// Writes one audit row inside the change's transaction.
pub(crate) async fn audit(
    conn: &mut PgConnection,
    actor: &Actor,
    action: &str,
    target: (&str, &str),
    before: serde_json::Value,
    after: serde_json::Value,
) -> Result<()> {
    sqlx::query!(
        "INSERT INTO admin_audit_log (actor_user_id, actor, action, target_type, target_id, before, after)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
        actor.user_id(),
        actor.label(),
        action,
        target.0,
        target.1,
        before,
        after
    )
    .execute(conn)
    .await?;
    tracing::info!(actor = %actor.label(), action, target = %format!("{}:{}", target.0, target.1), "admin action");
    Ok(())
}
