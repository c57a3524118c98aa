//! Prometheus metrics (docs/operations.md, "Metrics"): the one recorder of the process and the
//! series polydev writes. Every series is named here, with a function that writes it, so a
//! call site is one line and the names cannot drift from the docs. A leaf module: it imports no
//! other part of the crate, so every domain may call it.
//!
//! Counters and histograms are written where things happen; the gauges (connection pools,
//! runtime containers) are sampled when `/metrics` is scraped.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Request latency, by matched route template, method and status.
pub const HTTP_REQUEST_DURATION: &str = "polydev_http_request_duration_seconds";
/// Model call latency, by model and outcome (`ok` or the error class).
pub const PROVIDER_DURATION: &str = "polydev_provider_request_duration_seconds";
/// Failed model calls, by model and error class.
pub const PROVIDER_ERRORS: &str = "polydev_provider_errors_total";
/// Quota units reserved, by tier (the counter: `messages`, `premium`, `normal`, `eco`).
pub const QUOTA_RESERVED: &str = "polydev_quota_reserved_total";
/// Quota units given back by the call that reserved them, by tier.
pub const QUOTA_REFUNDED: &str = "polydev_quota_refunded_total";
/// Quota units given back by the sweeper (their call died), all tiers.
pub const QUOTA_SWEPT: &str = "polydev_quota_swept_total";
/// Reservations refused because a monthly limit is reached, by tier.
pub const QUOTA_REFUSED: &str = "polydev_quota_refusals_total";
/// Bearer token lookups, by `result`: `hit` (answered by the process's token cache), `miss`
/// (asked the database).
pub const TOKEN_CACHE_LOOKUPS: &str = "polydev_token_cache_lookups_total";
/// Time a call with an idempotency key waited for the call holding the key, by outcome.
pub const IDEMPOTENCY_WAIT: &str = "polydev_idempotency_wait_seconds";
/// Database connections, by pool (`durable`, `relaxed`) and state (`idle`, `in_use`).
pub const DB_POOL_CONNECTIONS: &str = "polydev_db_pool_connections";
/// The most connections a pool may open, by pool.
pub const DB_POOL_MAX: &str = "polydev_db_pool_max_connections";
/// Runtime containers (shared through the database), by provider and state.
pub const RUNTIME_CONTAINERS: &str = "polydev_runtime_containers";
/// Claim statements run (runtime/claims.rs: the claims arriving together share one).
pub const RUNTIME_CLAIM_STATEMENTS: &str = "polydev_runtime_claim_statements_total";
/// Users those claim statements claimed for: over `RUNTIME_CLAIM_STATEMENTS`, how many claims
/// a statement served.
pub const RUNTIME_CLAIM_STATEMENT_USERS: &str = "polydev_runtime_claim_statement_users_total";
/// MCP sessions of this process, by state (`live`: a worker and a handler running;
/// `hibernated`: idle, kept as their `initialize` parameters).
pub const MCP_SESSIONS: &str = "polydev_mcp_sessions";

/// Bucket bounds (seconds) of every `_seconds` histogram: from a cached lookup to a model call
/// near its 600 s deadline.
const BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0, 600.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process's recorder, installed on first use (every `AppState` installs it, so nothing is
/// recorded before it). Later calls return the same handle.
pub fn handle() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), BUCKETS)
            .expect("the bucket list is not empty")
            .build_recorder();
        let handle = recorder.handle();
        // Fails only if another recorder is installed (an embedding program's): its metrics
        // win, and this handle renders an empty page.
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("a metrics recorder was already installed: /metrics stays empty");
        }
        handle
    })
}

/// The exposition text of every series. Histogram samples are folded in first (the exporter's
/// "upkeep"), which also keeps their memory bounded between scrapes.
pub fn render() -> String {
    let handle = handle();
    handle.run_upkeep();
    handle.render()
}

/// Folds histogram samples in every few seconds, so their memory stays bounded when nobody
/// scrapes; stops with `shutdown`.
pub fn spawn_upkeep(shutdown: tokio_util::sync::CancellationToken) {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = every.tick() => handle().run_upkeep(),
                () = shutdown.cancelled() => return,
            }
        }
    });
}

pub fn http_request(route: &str, method: &str, status: u16, elapsed: Duration) {
    histogram!(
        HTTP_REQUEST_DURATION,
        "route" => route.to_owned(),
        "method" => method.to_owned(),
        "status" => status.to_string(),
    )
    .record(elapsed);
}

/// A model call finished: `error_class` is `None` when it answered.
pub fn provider_call(model: &str, error_class: Option<&'static str>, elapsed: Duration) {
    let outcome = error_class.unwrap_or("ok");
    histogram!(PROVIDER_DURATION, "model" => model.to_owned(), "outcome" => outcome)
        .record(elapsed);
    if let Some(class) = error_class {
        counter!(PROVIDER_ERRORS, "model" => model.to_owned(), "class" => class).increment(1);
    }
}

pub fn quota_reserved(tier: &'static str, units: u64) {
    counter!(QUOTA_RESERVED, "tier" => tier).increment(units);
}

pub fn quota_refunded(tier: &'static str) {
    counter!(QUOTA_REFUNDED, "tier" => tier).increment(1);
}

pub fn token_cache_lookup(hit: bool) {
    counter!(TOKEN_CACHE_LOOKUPS, "result" => if hit { "hit" } else { "miss" }).increment(1);
}

pub fn quota_swept(units: u64) {
    counter!(QUOTA_SWEPT).increment(units);
}

pub fn quota_refused(tier: &'static str) {
    counter!(QUOTA_REFUSED, "tier" => tier).increment(1);
}

/// `outcome`: `replayed` (the first call finished; its answer is returned), `claimed` (the
/// first call gave the key up; this one runs) or `in_progress` (gave up waiting: 409).
pub fn idempotency_wait(outcome: &'static str, waited: Duration) {
    histogram!(IDEMPOTENCY_WAIT, "outcome" => outcome).record(waited);
}

pub fn db_pool(pool: &'static str, size: u32, idle: usize, max: u32) {
    let idle = idle.min(size as usize) as f64;
    gauge!(DB_POOL_CONNECTIONS, "pool" => pool, "state" => "idle").set(idle);
    gauge!(DB_POOL_CONNECTIONS, "pool" => pool, "state" => "in_use").set(f64::from(size) - idle);
    gauge!(DB_POOL_MAX, "pool" => pool).set(f64::from(max));
}

pub fn mcp_sessions(live: usize, hibernated: usize) {
    gauge!(MCP_SESSIONS, "state" => "live").set(live as f64);
    gauge!(MCP_SESSIONS, "state" => "hibernated").set(hibernated as f64);
}

pub fn runtime_containers(provider: &str, state: &str, count: i64) {
    gauge!(RUNTIME_CONTAINERS, "provider" => provider.to_owned(), "state" => state.to_owned())
        .set(count as f64);
}

/// A claim statement ran for `users` users.
pub fn runtime_claim_statement(users: usize) {
    counter!(RUNTIME_CLAIM_STATEMENTS).increment(1);
    counter!(RUNTIME_CLAIM_STATEMENT_USERS).increment(users as u64);
}
