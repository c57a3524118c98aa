//! Monthly quotas per model tier (`user_perspective_quotas`), with limits per plan from the
//! `plan_tiers` table.

mod guard;

use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::error::{Error, Result};

pub use guard::ReservationGuard;

/// A user's quota row. `None` limits are unlimited.
#[derive(Debug, Clone, Serialize)]
pub struct Quota {
    pub id: Uuid,
    pub plan_tier: Option<String>,
    pub messages_per_month: Option<i32>,
    pub premium_perspectives_limit: Option<i32>,
    pub normal_perspectives_limit: Option<i32>,
    pub eco_perspectives_limit: Option<i32>,
    pub current_month_start: Option<NaiveDate>,
    pub messages_used: Option<i32>,
    pub premium_perspectives_used: Option<i32>,
    pub normal_perspectives_used: Option<i32>,
    pub eco_perspectives_used: Option<i32>,
    pub last_reset_date: Option<NaiveDate>,
    pub updated_at: Option<DateTime<Utc>>,
}

/// Creates the quota row of a new user with the limits of `plan` (inside the caller's
/// transaction), starting in the current calendar month.
pub async fn create_for_user(conn: &mut PgConnection, user_id: Uuid, plan: &str) -> Result<Quota> {
    sqlx::query_as!(
        Quota,
        "INSERT INTO user_perspective_quotas
             (user_id, plan_tier, messages_per_month, premium_perspectives_limit,
              normal_perspectives_limit, eco_perspectives_limit, current_month_start,
              messages_used, premium_perspectives_used, normal_perspectives_used,
              eco_perspectives_used, last_reset_date)
         SELECT $1, tier, messages_per_month, premium_perspectives_limit,
                normal_perspectives_limit, eco_perspectives_limit,
                date_trunc('month', now() AT TIME ZONE 'UTC')::date, 0, 0, 0, 0,
                (now() AT TIME ZONE 'UTC')::date
           FROM plan_tiers WHERE tier = $2
         RETURNING id, plan_tier, messages_per_month, premium_perspectives_limit,
                   normal_perspectives_limit, eco_perspectives_limit, current_month_start,
                   messages_used, premium_perspectives_used, normal_perspectives_used,
                   eco_perspectives_used, last_reset_date, updated_at",
        user_id,
        plan
    )
    .fetch_optional(conn)
    .await?
    .ok_or_else(|| {
        Error::Invalid(format!(
            "unknown plan tier `{plan}` (see the plan_tiers table)"
        ))
    })
}

/// The user's quota row, if they have one (legacy users may not).
pub async fn for_user(pool: &PgPool, user_id: Uuid) -> Result<Option<Quota>> {
    Ok(sqlx::query_as!(
        Quota,
        "SELECT id, plan_tier, messages_per_month, premium_perspectives_limit,
                normal_perspectives_limit, eco_perspectives_limit, current_month_start,
                messages_used, premium_perspectives_used, normal_perspectives_used,
                eco_perspectives_used, last_reset_date, updated_at
           FROM user_perspective_quotas
          WHERE user_id = $1 ORDER BY created_at DESC LIMIT 1",
        user_id
    )
    .fetch_optional(pool)
    .await?)
}

/// Use of one limit this month. `limit` and `remaining` are `None` when unlimited.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub limit: Option<i32>,
    pub used: i32,
    pub remaining: Option<i32>,
}

/// The quota as the user sees it in the current calendar month.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaState {
    pub plan_tier: Option<String>,
    pub month_start: NaiveDate,
    pub messages: Usage,
    pub premium: Usage,
    pub normal: Usage,
    pub eco: Usage,
}

/// The first day of `date`'s calendar month.
pub fn month_start(date: NaiveDate) -> NaiveDate {
    use chrono::Datelike;
    date.with_day(1).expect("day 1 exists in every month")
}

