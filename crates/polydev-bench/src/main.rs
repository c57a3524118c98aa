//! Polydev benchmarks (run with `bench/run.sh`; docs/benchmarks.md). Every figure is reported
//! against a baseline measured in the same run, because these machines are shared and noisy:
//!
//! 1. gateway overhead: a one-model `POST /v1/perspectives` through `polydev serve` (auth, rate
//!    limit, quota reservation, usage row) vs the same request straight to the mock upstream, at
//!    concurrency 1 and 32;
//! 2. fan-out: three models with upstream delays of 100, 300 and 900 ms vs the slowest alone;
//! 3. quota contention: 1,000 concurrent reservations for one user vs 1,000 plain increments;
//! 4. the LiteLLM proxy in front of the same mock, measured like (1), when `--litellm-url` is given;
//! 5. zero-knowledge: envelope seal/open vs the raw AEAD, unlock time, and the migration of
//!    100,000 messages of 1 KiB (client and database in one run);
//! 6. MCP: 1,000 idle sessions' memory, and a call over MCP vs the same call over REST;
//! 7. login signalling relay: a message posted on one `polydev serve` reaching a peer's SSE
//!    stream on a second process (PostgreSQL LISTEN/NOTIFY) vs a plain request round trip;
//! 8. local CLIs: `get_perspectives` through `polydev mcp` answered by a fake `claude` that
//!    answers at once vs running that fake `claude` directly.
//!
//! At the end every target of issue 13 is printed with its figure and whether it is met.

mod login;

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use polydev::perspectives::PerspectivesRequest;
use serde_json::{Value, json};
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, Executor, PgConnection, PgPool};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use polydev::accounts::{self, Plan};
use polydev::db::embedded::EmbeddedPostgres;
use polydev::quota::{self, Counter};

struct Args {
    mock_url: String,
    litellm: Option<(String, String)>,
    quick: bool,
    /// Run only this section (`gateway`, `fanout`, `quota`, `zk`, `mcp`, `login`, `cli`).
    only: Option<String>,
}

impl Args {
    fn runs(&self, section: &str) -> bool {
        self.only.as_deref().is_none_or(|only| only == section)
    }
}

fn args() -> anyhow::Result<Args> {
    let mut mock_url = None;
    let mut litellm_url = None;
    let mut litellm_key = None;
    let mut quick = false;
    let mut only = None;
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--mock-url" => mock_url = it.next(),
            "--litellm-url" => litellm_url = it.next(),
            "--litellm-key" => litellm_key = it.next(),
            "--quick" => quick = true,
            "--only" => only = it.next(),
            other => bail!("unknown argument {other}"),
        }
    }
    Ok(Args {
        mock_url: mock_url.context("--mock-url is required (bench/run.sh starts the mock)")?,
        litellm: litellm_url.zip(litellm_key),
        quick,
        only,
    })
}

#[derive(Debug, Clone)]
struct Run {
    latencies: Vec<Duration>,
    elapsed: Duration,
    errors: usize,
}

impl Run {
    fn empty() -> Run {
        Run {
            latencies: Vec::new(),
            elapsed: Duration::ZERO,
            errors: 0,
        }
    }

    fn percentile(&self, p: f64) -> Duration {
        let mut sorted = self.latencies.clone();
        sorted.sort();
        if sorted.is_empty() {
            return Duration::ZERO;
        }
        let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
        sorted[index]
    }
    fn throughput(&self) -> f64 {
        self.latencies.len() as f64 / self.elapsed.as_secs_f64()
    }
}

/// One target of issue 13: its figure and whether it is met (`None`: not measured in this run).
struct Target {
    name: &'static str,
    figure: String,
    met: Option<bool>,
}

#[derive(Default)]
struct Targets(Vec<Target>);

impl Targets {
    fn add(&mut self, name: &'static str, figure: String, met: Option<bool>) {
        self.0.push(Target { name, figure, met });
    }

    fn print(&self) {
        println!("== targets (issue 13), load average {}", loadavg());
        for t in &self.0 {
            let verdict = match t.met {
                Some(true) => "met",
                Some(false) => "NOT MET",
                None => "not measured",
            };
            println!("[{verdict:^12}] {:<58} {}", t.name, t.figure);
        }
    }

    fn json(&self) -> Value {
        Value::Array(
            self.0
                .iter()
                .map(|t| json!({ "target": t.name, "figure": t.figure, "met": t.met }))
                .collect(),
        )
    }
}

/// The 1-, 5- and 15-minute load averages: this machine is shared, every figure comes with it.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

fn ms_f(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn signed_ms(a: Duration, b: Duration) -> String {
    format!("{:+.2} ms", (a.as_secs_f64() - b.as_secs_f64()) * 1000.0)
}

/// Sends `total` requests with `concurrency` in flight; each must answer 200.
async fn load(
    concurrency: usize,
    total: usize,
    request: Arc<dyn Fn() -> reqwest::RequestBuilder + Send + Sync>,
) -> Run {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (next, request) = (next.clone(), request.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut errors = 0;
                while next.fetch_add(1, Ordering::Relaxed) < total {
                    let t = Instant::now();
                    match request().send().await {
                        Ok(response) if response.status().is_success() => {
                            let _ = response.bytes().await;
                            latencies.push(t.elapsed());
                        }
                        Ok(response) => {
                            errors += 1;
                            if errors == 1 {
                                eprintln!(
                                    "request failed: {} {}",
                                    response.status(),
                                    response.text().await.unwrap_or_default()
                                );
                            }
                        }
                        Err(e) => {
                            errors += 1;
                            if errors == 1 {
                                eprintln!("request failed: {e}");
                            }
                        }
                    }
                }
                (latencies, errors)
            })
        })
        .collect();
    let mut run = Run {
        latencies: Vec::with_capacity(total),
        elapsed: Duration::ZERO,
        errors: 0,
    };
    for worker in workers {
        let (latencies, errors) = worker.await.expect("worker");
        run.latencies.extend(latencies);
        run.errors += errors;
    }
    run.elapsed = started.elapsed();
    run
}

fn client() -> reqwest::Client {
    polydev::net::install_tls_provider();
    reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()
        .expect("client")
}

