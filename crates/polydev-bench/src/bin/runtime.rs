//! Runtime benchmarks (`bench/runtime.sh`; docs/runtime.md), each against a baseline measured
//! in the same run:
//!
//! 1. **Claim latency**: 100 ready warm containers, 32 users claiming at once (one claim each),
//!    20 rounds after six warm-up rounds; every container must be claimed once. Each user already
//!    has a proxy port (a gate on 127.0.0.1, as in production after the first use), so the claim
//!    reads it and checks its health in its one statement. Baselines at the same concurrency
//!    over the same pool: a primary-key `SELECT` of one row, and a primary-key `UPDATE` of one
//!    row (autocommit, waiting for the WAL flush; the claim does not: docs/runtime.md). The orchestrator is in memory (the
//!    local driver's inspect and set_proxy are map lookups too): what is measured is the claim.
//! 2. **Sealed `true`**: a sealed job running `true` end to end on a claimed local container
//!    (seal, submit over HTTP, the agent's long poll wakes, opens, runs, finishes; the client
//!    reads `finished` from the SSE stream), against `true` run directly in the same sandbox
//!    (timed inside it with `date +%s%N`, reported through a sealed job). Also reported: a
//!    fresh sandbox of the same driver running `true`, start to exit.
//!
//! Usage: runtime --agent PATH [--rounds N] [--claim-only] (DATABASE_URL: a server to create a scratch
//! database on; default postgres://postgres@127.0.0.1:5432/postgres).

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use polydev::accounts::{self, Plan, Scope};
use polydev::app::AppState;
use polydev::runtime::orchestrator::BoxFuture;
use polydev::runtime::{
    ContainerInfo, ContainerSpec, Event, LocalConfig, LocalDriver, NetworkPolicy, Orchestrator,
    OrchestratorError, Resources, Runtime, RuntimeConfig, State,
};
use polydev_agent::proto::{COMMAND_NAMESPACE, JobCommand};
use polydev_zk::{Context as ZkContext, KdfParams, Keyring, X25519KeyPair};
use serde_json::{Value, json};
use sqlx::{Connection, Executor, PgConnection, PgPool};
use uuid::Uuid;

/// Every container runs; proxies are accepted. The claim's own cost is what remains.
struct InMemory;

impl Orchestrator for InMemory {
    fn driver(&self) -> &'static str {
        "bench"
    }
    fn start(&self, _: ContainerSpec) -> BoxFuture<'_, Result<String, OrchestratorError>> {
        Box::pin(async { Ok(Uuid::new_v4().to_string()) })
    }
    fn stop<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Result<(), OrchestratorError>> {
        Box::pin(async { Ok(()) })
    }
    fn set_proxy<'a>(
        &'a self,
        _: &'a str,
        _: Option<SocketAddr>,
    ) -> BoxFuture<'a, Result<(), OrchestratorError>> {
        Box::pin(async { Ok(()) })
    }
    fn inspect<'a>(
        &'a self,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Option<ContainerInfo>, OrchestratorError>> {
        Box::pin(async move {
            Ok(Some(ContainerInfo {
                id: id.into(),
                name: String::new(),
                state: State::Running,
            }))
        })
    }
    fn list(&self) -> BoxFuture<'_, Result<Vec<ContainerInfo>, OrchestratorError>> {
        Box::pin(async { Ok(Vec::new()) })
    }
    fn events(&self) -> BoxStream<'static, Event> {
        Box::pin(futures_util::stream::empty())
    }
}

fn percentile(samples: &[Duration], p: f64) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1_000_000.0).round() / 1000.0
}

