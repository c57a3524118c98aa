//! The claim statement, shared by the claims that arrive together (docs/runtime.md, "Claims in
//! a burst").
//!
//! A claim joins its provider's queue. If fewer than two drainers of that provider run in this
//! process, it spawns one: a task that takes what is queued, claims for all of it in one
//! statement, hands each claimer its row, and goes on until the queue is empty. A lone claim is
//! a batch of one, so it costs the one statement it always did; 32 claimers arriving at once
//! make a few statements (two to four in the benchmark) instead of 32 transactions skipping
//! over one another's rows on the same two CPUs. A user's second claim while their first is in
//! a statement waits for the next batch, and then finds the container the first one got. A
//! claim whose caller went away before its batch was taken is dropped, not claimed for.
//!
//! The statements run on a small pool of their own (two connections, shared by the providers
//! and by claims running alone),
//! so the statement stays prepared on a warm connection and PostgreSQL soon keeps its plan: on
//! a connection of the shared request pool, picked at random, each batch would be parsed,
//! planned and given cold caches afresh, which cost more than the batch itself.
//!
//! A batch that fails (the database is down, another replica claimed for one of its users at
//! the same moment) hands out nothing: each of its claimers runs the statement alone and gets
//! its own answer. So batching changes how many statements run, never what a claim returns.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, MutexGuard, PoisonError};

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio::sync::oneshot;
use uuid::Uuid;

use super::pool::Runtime;
use crate::error::{Error, Result};

/// The most users one statement claims for; more waiting make more statements.
const MAX_BATCH: usize = 64;
/// Statements of one provider in flight at once: while one runs, the claims arriving behind it
/// go out in a second on another connection (and CPU) instead of waiting for it.
const IN_FLIGHT: usize = 2;

/// One asked user's row of the claim statement.
#[derive(Debug)]
pub(super) struct ClaimRow {
    pub user_id: Uuid,
    /// The container's row, absent when none could be given (no ready container, no healthy
    /// proxy port).
    pub id: Option<Uuid>,
    pub container_id: Option<String>,
    pub public_key: Option<String>,
    pub decodo_port: Option<i32>,
    pub assigned_at: Option<DateTime<Utc>>,
    /// The user already held it (not a new claim).
    pub held: Option<bool>,
    /// The user's proxy port and its last health, when ports are configured.
    pub proxy_port: Option<i32>,
    pub proxy_healthy: Option<bool>,
}

/// Claims waiting for a statement, per provider, and the connections their statements run on.
pub(super) struct Claims {
    queues: Mutex<HashMap<&'static str, Queue>>,
    /// `IN_FLIGHT` connections, shared by the providers: few enough that each is opened once
    /// and stays warm (a pool that may open more opens them while a returned connection is on
    /// its way back, and each new one parses and plans the statement afresh).
    pool: PgPool,
}

#[derive(Default)]
struct Queue {
    waiting: Vec<(Uuid, oneshot::Sender<ClaimRow>)>,
    /// Drainer tasks running (at most `IN_FLIGHT`).
    drainers: usize,
    /// Users in a statement now. Another claim of theirs waits for a later batch, so two
    /// statements in flight never claim for the same user (which the unique index would refuse
    /// to one of them, failing its whole batch).
    in_flight: HashSet<Uuid>,
}

impl Queue {
    /// The next batch: up to `MAX_BATCH` waiting claims of distinct users not in flight, who
    /// are in flight from now on.
    fn take_batch(&mut self) -> HashMap<Uuid, oneshot::Sender<ClaimRow>> {
        let mut batch = HashMap::new();
        let mut left = Vec::new();
        for (user, sender) in self.waiting.drain(..) {
            if sender.is_closed() {
                continue; // its caller went away: claim nothing for it
            }
            if batch.len() < MAX_BATCH && self.in_flight.insert(user) {
                batch.insert(user, sender);
            } else {
                left.push((user, sender));
            }
        }
        self.waiting = left;
        batch
    }
}