fn chat_body(model: &str) -> Value {
    json!({
        "model": model,
        "messages": [{ "role": "user", "content": "Summarise the trade-offs of optimistic locking in one paragraph." }],
        "max_tokens": 64,
    })
}

struct Polydev {
    child: Child,
    url: String,
    /// One user per concurrent client, as real IDEs are: same-row quota contention is measured
    /// on its own (section 3).
    tokens: Vec<String>,
    /// An `account` token of the last user, for the zero-knowledge migration (its key
    /// material, clear and hand-over routes need that scope).
    account_token: String,
    pool: PgPool,
    /// The database's URL, for more processes on it.
    db_url: String,
    /// The server holding the bench's database, and its name: dropped at the end.
    server: sqlx::postgres::PgConnectOptions,
    database: String,
}

impl Polydev {
    /// Stops `polydev serve` and drops the bench's database (a shared server keeps no leftovers).
    async fn finish(mut self) -> anyhow::Result<()> {
        self.child.kill().await?;
        self.pool.close().await;
        let mut admin = PgConnection::connect_with(&self.server).await?;
        admin
            .execute(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE {} WITH (FORCE)",
                self.database
            )))
            .await?;
        Ok(())
    }
}

/// Starts `polydev serve` (release build, next to this binary) on a fresh database.
async fn start_polydev(mock_url: &str, work: &std::path::Path) -> anyhow::Result<Polydev> {
    let server = match std::env::var("DATABASE_URL").ok().filter(|u| !u.is_empty()) {
        Some(url) => url.parse()?,
        None => {
            let cluster = EmbeddedPostgres::start(&work.join("pg"), None).await?;
            let options = cluster.connect_options().database("postgres");
            std::mem::forget(cluster); // stopped by bench/run.sh
            options
        }
    };
    let name = format!("polydev_bench_{}", chrono::Utc::now().timestamp_millis());
    let mut admin = PgConnection::connect_with(&server).await?;
    admin
        .execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .await?;
    admin.close().await?;
    let options = server.clone().database(&name);
    let pool = PgPoolOptions::new()
        .max_connections(40)
        .connect_with(options.clone())
        .await?;
    let mut conn = pool.acquire().await?;
    polydev::db::migrate::run(&mut conn).await?;
    drop(conn);

    let models = work.join("models.toml");
    // `unconfigured`'s provider has no key: the CLI section asks it so that the server answers
    // `no_provider_configured` at once and the local CLI's answer is the result.
    let catalogue = format!(
        "[providers.openai]\nkind = \"openai\"\nbase_url = \"{mock_url}/v1\"\napi_key_env = \"BENCH_MOCK_KEY\"\n\n\
         [providers.nokey]\nkind = \"openai\"\nbase_url = \"{mock_url}/v1\"\napi_key_env = \"POLYDEV_BENCH_UNSET_KEY\"\n\n\
         [[models]]\nid = \"unconfigured\"\nprovider = \"nokey\"\ntier = \"premium\"\ninput_price = \"1\"\noutput_price = \"1\"\ncontext_window = 128000\n\n{}",
        [("bench", "bench"), ("delay-100", "bench~delay100"), ("delay-300", "bench~delay300"), ("delay-900", "bench~delay900"), ("failing", "bench~status500")]
            .map(|(id, upstream)| format!(
                "[[models]]\nid = \"{id}\"\nprovider = \"openai\"\ntier = \"premium\"\ninput_price = \"2.50\"\noutput_price = \"10\"\ncontext_window = 128000\nupstream = \"{upstream}\"\n"
            ))
            .join("\n")
    );
    std::fs::write(&models, catalogue)?;
    let url = match (server.get_socket(), server.get_host()) {
        (Some(socket), _) => format!(
            "postgres://{}@localhost/{name}?host={}",
            server.get_username(),
            socket.display()
        ),
        (None, host) => format!(
            "postgres://{}@{host}:{}/{name}",
            server.get_username(),
            server.get_port()
        ),
    };
    let db_url = url.clone();
    let bin = std::env::current_exe()?.with_file_name("polydev");
    let mut child = Command::new(bin)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--db-max-connections",
            "32",
            "--models",
        ])
        .arg(&models)
        .env("DATABASE_URL", url)
        .env("BENCH_MOCK_KEY", "mock-key")
        .env_remove("POLYDEV_BENCH_UNSET_KEY")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("start polydev serve")?;
    let line = BufReader::new(child.stdout.take().expect("stdout"))
        .lines()
        .next_line()
        .await?
        .context("polydev serve exited")?;
    let url = line
        .strip_prefix("polydev listening on ")
        .context("unexpected output")?
        .to_string();

    let mut tokens = Vec::new();
    let mut last_user = None;
    for i in 0..32 {
        let email = format!("bench{i}@example.com");
        let user = accounts::create_user(&pool, &email, Plan::Enterprise).await?;
        tokens.push(
            accounts::create_token(&pool, user.user_id, "bench", None)
                .await?
                .token,
        );
        last_user = Some(user.user_id);
    }
    let account_token = accounts::create_scoped_token(
        &pool,
        last_user.context("no bench user")?,
        "bench-zk",
        None,
        accounts::Scope::Account,
    )
    .await?
    .token;
    // Measure the gateway, not the product limits: no rate limit or quota stops the run.
    pool.execute("UPDATE rate_limit_tiers SET requests_per_minute = 100000000")
        .await?;
    pool.execute(
        "UPDATE user_perspective_quotas SET premium_perspectives_limit = NULL, messages_per_month = NULL",
    )
    .await?;
    Ok(Polydev {
        child,
        url,
        tokens,
        account_token,
        pool,
        db_url,
        server,
        database: name,
    })
}

struct Overhead {
    direct: Run,
    gateway: Run,
}

