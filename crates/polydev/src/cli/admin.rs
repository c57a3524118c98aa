//! `polydev admin …`: the admin console for operators on the server host. It talks to the
//! database directly (like `polydev user create`), acts as `cli:<os user>` in the audit log, and
//! runs the same domain functions, checks and audit rows as the web console.

use clap::Subcommand;
use uuid::Uuid;

use crate::accounts;
use crate::admin::{self, Actor, PlanLimits, UserStatus};

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// List users, newest first (search by e-mail substring or user id).
    Users {
        #[arg(long)]
        search: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: i64,
        #[arg(long, default_value_t = 0)]
        offset: i64,
    },
    /// One user: plan, status, quota, live tokens and sessions, zero-knowledge status.
    Show {
        /// E-mail address or user id.
        user: String,
    },
    /// Move a user to another plan (a row of plan_tiers).
    SetPlan { user: String, plan: String },
    /// Add units to one of a user's monthly limits (until their plan changes).
    Grant {
        user: String,
        /// messages, premium, normal or eco.
        #[arg(long)]
        limit: String,
        #[arg(long, allow_negative_numbers = true)]
        amount: i64,
    },
    /// Set a user's counters of this month back to zero.
    ResetQuota { user: String },
    /// Suspend a user: their tokens and web sessions are refused until reactivated.
    Suspend { user: String },
    /// Reactivate a suspended user.
    Reactivate { user: String },
    /// Make a user an administrator (profiles.is_admin).
    MakeAdmin { user: String },
    /// Take administrator rights away (never from the last active admin).
    RemoveAdmin { user: String },
    /// Revoke a user's API tokens, web sessions and OAuth grants.
    Revoke { user: String },
    /// Plan limits (plan_tiers).
    Plans,
    /// Set a plan's limits (and those of every user on the plan).
    SetPlanLimits {
        tier: String,
        /// Messages per month; `unlimited` for none.
        #[arg(long, allow_negative_numbers = true)]
        messages: String,
        #[arg(long, allow_negative_numbers = true)]
        premium: i32,
        #[arg(long, allow_negative_numbers = true)]
        normal: i32,
        #[arg(long, allow_negative_numbers = true)]
        eco: i32,
    },
    /// Rate tiers (rate_limit_tiers).
    RateTiers,
    /// Set a rate tier's requests per minute.
    SetRateTier {
        tier: String,
        #[arg(allow_negative_numbers = true)]
        requests_per_minute: i32,
    },
    /// Usage by day, model, provider and plan (requests, errors, tokens, cost).
    Usage {
        #[arg(long, default_value_t = 30)]
        days: i32,
        /// CSV instead of a table.
        #[arg(long)]
        csv: bool,
    },
    /// The audit log, newest first.
    Audit {
        #[arg(long, default_value_t = 50)]
        limit: i64,
        /// Only rows about this target (a user id, a plan or a rate tier).
        #[arg(long)]
        target: Option<String>,
    },
}

/// A user given by id or e-mail address.
async fn resolve(pool: &sqlx::PgPool, user: &str) -> anyhow::Result<Uuid> {
    match user.parse::<Uuid>() {
        Ok(id) => Ok(accounts::find_user(pool, id).await?.user_id),
        Err(_) => Ok(accounts::find_user_by_email(pool, user).await?.user_id),
    }
}

fn print_user(u: &admin::AdminUser) {
    println!(
        "{}  {:<32}  plan={:<10} status={:<9} admin={:<5} zero-knowledge={}",
        u.user_id,
        u.email.as_deref().unwrap_or("-"),
        u.plan.as_deref().unwrap_or("-"),
        u.status.as_deref().unwrap_or("active"),
        u.is_admin,
        if u.zero_knowledge { "on" } else { "off" }
    );
}

