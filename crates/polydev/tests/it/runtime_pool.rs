//! Warm pools and the container lifecycle in PostgreSQL, against an in-memory orchestrator
//! (the drivers have their own tests): refill, registration, claims (32 at once), reuse by the
//! same user, never another's, idle reaping, the reconcile loop and its lock, an unreachable
//! orchestrator.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::stream::BoxStream;
use polydev::runtime::orchestrator::BoxFuture;
use polydev::runtime::{
    ContainerInfo, ContainerSpec, Event, Orchestrator, OrchestratorError, Reconciled, Runtime,
    RuntimeConfig, State,
};
use sqlx::PgPool;
use tokio::sync::broadcast;
use uuid::Uuid;

use crate::common::TestDb;

/// An orchestrator in memory: records specs and proxies, and lets a test kill containers or
/// make it unreachable.
pub struct Fake {
    instance: String,
    containers: Mutex<BTreeMap<String, (ContainerSpec, State)>>,
    pub proxies: Mutex<HashMap<String, Option<SocketAddr>>>,
    pub stopped: Mutex<Vec<String>>,
    pub unreachable: AtomicBool,
    /// When set, each container's agent registers (on this database) before `start` answers,
    /// as a fast sandbox's may.
    pub registers_early: Mutex<Option<PgPool>>,
    events: broadcast::Sender<Event>,
    next: AtomicU32,
}

impl Fake {
    pub fn new() -> Arc<Fake> {
        Self::named("fake")
    }

    /// A fake that is its own orchestrator instance (like one process's local sandboxes).
    pub fn named(instance: &str) -> Arc<Fake> {
        Arc::new(Fake {
            instance: instance.into(),
            containers: Mutex::default(),
            proxies: Mutex::default(),
            stopped: Mutex::default(),
            unreachable: AtomicBool::new(false),
            registers_early: Mutex::default(),
            events: broadcast::channel(64).0,
            next: AtomicU32::new(1),
        })
    }

    /// `<container>.<bootstrap secret>` of each running container (what its agent presents).
    pub fn bootstrap_secrets(&self) -> Vec<String> {
        self.containers
            .lock()
            .unwrap()
            .values()
            .filter(|(_, state)| *state == State::Running)
            .map(|(spec, _)| {
                format!(
                    "{}.{}",
                    spec.env["POLYDEV_CONTAINER"], spec.env["POLYDEV_BOOTSTRAP"]
                )
            })
            .collect()
    }

    pub fn set_state(&self, id: &str, state: State) {
        let mut containers = self.containers.lock().unwrap();
        let entry = containers.get_mut(id).expect("known container");
        entry.1 = state.clone();
        let _ = self.events.send(Event {
            id: id.into(),
            name: entry.0.name.clone(),
            state,
        });
    }

    /// A container the table does not know.
    pub fn add_orphan(&self, name: &str) -> String {
        let id = format!(
            "{}-orphan-{}",
            self.instance,
            self.next.fetch_add(1, Ordering::SeqCst)
        );
        let spec = ContainerSpec {
            name: name.into(),
            command: vec![],
            env: BTreeMap::new(),
            resources: Default::default(),
            network: Default::default(),
            binds: Vec::new(),
        };
        self.containers
            .lock()
            .unwrap()
            .insert(id.clone(), (spec, State::Running));
        id
    }

    pub fn running(&self) -> usize {
        let containers = self.containers.lock().unwrap();
        containers
            .values()
            .filter(|(_, s)| *s == State::Running)
            .count()
    }

    fn check(&self) -> Result<(), OrchestratorError> {
        if self.unreachable.load(Ordering::SeqCst) {
            return Err(OrchestratorError::Unreachable("connection refused".into()));
        }
        Ok(())
    }
}