async fn overhead(
    name: &str,
    concurrency: usize,
    total: usize,
    direct: Arc<dyn Fn() -> reqwest::RequestBuilder + Send + Sync>,
    gateway: Arc<dyn Fn() -> reqwest::RequestBuilder + Send + Sync>,
) -> Overhead {
    // Warm up both paths (connections, caches), then measure them alternately.
    load(concurrency, total / 10, direct.clone()).await;
    load(concurrency, total / 10, gateway.clone()).await;
    let direct = load(concurrency, total, direct).await;
    let gateway = load(concurrency, total, gateway).await;
    println!(
        "{name:<10} c={concurrency:<3} direct p50 {} p99 {} {:>8.0} req/s | {name} p50 {} p99 {} {:>7.0} req/s | added p50 {} p99 {} | throughput ratio {:.2} | errors {}",
        ms(direct.percentile(0.5)),
        ms(direct.percentile(0.99)),
        direct.throughput(),
        ms(gateway.percentile(0.5)),
        ms(gateway.percentile(0.99)),
        gateway.throughput(),
        signed_ms(gateway.percentile(0.5), direct.percentile(0.5)),
        signed_ms(gateway.percentile(0.99), direct.percentile(0.99)),
        gateway.throughput() / direct.throughput(),
        direct.errors + gateway.errors,
    );
    Overhead { direct, gateway }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = args()?;
    let work = PathBuf::from("target/bench");
    std::fs::create_dir_all(&work)?;
    let polydev = start_polydev(&args.mock_url, &work).await?;
    let client = client();
    let (c1_total, c32_total) = if args.quick {
        (300, 2000)
    } else {
        (2000, 20000)
    };
    let mut report = serde_json::Map::new();
    let mut targets = Targets::default();
    println!("load average at start: {}", loadavg());

    if args.runs("gateway") {
        println!(
            "== 1. gateway overhead (one model, non-streaming; polydev includes auth, rate limit, quota reservation, usage row)"
        );
        let direct: Arc<dyn Fn() -> reqwest::RequestBuilder + Send + Sync> = {
            let (client, url) = (
                client.clone(),
                format!("{}/v1/chat/completions", args.mock_url),
            );
            Arc::new(move || {
                client
                    .post(&url)
                    .bearer_auth("mock-key")
                    .json(&chat_body("bench"))
            })
        };
        let gateway: Arc<dyn Fn() -> reqwest::RequestBuilder + Send + Sync> = {
            let (client, url, tokens) = (
                client.clone(),
                format!("{}/v1/perspectives", polydev.url),
                polydev.tokens.clone(),
            );
            let body = PerspectivesRequest {
                max_tokens: Some(64),
                ..PerspectivesRequest::to_models(
                    "Summarise the trade-offs of optimistic locking in one paragraph.",
                    &["bench"],
                )
            };
            let next = AtomicUsize::new(0);
            Arc::new(move || {
                let token = &tokens[next.fetch_add(1, Ordering::Relaxed) % tokens.len()];
                client.post(&url).bearer_auth(token).json(&body)
            })
        };
        let mut polydev_runs = Vec::new();
        for (concurrency, total) in [(1, c1_total), (32, c32_total)] {
            let o = overhead(
                "polydev",
                concurrency,
                total,
                direct.clone(),
                gateway.clone(),
            )
            .await;
            report.insert(format!("overhead_c{concurrency}"), summary(&o));
            let added = ms_f(o.gateway.percentile(0.99)) - ms_f(o.direct.percentile(0.99));
            let bound = if concurrency == 1 { 1.0 } else { 5.0 };
            targets.add(
                if concurrency == 1 {
                    "1. gateway c=1: added p99 < 1 ms"
                } else {
                    "1. gateway c=32: added p99 < 5 ms"
                },
                format!("added p99 {added:+.2} ms (load {})", loadavg()),
                Some(added < bound),
            );
            polydev_runs.push((concurrency, total, o));
        }
        if args.litellm.is_none() {
            targets.add(
                "1. gateway c=32: throughput >= 50x LiteLLM",
                "run without --no-litellm".into(),
                None,
            );
        }

        if let Some((url, key)) = &args.litellm {
            println!("== 4. LiteLLM proxy, same mock, same measurement");
            let litellm: Arc<dyn Fn() -> reqwest::RequestBuilder + Send + Sync> = {
                let (client, url, key) = (
                    client.clone(),
                    format!("{url}/chat/completions"),
                    key.clone(),
                );
                Arc::new(move || {
                    client
                        .post(&url)
                        .bearer_auth(&key)
                        .json(&chat_body("bench"))
                })
            };
            for (concurrency, total, ours) in &polydev_runs {
                // LiteLLM is far slower: fewer requests keep the run short.
                let o = overhead(
                    "litellm",
                    *concurrency,
                    (*total / 4).max(200),
                    direct.clone(),
                    litellm.clone(),
                )
                .await;
                let ours_added = ours.gateway.percentile(0.99).as_secs_f64()
                    - ours.direct.percentile(0.99).as_secs_f64();
                let theirs_added = o.gateway.percentile(0.99).as_secs_f64()
                    - o.direct.percentile(0.99).as_secs_f64();
                let ratio = ours.gateway.throughput() / o.gateway.throughput();
                if *concurrency == 32 {
                    // A LiteLLM that answered nothing (it did not start right) is no baseline.
                    let measured = o.gateway.errors == 0 && o.gateway.throughput() > 0.0;
                    targets.add(
                        "1. gateway c=32: throughput >= 50x LiteLLM",
                        format!(
                            "{ratio:.1}x ({:.0} vs {:.0} req/s, LiteLLM errors {})",
                            ours.gateway.throughput(),
                            o.gateway.throughput(),
                            o.gateway.errors
                        ),
                        measured.then_some(ratio >= 50.0),
                    );
                }
                println!(
                    "polydev vs litellm c={concurrency}: throughput {:.1}x, added p99 {} vs {}",
                    ours.gateway.throughput() / o.gateway.throughput(),
                    ms(Duration::from_secs_f64(ours_added.max(0.0))),
                    ms(Duration::from_secs_f64(theirs_added.max(0.0))),
                );
                report.insert(format!("litellm_c{concurrency}"), summary(&o));
            }
        }
    }

    if args.runs("fanout") {
        println!("== 2. fan-out (models with upstream delays 100, 300, 900 ms)");
        let rounds = if args.quick { 5 } else { 20 };
        let slowest = load(1, rounds, {
            let (client, url) = (
                client.clone(),
                format!("{}/v1/chat/completions", args.mock_url),
            );
            Arc::new(move || {
                client
                    .post(&url)
                    .bearer_auth("mock-key")
                    .json(&chat_body("bench~delay900"))
            })
        })
        .await;
        let fanout = load(1, rounds, {
            let (client, url, token) = (
                client.clone(),
                format!("{}/v1/perspectives", polydev.url),
                polydev.tokens[0].clone(),
            );
            let body = PerspectivesRequest {
                max_tokens: Some(64),
                ..PerspectivesRequest::to_models(
                    "Compare three queueing designs.",
                    &["delay-100", "delay-300", "delay-900"],
                )
            };
            Arc::new(move || client.post(&url).bearer_auth(&token).json(&body))
        })
        .await;
        println!(
            "fan-out of 3: p50 {} p99 {} | slowest model alone p50 {} p99 {} | overhead p50 {} p99 {}",
            ms(fanout.percentile(0.5)),
            ms(fanout.percentile(0.99)),
            ms(slowest.percentile(0.5)),
            ms(slowest.percentile(0.99)),
            signed_ms(fanout.percentile(0.5), slowest.percentile(0.5)),
            signed_ms(fanout.percentile(0.99), slowest.percentile(0.99)),
        );
        let added = ms_f(fanout.percentile(0.5)) - ms_f(slowest.percentile(0.5));
        targets.add(
            "2. fan-out 100/300/900 ms: total - slowest < 5 ms",
            format!("p50 {added:+.2} ms (load {})", loadavg()),
            Some(added < 5.0),
        );
        let first = first_answer(&client, &args.mock_url, &polydev, rounds).await?;
        targets.add(
            "2. first answer's event < 1 ms after its model (REST/SSE)",
            format!("p50 {:+.2} ms (load {})", first.0, loadavg()),
            Some(first.0 < 1.0),
        );
        targets.add(
            "2. first answer's event < 1 ms after its model (MCP)",
            format!("p50 {:+.2} ms (load {})", first.1, loadavg()),
            Some(first.1 < 1.0),
        );
        let deadline = deadline_kept(&client, &polydev, rounds).await?;
        targets.add(
            "2. deadline 500 ms on 100/900 ms/failing: within 5 ms",
            format!(
                "elapsed_ms - deadline: p50 {:+.1} ms, worst {:+.1} ms; client-observed p50 {:+.1} ms (load {})",
                deadline.0,
                deadline.1,
                deadline.2,
                loadavg()
            ),
            Some(deadline.1 <= 5.0),
        );
        report.insert(
            "fanout".into(),
            json!({
                "total_p50_ms": ms_f(fanout.percentile(0.5)), "slowest_p50_ms": ms_f(slowest.percentile(0.5)),
                "first_answer_sse_lag_ms": first.0, "first_answer_mcp_lag_ms": first.1,
                "deadline_over_p50_ms": deadline.0, "deadline_over_worst_ms": deadline.1,
                "deadline_client_over_p50_ms": deadline.2,
            }),
        );
    }

    if args.runs("mcp") {
        println!("== 6. MCP sessions and per-call overhead");
        report.insert(
            "mcp".into(),
            mcp_bench(&client, &polydev, args.quick, &mut targets).await?,
        );
    }

    if args.runs("quota") {
        println!("== 3. quota contention (1,000 concurrent reservations for one user, limit 250)");
        let contention = quota_contention(&polydev.pool).await?;
        report.insert("quota".into(), contention);
    }

    if args.runs("zk") {
        println!("== 5. zero-knowledge");
        report.insert(
            "zk".into(),
            zk_bench(&polydev, args.quick, &mut targets).await?,
        );
    }

    if args.runs("login") {
        println!("== 7. login signalling relay across two serve processes");
        report.insert(
            "login".into(),
            login::relay_bench(&polydev, args.quick).await?,
        );
    }

    if args.runs("cli") {
        println!(
            "== 8. local CLI through `polydev mcp` vs the CLI run directly (a fake `claude` that answers at once)"
        );
        report.insert("cli".into(), cli_bench(&polydev, &work, args.quick).await?);
    }

    targets.print();
    report.insert("targets".into(), targets.json());
    report.insert("load_average_end".into(), json!(loadavg()));
    let out = work.join("results.json");
    std::fs::write(&out, serde_json::to_string_pretty(&Value::Object(report))?)?;
    println!("results: {}", out.display());
    polydev.finish().await?;
    Ok(())
}

