//! Warm pools and the container lifecycle in `runtime_containers` (docs/runtime.md):
//!
//! ```text
//! warming ──agent registers──▶ ready ──claim──▶ assigned ◀──▶ executing
//!    │                           │                 │ idle
//!    └───────────────────────────┴─────────────────┴──▶ destroyed (never reused)
//! ```
//!
//! One row per container, inserted (as `warming`, `container_id` = its name) before the
//! orchestrator starts it, so a container that exists always has a row: the reconcile loop can
//! stop anything else as an orphan without racing a start.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::claims::Claims;
use super::orchestrator::{
    ContainerSpec, NetworkPolicy, Orchestrator, OrchestratorError, Resources, State,
};
use crate::error::{Error, Result};
use crate::proxy::Proxies;

/// The providers whose CLIs run in containers (the table's CHECK).
pub const PROVIDERS: [&str; 3] = ["openai", "anthropic", "google"];
/// The states of a container that exists (`destroyed` rows are history).
pub const LIVE_STATES: [&str; 4] = ["warming", "ready", "assigned", "executing"];
/// Orchestrator names of polydev's containers: `polydev-<row id>`.
pub const NAME_PREFIX: &str = "polydev-";
/// Orchestrator names of login sandboxes (`polydev-login-<uuid>`, also their `vms.vm_id`): the
/// login domain owns them (docs/login.md), so the reconcile loop leaves them alone.
pub const LOGIN_NAME_PREFIX: &str = "polydev-login-";
/// The seed of the reconcile loop's advisory lock key, `hashtextextended(<instance>, seed)`:
/// one lock per orchestrator instance (transaction-scoped: released when its pass ends, or when
/// its connection dies).
pub const RECONCILE_LOCK_SEED: i64 = 0x706f_6c79_7275_6e31; // "polyrun1"

pub fn check_provider(provider: &str) -> Result<&'static str> {
    PROVIDERS
        .iter()
        .find(|p| **p == provider)
        .copied()
        .ok_or_else(|| {
            Error::Invalid(format!(
                "unknown provider `{provider}`: expected one of {}",
                PROVIDERS.join(", ")
            ))
        })
}

#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Warm containers to keep per provider.
    pub warm: BTreeMap<String, u32>,
    /// An assigned container unused this long is destroyed.
    pub idle_timeout: Duration,
    /// A container whose agent has not registered within this is destroyed.
    pub warming_timeout: Duration,
    pub resources: Resources,
    /// The command containers run (the agent), inside.
    pub command: Vec<String>,
    /// Where agents reach this server: the local driver tunnels to it.
    pub server: Option<SocketAddr>,
    /// The server's URL as agents on other machines (Nomad) see it; `POLYDEV_SERVER` for them.
    pub server_url: Option<String>,
    /// How often the reconcile loop runs when nothing wakes it.
    pub reconcile_interval: Duration,
    /// A job is killed when it has run this long.
    pub job_wall_clock: Duration,
    /// Plaintext output per stream of a job; the rest is dropped behind a marker.
    pub max_output_bytes: u64,
    /// Extra read-only binds in every container (the local driver; tests mount fake CLIs).
    pub binds: Vec<super::orchestrator::Bind>,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            warm: PROVIDERS.iter().map(|p| (p.to_string(), 0)).collect(),
            idle_timeout: Duration::from_secs(15 * 60),
            warming_timeout: Duration::from_secs(120),
            resources: Resources::default(),
            command: vec![super::local::AGENT_INSIDE.into(), "serve".into()],
            server: None,
            server_url: None,
            reconcile_interval: Duration::from_secs(5),
            job_wall_clock: Duration::from_secs(10 * 60),
            max_output_bytes: 1024 * 1024,
            binds: Vec::new(),
        }
    }
}

/// The runtime domain's handle: the database, the orchestrator, the configuration.
#[derive(Clone)]
pub struct Runtime {
    pub pool: PgPool,
    pub orchestrator: Arc<dyn Orchestrator>,
    pub config: Arc<RuntimeConfig>,
    /// The users' proxy ports (`None`: containers have no egress).
    pub proxies: Option<Proxies>,
    /// Wakes the background loop (a claim found a pool empty, a container ended).
    wake: Arc<Notify>,
    /// Wakes waiters on job changes in this process (agents waiting for work, output followers).
    pub(crate) jobs: Arc<Notify>,
    /// Claims waiting for the statement of their batch, and its connections.
    pub(super) claims: Arc<Claims>,
}