impl Claims {
    /// Connects (lazily) as `pool` does, with the same session settings and acquire timeout.
    pub(super) fn new(pool: &PgPool) -> Self {
        let options = pool.options();
        Claims {
            queues: Mutex::default(),
            pool: PgPoolOptions::new()
                .max_connections(IN_FLIGHT as u32)
                .acquire_timeout(options.get_acquire_timeout())
                .connect_lazy_with((*pool.connect_options()).clone()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<&'static str, Queue>> {
        // Nothing is left half-changed under this lock: a panic elsewhere cannot poison it in a
        // way that matters.
        self.queues.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Ends a drainer however it ends. If it panicked, its provider may start another, its batch's
/// users are no longer in flight, and if no drainer is left the claims still queued run alone
/// (their senders are dropped).
struct Draining<'a> {
    queues: &'a Claims,
    provider: &'static str,
    /// The users of the batch being claimed for.
    batch: Vec<Uuid>,
}

impl Drop for Draining<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let mut queues = self.queues.lock();
            if let Some(queue) = queues.get_mut(self.provider) {
                queue.drainers -= 1;
                for user in &self.batch {
                    queue.in_flight.remove(user);
                }
                if queue.drainers == 0 {
                    queue.waiting.clear();
                }
            }
        }
    }
}

impl Runtime {
    /// `user_id`'s row of a claim statement of `provider`, run for the batch this claim joined.
    pub(super) async fn claim_row(
        &self,
        user_id: Uuid,
        provider: &'static str,
    ) -> Result<ClaimRow> {
        let (sender, receiver) = oneshot::channel();
        let start_drainer = {
            let mut queues = self.claims.lock();
            let queue = queues.entry(provider).or_default();
            queue.waiting.push((user_id, sender));
            let start = queue.drainers < IN_FLIGHT;
            queue.drainers += usize::from(start);
            start
        };
        if start_drainer {
            // A task of its own: a claimer whose request is dropped must not take the batch
            // down with it.
            tokio::spawn(self.clone().drain_claims(provider));
        }
        match receiver.await {
            Ok(row) => Ok(row),
            // The batch failed: alone, with its own answer.
            Err(_) => self
                .claim_rows(provider, &[user_id])
                .await?
                .pop()
                .ok_or_else(|| Error::Internal("the claim statement returned no row".into())),
        }
    }

    async fn drain_claims(self, provider: &'static str) {
        let mut draining = Draining {
            queues: &self.claims,
            provider,
            batch: Vec::new(),
        };
        // Once round the scheduler first: claims woken by the same burst join this batch
        // rather than the next (a lone claim loses a microsecond).
        tokio::task::yield_now().await;
        loop {
            let mut batch = {
                let mut queues = self.claims.lock();
                let queue = queues.entry(provider).or_default();
                let batch = queue.take_batch();
                if batch.is_empty() {
                    // Whatever still waits belongs to users in the other drainer's statement:
                    // it takes them when that is done.
                    queue.drainers -= 1;
                    return;
                }
                batch
            };
            draining.batch = batch.keys().copied().collect();
            let users = &draining.batch;
            let result = self.claim_rows(provider, users).await;
            {
                let mut queues = self.claims.lock();
                let queue = queues.entry(provider).or_default();
                for user in users {
                    queue.in_flight.remove(user);
                }
            }
            match result {
                Ok(rows) => {
                    for row in rows {
                        if let Some(sender) = batch.remove(&row.user_id) {
                            // A claimer that went away leaves its claim standing, as a lone
                            // claim whose caller goes away after its statement does.
                            let _ = sender.send(row);
                        }
                    }
                }
                Err(error) => {
                    tracing::debug!(%error, users = users.len(), "a batch of claims failed; each runs alone");
                }
            }
        }
    }