async fn scratch_database() -> anyhow::Result<(PgPool, String, String)> {
    let server = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let name = format!("polydev_bench_runtime_{}", std::process::id());
    let mut admin = PgConnection::connect(&server).await?;
    admin
        .execute(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )))
        .await?;
    admin
        .execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .await?;
    let (base, query) = server
        .split_once('?')
        .map_or((server.as_str(), ""), |(b, q)| (b, q));
    let url = format!(
        "{}/{name}{}",
        base.rsplit_once('/').map_or(base, |(b, _)| b),
        if query.is_empty() {
            String::new()
        } else {
            format!("?{query}")
        }
    );
    let mut conn = PgConnection::connect(&url).await?;
    polydev::db::migrate::run(&mut conn).await?;
    conn.close().await.ok();
    // The server's own pool settings (`polydev serve` hands the runtime its request pool).
    let pool = polydev::db::request_pool(40).connect(&url).await?;
    Ok((pool, server, name))
}

async fn drop_database(server: &str, name: &str) {
    if let Ok(mut admin) = PgConnection::connect(server).await {
        let _ = admin
            .execute(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
            )))
            .await;
    }
}

async fn new_user(pool: &PgPool, n: usize) -> anyhow::Result<Uuid> {
    let user = accounts::create_user(
        pool,
        &format!("bench-{n}-{}@example.com", Uuid::new_v4()),
        Plan::Pro,
    )
    .await?;
    Ok(user.user_id)
}

/// `sql` (whose `$1` is a user id) for each of `users` at once: each one's latency.
async fn burst(pool: &PgPool, users: &[Uuid], sql: &'static str) -> anyhow::Result<Vec<Duration>> {
    let timed = futures_util::future::join_all(users.iter().map(|&user| {
        let pool = pool.clone();
        tokio::spawn(async move {
            let start = Instant::now();
            sqlx::query(sql).bind(user).execute(&pool).await?;
            anyhow::Ok(start.elapsed())
        })
    }))
    .await;
    timed.into_iter().map(|t| t?).collect()
}