fn summary(o: &Overhead) -> Value {
    json!({
        "direct_p50_ms": o.direct.percentile(0.5).as_secs_f64() * 1e3,
        "direct_p99_ms": o.direct.percentile(0.99).as_secs_f64() * 1e3,
        "direct_rps": o.direct.throughput(),
        "gateway_p50_ms": o.gateway.percentile(0.5).as_secs_f64() * 1e3,
        "gateway_p99_ms": o.gateway.percentile(0.99).as_secs_f64() * 1e3,
        "gateway_rps": o.gateway.throughput(),
        "errors": o.direct.errors + o.gateway.errors,
    })
}

async fn quota_contention(pool: &PgPool) -> anyhow::Result<Value> {
    const CALLS: usize = 1000;
    const LIMIT: i32 = 250;
    let user = accounts::create_user(pool, "contention@example.com", Plan::Free).await?;
    sqlx::query(
        "UPDATE user_perspective_quotas SET premium_perspectives_limit = $2 WHERE user_id = $1",
    )
    .bind(user.user_id)
    .bind(LIMIT)
    .execute(pool)
    .await?;

    // Baseline: the same number of unconditional increments of the same row.
    let quota_id: sqlx::types::Uuid =
        sqlx::query_scalar("SELECT id FROM user_perspective_quotas WHERE user_id = $1")
            .bind(user.user_id)
            .fetch_one(pool)
            .await?;
    let started = Instant::now();
    let tasks: Vec<_> = (0..CALLS)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move {
                sqlx::query("UPDATE user_perspective_quotas SET eco_perspectives_used = eco_perspectives_used + 1 WHERE id = $1")
                    .bind(quota_id)
                    .execute(&pool)
                    .await
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    let baseline = CALLS as f64 / started.elapsed().as_secs_f64();

    let started = Instant::now();
    let tasks: Vec<_> = (0..CALLS)
        .map(|_| {
            let pool = pool.clone();
            let user_id = user.user_id;
            tokio::spawn(async move {
                quota::reserve(
                    &pool,
                    user_id,
                    sqlx::types::Uuid::new_v4(),
                    Counter::Premium,
                )
                .await
            })
        })
        .collect();
    let mut granted = 0;
    for task in tasks {
        if task.await??.is_ok() {
            granted += 1;
        }
    }
    let rate = CALLS as f64 / started.elapsed().as_secs_f64();
    let used: i32 = sqlx::query_scalar(
        "SELECT premium_perspectives_used FROM user_perspective_quotas WHERE user_id = $1",
    )
    .bind(user.user_id)
    .fetch_one(pool)
    .await?;
    println!(
        "granted {granted} of {CALLS} (limit {LIMIT}, counter {used}: {}) | {rate:.0} reservations/s vs {baseline:.0} plain increments/s (ratio {:.2})",
        if granted == LIMIT && used == LIMIT {
            "zero overspend"
        } else {
            "OVERSPEND"
        },
        rate / baseline
    );
    if granted != LIMIT || used != LIMIT {
        bail!("quota overspend: granted {granted}, counter {used}, limit {LIMIT}");
    }
    Ok(
        json!({ "granted": granted, "limit": LIMIT, "reservations_per_s": rate, "baseline_increments_per_s": baseline }),
    )
}

async fn zk_bench(polydev: &Polydev, quick: bool, targets: &mut Targets) -> anyhow::Result<Value> {
    use chacha20poly1305::aead::{Aead, KeyInit};
    use polydev_zk::{Context as ZkContext, KdfParams, Keyring};

    // (a) Envelopes vs the raw AEAD of the same crate, 1 KiB items.
    let item = vec![0x5au8; 1024];
    let rounds = if quick { 2_000 } else { 20_000 };
    let (keyring, _, _) = Keyring::setup("bench password", "bench-user", KdfParams::MINIMUM)?;
    let ctx = ZkContext {
        namespace: "chat.message",
        user_id: "bench-user",
        row_id: "row",
    };
    // Seal, open and the raw AEAD in turns, ten slices each, and the best slice of each: on a
    // shared machine a burst of load then hits all three alike instead of one of them.
    let cipher = chacha20poly1305::XChaCha20Poly1305::new(&[7u8; 32].into());
    let nonce = chacha20poly1305::XNonce::from([9u8; 24]);
    let slice = rounds / 10;
    let mut sealed = keyring.seal(&ctx, &item)?;
    let (mut seal, mut open, mut raw) = (0f64, 0f64, 0f64);
    let rate = |started: Instant| slice as f64 / started.elapsed().as_secs_f64();
    for _ in 0..10 {
        let started = Instant::now();
        for _ in 0..slice {
            sealed = keyring.seal(&ctx, &item)?;
        }
        seal = seal.max(rate(started));
        let started = Instant::now();
        for _ in 0..slice {
            std::hint::black_box(keyring.open(&ctx, &sealed)?);
        }
        open = open.max(rate(started));
        let started = Instant::now();
        for _ in 0..slice {
            std::hint::black_box(
                cipher
                    .encrypt(&nonce, item.as_slice())
                    .map_err(|_| anyhow::anyhow!("aead"))?,
            );
        }
        raw = raw.max(rate(started));
    }
    println!(
        "1 KiB items: seal {seal:.0}/s ({:.1} MB/s), open {open:.0}/s | raw XChaCha20-Poly1305 {raw:.0}/s ({:.1} MB/s) | seal/raw {:.2}",
        seal * 1024.0 / 1e6,
        raw * 1024.0 / 1e6,
        seal / raw
    );
    targets.add(
        "5. envelope seal 1 KiB >= 0.5x raw AEAD",
        format!("{:.2}x ({seal:.0} vs {raw:.0}/s)", seal / raw),
        Some(seal / raw >= 0.5),
    );
    targets.add(
        "5. envelope open at least as fast as seal",
        format!("open/seal {:.2} ({open:.0} vs {seal:.0}/s)", open / seal),
        Some(open >= seal),
    );

    // (b) Unlock with the default parameters (Argon2id m=64 MiB, t=3).
    let (_, material, _) = Keyring::setup("bench password", "bench-user", KdfParams::DEFAULT)?;
    let started = Instant::now();
    Keyring::unlock(&material, "bench password", "bench-user")?;
    let unlock = started.elapsed();
    println!("unlock (Argon2id m=64 MiB t=3 p=1, native): {}", ms(unlock));

    // (c) Migration of plaintext history through the real server.
    let messages: i32 = if quick { 10_000 } else { 100_000 };
    let token = &polydev.account_token;
    // Pins go to a scratch directory, not the user's config.
    let pins = std::env::temp_dir().join(format!("polydev-bench-pins-{}", std::process::id()));
    let client = polydev::client::zk::ZkClient::new(&polydev.url, token).with_config_dir(&pins);
    let user_id: sqlx::types::Uuid = client.user_id().await?.parse()?;
    let session: sqlx::types::Uuid = sqlx::query_scalar(
        "INSERT INTO chat_sessions (user_id, title) VALUES ($1, 'bench') RETURNING id",
    )
    .bind(user_id)
    .fetch_one(&polydev.pool)
    .await?;
    sqlx::query(
        "INSERT INTO chat_messages (session_id, role, content)
         SELECT $1, 'user', rpad('message ' || i || ' ', 1024, 'lorem ipsum ') FROM generate_series(1, $2) i",
    )
    .bind(session)
    .bind(messages)
    .execute(&polydev.pool)
    .await?;
    // Turned on after the history exists: the manifest lists it, so the migration seals it.
    let (keyring, _) = client
        .enable("bench master password", KdfParams::MINIMUM)
        .await?;
    let started = Instant::now();
    let report = client
        .migrate(
            &keyring,
            500,
            |_| {},
            |_| std::ops::ControlFlow::Continue(()),
        )
        .await?;
    let elapsed = started.elapsed();
    let rate = f64::from(messages) / elapsed.as_secs_f64();
    targets.add(
        "4. ZK migration 100,000 x 1 KiB >= 20,000 msg/s",
        format!(
            "{rate:.0} msg/s over {messages} messages (load {})",
            loadavg()
        ),
        Some(rate >= 20_000.0),
    );
    println!(
        "migration of {messages} messages of 1 KiB: {:.1} s, {rate:.0} messages/s ({} encrypted, {} verified and cleared) | {:.3} of the raw seal rate",
        elapsed.as_secs_f64(),
        report.encrypted,
        report.verified_and_cleared,
        rate / seal
    );
    Ok(json!({
        "seal_per_s": seal, "open_per_s": open, "raw_aead_per_s": raw, "unlock_ms": unlock.as_secs_f64() * 1e3,
        "migration_messages": messages, "migration_s": elapsed.as_secs_f64(), "migration_per_s": rate,
    }))
    .inspect(|_| {
        let _ = std::fs::remove_dir_all(&pins);
    })
}

/// Claude Code's `result` object, as the fake CLI prints it.
const FAKE_CLAUDE_OUTPUT: &str = r#"{"type":"result","subtype":"success","is_error":false,"duration_ms":1,"num_turns":1,"result":"Spaces.","session_id":"bench","total_cost_usd":0,"usage":{"input_tokens":12,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":2}}"#;

/// A JSON-RPC client of `polydev mcp` over its stdio (newline-delimited messages).
struct StdioMcp {
    _child: Child,
    stdin: tokio::process::ChildStdin,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    next_id: u64,
}

impl StdioMcp {
    async fn start(bin: &std::path::Path, env: &[(&str, String)]) -> anyhow::Result<StdioMcp> {
        let mut child = Command::new(bin)
            .arg("mcp")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("start polydev mcp")?;
        let stdin = child.stdin.take().context("stdin")?;
        let lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
        let mut mcp = StdioMcp {
            _child: child,
            stdin,
            lines,
            next_id: 0,
        };
        mcp.request(
            "initialize",
            json!({ "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": { "name": "polydev-bench", "version": "0" } }),
        )
        .await?;
        mcp.send(json!({ "jsonrpc": "2.0", "method": "notifications/initialized" }))
            .await?;
        Ok(mcp)
    }

    async fn send(&mut self, message: Value) -> anyhow::Result<()> {
        use tokio::io::AsyncWriteExt;
        let mut line = serde_json::to_vec(&message)?;
        line.push(b'\n');
        self.stdin.write_all(&line).await?;
        Ok(())
    }

    async fn request(&mut self, method: &str, params: Value) -> anyhow::Result<Value> {
        self.next_id += 1;
        let id = self.next_id;
        self.send(json!({ "jsonrpc": "2.0", "id": id, "method": method, "params": params }))
            .await?;
        while let Some(line) = self.lines.next_line().await? {
            let message: Value = serde_json::from_str(&line)?;
            if message["id"] == id {
                if !message["error"].is_null() {
                    bail!("{method} failed: {}", message["error"]);
                }
                return Ok(message["result"].clone());
            }
        }
        bail!("polydev mcp exited")
    }
}

/// `get_perspectives` through `polydev mcp` answered by a fake `claude` alone (the server has
/// no provider for the model asked, so it answers `no_provider_configured` at once), against
/// spawning the same fake `claude` with the same arguments and prompt directly.
async fn cli_bench(
    polydev: &Polydev,
    work: &std::path::Path,
    quick: bool,
) -> anyhow::Result<Value> {
    use std::os::unix::fs::PermissionsExt;
    use tokio::io::AsyncWriteExt;

    let dir = work.join("fake-cli");
    std::fs::create_dir_all(&dir)?;
    let claude = dir.join("claude");
    std::fs::write(
        &claude,
        format!(
            "#!/bin/sh\nif [ \"$1\" = \"--version\" ]; then echo '2.1.332 (Claude Code)'; exit 0; fi\ncat > /dev/null\necho '{FAKE_CLAUDE_OUTPUT}'\n"
        ),
    )?;
    std::fs::set_permissions(&claude, std::fs::Permissions::from_mode(0o755))?;
    let prompt = "Summarise the trade-offs of optimistic locking in one paragraph.";
    let rounds = if quick { 50 } else { 300 };

    let direct = async || -> anyhow::Result<Duration> {
        let started = Instant::now();
        let mut child = Command::new(&claude)
            .args(["-p", "--output-format", "json"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let mut stdin = child.stdin.take().context("stdin")?;
        stdin.write_all(prompt.as_bytes()).await?;
        drop(stdin);
        let out = child.wait_with_output().await?;
        if !out.status.success() || !out.stdout.starts_with(b"{") {
            bail!("the fake CLI failed");
        }
        Ok(started.elapsed())
    };

    let path = format!(
        "{}:{}",
        dir.canonicalize()?.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let bin = std::env::current_exe()?.with_file_name("polydev");
    let mut mcp = StdioMcp::start(
        &bin,
        &[
            ("PATH", path),
            ("POLYDEV_SERVER_URL", polydev.url.clone()),
            ("POLYDEV_USER_TOKEN", polydev.tokens[0].clone()),
            ("POLYDEV_LOCAL_CLIS", "claude".into()),
        ],
    )
    .await?;
    let arguments = json!({ "prompt": prompt, "models": ["unconfigured"] });
    let mut through_mcp = async || -> anyhow::Result<Duration> {
        let started = Instant::now();
        let result = mcp
            .request(
                "tools/call",
                json!({ "name": "get_perspectives", "arguments": arguments }),
            )
            .await?;
        let elapsed = started.elapsed();
        let answered = &result["structuredContent"]["perspectives"][0];
        if result["isError"] == true
            || answered["model"] != "claude-code"
            || answered["status"] != "ok"
        {
            bail!("unexpected result: {result}");
        }
        Ok(elapsed)
    };

    // Warm up both (the bridge detects the CLI and connects to the server on first use), then
    // alternate so both see the same machine.
    for _ in 0..5 {
        direct().await?;
        through_mcp().await?;
    }
    let mut runs = (Run::empty(), Run::empty());
    for _ in 0..rounds {
        runs.0.latencies.push(direct().await?);
        runs.1.latencies.push(through_mcp().await?);
    }
    drop(mcp);
    let (direct, mcp) = runs;
    println!(
        "cli        c=1   direct p50 {} p99 {} | through polydev mcp p50 {} p99 {} | added p50 {} p99 {}",
        ms(direct.percentile(0.5)),
        ms(direct.percentile(0.99)),
        ms(mcp.percentile(0.5)),
        ms(mcp.percentile(0.99)),
        signed_ms(mcp.percentile(0.5), direct.percentile(0.5)),
        signed_ms(mcp.percentile(0.99), direct.percentile(0.99)),
    );
    Ok(json!({
        "rounds": rounds,
        "direct_p50_ms": direct.percentile(0.5).as_secs_f64() * 1e3,
        "direct_p99_ms": direct.percentile(0.99).as_secs_f64() * 1e3,
        "mcp_p50_ms": mcp.percentile(0.5).as_secs_f64() * 1e3,
        "mcp_p99_ms": mcp.percentile(0.99).as_secs_f64() * 1e3,
    }))
}

/// Server-sent events of a response as they arrive: `(arrival, event name, data)`. Reads until
/// `until` says the last wanted event came, or the body ends.
async fn sse_events(
    mut response: reqwest::Response,
    until: impl Fn(&str, &str) -> bool,
) -> anyhow::Result<Vec<(Instant, String, String)>> {
    let mut events = Vec::new();
    let mut buffer = String::new();
    while let Some(chunk) = response.chunk().await? {
        let arrived = Instant::now();
        buffer.push_str(std::str::from_utf8(&chunk)?);
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            let (mut name, mut data) = (String::from("message"), String::new());
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    name = v.trim().to_string();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim_start());
                }
            }
            if data.is_empty() {
                continue;
            }
            let done = until(&name, &data);
            events.push((arrived, name, data));
            if done {
                return Ok(events);
            }
        }
    }
    Ok(events)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

/// How long after its model finished the first answer's event reaches the client, over
/// REST/SSE and over MCP (`notifications/progress`): (time from the call's first event to the
/// first answer's event) minus (the 100 ms model called straight at the mock, same run). What
/// remains is polydev's own work around the upstream call (the upstream request, the usage
/// row's durable commit, the event), as p50 of `rounds` calls each.
async fn first_answer(
    client: &reqwest::Client,
    mock_url: &str,
    polydev: &Polydev,
    rounds: usize,
) -> anyhow::Result<(f64, f64)> {
    let direct = load(1, rounds, {
        let (client, url) = (client.clone(), format!("{mock_url}/v1/chat/completions"));
        Arc::new(move || {
            client
                .post(&url)
                .bearer_auth("mock-key")
                .json(&chat_body("bench~delay100"))
        })
    })
    .await;
    let upstream = ms_f(direct.percentile(0.5));
    let body = PerspectivesRequest {
        max_tokens: Some(64),
        ..PerspectivesRequest::to_models(
            "Compare three queueing designs.",
            &["delay-100", "delay-300", "delay-900"],
        )
    };
    let mut sse = Vec::new();
    for _ in 0..rounds {
        let response = client
            .post(format!("{}/v1/perspectives", polydev.url))
            .bearer_auth(&polydev.tokens[0])
            .header("accept", "text/event-stream")
            .json(&body)
            .send()
            .await?;
        let events = sse_events(response, |name, _| name == "result").await?;
        let started = events
            .iter()
            .find(|e| e.1 == "started")
            .context("no started event")?;
        let first = events
            .iter()
            .find(|e| e.1 == "model")
            .context("no model event")?;
        sse.push(ms_f(first.0 - started.0) - upstream);
    }
    let mcp = McpSession::open(client, &polydev.url, &polydev.tokens[0]).await?;
    let mut over_mcp = Vec::new();
    for _ in 0..rounds {
        let arguments = serde_json::to_value(&body)?;
        let response = mcp.call_tool(client, arguments, true).await?;
        let events = sse_events(response, |_, data| data.contains("\"result\"")).await?;
        let progress: Vec<_> = events
            .iter()
            .filter(|e| e.2.contains("notifications/progress"))
            .collect();
        let (Some(started), Some(first)) = (progress.first(), progress.get(1)) else {
            bail!("MCP: expected progress notifications, got {events:?}");
        };
        over_mcp.push(ms_f(first.0 - started.0) - upstream);
    }
    let (sse, over_mcp) = (median(sse), median(over_mcp));
    println!(
        "first answer's event after its model finished (100 ms model alone p50 {upstream:.2} ms): REST/SSE p50 {sse:+.2} ms, MCP p50 {over_mcp:+.2} ms"
    );
    Ok((sse, over_mcp))
}

/// A call with `deadline_ms: 500` on the 100 ms, the 900 ms and a failing model: how far past
/// the deadline it returns, by its own `elapsed_ms` (p50, worst) and as the client sees it (p50).
async fn deadline_kept(
    client: &reqwest::Client,
    polydev: &Polydev,
    rounds: usize,
) -> anyhow::Result<(f64, f64, f64)> {
    let body = PerspectivesRequest {
        max_tokens: Some(64),
        deadline_ms: Some(500),
        ..PerspectivesRequest::to_models(
            "Answer within the deadline.",
            &["delay-100", "delay-900", "failing"],
        )
    };
    let (mut own, mut seen) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let t = Instant::now();
        let result: Value = client
            .post(format!("{}/v1/perspectives", polydev.url))
            .bearer_auth(&polydev.tokens[1])
            .json(&body)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        seen.push(ms_f(t.elapsed()) - 500.0);
        let elapsed = result["totals"]["elapsed_ms"]
            .as_f64()
            .context("no elapsed_ms")?;
        own.push(elapsed - 500.0);
        let statuses: Vec<&str> = result["perspectives"]
            .as_array()
            .context("no perspectives")?
            .iter()
            .filter_map(|p| p["status"].as_str())
            .collect();
        if statuses != ["ok", "timeout", "error"] {
            bail!("deadline call: unexpected statuses {statuses:?}");
        }
    }
    let worst = own.iter().copied().fold(f64::MIN, f64::max);
    let (own, seen) = (median(own), median(seen));
    println!(
        "deadline 500 ms (100 ms ok, 900 ms timeout, failing error): elapsed_ms - deadline p50 {own:+.1} ms, worst {worst:+.1} ms; client-observed p50 {seen:+.1} ms"
    );
    Ok((own, worst, seen))
}