impl Orchestrator for Fake {
    fn driver(&self) -> &'static str {
        "fake"
    }

    fn instance(&self) -> String {
        self.instance.clone()
    }

    fn start(&self, spec: ContainerSpec) -> BoxFuture<'_, Result<String, OrchestratorError>> {
        Box::pin(async move {
            self.check()?;
            let id = format!(
                "{}-{}",
                self.instance,
                self.next.fetch_add(1, Ordering::SeqCst)
            );
            let early = self.registers_early.lock().unwrap().clone();
            if let Some(pool) = early {
                let row: Uuid = spec.env["POLYDEV_CONTAINER"].parse().unwrap();
                sqlx::query(
                    "UPDATE runtime_containers SET status = 'ready', agent_public_key = $2,
                            ready_at = NOW() WHERE id = $1",
                )
                .bind(row)
                .bind(public_key(0))
                .execute(&pool)
                .await
                .unwrap();
            }
            self.containers
                .lock()
                .unwrap()
                .insert(id.clone(), (spec, State::Running));
            Ok(id)
        })
    }

    fn stop<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), OrchestratorError>> {
        Box::pin(async move {
            self.check()?;
            self.containers.lock().unwrap().remove(id);
            self.stopped.lock().unwrap().push(id.into());
            Ok(())
        })
    }

    fn set_proxy<'a>(
        &'a self,
        id: &'a str,
        proxy: Option<SocketAddr>,
    ) -> BoxFuture<'a, Result<(), OrchestratorError>> {
        Box::pin(async move {
            self.check()?;
            self.proxies.lock().unwrap().insert(id.into(), proxy);
            Ok(())
        })
    }

    fn inspect<'a>(
        &'a self,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Option<ContainerInfo>, OrchestratorError>> {
        Box::pin(async move {
            self.check()?;
            Ok(self
                .containers
                .lock()
                .unwrap()
                .get(id)
                .map(|(spec, state)| ContainerInfo {
                    id: id.into(),
                    name: spec.name.clone(),
                    state: state.clone(),
                }))
        })
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<ContainerInfo>, OrchestratorError>> {
        Box::pin(async move {
            self.check()?;
            Ok(self
                .containers
                .lock()
                .unwrap()
                .iter()
                .map(|(id, (spec, state))| ContainerInfo {
                    id: id.clone(),
                    name: spec.name.clone(),
                    state: state.clone(),
                })
                .collect())
        })
    }

    fn events(&self) -> BoxStream<'static, Event> {
        Box::pin(futures_util::stream::empty())
    }
}

pub fn config(provider: &str, warm: u32) -> RuntimeConfig {
    let mut config = RuntimeConfig::default();
    config.warm.insert(provider.into(), warm);
    config
}

pub async fn user(pool: &PgPool) -> Uuid {
    let id = Uuid::new_v4();
    sqlx::query("INSERT INTO users (user_id, email) VALUES ($1, $2)")
        .bind(id)
        .bind(format!("{id}@example.com"))
        .execute(pool)
        .await
        .expect("insert user");
    id
}

fn public_key(n: u32) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode([n as u8; 32])
}

/// What the agent's `register` call does: authenticate with the bootstrap credential, then
/// register the public key.
pub async fn register(
    runtime: &Runtime,
    credential: &str,
    key: &str,
) -> Result<Uuid, polydev::error::Error> {
    let agent = runtime
        .authenticate_agent(Some(&format!("Bearer {credential}")))
        .await?;
    runtime.register_agent(agent.container, key).await
}

/// Reconciles (starting the warm containers), then registers every agent.
pub async fn warm_up(runtime: &Runtime, fake: &Fake) {
    // A pass that failed just before holds its lock until sqlx's rollback of the dropped
    // transaction reaches the database: a bounded wait for that, not for time.
    let mut done = runtime.reconcile().await.unwrap();
    for _ in 0..100 {
        if done.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        done = runtime.reconcile().await.unwrap();
    }
    done.expect("lock free");
    for (n, secret) in fake.bootstrap_secrets().iter().enumerate() {
        let _ = register(runtime, secret, &public_key(n as u32)).await;
    }
}

pub async fn status_counts(pool: &PgPool) -> BTreeMap<String, i64> {
    sqlx::query_as::<_, (String, i64)>(
        "SELECT status, COUNT(*) FROM runtime_containers GROUP BY status",
    )
    .fetch_all(pool)
    .await
    .unwrap()
    .into_iter()
    .collect()
}