async fn claim_latency(pool: &PgPool, rounds: usize) -> anyhow::Result<Value> {
    const WARM: usize = 100;
    const CLAIMERS: usize = 32;
    let proxies = polydev::proxy::Proxies::new(
        pool.clone(),
        polydev::proxy::ProxyConfig {
            gate_host: "127.0.0.1".into(),
            ports: 10001..=60000,
            credentials: None,
            check_url: "http://127.0.0.1:9/".parse()?,
            check_interval: Duration::from_secs(3600),
            check_timeout: Duration::from_secs(5),
        },
    );
    let runtime = Runtime::new(pool.clone(), Arc::new(InMemory), RuntimeConfig::default())
        .with_proxies(Some(proxies.clone()));
    let mut claims = Vec::new();
    let mut baseline = Vec::new();
    let mut baseline_update = Vec::new();
    let mut baseline_relaxed = Vec::new();
    let mut baseline_before = Vec::new();
    let probe = new_user(pool, 0).await?;
    // The first rounds warm the pool up and are not counted: its connections open, and each
    // runs the claim until PostgreSQL has cached its plan (a prepared statement is planned
    // afresh for its first five executions on a connection, then a generic plan is kept). A
    // server's long-lived pool is in that state; the cold first round is reported apart.
    const WARMUP: usize = 6;
    let mut cold = Vec::new();
    for round in 0..rounds + WARMUP {
        sqlx::query(
            "INSERT INTO runtime_containers
                 (provider, container_id, status, orchestrator, agent_public_key, ready_at)
             SELECT 'anthropic', gen_random_uuid()::text, 'ready', 'bench',
                    'AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA', NOW()
             FROM generate_series(1, $1)",
        )
        .bind(WARM as i32)
        .execute(pool)
        .await?;
        let mut users = Vec::new();
        for n in 0..CLAIMERS {
            let user = new_user(pool, round * CLAIMERS + n).await?;
            proxies.port_for(user).await?;
            users.push(user);
        }
        // The SELECT baseline once more just before the claims too: the first burst after the
        // round's sequential set-up wakes 32 idle server processes at once.
        let probes = [probe; CLAIMERS];
        let select_before =
            burst(pool, &probes, "SELECT email FROM users WHERE user_id = $1").await?;
        let timed = futures_util::future::join_all(users.iter().map(|&user| {
            let runtime = runtime.clone();
            tokio::spawn(async move {
                let start = Instant::now();
                let claimed = runtime.claim(user, "anthropic").await;
                (start.elapsed(), claimed.map(|c| c.id))
            })
        }))
        .await;
        let mut seen = HashSet::new();
        for result in timed {
            let (elapsed, claimed) = result?;
            let id = claimed.map_err(|e| anyhow::anyhow!("claim failed: {e}"))?;
            if !seen.insert(id) {
                bail!("container {id} claimed twice");
            }
            if round >= WARMUP {
                claims.push(elapsed);
            } else if round == 0 {
                cold.push(elapsed);
            }
        }
        // Baselines at the same concurrency: a primary-key SELECT; a primary-key UPDATE of
        // each user's own row, committed durably; the same UPDATE committed like the claim
        // (not waiting for the WAL flush).
        let select = burst(pool, &probes, "SELECT email FROM users WHERE user_id = $1").await?;
        let update = burst(
            pool,
            &users,
            "UPDATE users SET last_active_at = NOW() WHERE user_id = $1",
        )
        .await?;
        let relaxed = burst(
            pool,
            &users,
            "WITH relaxed AS (SELECT set_config('synchronous_commit', 'off', true))
             UPDATE users SET last_active_at = NOW() FROM relaxed WHERE user_id = $1",
        )
        .await?;
        if round >= WARMUP {
            baseline.extend(select);
            baseline_before.extend(select_before);
            baseline_update.extend(update);
            baseline_relaxed.extend(relaxed);
        }
        // Next round starts from a clean pool of 100.
        sqlx::query("UPDATE runtime_containers SET status = 'destroyed', destroyed_at = NOW() WHERE status <> 'destroyed'")
            .execute(pool)
            .await?;
    }
    let result = json!({
        "warm": WARM, "claimers": CLAIMERS, "rounds": rounds, "claims": claims.len(),
        "each_claimed_once": true,
        "claim_p50_ms": ms(percentile(&claims, 0.5)),
        "claim_p99_ms": ms(percentile(&claims, 0.99)),
        "warmup_rounds": WARMUP,
        "cold_round_p99_ms": ms(percentile(&cold, 0.99)),
        "baseline_select_p50_ms": ms(percentile(&baseline, 0.5)),
        "baseline_select_p99_ms": ms(percentile(&baseline, 0.99)),
        "baseline_select_before_claims_p50_ms": ms(percentile(&baseline_before, 0.5)),
        "baseline_select_before_claims_p99_ms": ms(percentile(&baseline_before, 0.99)),
        "baseline_update_p50_ms": ms(percentile(&baseline_update, 0.5)),
        "baseline_update_p99_ms": ms(percentile(&baseline_update, 0.99)),
        "baseline_relaxed_update_p50_ms": ms(percentile(&baseline_relaxed, 0.5)),
        "baseline_relaxed_update_p99_ms": ms(percentile(&baseline_relaxed, 0.99)),
        "p99_ratio": percentile(&claims, 0.99).as_secs_f64() / percentile(&baseline, 0.99).as_secs_f64().max(1e-9),
        "p99_ratio_to_update": percentile(&claims, 0.99).as_secs_f64() / percentile(&baseline_update, 0.99).as_secs_f64().max(1e-9),
        "p99_ratio_to_relaxed_update": percentile(&claims, 0.99).as_secs_f64() / percentile(&baseline_relaxed, 0.99).as_secs_f64().max(1e-9),
    });
    Ok(result)
}