/// A raw MCP session over streamable HTTP (protocol revision 2025-06-18).
struct McpSession {
    url: String,
    token: String,
    id: String,
    next: AtomicUsize,
}

impl McpSession {
    async fn open(client: &reqwest::Client, base: &str, token: &str) -> anyhow::Result<Self> {
        let url = format!("{base}/mcp");
        let response = client
            .post(&url)
            .bearer_auth(token)
            .header("accept", "application/json, text/event-stream")
            .json(
                &json!({ "jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
                "protocolVersion": "2025-06-18", "capabilities": {},
                "clientInfo": { "name": "polydev-bench", "version": "1" } } }),
            )
            .send()
            .await?
            .error_for_status()?;
        let id = response
            .headers()
            .get("mcp-session-id")
            .context("no MCP session id")?
            .to_str()?
            .to_string();
        response.bytes().await?;
        let session = McpSession {
            url,
            token: token.to_string(),
            id,
            next: AtomicUsize::new(1),
        };
        session
            .post(
                client,
                json!({ "jsonrpc": "2.0", "method": "notifications/initialized" }),
            )
            .send()
            .await?
            .error_for_status()?
            .bytes()
            .await?;
        Ok(session)
    }

    fn post(&self, client: &reqwest::Client, body: Value) -> reqwest::RequestBuilder {
        client
            .post(&self.url)
            .bearer_auth(&self.token)
            .header("accept", "application/json, text/event-stream")
            .header("mcp-session-id", &self.id)
            .header("mcp-protocol-version", "2025-06-18")
            .json(&body)
    }

    /// `tools/call` of `get_perspectives`; with `progress`, asks for progress notifications.
    async fn call_tool(
        &self,
        client: &reqwest::Client,
        arguments: Value,
        progress: bool,
    ) -> anyhow::Result<reqwest::Response> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let mut params = json!({ "name": "get_perspectives", "arguments": arguments });
        if progress {
            params["_meta"] = json!({ "progressToken": id });
        }
        Ok(self
            .post(
                client,
                json!({ "jsonrpc": "2.0", "id": id, "method": "tools/call", "params": params }),
            )
            .send()
            .await?
            .error_for_status()?)
    }
}