impl Quota {
    /// Counters from an earlier month count as zero: the month rolls over on the calendar, and
    /// the stored row is reset by the first use in the new month.
    pub fn state(&self, today: NaiveDate) -> QuotaState {
        let month = month_start(today);
        let current = self.current_month_start.is_some_and(|start| start >= month);
        let usage = |limit: Option<i32>, used: Option<i32>| {
            let used = if current { used.unwrap_or(0) } else { 0 };
            Usage {
                limit,
                used,
                remaining: limit.map(|l| (l - used).max(0)),
            }
        };
        QuotaState {
            plan_tier: self.plan_tier.clone(),
            month_start: month,
            messages: usage(self.messages_per_month, self.messages_used),
            premium: usage(
                self.premium_perspectives_limit,
                self.premium_perspectives_used,
            ),
            normal: usage(
                self.normal_perspectives_limit,
                self.normal_perspectives_used,
            ),
            eco: usage(self.eco_perspectives_limit, self.eco_perspectives_used),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quota(month: &str) -> Quota {
        Quota {
            id: Uuid::nil(),
            plan_tier: Some("free".into()),
            messages_per_month: Some(200),
            premium_perspectives_limit: Some(10),
            normal_perspectives_limit: Some(40),
            eco_perspectives_limit: None,
            current_month_start: Some(month.parse().unwrap()),
            messages_used: Some(5),
            premium_perspectives_used: Some(12),
            normal_perspectives_used: Some(1),
            eco_perspectives_used: Some(3),
            last_reset_date: None,
            updated_at: None,
        }
    }

    #[test]
    fn state_counts_this_month_and_never_goes_negative() {
        let state = quota("2026-11-01").state("2026-11-25".parse().unwrap());
        assert_eq!(
            state.messages,
            Usage {
                limit: Some(200),
                used: 5,
                remaining: Some(195)
            }
        );
        assert_eq!(state.premium.remaining, Some(0));
        assert_eq!(
            state.eco,
            Usage {
                limit: None,
                used: 3,
                remaining: None
            }
        );
    }

    #[test]
    fn an_earlier_month_reads_as_unused() {
        let state = quota("2026-10-01").state("2026-11-01".parse().unwrap());
        assert_eq!(state.month_start, "2026-11-01".parse().unwrap());
        assert_eq!(state.messages.used, 0);
        assert_eq!(state.premium.remaining, Some(10));
    }
}

/// One of the monthly counters a call draws on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counter {
    Messages,
    Premium,
    Normal,
    Eco,
}

impl Counter {
    /// (used column, limit column). Static names: safe to splice into SQL.
    fn columns(self) -> (&'static str, &'static str) {
        match self {
            Counter::Messages => ("messages_used", "messages_per_month"),
            Counter::Premium => ("premium_perspectives_used", "premium_perspectives_limit"),
            Counter::Normal => ("normal_perspectives_used", "normal_perspectives_limit"),
            Counter::Eco => ("eco_perspectives_used", "eco_perspectives_limit"),
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Counter::Messages => "messages",
            Counter::Premium => "premium perspectives",
            Counter::Normal => "normal perspectives",
            Counter::Eco => "eco perspectives",
        }
    }
}

/// A unit taken from a counter, with its row in `quota_reservations`. Give it back with
/// [`refund`] if the work it paid for did not happen; a usage row settles it (perspectives).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reservation {
    /// Its `quota_reservations` row.
    pub id: Uuid,
    pub quota_id: Uuid,
    pub counter: Counter,
    pub month: NaiveDate,
}

/// Why a reservation was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exhausted {
    pub counter: Counter,
    pub limit: i32,
}

impl std::fmt::Display for Exhausted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use chrono::Datelike;
        // Months are calendar months in UTC: the counters start again on the 1st.
        let today = chrono::Utc::now().date_naive();
        let resets = today
            .with_day(1)
            .and_then(|first| first.checked_add_months(chrono::Months::new(1)))
            .unwrap_or(today);
        write!(
            f,
            "monthly {} limit reached ({} per month); it resets on {resets} (UTC)",
            self.counter.describe(),
            self.limit
        )
    }
}