#[tokio::test]
async fn runtime_pool_refills_registers_claims_and_reuses() {
    let db = TestDb::migrated().await;
    let fake = Fake::new();
    // The proxy gate is this machine; alice's seed row (port 10001) is reused, not duplicated.
    let proxies = polydev::proxy::Proxies::new(
        db.pool.clone(),
        crate::proxy_ports::proxy_config(10001..=10010, None),
    );
    let runtime = Runtime::new(db.pool.clone(), fake.clone(), config("anthropic", 2))
        .with_proxies(Some(proxies));
    let done = runtime.reconcile().await.unwrap().unwrap();
    assert_eq!(done.started, 2);
    assert_eq!(status_counts(&db.pool).await["warming"], 2);
    // Warming containers cannot be claimed; the agents register, then they can.
    let alice = user(&db.pool).await;
    sqlx::query("INSERT INTO user_proxy_ports (user_id, proxy_port, proxy_ip) VALUES ($1, 10001, '203.0.113.10')")
        .bind(alice)
        .execute(&db.pool)
        .await
        .unwrap();
    let error = runtime.claim(alice, "anthropic").await.unwrap_err();
    assert_eq!(error.code(), "runtime_unavailable");
    let secrets = fake.bootstrap_secrets();
    register(&runtime, &secrets[0], &public_key(1))
        .await
        .unwrap();
    register(&runtime, &secrets[1], &public_key(2))
        .await
        .unwrap();
    assert_eq!(
        register(&runtime, &secrets[0], &public_key(3))
            .await
            .unwrap_err()
            .code(),
        "not_found",
        "an agent registers once"
    );
    let container = secrets[0].split('.').next().unwrap();
    assert_eq!(
        register(&runtime, &format!("{container}.guess"), &public_key(3))
            .await
            .unwrap_err()
            .code(),
        "token_unknown",
        "a wrong secret is refused"
    );

    let claimed = runtime.claim(alice, "anthropic").await.unwrap();
    assert_eq!(claimed.decodo_port, Some(10001));
    assert!(claimed.public_key == public_key(1) || claimed.public_key == public_key(2));
    let row: (
        Option<Uuid>,
        String,
        String,
        Option<i32>,
        bool,
        bool,
        String,
    ) = sqlx::query_as(
        "SELECT user_id, status, container_id, decodo_port, assigned_at IS NOT NULL,
                last_used_at IS NOT NULL, orchestrator
         FROM runtime_containers WHERE id = $1",
    )
    .bind(claimed.id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        (row.0, row.1.as_str(), row.3, row.4, row.5, row.6.as_str()),
        (Some(alice), "assigned", Some(10001), true, true, "fake")
    );
    assert!(
        row.2.starts_with("fake-"),
        "container_id is the orchestrator's id"
    );
    assert_eq!(
        fake.proxies.lock().unwrap()[&row.2],
        Some("127.0.0.1:10001".parse().unwrap()),
        "egress points at the user's proxy port"
    );
    // The same user gets the same container back; the pool refills in the background.
    assert_eq!(
        runtime.claim(alice, "anthropic").await.unwrap().id,
        claimed.id
    );
    let done = runtime.reconcile().await.unwrap().unwrap();
    assert_eq!(done.started, 1);
    let bad = runtime.claim(alice, "cohere").await.unwrap_err();
    assert_eq!(bad.code(), "invalid_request");
}

/// (claim statements, users they claimed for) so far in this process (`/metrics`' counters).
fn claim_statements() -> (f64, f64) {
    let page = polydev::telemetry::render();
    let read = |name: &str| {
        page.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    };
    (
        read(polydev::telemetry::RUNTIME_CLAIM_STATEMENTS),
        read(polydev::telemetry::RUNTIME_CLAIM_STATEMENT_USERS),
    )
}

/// Claims for `asks` (a user may appear several times), all started at once: each ask's user
/// and what its claim returned.
async fn claim_all(
    runtime: &Runtime,
    provider: &'static str,
    asks: &[Uuid],
) -> Vec<(
    Uuid,
    Result<polydev::runtime::Claimed, polydev::error::Error>,
)> {
    futures_util::future::join_all(asks.iter().map(|&u| {
        let runtime = runtime.clone();
        tokio::spawn(async move { (u, runtime.claim(u, provider).await) })
    }))
    .await
    .into_iter()
    .map(|claim| claim.expect("claim task"))
    .collect()
}