/// A claimed container, as its user sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claimed {
    pub id: Uuid,
    pub provider: String,
    /// The agent's X25519 public key: seal jobs to it.
    pub public_key: String,
    pub decodo_port: Option<i32>,
    pub assigned_at: DateTime<Utc>,
}

/// A container as its user reads it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct ContainerView {
    pub id: Uuid,
    pub provider: String,
    pub status: String,
    pub public_key: Option<String>,
    pub decodo_port: Option<i32>,
    pub assigned_at: Option<DateTime<Utc>>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub destroyed_at: Option<DateTime<Utc>>,
}

/// What one reconcile pass did (`None` from [`Runtime::reconcile`]: another process held the
/// lock).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reconciled {
    /// Rows whose container died or vanished, or timed out warming, or sat idle.
    pub destroyed: usize,
    /// Containers the table does not know, stopped.
    pub orphans_stopped: usize,
    /// Warm containers started to refill the pools.
    pub started: usize,
}

pub fn sha256_hex(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).expect("random");
    hex::encode(buf)
}

/// The row id in a container name, if it is one of ours.
pub fn row_of(name: &str) -> Option<Uuid> {
    name.strip_prefix(NAME_PREFIX)?.parse().ok()
}

impl Runtime {
    /// Needs a tokio runtime (the claim statements' pool starts its upkeep task).
    pub fn new(pool: PgPool, orchestrator: Arc<dyn Orchestrator>, config: RuntimeConfig) -> Self {
        Runtime {
            claims: Arc::new(Claims::new(&pool)),
            pool,
            orchestrator,
            config: Arc::new(config),
            proxies: None,
            wake: Arc::new(Notify::new()),
            jobs: Arc::new(Notify::new()),
        }
    }

    /// Live containers (all but `destroyed`) by provider and state, every pair present (zero
    /// when none), for the metrics page. Rows are shared: every replica sees the same counts.
    pub async fn counts_by_state(&self) -> Result<Vec<(&'static str, &'static str, i64)>> {
        let rows = sqlx::query!(
            r#"SELECT provider AS "provider!", status AS "status!", count(*) AS "count!"
                 FROM runtime_containers WHERE status <> 'destroyed'
                GROUP BY provider, status"#
        )
        .fetch_all(&self.pool)
        .await?;
        let mut counts = Vec::new();
        for provider in PROVIDERS {
            for state in LIVE_STATES {
                let count = rows
                    .iter()
                    .find(|r| r.provider == provider && r.status == state)
                    .map_or(0, |r| r.count);
                counts.push((provider, state, count));
            }
        }
        Ok(counts)
    }

    /// Every container's egress goes through its user's port of `proxies`.
    pub fn with_proxies(mut self, proxies: Option<Proxies>) -> Self {
        self.proxies = proxies;
        self
    }

    /// Gives `user_id` a container of `provider`: the one they already hold, else the oldest
    /// ready warm container, in one statement (one round trip: `UPDATE … FROM (SELECT … FOR
    /// UPDATE SKIP LOCKED LIMIT n)`, with the held container and the user's proxy port folded
    /// in) shared with the claims of this process that arrive with it (runtime/claims.rs).
    /// With proxy ports configured, a user's first claim allocates their port, and a port
    /// whose last health check failed refuses the claim (`proxy_unhealthy`): containers never
    /// start on a bad egress nor around it.
    ///
    /// The orchestrator then confirms the container runs and points its egress at the user's
    /// proxy. A container it cannot confirm is destroyed (never handed to anyone else) and the
    /// next one tried; if it cannot be reached, the claim fails with 503.
    pub async fn claim(&self, user_id: Uuid, provider: &str) -> Result<Claimed> {
        let provider = check_provider(provider)?;
        for _ in 0..4 {
            match self.try_claim(user_id, provider).await {
                Err(Error::Conflict(_)) => continue, // a concurrent claim of the same user won
                Ok(Some(claimed)) => return Ok(claimed),
                Ok(None) => continue, // dead container destroyed, or a port just allocated
                Err(other) => return Err(other),
            }
        }
        Err(Error::RuntimeUnavailable(format!(
            "no live warm container for {provider} after several tries"
        )))
    }