/// Resident memory of a process, from /proc.
fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")
}

/// 1,000 idle MCP sessions (initialized, then left alone): the server's extra resident memory;
/// and a one-model call over MCP against the same call over REST, at concurrency 1.
async fn mcp_bench(
    client: &reqwest::Client,
    polydev: &Polydev,
    quick: bool,
    targets: &mut Targets,
) -> anyhow::Result<Value> {
    let pid = polydev.child.id().context("polydev serve has exited")?;
    let token = &polydev.tokens[2];
    // Warm up the MCP path (allocator arenas, first session), then measure.
    let _warm = McpSession::open(client, &polydev.url, token).await?;
    let before = rss_kib(pid)?;
    const SESSIONS: usize = 1000;
    let mut sessions = Vec::with_capacity(SESSIONS);
    for _ in 0..SESSIONS {
        sessions.push(McpSession::open(client, &polydev.url, token).await?);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_kib(pid)?;
    let extra_mib = (after.saturating_sub(before)) as f64 / 1024.0;
    println!(
        "{SESSIONS} idle MCP sessions: RSS {:.1} -> {:.1} MiB, {extra_mib:.1} MiB extra ({:.1} KiB each)",
        before as f64 / 1024.0,
        after as f64 / 1024.0,
        (after.saturating_sub(before)) as f64 / SESSIONS as f64
    );
    targets.add(
        "3. 1,000 idle MCP sessions < 30 MiB extra RSS",
        format!("{extra_mib:.1} MiB"),
        Some(extra_mib < 30.0),
    );
    targets.add(
        "3. idle MCP sessions expire after a documented timeout",
        "--mcp-session-idle-timeout, default 900 s (test mcp::an_idle_session_expires)".into(),
        Some(true),
    );
    drop(sessions);

    let rounds = if quick { 100 } else { 500 };
    let body = PerspectivesRequest {
        max_tokens: Some(64),
        ..PerspectivesRequest::to_models(
            "Summarise the trade-offs of optimistic locking in one paragraph.",
            &["bench"],
        )
    };
    let arguments = serde_json::to_value(&body)?;
    let mcp = McpSession::open(client, &polydev.url, token).await?;
    let (mut rest, mut over_mcp) = (Vec::new(), Vec::new());
    for i in 0..rounds * 11 / 10 {
        let t = Instant::now();
        client
            .post(format!("{}/v1/perspectives", polydev.url))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await?
            .error_for_status()?
            .bytes()
            .await?;
        let r = ms_f(t.elapsed());
        let t = Instant::now();
        let response = mcp.call_tool(client, arguments.clone(), false).await?;
        sse_events(response, |_, data| data.contains("\"result\"")).await?;
        let m = ms_f(t.elapsed());
        // The first tenth warms up.
        if i >= rounds / 10 {
            rest.push(r);
            over_mcp.push(m);
        }
    }
    let (rest, over_mcp) = (median(rest), median(over_mcp));
    println!(
        "one-model call, c=1, p50: REST {rest:.2} ms, MCP {over_mcp:.2} ms, MCP over REST {:+.2} ms",
        over_mcp - rest
    );
    targets.add(
        "3. per-call overhead of MCP over REST (reported)",
        format!(
            "p50 {:+.2} ms (REST {rest:.2} ms, MCP {over_mcp:.2} ms)",
            over_mcp - rest
        ),
        Some(true),
    );
    Ok(json!({
        "idle_sessions": SESSIONS, "rss_before_kib": before, "rss_after_kib": after,
        "rest_p50_ms": rest, "mcp_p50_ms": over_mcp,
    }))
}