pub async fn run(pool: &sqlx::PgPool, command: AdminCommand) -> anyhow::Result<()> {
    let actor = Actor::cli();
    match command {
        AdminCommand::Users {
            search,
            limit,
            offset,
        } => {
            for u in admin::list_users(pool, search.as_deref(), limit, offset).await? {
                print_user(&u);
            }
        }
        AdminCommand::Show { user } => {
            let id = resolve(pool, &user).await?;
            let d = admin::user_detail(pool, id).await?;
            print_user(&d.user);
            println!(
                "live tokens {}, web sessions {}, OAuth grants {}",
                d.live_tokens, d.live_sessions, d.live_oauth_grants
            );
            if let Some(q) = &d.quota {
                for (name, u) in [
                    ("messages", &q.messages),
                    ("premium", &q.premium),
                    ("normal", &q.normal),
                    ("eco", &q.eco),
                ] {
                    let limit = u.limit.map_or("unlimited".to_string(), |l| l.to_string());
                    println!("{name:<9} used {:>7} of {limit}", u.used);
                }
            }
            println!(
                "zero-knowledge: {} (content is never readable by an admin: the server holds no key)",
                if d.user.zero_knowledge { "on" } else { "off" }
            );
        }
        AdminCommand::SetPlan { user, plan } => {
            let id = resolve(pool, &user).await?;
            print_user(&admin::set_plan(pool, &actor, id, &plan).await?);
        }
        AdminCommand::Grant {
            user,
            limit,
            amount,
        } => {
            let id = resolve(pool, &user).await?;
            admin::grant_quota(pool, &actor, id, &limit, amount).await?;
            println!("granted {amount} {limit} to {id}");
        }
        AdminCommand::ResetQuota { user } => {
            let id = resolve(pool, &user).await?;
            admin::reset_quota(pool, &actor, id).await?;
            println!("this month's counters of {id} are back to zero");
        }
        AdminCommand::Suspend { user } => {
            let id = resolve(pool, &user).await?;
            print_user(&admin::set_status(pool, &actor, id, UserStatus::Suspended).await?);
        }
        AdminCommand::Reactivate { user } => {
            let id = resolve(pool, &user).await?;
            print_user(&admin::set_status(pool, &actor, id, UserStatus::Active).await?);
        }
        AdminCommand::MakeAdmin { user } => {
            let id = resolve(pool, &user).await?;
            print_user(&admin::set_admin(pool, &actor, id, true).await?);
        }
        AdminCommand::RemoveAdmin { user } => {
            let id = resolve(pool, &user).await?;
            print_user(&admin::set_admin(pool, &actor, id, false).await?);
        }
        AdminCommand::Revoke { user } => {
            let id = resolve(pool, &user).await?;
            let r = admin::revoke_access(pool, &actor, id).await?;
            println!(
                "revoked {} tokens, {} web sessions, {} OAuth grants ({} refresh tokens)",
                r.tokens, r.sessions, r.oauth_grants, r.refresh_tokens
            );
        }
        AdminCommand::Plans => {
            println!(
                "{:<12} {:>6} {:>10} {:>8} {:>8} {:>8}",
                "PLAN", "USERS", "MESSAGES", "PREMIUM", "NORMAL", "ECO"
            );
            for p in admin::list_plans(pool).await? {
                let messages = p
                    .messages_per_month
                    .map_or("unlimited".to_string(), |m| m.to_string());
                println!(
                    "{:<12} {:>6} {:>10} {:>8} {:>8} {:>8}",
                    p.tier,
                    p.users,
                    messages,
                    p.premium_perspectives_limit,
                    p.normal_perspectives_limit,
                    p.eco_perspectives_limit
                );
            }
        }
        AdminCommand::SetPlanLimits {
            tier,
            messages,
            premium,
            normal,
            eco,
        } => {
            let messages_per_month = match messages.as_str() {
                "unlimited" => None,
                n => Some(n.parse::<i32>().map_err(|_| {
                    anyhow::anyhow!("--messages is a number or `unlimited`, not `{n}`")
                })?),
            };
            let limits = PlanLimits {
                messages_per_month,
                premium_perspectives_limit: premium,
                normal_perspectives_limit: normal,
                eco_perspectives_limit: eco,
                expected_updated_at: None,
            };
            let p = admin::update_plan(pool, &actor, &tier, &limits).await?;
            println!("plan {} updated ({} users)", p.tier, p.users);
        }
        AdminCommand::RateTiers => {
            for t in admin::list_rate_tiers(pool).await? {
                println!(
                    "{:<12} {:>8} requests/minute",
                    t.tier, t.requests_per_minute
                );
            }
        }
        AdminCommand::SetRateTier {
            tier,
            requests_per_minute,
        } => {
            let t = admin::set_rate_tier(pool, &actor, &tier, requests_per_minute, None).await?;
            println!(
                "{} is now {} requests/minute",
                t.tier, t.requests_per_minute
            );
        }
        AdminCommand::Usage { days, csv } => {
            let rows = admin::usage(pool, days).await?;
            if csv {
                print!("{}", admin::usage_csv(&rows));
            } else {
                println!(
                    "{:<10}  {:<24}  {:<10}  {:<10}  {:>8}  {:>6}  {:>10}  {:>10}  COST_USD",
                    "DAY", "MODEL", "PROVIDER", "PLAN", "REQUESTS", "ERRORS", "IN_TOK", "OUT_TOK"
                );
                for r in rows {
                    println!(
                        "{:<10}  {:<24}  {:<10}  {:<10}  {:>8}  {:>6}  {:>10}  {:>10}  {}",
                        r.day,
                        r.model,
                        r.provider,
                        r.plan,
                        r.requests,
                        r.errors,
                        r.input_tokens,
                        r.output_tokens,
                        r.cost_usd
                    );
                }
            }
        }
        AdminCommand::Audit { limit, target } => {
            for e in admin::list_audit(pool, limit, None, target.as_deref()).await? {
                println!(
                    "{}  {}  {:<24}  {}:{}  {} -> {}",
                    e.at.format("%Y-%m-%d %H:%M:%S"),
                    e.actor,
                    e.action,
                    e.target_type,
                    e.target_id,
                    e.before.unwrap_or_default(),
                    e.after.unwrap_or_default()
                );
            }
        }
    }
    Ok(())
}