/// A request to count against its token's and its user's requests-per-minute limits
/// (`rate_limit_tiers`; the counting is the database function `polydev_count_request`, owned by
/// `accounts`, migration 0076), in [`count_request`] or in the statement that reserves the
/// request's quota ([`reserve_all`]), so a perspectives call needs one round trip for both.
#[derive(Debug, Clone)]
pub struct CountRequest {
    pub token_id: Uuid,
    /// The token's tier: its own limit.
    pub token_tier: Option<String>,
    pub user_id: Uuid,
    /// The user's tier: the limit of all their tokens together.
    pub user_tier: Option<String>,
}

/// A request's counts in the current one-minute window, and the limits they are held to.
#[derive(Debug, Clone, Copy, sqlx::FromRow)]
pub struct RequestCount {
    pub token_count: i32,
    pub token_limit: i32,
    pub user_count: i32,
    pub user_limit: i32,
    /// Seconds until the window ends.
    pub retry_after: f64,
}

impl RequestCount {
    /// `Error::RateLimited` when either limit is exceeded.
    pub fn check(&self) -> Result<()> {
        let retry_after = std::time::Duration::from_secs(self.retry_after.ceil().max(1.0) as u64);
        if self.token_count > self.token_limit {
            return Err(Error::RateLimited {
                limit: self.token_limit,
                retry_after,
            });
        }
        if self.user_count > self.user_limit {
            return Err(Error::RateLimited {
                limit: self.user_limit,
                retry_after,
            });
        }
        Ok(())
    }
}

/// Counts one request (see [`CountRequest`]) and refuses it with `Error::RateLimited` when a
/// limit is exceeded.
pub async fn count_request(pool: &PgPool, request: &CountRequest) -> Result<()> {
    // A runtime query, as the counting variant of `reserve_all` below reads the same row.
    let count: RequestCount = sqlx::query_as(
        "SELECT token_count, token_limit, user_count, user_limit, retry_after
           FROM polydev_count_request($1, $2, $3, $4)",
    )
    .bind(request.token_id)
    .bind(request.token_tier.as_deref())
    .bind(request.user_id)
    .bind(request.user_tier.as_deref())
    .fetch_one(pool)
    .await?;
    count.check()
}

/// The current month on the database's clock (UTC), never the calling process's: replicas
/// with skewed clocks and calls that cross midnight agree on it.
const MONTH: &str = "date_trunc('month', now() AT TIME ZONE 'UTC')::date";
const ALL_COUNTERS: [Counter; 4] = [
    Counter::Messages,
    Counter::Premium,
    Counter::Normal,
    Counter::Eco,
];

impl Counter {
    /// The `quota_reservations.counter` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Counter::Messages => "messages",
            Counter::Premium => "premium",
            Counter::Normal => "normal",
            Counter::Eco => "eco",
        }
    }
}

/// Takes one unit per entry of `wants` (a counter may appear more than once) for `user_id` this
/// month, all or nothing, for the call `request_id`. One statement: it checks every limit and
/// increments under the row lock (concurrent callers can never exceed a limit), and writes a
/// `quota_reservations` row per unit, so a unit whose call dies with its process is found and
/// refunded by [`reconcile`]. The month is the database's: the first use in a new month resets
/// every counter in the same statement, and `current_month_start` never moves backwards. `None`
/// when a limit would be exceeded.
pub async fn reserve_all(
    pool: &PgPool,
    user_id: Uuid,
    request_id: Uuid,
    wants: &[Counter],
) -> Result<Option<Vec<Reservation>>> {
    reserve_all_counting(pool, user_id, request_id, wants, None).await
}