async fn owner(pool: &PgPool, container: Uuid) -> Option<Uuid> {
    sqlx::query_scalar("SELECT user_id FROM runtime_containers WHERE id = $1")
        .bind(container)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// `n` serve processes over one database: separate `Runtime` values, each with its own pool.
async fn processes(db: &TestDb, fake: &Arc<Fake>, n: usize, config: RuntimeConfig) -> Vec<Runtime> {
    let mut runtimes = Vec::new();
    for _ in 0..n {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .connect_with(db.options.clone())
            .await
            .unwrap();
        runtimes.push(Runtime::new(pool, fake.clone(), config.clone()));
    }
    runtimes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn runtime_pool_32_concurrent_claimers_each_get_a_distinct_container() {
    polydev::telemetry::handle();
    let db = TestDb::migrated().await;
    let fake = Fake::new();
    let runtime = Runtime::new(db.pool.clone(), fake.clone(), config("openai", 40));
    warm_up(&runtime, &fake).await;
    assert_eq!(status_counts(&db.pool).await["ready"], 40);
    let mut users = Vec::new();
    for _ in 0..32 {
        users.push(user(&db.pool).await);
    }
    let before = claim_statements();
    let claims = claim_all(&runtime, "openai", &users).await;
    let after = claim_statements();
    let mut containers = std::collections::HashSet::new();
    for (user, claimed) in claims {
        let container = claimed.unwrap().id;
        assert!(containers.insert(container), "claimed twice: {container}");
        assert_eq!(owner(&db.pool, container).await, Some(user));
    }
    let counts = status_counts(&db.pool).await;
    assert_eq!((counts["assigned"], counts["ready"]), (32, 8));
    // Claims that arrive together share statements (runtime/claims.rs): 32 users claimed for,
    // in fewer than 32 statements.
    let (statements, claimed_for) = (after.0 - before.0, after.1 - before.1);
    assert_eq!(claimed_for, 32.0);
    assert!(
        statements < 32.0,
        "{statements} statements for 32 claims arriving together"
    );
}

/// A batch answers each claim as a claim alone would: a user asking four times at once holds
/// one container and every ask returns it; when the pool runs out, the users left over are
/// refused (503) and nothing is claimed for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn runtime_claims_in_one_batch_each_get_what_a_claim_alone_would() {
    let db = TestDb::migrated().await;
    let fake = Fake::new();
    let runtime = Runtime::new(db.pool.clone(), fake.clone(), config("openai", 10));
    warm_up(&runtime, &fake).await;
    let mut users = Vec::new();
    for _ in 0..12 {
        users.push(user(&db.pool).await);
    }
    // The first eight ask four times each, the other four once: 36 claims, 12 users.
    let asks: Vec<Uuid> = users[..8]
        .iter()
        .flat_map(|&u| [u; 4])
        .chain(users[8..].iter().copied())
        .collect();
    let mut answers: HashMap<Uuid, Vec<Result<Uuid, String>>> = HashMap::new();
    for (user, claimed) in claim_all(&runtime, "openai", &asks).await {
        let answer = claimed.map(|c| c.id).map_err(|e| e.code().to_string());
        answers.entry(user).or_default().push(answer);
    }
    let mut holders = HashMap::new();
    for (user, answers) in &answers {
        let first = &answers[0];
        assert!(
            answers.iter().all(|a| a == first),
            "{user}'s asks differ: {answers:?}"
        );
        match first {
            Ok(container) => {
                assert!(
                    holders.insert(*container, *user).is_none(),
                    "shared: {container}"
                );
                assert_eq!(owner(&db.pool, *container).await, Some(*user));
            }
            Err(code) => assert_eq!(code, "runtime_unavailable"),
        }
    }
    assert_eq!(
        holders.len(),
        10,
        "ten containers, ten holders: {answers:?}"
    );
    let counts = status_counts(&db.pool).await;
    assert_eq!((counts["assigned"], counts.get("ready")), (10, None));
}

/// Two processes claiming for the same users at the same moment: a batch may lose a user to the
/// other process (the unique index refuses a second live container), and then its claims run
/// alone. Every user ends with one container, and both processes return that one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn runtime_claims_racing_across_processes_give_each_user_one_container() {
    let db = TestDb::migrated().await;
    let fake = Fake::new();
    let runtimes = processes(&db, &fake, 2, config("anthropic", 40)).await;
    warm_up(&runtimes[0], &fake).await;
    let mut users = Vec::new();
    for _ in 0..16 {
        users.push(user(&db.pool).await);
    }
    let (first, second) = tokio::join!(
        claim_all(&runtimes[0], "anthropic", &users),
        claim_all(&runtimes[1], "anthropic", &users)
    );
    let mut held = HashMap::new();
    for (user, claimed) in first.into_iter().chain(second) {
        let container = claimed.unwrap().id;
        assert_eq!(
            *held.entry(user).or_insert(container),
            container,
            "{user} was given two containers"
        );
        assert_eq!(owner(&db.pool, container).await, Some(user));
    }
    assert_eq!(held.len(), 16);
    let counts = status_counts(&db.pool).await;
    assert_eq!((counts["assigned"], counts["ready"]), (16, 24));
}