    /// The claim statement for `users` (distinct) and `provider`: each user's live container
    /// if they hold one, else one of the oldest ready warm containers, in one round trip, with
    /// each user's proxy port and its health read in the same statement. One row per user.
    ///
    /// The commit does not wait for the WAL flush (`synchronous_commit` off for this
    /// statement's transaction only): a claim lost in a database crash is harmless. The row goes
    /// back to `ready` with nothing of its user in it; the user's next request on it is refused
    /// as not theirs and claims again; a later claimer points its egress at its own proxy.
    /// Anything that depends on the claim (a job row) commits durably, and that flush covers
    /// the claim's earlier WAL record (docs/runtime.md, "Why a claim's commit does not wait for
    /// the disk").
    async fn claim_rows(&self, provider: &'static str, users: &[Uuid]) -> Result<Vec<ClaimRow>> {
        let with_proxy = self.proxies.is_some();
        let rows = sqlx::query_as!(
            ClaimRow,
            r#"WITH relaxed AS (
                   SELECT set_config('synchronous_commit', 'off', true)
               ), asked AS (
                   SELECT user_id, n FROM unnest($1::uuid[]) WITH ORDINALITY AS asked (user_id, n)
               ), proxy AS (
                   SELECT user_id, proxy_port, healthy FROM user_proxy_ports
                   WHERE user_id = ANY($1) AND $4::bool
               ), held AS (
                   UPDATE runtime_containers SET last_used_at = NOW()
                   WHERE user_id = ANY($1) AND provider = $2 AND status IN ('assigned', 'executing')
                   RETURNING user_id, id, container_id, agent_public_key, decodo_port,
                             assigned_at, true AS held
               ), waiting AS (
                   SELECT asked.user_id, row_number() OVER (ORDER BY asked.n) AS n
                   FROM asked LEFT JOIN proxy USING (user_id)
                   WHERE NOT EXISTS (SELECT 1 FROM held WHERE held.user_id = asked.user_id)
                     AND (NOT $4::bool OR (proxy.proxy_port IS NOT NULL
                                           AND proxy.healthy IS DISTINCT FROM false))
               ), free AS (
                   SELECT id, row_number() OVER (ORDER BY created_at) AS n
                   FROM (SELECT id, created_at FROM runtime_containers
                         WHERE provider = $2 AND status = 'ready' AND user_id IS NULL
                               AND orchestrator = $3
                         ORDER BY created_at LIMIT (SELECT count(*) FROM waiting)
                         FOR UPDATE SKIP LOCKED) AS ready
               ), claimed AS (
                   UPDATE runtime_containers c
                   SET status = 'assigned', user_id = waiting.user_id, assigned_at = NOW(),
                       last_used_at = NOW(), decodo_port = proxy.proxy_port
                   FROM free JOIN waiting USING (n) LEFT JOIN proxy USING (user_id)
                   WHERE c.id = free.id
                   RETURNING c.user_id, c.id, c.container_id, c.agent_public_key,
                             c.decodo_port, c.assigned_at, false AS held
               )
               SELECT asked.user_id AS "user_id!", c.id AS "id?",
                      c.container_id AS "container_id?", c.agent_public_key AS "public_key?",
                      c.decodo_port AS "decodo_port?", c.assigned_at AS "assigned_at?",
                      c.held AS "held?", proxy.proxy_port AS "proxy_port?",
                      proxy.healthy AS "proxy_healthy?"
               FROM asked
               LEFT JOIN (SELECT * FROM held UNION ALL SELECT * FROM claimed) c USING (user_id)
               LEFT JOIN proxy USING (user_id)
               CROSS JOIN relaxed
               ORDER BY asked.n"#,
            users,
            provider,
            self.orchestrator.instance(),
            with_proxy
        )
        .fetch_all(&self.claims.pool)
        .await?; // 23505: a concurrent claim of one of these users won (Conflict, retried)
        crate::telemetry::runtime_claim_statement(users.len());
        Ok(rows)
    }
}