/// [`reserve_all`], counting the request against its rate limits (`uncounted`) in the same
/// statement: a request over a limit is refused with `Error::RateLimited` and reserves
/// nothing; otherwise it is counted whatever the quota says, as [`count_request`] would.
pub async fn reserve_all_counting(
    pool: &PgPool,
    user_id: Uuid,
    request_id: Uuid,
    wants: &[Counter],
    mut uncounted: Option<&CountRequest>,
) -> Result<Option<Vec<Reservation>>> {
    let stale = format!("(current_month_start IS NULL OR current_month_start < {MONTH})");
    let count = |c: Counter| wants.iter().filter(|w| **w == c).count();
    let current = |col: &str| format!("(CASE WHEN {stale} THEN 0 ELSE coalesce({col}, 0) END)");
    let sets = ALL_COUNTERS
        .map(|c| {
            let (used, _) = c.columns();
            match count(c) {
                0 => format!("{used} = CASE WHEN {stale} THEN 0 ELSE {used} END"),
                n => format!("{used} = {} + {n}", current(used)),
            }
        })
        .join(", ");
    let checks: String = ALL_COUNTERS
        .iter()
        .filter(|c| count(**c) > 0)
        .map(|c| {
            let (used, limit) = c.columns();
            format!(
                " AND ({limit} IS NULL OR {} + {} <= {limit})",
                current(used),
                count(*c)
            )
        })
        .collect();
    // Takes the units from the user's newest quota row, if every limit allows them.
    let take = format!(
        "UPDATE user_perspective_quotas SET {sets},
                last_reset_date = CASE WHEN {stale} THEN (now() AT TIME ZONE 'UTC')::date
                                  ELSE last_reset_date END,
                current_month_start = greatest(current_month_start, {MONTH}),
                updated_at = now()
          WHERE id = (SELECT id FROM user_perspective_quotas WHERE user_id = $1
                       ORDER BY created_at DESC LIMIT 1){checks}"
    );
    // One reservation row per unit taken.
    const RESERVE: &str =
        "INSERT INTO quota_reservations (id, quota_id, user_id, request_id, counter, month)
         SELECT unit.id, taken.id, $1, $2, unit.counter, taken.current_month_start
           FROM taken, unnest($3::uuid[], $4::text[]) AS unit(id, counter)
         RETURNING quota_id, month";
    let sql = format!("WITH taken AS ({take} RETURNING id, current_month_start) {RESERVE}");
    // The same, after counting the request (only when there is one to count): the count's CTE
    // is read by the UPDATE (nothing is taken over a rate limit) and by the result, so it runs
    // exactly once either way.
    let counting_sql = uncounted.map(|_| {
        format!(
            "WITH counted AS MATERIALIZED (
             SELECT * FROM polydev_count_request($5, $6, $1, $7)),
         taken AS (
             {take}
                AND (SELECT token_count <= token_limit AND user_count <= user_limit FROM counted)
             RETURNING id, current_month_start),
         units AS ({RESERVE})
         SELECT counted.token_count, counted.token_limit, counted.user_count,
                counted.user_limit, counted.retry_after,
                (SELECT quota_id FROM units LIMIT 1) AS quota_id,
                (SELECT month FROM units LIMIT 1) AS month
           FROM counted"
        )
    });
    let ids: Vec<Uuid> = wants.iter().map(|_| Uuid::new_v4()).collect();
    let counters: Vec<&str> = wants.iter().map(|c| c.as_str()).collect();
    for _ in 0..2 {
        // Dynamic: the SET list and the limit checks depend on which counters are wanted.
        let reserved: Option<(Uuid, NaiveDate)> = match uncounted.take().zip(counting_sql.as_ref())
        {
            None => sqlx::query_as(sqlx::AssertSqlSafe(sql.clone()))
                .bind(user_id)
                .bind(request_id)
                .bind(&ids)
                .bind(&counters)
                .fetch_all(pool)
                .await?
                .into_iter()
                .next(),
            Some((request, counting_sql)) => {
                debug_assert_eq!(request.user_id, user_id);
                let row: CountedReservation =
                    sqlx::query_as(sqlx::AssertSqlSafe(counting_sql.clone()))
                        .bind(user_id)
                        .bind(request_id)
                        .bind(&ids)
                        .bind(&counters)
                        .bind(request.token_id)
                        .bind(request.token_tier.as_deref())
                        .bind(request.user_tier.as_deref())
                        .fetch_one(pool)
                        .await?;
                row.count.check()?;
                row.quota_id.zip(row.month)
            }
        };
        if let Some((quota_id, month)) = reserved {
            for tier in ALL_COUNTERS.iter().filter(|c| count(**c) > 0) {
                crate::telemetry::quota_reserved(tier.as_str(), count(*tier) as u64);
            }
            let reservations = wants
                .iter()
                .zip(&ids)
                .map(|(&counter, &id)| Reservation {
                    id,
                    quota_id,
                    counter,
                    month,
                })
                .collect();
            return Ok(Some(reservations));
        }
        if for_user(pool, user_id).await?.is_some() {
            return Ok(None);
        }
        // A legacy user without a quota row gets one from their plan, then we retry.
        ensure_row(pool, user_id).await?;
    }
    Err(Error::NotFound("quota"))
}