/// An agent may register before the orchestrator has answered the start (a fast sandbox): the
/// row still gets the orchestrator's id, and the container can be claimed (it was looked up by
/// its name, not found, and destroyed as dead: a 503).
#[tokio::test]
async fn runtime_an_agent_registering_before_its_start_returns_leaves_a_claimable_container() {
    let db = TestDb::migrated().await;
    let fake = Fake::new();
    *fake.registers_early.lock().unwrap() = Some(db.pool.clone());
    let runtime = Runtime::new(db.pool.clone(), fake.clone(), config("openai", 1));
    runtime.reconcile().await.unwrap().expect("lock free");
    let (status, container_id): (String, String) =
        sqlx::query_as("SELECT status, container_id FROM runtime_containers")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(status, "ready");
    assert!(container_id.starts_with("fake-"), "{container_id}");
    let alice = user(&db.pool).await;
    let claimed = runtime.claim(alice, "openai").await.unwrap();
    assert_eq!(owner(&db.pool, claimed.id).await, Some(alice));
}

#[tokio::test]
async fn runtime_containers_never_change_hands_nor_come_back() {
    let db = TestDb::migrated().await;
    let fake = Fake::new();
    let runtime = Runtime::new(db.pool.clone(), fake.clone(), config("google", 1));
    warm_up(&runtime, &fake).await;
    let (alice, bob) = (user(&db.pool).await, user(&db.pool).await);
    let claimed = runtime.claim(alice, "google").await.unwrap();
    // Bob finds no container: Alice's is hers (no recycling).
    assert_eq!(
        runtime.claim(bob, "google").await.unwrap_err().code(),
        "runtime_unavailable"
    );
    let steal = sqlx::query("UPDATE runtime_containers SET user_id = $2 WHERE id = $1")
        .bind(claimed.id)
        .bind(bob)
        .execute(&db.pool)
        .await
        .unwrap_err();
    assert!(steal.to_string().contains("already belongs"), "{steal}");
    assert!(runtime.destroy(claimed.id, "test").await.unwrap());
    assert!(!runtime.destroy(claimed.id, "again").await.unwrap());
    let revive = sqlx::query("UPDATE runtime_containers SET status = 'ready' WHERE id = $1")
        .bind(claimed.id)
        .execute(&db.pool)
        .await
        .unwrap_err();
    assert!(revive.to_string().contains("destroyed"), "{revive}");
    let (destroyed_at, reason): (Option<chrono::DateTime<chrono::Utc>>, Option<String>) =
        sqlx::query_as("SELECT destroyed_at, destroy_reason FROM runtime_containers WHERE id = $1")
            .bind(claimed.id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(destroyed_at.is_some());
    assert_eq!(reason.as_deref(), Some("test"));
    assert_eq!(fake.running(), 0, "its container was stopped");
}

#[tokio::test]
async fn runtime_reconcile_replaces_dead_containers_fails_their_jobs_and_stops_orphans() {
    let db = TestDb::migrated().await;
    let fake = Fake::new();
    let runtime = Runtime::new(db.pool.clone(), fake.clone(), config("anthropic", 2));
    warm_up(&runtime, &fake).await;
    let alice = user(&db.pool).await;
    let claimed = runtime.claim(alice, "anthropic").await.unwrap();
    let job: Uuid = sqlx::query_scalar(
        "INSERT INTO job_executions (user_id, container_id, job_type, encrypted_command, status)
         VALUES ($1, $2, 'cli', 'sealed', 'running') RETURNING id",
    )
    .bind(alice)
    .bind(claimed.id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let container: String =
        sqlx::query_scalar("SELECT container_id FROM runtime_containers WHERE id = $1")
            .bind(claimed.id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    fake.set_state(&container, State::Lost);
    let unknown_row = fake.add_orphan(&format!("polydev-{}", Uuid::new_v4()));
    let done = runtime.reconcile().await.unwrap().unwrap();
    assert_eq!(
        (done.destroyed, done.orphans_stopped, done.started),
        (1, 1, 1)
    );
    assert!(fake.stopped.lock().unwrap().contains(&unknown_row));
    let (status, reason): (String, Option<String>) =
        sqlx::query_as("SELECT status, failure_reason FROM job_executions WHERE id = $1")
            .bind(job)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(status, "failed");
    assert!(reason.unwrap().contains("Lost"));
    // Idle: an assigned container unused past the timeout is destroyed.
    let bob = user(&db.pool).await;
    warm_up(&runtime, &fake).await;
    let bobs = runtime.claim(bob, "anthropic").await.unwrap();
    sqlx::query(
        "UPDATE runtime_containers SET last_used_at = NOW() - interval '1 day' WHERE id = $1",
    )
    .bind(bobs.id)
    .execute(&db.pool)
    .await
    .unwrap();
    let done = runtime.reconcile().await.unwrap().unwrap();
    assert_eq!(done.destroyed, 1);
    let reason: Option<String> =
        sqlx::query_scalar("SELECT destroy_reason FROM runtime_containers WHERE id = $1")
            .bind(bobs.id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(reason.as_deref(), Some("idle"));
}

#[tokio::test]
async fn runtime_reconcile_runs_in_one_process_at_a_time() {
    let db = TestDb::migrated().await;
    let fake = Fake::new();
    let runtimes = processes(&db, &fake, 4, config("google", 3)).await;
    for _ in 0..5 {
        let passes = futures_util::future::join_all(runtimes.iter().map(|r| r.reconcile())).await;
        assert!(passes.iter().all(|p| p.is_ok()));
    }
    assert_eq!(
        status_counts(&db.pool).await["warming"],
        3,
        "never double-started"
    );
    assert_eq!(fake.running(), 3);
    // While another holds the lock, a pass does nothing.
    let mut other = db.pool.begin().await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('fake', $1))")
        .bind(polydev::runtime::pool::RECONCILE_LOCK_SEED)
        .execute(&mut *other)
        .await
        .unwrap();
    assert_eq!(runtimes[0].reconcile().await.unwrap(), None);
}

#[tokio::test]
async fn runtime_claim_with_the_orchestrator_unreachable_is_503_and_claims_nothing() {
    let db = TestDb::migrated().await;
    let fake = Fake::new();
    let runtime = Runtime::new(db.pool.clone(), fake.clone(), config("openai", 1));
    warm_up(&runtime, &fake).await;
    fake.unreachable.store(true, Ordering::SeqCst);
    let alice = user(&db.pool).await;
    let error = runtime.claim(alice, "openai").await.unwrap_err();
    assert_eq!(error.code(), "runtime_unavailable");
    assert_eq!(polydev::http::status(&error).as_u16(), 503);
    // The claim is one statement; a container the orchestrator could not confirm is destroyed,
    // so it is never handed out, to alice or anyone else, without its egress set.
    let row: (String, Option<Uuid>, Option<String>) =
        sqlx::query_as("SELECT status, user_id, destroy_reason FROM runtime_containers")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        row,
        (
            "destroyed".to_string(),
            Some(alice),
            Some("orchestrator unreachable when claimed".to_string())
        ),
        "nothing half-claimed"
    );
    assert!(fake.proxies.lock().unwrap().is_empty(), "no egress was set");
    assert!(
        runtime.reconcile().await.is_err(),
        "reconcile reports it too"
    );
    fake.unreachable.store(false, Ordering::SeqCst);
    warm_up(&runtime, &fake).await;
    runtime.claim(alice, "openai").await.unwrap();
    assert_eq!(status_counts(&db.pool).await["assigned"], 1);
}

#[tokio::test]
async fn runtime_api_claim_with_the_orchestrator_unreachable_is_503_and_claims_nothing() {
    let db = TestDb::migrated().await;
    let fake = Fake::new();
    let runtime = Runtime::new(db.pool.clone(), fake.clone(), config("anthropic", 1));
    warm_up(&runtime, &fake).await;
    let catalogue = polydev::perspectives::Catalogue::load(None).unwrap();
    let state = polydev::app::AppState::new(
        db.pool.clone(),
        polydev::perspectives::Gateway::new(catalogue),
    )
    .with_runtime(Some(runtime.clone()));
    let server = crate::http_api::TestServer::start_state(state).await;
    let (_, token) =
        crate::http_api::user_with_token(&db, "alice@example.com", polydev::accounts::Plan::Pro)
            .await;
    fake.unreachable.store(true, Ordering::SeqCst);
    let response = server
        .send_json(
            reqwest::Method::POST,
            "/v1/runtime/containers",
            &token,
            &serde_json::json!({"provider": "anthropic"}),
        )
        .await;
    assert_eq!(response.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "runtime_unavailable");
    assert!(
        !body.to_string().contains("connection refused"),
        "the detail stays in the log"
    );
    let counts = status_counts(&db.pool).await;
    assert_eq!(
        (
            counts.get("ready"),
            counts.get("assigned"),
            counts["destroyed"]
        ),
        (None, None, 1),
        "nothing half-claimed: the unconfirmed container is destroyed"
    );
    // Without a runtime, the routes say what the operator must set.
    let off = crate::http_api::TestServer::start(&db).await;
    let response = off
        .send_json(
            reqwest::Method::POST,
            "/v1/runtime/containers",
            &token,
            &serde_json::json!({"provider": "anthropic"}),
        )
        .await;
    assert_eq!(response.status(), reqwest::StatusCode::NOT_IMPLEMENTED);
}

#[tokio::test]
async fn runtime_instances_keep_to_their_own_containers_and_dead_local_ones_are_swept() {
    let db = TestDb::migrated().await;
    // Two serve processes with local sandboxes of their own: each judges, claims and refills
    // only its own; neither takes the other's containers for vanished.
    let (fake_a, fake_b) = (Fake::named("local-a"), Fake::named("local-b"));
    let a = Runtime::new(db.pool.clone(), fake_a.clone(), config("openai", 2));
    let b = Runtime::new(db.pool.clone(), fake_b.clone(), config("openai", 2));
    warm_up(&a, &fake_a).await;
    warm_up(&b, &fake_b).await;
    for _ in 0..2 {
        assert_eq!(a.reconcile().await.unwrap().unwrap(), Reconciled::default());
        assert_eq!(b.reconcile().await.unwrap().unwrap(), Reconciled::default());
    }
    assert_eq!(status_counts(&db.pool).await["ready"], 4);
    let alice = user(&db.pool).await;
    let claimed = a.claim(alice, "openai").await.unwrap();
    let owner: String =
        sqlx::query_scalar("SELECT orchestrator FROM runtime_containers WHERE id = $1")
            .bind(claimed.id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(owner, "local-a");

    // Rows of a local process on this machine that has ended are destroyed by whoever runs.
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    let dead = format!("local:{}:4194999", boot.trim());
    sqlx::query(
        "INSERT INTO runtime_containers (provider, container_id, status, orchestrator)
         VALUES ('openai', 'gone', 'ready', $1)",
    )
    .bind(&dead)
    .execute(&db.pool)
    .await
    .unwrap();
    let done = a.reconcile().await.unwrap().unwrap();
    assert_eq!(done.destroyed, 1);
    let reason: Option<String> =
        sqlx::query_scalar("SELECT destroy_reason FROM runtime_containers WHERE orchestrator = $1")
            .bind(&dead)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(reason.as_deref(), Some("its polydev process ended"));
}
