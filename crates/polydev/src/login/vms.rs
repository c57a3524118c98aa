//! Login sandboxes: containers of the `login` kind started through the runtime's orchestrator
//! and recorded in `vms` (`type` = `vm_type` = `login`). The row is written before the
//! container is started, so a container that exists always has one: anything named like a
//! login sandbox without a live row is an orphan and is stopped.
//!
//! `vms.status`: `starting` → `running` (started; heartbeats keep `last_heartbeat`) →
//! `stopping` (teardown scheduled) → `destroyed` (`destroyed_at`).

use uuid::Uuid;

use super::Login;
use crate::error::{Error, Result};
use crate::runtime::orchestrator::{Bind, ContainerSpec, NetworkPolicy, SERVER_INSIDE};
use crate::runtime::{LOGIN_NAME_PREFIX, Runtime, State};

/// Where the login agent binary is mounted inside a local sandbox.
pub const LOGIN_AGENT_INSIDE: &str = "/opt/polydev/login-agent";

impl Login {
    /// Starts the sandbox of session `id`'s current attempt, with its agent's environment:
    /// `POLYDEV_SERVER_URL`, `POLYDEV_LOGIN_SESSION_ID`, `POLYDEV_LOGIN_SECRET`,
    /// `POLYDEV_LOGIN_PROVIDER`.
    pub(crate) async fn launch(
        &self,
        runtime: &Runtime,
        id: Uuid,
        user: Uuid,
        provider: &str,
        secret: &str,
    ) -> Result<String> {
        let orchestrator = &runtime.orchestrator;
        let local = orchestrator.driver() == "local";
        let server_url = match (&runtime.config.server, &runtime.config.server_url) {
            // A local login sandbox shares the host's network (see `host` below), unless a
            // TURN relay is forwarded into it: then it reaches this server by its tunnel.
            (Some(_), _) if local && self.config.turn_forward.is_some() => {
                format!("http://{SERVER_INSIDE}")
            }
            (Some(server), _) if local => format!("http://{server}"),
            (_, Some(url)) => url.trim_end_matches('/').to_string(),
            _ => {
                return Err(Error::NotConfigured(
                    "login agents cannot reach this server: set --runtime-server-url".into(),
                ));
            }
        };
        if local && !self.config.agent_bin.exists() {
            return Err(Error::NotConfigured(format!(
                "the login agent binary {} does not exist (serve --login-agent-bin)",
                self.config.agent_bin.display()
            )));
        }
        let vm_id = format!("{LOGIN_NAME_PREFIX}{}", Uuid::new_v4());
        let mut resources = self.config.resources.clone();
        // The sandbox never outlives its session by more than a minute, whatever happens here.
        resources.wall_clock =
            Some(self.config.session_timeout + std::time::Duration::from_secs(60));
        let memory_mb = i32::try_from(resources.memory_bytes / (1024 * 1024)).unwrap_or(i32::MAX);
        let vcpus = f64::from(resources.cpu_mhz) / 1000.0;
        sqlx::query!(
            "INSERT INTO vms (vm_id, user_id, type, vm_type, status, provider, memory_mb,
                              vcpu_count, orchestrator, session_id)
             VALUES ($1, $2, 'login', 'login', 'starting', $3, $4, $5::float8::numeric, $6, $7)",
            vm_id,
            user,
            provider,
            memory_mb,
            vcpus,
            orchestrator.instance(),
            id
        )
        .execute(&self.pool)
        .await?;
        let attached = sqlx::query!(
            "UPDATE auth_sessions SET vm_id = $2
             WHERE session_id = $1 AND status = 'pending' AND vm_id IS NULL",
            id,
            vm_id
        )
        .execute(&self.pool)
        .await?
        .rows_affected();
        if attached == 0 {
            // Cancelled or retried meanwhile: the row stays for the record, nothing starts.
            self.schedule_cleanup(&vm_id, id).await?;
            return Err(Error::Conflict(
                "the login session changed while its sandbox was starting".into(),
            ));
        }
        let mut env = self.config.agent_env.clone();
        env.extend([
            ("POLYDEV_SERVER_URL".to_string(), server_url),
            ("POLYDEV_LOGIN_SESSION_ID".to_string(), id.to_string()),
            ("POLYDEV_LOGIN_SECRET".to_string(), secret.to_string()),
            ("POLYDEV_LOGIN_PROVIDER".to_string(), provider.to_string()),
        ]);
        let (command, binds) = if local {
            (
                vec![LOGIN_AGENT_INSIDE.to_string()],
                std::iter::once(Bind {
                    host: self.config.agent_bin.clone(),
                    inside: LOGIN_AGENT_INSIDE.into(),
                })
                // The browser's font configuration (without it Chromium draws no text).
                .chain(std::path::Path::new("/etc/fonts").is_dir().then(|| Bind {
                    host: "/etc/fonts".into(),
                    inside: "/etc/fonts".into(),
                }))
                .collect(),
            )
        } else {
            (
                vec![self.config.agent_bin.display().to_string()],
                Vec::new(),
            )
        };
        let spec = ContainerSpec {
            name: vm_id.clone(),
            command,
            env,
            resources,
            network: NetworkPolicy {
                proxy: self.config.proxy,
                server: runtime.config.server,
                turn: self.config.turn_forward.filter(|_| local),
                // The agent's WebRTC peer must be reachable by the user's browser: over UDP on
                // the host's network, unless a TURN relay is forwarded into the sandbox (a
                // local sandbox's own network namespace has only its loopback; docs/login.md,
                // "Limitations").
                host: local && self.config.turn_forward.is_none(),
            },
            binds,
        };
        match orchestrator.start(spec).await {
            Ok(container) => {
                sqlx::query!(
                    "UPDATE vms SET container_id = $2,
                         status = CASE WHEN status = 'starting' THEN 'running' ELSE status END
                     WHERE vm_id = $1",
                    vm_id,
                    container
                )
                .execute(&self.pool)
                .await?;
                tracing::info!(session = %id, vm = %vm_id, %container, "login sandbox started");
                Ok(vm_id)
            }
            Err(error) => {
                self.schedule_cleanup(&vm_id, id).await?;
                Err(error.into())
            }
        }
    }

    /// Sessions in progress whose sandbox is gone, with why: it ended or vanished (this
    /// process's orchestrator says so), or the local polydev process that ran it has ended
    /// (its sandboxes died with it). Also stops this orchestrator's login sandboxes that no
    /// live row owns.
    pub(crate) async fn sandboxes_gone(&self) -> Result<Vec<(Uuid, String)>> {
        let Some(runtime) = &self.runtime else {
            return Ok(Vec::new());
        };
        let orchestrator = &runtime.orchestrator;
        let instance = orchestrator.instance();
        let live = sqlx::query!(
            r#"SELECT s.session_id AS "id!", v.vm_id, v.container_id,
                      v.orchestrator AS "orchestrator!"
               FROM auth_sessions s JOIN vms v ON v.vm_id = s.vm_id
               WHERE s.status IN ('pending', 'authenticating') AND v.destroyed_at IS NULL
                 AND v.status = 'running' AND v.orchestrator IS NOT NULL"#
        )
        .fetch_all(&self.pool)
        .await?;
        let listed = orchestrator.list().await?;
        let mut gone = Vec::new();
        for row in &live {
            if row.orchestrator == instance {
                let container = row.container_id.as_deref().unwrap_or(&row.vm_id);
                match listed.iter().find(|c| c.id == container) {
                    None => gone.push((row.id, "the login sandbox vanished".to_string())),
                    Some(c) if c.state.is_terminal() => gone.push((
                        row.id,
                        format!("the login sandbox ended ({})", describe(&c.state)),
                    )),
                    Some(_) => {}
                }
            } else if crate::runtime::local::instance_alive(&row.orchestrator) == Some(false) {
                gone.push((
                    row.id,
                    "the polydev process running the login sandbox ended".to_string(),
                ));
            }
        }
        let owned = sqlx::query_scalar!(
            r#"SELECT vm_id AS "vm_id!" FROM vms
               WHERE type = 'login' AND orchestrator = $1 AND destroyed_at IS NULL"#,
            instance
        )
        .fetch_all(&self.pool)
        .await?;
        for container in listed
            .iter()
            .filter(|c| c.name.starts_with(LOGIN_NAME_PREFIX))
        {
            if !owned.contains(&container.name) {
                tracing::warn!(name = %container.name, "stopping an orphaned login sandbox");
                orchestrator.stop(&container.id).await?;
            }
        }
        Ok(gone)
    }
}

fn describe(state: &State) -> String {
    match state {
        State::Exited { code, reason } => format!("exit code {code}, {}", reason.as_str()),
        State::Failed(why) => format!("failed: {why}"),
        State::Lost => "its node was lost".into(),
        State::Pending | State::Running => "running".into(),
    }
}