/// The row of [`reserve_all_counting`]'s statement.
#[derive(sqlx::FromRow)]
struct CountedReservation {
    #[sqlx(flatten)]
    count: RequestCount,
    quota_id: Option<Uuid>,
    month: Option<NaiveDate>,
}

/// Takes one unit of `counter`, or says which limit is reached.
pub async fn reserve(
    pool: &PgPool,
    user_id: Uuid,
    request_id: Uuid,
    counter: Counter,
) -> Result<std::result::Result<Reservation, Exhausted>> {
    if let Some(mut taken) = reserve_all(pool, user_id, request_id, &[counter]).await? {
        return Ok(Ok(taken.remove(0)));
    }
    let quota = for_user(pool, user_id)
        .await?
        .ok_or(Error::NotFound("quota"))?;
    let limit = match counter {
        Counter::Messages => quota.messages_per_month,
        Counter::Premium => quota.premium_perspectives_limit,
        Counter::Normal => quota.normal_perspectives_limit,
        Counter::Eco => quota.eco_perspectives_limit,
    };
    crate::telemetry::quota_refused(counter.as_str());
    Ok(Err(Exhausted {
        counter,
        limit: limit.unwrap_or(0),
    }))
}

/// Gives a reserved unit back (a failed, timed-out or cancelled model call): deletes its
/// `quota_reservations` row and decrements its counter in one statement, so a unit is given
/// back at most once (a second refund, or one racing the sweeper, finds no row). A reservation
/// from a month that has since rolled over has nothing to give back.
pub async fn refund(pool: &PgPool, reservation: &Reservation) -> Result<()> {
    let refunded = sqlx::query!(
        "WITH unit AS (DELETE FROM quota_reservations WHERE id = $1 RETURNING quota_id, month, counter)
         UPDATE user_perspective_quotas q SET
                messages_used = CASE WHEN unit.counter = 'messages'
                    THEN greatest(coalesce(messages_used, 0) - 1, 0) ELSE messages_used END,
                premium_perspectives_used = CASE WHEN unit.counter = 'premium'
                    THEN greatest(coalesce(premium_perspectives_used, 0) - 1, 0) ELSE premium_perspectives_used END,
                normal_perspectives_used = CASE WHEN unit.counter = 'normal'
                    THEN greatest(coalesce(normal_perspectives_used, 0) - 1, 0) ELSE normal_perspectives_used END,
                eco_perspectives_used = CASE WHEN unit.counter = 'eco'
                    THEN greatest(coalesce(eco_perspectives_used, 0) - 1, 0) ELSE eco_perspectives_used END,
                updated_at = now()
           FROM unit WHERE q.id = unit.quota_id AND q.current_month_start = unit.month",
        reservation.id
    )
    .execute(pool)
    .await?;
    if refunded.rows_affected() > 0 {
        crate::telemetry::quota_refunded(reservation.counter.as_str());
    }
    Ok(())
}