    async fn try_claim(&self, user_id: Uuid, provider: &'static str) -> Result<Option<Claimed>> {
        // Shared with the claims of this process that arrive with it (runtime/claims.rs).
        let row = self.claim_row(user_id, provider).await?;
        if let Some(proxies) = &self.proxies {
            if row.proxy_port.is_none() {
                // First use: allocate the user's port, then claim again.
                proxies.port_for(user_id).await?;
                return Ok(None);
            }
            if row.proxy_healthy == Some(false) {
                let port = proxies
                    .port_of(user_id)
                    .await?
                    .ok_or(Error::NotFound("proxy port"))?;
                port.ensure_healthy()?;
            }
        }
        let (Some(id), Some(container_id), Some(public_key), Some(assigned_at), Some(held)) = (
            row.id,
            row.container_id,
            row.public_key,
            row.assigned_at,
            row.held,
        ) else {
            self.wake.notify_one();
            return Err(Error::RuntimeUnavailable(format!(
                "no warm {provider} container is ready"
            )));
        };
        let port = row.decodo_port;
        let proxy_addr = match (&self.proxies, port) {
            (Some(proxies), Some(port)) => Some(proxies.config.addr(port as u16).await?),
            _ => None,
        };
        // The claim is committed: from here on the container is this user's or destroyed.
        if !held {
            let info = match self.orchestrator.inspect(&container_id).await {
                Ok(info) => info,
                Err(error) => {
                    self.destroy(id, "orchestrator unreachable when claimed")
                        .await?;
                    return Err(error.into());
                }
            };
            if !matches!(info.map(|i| i.state), Some(State::Running)) {
                self.destroy(id, "dead when claimed").await?;
                return Ok(None);
            }
        }
        // Again for a held container: a claim interrupted after its statement (the caller went
        // away) must not leave the container without its user's egress.
        match self.orchestrator.set_proxy(&container_id, proxy_addr).await {
            Ok(()) => {}
            Err(OrchestratorError::Refused(why)) => {
                self.destroy(id, &format!("egress not set when claimed: {why}"))
                    .await?;
                return Ok(None);
            }
            Err(error) => {
                if !held {
                    self.destroy(id, "orchestrator unreachable when claimed")
                        .await?;
                }
                return Err(error.into());
            }
        }
        if !held {
            self.wake.notify_one(); // refill
        }
        Ok(Some(Claimed {
            id,
            provider: provider.into(),
            public_key,
            decodo_port: port,
            assigned_at,
        }))
    }

    /// The user's container (another user's, or an unknown id, is not found).
    pub async fn container(&self, user_id: Uuid, id: Uuid) -> Result<ContainerView> {
        sqlx::query_as!(
            ContainerView,
            r#"SELECT id, provider, status AS "status!", agent_public_key AS public_key,
                      decodo_port, assigned_at, last_used_at, destroyed_at
               FROM runtime_containers WHERE id = $1 AND user_id = $2"#,
            id,
            user_id
        )
        .fetch_optional(&self.pool)
        .await?
        .ok_or(Error::NotFound("container"))
    }

    /// Destroys the user's container (its unfinished jobs fail).
    pub async fn release(&self, user_id: Uuid, id: Uuid) -> Result<ContainerView> {
        self.container(user_id, id).await?;
        self.destroy(id, "released by its user").await?;
        self.container(user_id, id).await
    }

    /// The agent of a warming container registers its public key (authenticated by the
    /// container's bootstrap secret, [`Runtime::authenticate_agent`]): the container becomes
    /// `ready`. Once only: a second registration is refused (not found).
    pub async fn register_agent(&self, container: Uuid, public_key: &str) -> Result<Uuid> {
        super::check_public_key(public_key)?;
        let id = sqlx::query_scalar!(
            "UPDATE runtime_containers
             SET status = 'ready', agent_public_key = $2, ready_at = NOW()
             WHERE id = $1 AND status = 'warming' AND agent_public_key IS NULL
             RETURNING id",
            container,
            public_key
        )
        .fetch_optional(&self.pool)
        .await?
        .ok_or(Error::NotFound("warming container"))?;
        self.jobs.notify_waiters();
        Ok(id)
    }