async fn sealed_true(pool: &PgPool, agent: PathBuf, runs: usize) -> anyhow::Result<Value> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let mut config = RuntimeConfig::default();
    config.warm.insert("openai".into(), 1);
    config.server = Some(addr);
    let driver = LocalDriver::new(LocalConfig::detect(agent));
    let runtime = Runtime::new(pool.clone(), Arc::new(driver.clone()), config);
    let catalogue = polydev::perspectives::Catalogue::load(None)?;
    let state = AppState::new(pool.clone(), polydev::perspectives::Gateway::new(catalogue))
        .with_runtime(Some(runtime.clone()));
    let shutdown = state.shutdown.clone();
    tokio::spawn(polydev::http::serve(listener, state, async {
        std::future::pending::<()>().await
    }));
    runtime.reconcile().await?;
    let base = format!("http://{addr}");
    let client = polydev::net::http_client();
    // The agent registers over the sandbox's tunnel.
    let ready = async {
        loop {
            let n: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM runtime_containers WHERE status = 'ready'",
            )
            .fetch_one(pool)
            .await?;
            if n > 0 {
                return anyhow::Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(60), ready)
        .await
        .context("agent registration")??;

    let user = accounts::create_user(pool, "bench-sealed@example.com", Plan::Pro).await?;
    // Registering the user's runtime key needs an `account` token (docs/api.md, "Scopes").
    let token = accounts::create_scoped_token(pool, user.user_id, "bench", None, Scope::Account)
        .await?
        .token;
    let user_id = user.user_id.to_string();
    let (keyring, _, _) = Keyring::setup("bench password", &user_id, KdfParams::MINIMUM)?;
    let keys = X25519KeyPair::generate()?;
    let put = client
        .put(format!("{base}/v1/runtime/keys"))
        .bearer_auth(&token)
        .json(
            &json!({"public_key": keys.public_key(), "wrapped_private_key": keys.wrap(&keyring)?}),
        )
        .send()
        .await?;
    anyhow::ensure!(put.status().is_success(), "key: {}", put.status());
    let claimed: Value = client
        .post(format!("{base}/v1/runtime/containers"))
        .bearer_auth(&token)
        .json(&json!({"provider": "openai"}))
        .send()
        .await?
        .json()
        .await?;
    let container = claimed["id"].as_str().context("claimed")?.to_string();
    let public_key = claimed["public_key"]
        .as_str()
        .context("public key")?
        .to_string();
    // One sealed job end to end: (elapsed, opened stdout).
    let run_job = |command: JobCommand| {
        let (client, base, token, container, public_key, user_id) = (
            client.clone(),
            base.clone(),
            token.clone(),
            container.clone(),
            public_key.clone(),
            user_id.clone(),
        );
        let keys = &keys;
        async move {
            let start = Instant::now();
            let id = Uuid::new_v4();
            let row = id.to_string();
            let ctx = ZkContext {
                namespace: COMMAND_NAMESPACE,
                user_id: &user_id,
                row_id: &row,
            };
            let encrypted = polydev_zk::seal_to(&public_key, &ctx, &serde_json::to_vec(&command)?)?;
            let submitted = client
                .post(format!("{base}/v1/runtime/jobs"))
                .bearer_auth(&token)
                .json(&json!({"id": id, "container_id": container, "encrypted_command": encrypted}))
                .send()
                .await?;
            anyhow::ensure!(
                submitted.status().is_success(),
                "submit: {}",
                submitted.status()
            );
            let events = client
                .get(format!("{base}/v1/runtime/jobs/{id}/events"))
                .bearer_auth(&token)
                .send()
                .await?;
            let mut body = events.bytes_stream();
            let mut text = String::new();
            while let Some(chunk) = body.next().await {
                text.push_str(&String::from_utf8_lossy(&chunk?));
                if text.contains("event: finished") && text.ends_with("\n\n") {
                    break;
                }
            }
            let elapsed = start.elapsed();
            anyhow::ensure!(
                text.contains("\"succeeded\""),
                "job did not succeed: {text}"
            );
            let mut stdout = String::new();
            for line in text.lines().filter_map(|l| l.strip_prefix("data: ")) {
                let Ok(event) = serde_json::from_str::<Value>(line) else {
                    continue;
                };
                if let Some(sealed) = event["sealed"].as_str() {
                    let header = polydev_zk::inspect_sealed(sealed)?;
                    let ctx = ZkContext {
                        namespace: &header.namespace,
                        user_id: &user_id,
                        row_id: &header.row_id,
                    };
                    stdout.push_str(&String::from_utf8(keys.open(&ctx, sealed)?)?);
                }
            }
            anyhow::Ok((elapsed, stdout))
        }
    };
    let true_job = JobCommand {
        command: vec!["/bin/true".into()],
        env: BTreeMap::new(),
        ..JobCommand::default()
    };
    // `true` timed inside the same sandbox (the baseline), reported through a sealed job.
    let timed_true = JobCommand {
        command: vec![
            "/bin/sh".into(),
            "-c".into(),
            "s=$(date +%s%N); /bin/true; e=$(date +%s%N); echo $((e - s))".into(),
        ],
        ..JobCommand::default()
    };
    let mut sealed = Vec::new();
    let mut direct = Vec::new();
    let mut fresh = Vec::new();
    for i in 0..runs + 2 {
        let (elapsed, _) = run_job(true_job.clone()).await?;
        let (_, nanos) = run_job(timed_true.clone()).await?;
        let inside = Duration::from_nanos(nanos.trim().parse().context("timed true")?);
        // Also: a fresh sandbox of the same driver running `true` (start to exit).
        let start = Instant::now();
        let spec = ContainerSpec {
            name: format!("bench-true-{i}"),
            command: vec!["/bin/true".into()],
            env: BTreeMap::new(),
            resources: Resources::default(),
            network: NetworkPolicy::default(),
            binds: Vec::new(),
        };
        let id = driver.start(spec).await?;
        let state = driver.wait(&id, Duration::from_secs(30)).await;
        let sandbox = start.elapsed();
        anyhow::ensure!(
            matches!(state, Some(State::Exited { code: 0, .. })),
            "true: {state:?}"
        );
        driver.stop(&id).await?;
        if i >= 2 {
            // the first two warm up connections and caches
            sealed.push(elapsed);
            direct.push(inside);
            fresh.push(sandbox);
        }
    }
    shutdown.cancel();
    Ok(json!({
        "runs": runs,
        "sealed_true_p50_ms": ms(percentile(&sealed, 0.5)),
        "sealed_true_p99_ms": ms(percentile(&sealed, 0.99)),
        "true_in_the_sandbox_p50_ms": ms(percentile(&direct, 0.5)),
        "true_in_the_sandbox_p99_ms": ms(percentile(&direct, 0.99)),
        "added_p50_ms": ms(percentile(&sealed, 0.5)) - ms(percentile(&direct, 0.5)),
        "added_p99_ms": ms(percentile(&sealed, 0.99)) - ms(percentile(&direct, 0.99)),
        "fresh_sandbox_true_p50_ms": ms(percentile(&fresh, 0.5)),
    }))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    polydev::net::install_tls_provider();
    let mut agent = None;
    let mut rounds = 20;
    let mut claim_only = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--agent" => agent = args.next().map(PathBuf::from),
            "--rounds" => rounds = args.next().context("--rounds N")?.parse()?,
            "--claim-only" => claim_only = true,
            other => bail!("unknown argument {other}"),
        }
    }
    let agent = agent.context("--agent PATH (target/release/polydev-agent) is required")?;
    let (pool, server, name) = scratch_database().await?;
    let outcome = async {
        let claim = claim_latency(&pool, rounds).await?;
        println!("claim latency: {}", serde_json::to_string_pretty(&claim)?);
        if claim_only {
            return anyhow::Ok(());
        }
        let sealed = sealed_true(&pool, agent, rounds.max(10)).await?;
        println!("sealed true:   {}", serde_json::to_string_pretty(&sealed)?);
        let all = json!({"claim": claim, "sealed_true": sealed});
        std::fs::create_dir_all("target/bench")?;
        std::fs::write(
            "target/bench/runtime.json",
            serde_json::to_string_pretty(&all)?,
        )?;
        anyhow::Ok(())
    }
    .await;
    pool.close().await;
    drop_database(&server, &name).await;
    outcome
}