/// Refunds every reservation older than `stale_after` that was never settled nor refunded: its
/// call died with its process or its database connection (no call lives longer than its
/// deadline, and `stale_after` must exceed the longest). Safe on several replicas at once
/// (`FOR UPDATE SKIP LOCKED`; each unit is refunded once). Returns how many units went back.
pub async fn reconcile(pool: &PgPool, stale_after: std::time::Duration) -> Result<u64> {
    const BATCH: i64 = 1000;
    let mut total = 0;
    loop {
        let refunded = sqlx::query_scalar!(
            r#"WITH stale AS (
                   SELECT id FROM quota_reservations
                    WHERE created_at < now() - make_interval(secs => $1)
                    ORDER BY created_at LIMIT $2 FOR UPDATE SKIP LOCKED),
               unit AS (
                   DELETE FROM quota_reservations r USING stale WHERE r.id = stale.id
                   RETURNING r.quota_id, r.month, r.counter),
               per_quota AS (
                   SELECT quota_id, month,
                          count(*) FILTER (WHERE counter = 'messages') AS messages,
                          count(*) FILTER (WHERE counter = 'premium') AS premium,
                          count(*) FILTER (WHERE counter = 'normal') AS normal,
                          count(*) FILTER (WHERE counter = 'eco') AS eco
                     FROM unit GROUP BY quota_id, month),
               fixed AS (
                   UPDATE user_perspective_quotas q SET
                          messages_used = greatest(coalesce(messages_used, 0) - p.messages, 0),
                          premium_perspectives_used = greatest(coalesce(premium_perspectives_used, 0) - p.premium, 0),
                          normal_perspectives_used = greatest(coalesce(normal_perspectives_used, 0) - p.normal, 0),
                          eco_perspectives_used = greatest(coalesce(eco_perspectives_used, 0) - p.eco, 0),
                          updated_at = now()
                     FROM per_quota p WHERE q.id = p.quota_id AND q.current_month_start = p.month
                   RETURNING 1)
               SELECT count(*) AS "refunded!" FROM unit"#,
            stale_after.as_secs_f64(),
            BATCH
        )
        .fetch_one(pool)
        .await?;
        total += refunded as u64;
        crate::telemetry::quota_swept(refunded as u64);
        if refunded < BATCH {
            return Ok(total);
        }
    }
}

async fn ensure_row(pool: &PgPool, user_id: Uuid) -> Result<()> {
    let mut tx = pool.begin().await?;
    sqlx::query!(
        "SELECT pg_advisory_xact_lock(hashtextextended($1::uuid::text, 1))",
        user_id
    )
    .execute(&mut *tx)
    .await?;
    let exists = sqlx::query_scalar!(
        r#"SELECT EXISTS (SELECT 1 FROM user_perspective_quotas WHERE user_id = $1) AS "exists!""#,
        user_id
    )
    .fetch_one(&mut *tx)
    .await?;
    if !exists {
        let plan = sqlx::query_scalar!(
            r#"SELECT coalesce(u.tier, 'free') AS "tier!" FROM users u WHERE u.user_id = $1
                 AND EXISTS (SELECT 1 FROM plan_tiers p WHERE p.tier = coalesce(u.tier, 'free'))"#,
            user_id
        )
        .fetch_optional(&mut *tx)
        .await?;
        create_for_user(&mut tx, user_id, plan.as_deref().unwrap_or("free")).await?;
    }
    tx.commit().await?;
    Ok(())
}