    /// Marks the row destroyed (with why), fails its unfinished jobs, then stops the container.
    /// The row changes first: if the orchestrator cannot be reached now, the container is an
    /// orphan that the reconcile loop stops later.
    pub async fn destroy(&self, id: Uuid, reason: &str) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let container = sqlx::query_scalar!(
            "UPDATE runtime_containers
             SET status = 'destroyed', destroyed_at = NOW(), destroy_reason = $2,
                 credential_grant = NULL -- the grant dies with its container
             WHERE id = $1 AND status IS DISTINCT FROM 'destroyed'
             RETURNING container_id",
            id,
            reason
        )
        .fetch_optional(&mut *tx)
        .await?;
        let Some(container) = container else {
            return Ok(false);
        };
        sqlx::query!(
            "UPDATE job_executions
             SET status = 'failed', failure_reason = $2, completed_at = NOW(),
                 duration_ms = (EXTRACT(EPOCH FROM NOW() - COALESCE(started_at, created_at)) * 1000)::int
             WHERE container_id = $1 AND status IN ('queued', 'running')",
            id,
            format!("container destroyed: {reason}")
        )
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        self.jobs.notify_waiters();
        self.wake.notify_one();
        if let Err(error) = self.orchestrator.stop(&container).await {
            tracing::warn!(%id, %error, "stopping a destroyed container failed; reconcile will");
        }
        Ok(true)
    }

    /// Starts one warm container for `provider`: the row first, then the container.
    async fn start_warm(&self, provider: &str) -> Result<Uuid> {
        let id = Uuid::new_v4();
        let name = format!("{NAME_PREFIX}{id}");
        let secret = random_hex(32);
        sqlx::query!(
            "INSERT INTO runtime_containers
                 (id, provider, container_id, status, orchestrator, bootstrap_hash)
             VALUES ($1, $2, $3, 'warming', $4, $5)",
            id,
            provider,
            name,
            self.orchestrator.instance(),
            sha256_hex(&secret)
        )
        .execute(&self.pool)
        .await?;
        let mut env = BTreeMap::from([
            ("POLYDEV_BOOTSTRAP".to_string(), secret),
            ("POLYDEV_CONTAINER".to_string(), id.to_string()),
            ("POLYDEV_PROVIDER".to_string(), provider.to_string()),
        ]);
        if let Some(url) = &self.config.server_url {
            env.insert("POLYDEV_SERVER".into(), url.clone());
        }
        let spec = ContainerSpec {
            name,
            command: self.config.command.clone(),
            env,
            resources: self.config.resources.clone(),
            network: NetworkPolicy {
                proxy: None,
                server: self.config.server,
                turn: None,
                host: false,
            },
            binds: self.config.binds.clone(),
        };
        match self.orchestrator.start(spec).await {
            Ok(container_id) => {
                // Whatever state the row reached meanwhile: its agent may have registered
                // (`ready`) before the orchestrator answered, and a claim looks the container
                // up by this id. Only a destroyed row keeps its name (reconcile stops it).
                sqlx::query!(
                    "UPDATE runtime_containers SET container_id = $2
                     WHERE id = $1 AND status IS DISTINCT FROM 'destroyed'",
                    id,
                    container_id
                )
                .execute(&self.pool)
                .await?;
                Ok(id)
            }
            Err(error) => {
                self.destroy(id, &format!("start failed: {error}")).await?;
                Err(error.into())
            }
        }
    }

    /// One pass of the loop, if no other process is running one: containers that died or
    /// vanished are destroyed (and their jobs failed), warming ones that timed out and idle
    /// assigned ones too; containers the table does not know are stopped; pools are refilled.
    pub async fn reconcile(&self) -> Result<Option<Reconciled>> {
        let mut lock = self.pool.begin().await?;
        let instance = self.orchestrator.instance();
        let locked = sqlx::query_scalar!(
            r#"SELECT pg_try_advisory_xact_lock(hashtextextended($1, $2)) AS "locked!""#,
            instance,
            RECONCILE_LOCK_SEED
        )
        .fetch_one(&mut *lock)
        .await?;
        if !locked {
            return Ok(None);
        }
        let mut done = Reconciled::default();
        let listed = self.orchestrator.list().await?;
        let by_id: HashMap<&str, &State> =
            listed.iter().map(|c| (c.id.as_str(), &c.state)).collect();
        let by_name: HashMap<&str, &State> =
            listed.iter().map(|c| (c.name.as_str(), &c.state)).collect();

        let live = sqlx::query!(
            r#"SELECT id, container_id, status AS "status!",
                      created_at < NOW() - make_interval(secs => $2) AS "warming_expired!",
                      COALESCE(last_used_at < NOW() - make_interval(secs => $3), false) AS "idle!"
               FROM runtime_containers
               WHERE status <> 'destroyed' AND orchestrator = $1"#,
            instance,
            self.config.warming_timeout.as_secs_f64(),
            self.config.idle_timeout.as_secs_f64()
        )
        .fetch_all(&self.pool)
        .await?;
        let mut known = std::collections::HashSet::new();
        for row in &live {
            known.insert(row.id);
            let name = format!("{NAME_PREFIX}{}", row.id);
            let state = by_id
                .get(row.container_id.as_str())
                .or_else(|| by_name.get(name.as_str()));
            let reason = match state {
                None if row.status == "warming" && !row.warming_expired => None, // starting
                None => Some("container vanished".to_string()),
                Some(state) if state.is_terminal() => Some(format!("container ended: {state:?}")),
                Some(_) if row.status == "warming" && row.warming_expired => {
                    Some("agent did not register in time".into())
                }
                Some(_) if row.status == "assigned" && row.idle => Some("idle".into()),
                Some(_) => None,
            };
            if let Some(reason) = reason
                && self.destroy(row.id, &reason).await?
            {
                done.destroyed += 1;
            }
        }
        for container in &listed {
            if container.name.starts_with(LOGIN_NAME_PREFIX) {
                continue;
            }
            let ours = row_of(&container.name).is_some_and(|row| known.contains(&row));
            if !ours {
                self.orchestrator.stop(&container.id).await?;
                done.orphans_stopped += 1;
            }
        }
        // A destroyed row of a listed container is an orphan too (its stop failed earlier): the
        // loop above stopped it, as `known` holds only live rows.
        // Local sandboxes of a polydev process on this machine that has ended died with it.
        let others = sqlx::query_scalar!(
            r#"SELECT DISTINCT orchestrator AS "orchestrator!" FROM runtime_containers
               WHERE status <> 'destroyed' AND orchestrator LIKE 'local:%' AND orchestrator <> $1"#,
            instance
        )
        .fetch_all(&self.pool)
        .await?;
        for other in others {
            if super::local::instance_alive(&other) != Some(false) {
                continue;
            }
            let rows = sqlx::query_scalar!(
                "SELECT id FROM runtime_containers
                 WHERE status <> 'destroyed' AND orchestrator = $1",
                other
            )
            .fetch_all(&self.pool)
            .await?;
            for id in rows {
                if self.destroy(id, "its polydev process ended").await? {
                    done.destroyed += 1;
                }
            }
        }
        let counts = sqlx::query!(
            r#"SELECT provider AS "provider!", COUNT(*) AS "count!"
               FROM runtime_containers
               WHERE status IN ('warming', 'ready') AND user_id IS NULL AND orchestrator = $1
               GROUP BY provider"#,
            instance
        )
        .fetch_all(&self.pool)
        .await?;
        for (provider, &target) in &self.config.warm {
            let have = counts
                .iter()
                .find(|c| &c.provider == provider)
                .map_or(0, |c| c.count);
            for _ in have..i64::from(target) {
                self.start_warm(provider).await?;
                done.started += 1;
            }
        }
        lock.commit().await?;
        Ok(Some(done))
    }

    /// Runs [`Runtime::reconcile`] every `reconcile_interval`, and at once when woken (a claim
    /// emptied a pool, a container ended), until `shutdown`.
    pub fn spawn_background(&self, shutdown: CancellationToken) -> tokio::task::JoinHandle<()> {
        let runtime = self.clone();
        tokio::spawn(async move {
            let mut events = runtime.orchestrator.events();
            loop {
                match runtime.reconcile().await {
                    Ok(Some(done)) if done != Reconciled::default() => {
                        tracing::info!(?done, "runtime reconciled")
                    }
                    Ok(_) => {}
                    Err(error) => tracing::warn!(%error, "runtime reconcile failed"),
                }
                let sleep = tokio::time::sleep(runtime.config.reconcile_interval);
                tokio::pin!(sleep);
                loop {
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = &mut sleep => break,
                        () = runtime.wake.notified() => break,
                        Some(event) = events.next() => {
                            if event.state.is_terminal() {
                                break;
                            }
                        }
                    }
                }
            }
        })
    }
}
