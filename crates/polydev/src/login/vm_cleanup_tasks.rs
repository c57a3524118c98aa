//! The teardown queue: a `vm_cleanup_tasks` row per login sandbox to tear down (scheduled when
//! its session completes, fails, times out or loses its agent, or is retried), and the worker
//! every `polydev serve` runs.
//!
//! The worker takes one due task at a time with `FOR UPDATE SKIP LOCKED` (so replicas never
//! take the same one), tears the sandbox down through the orchestrator (the local driver kills
//! the sandbox's processes, removes its cgroups, its directory and the Unix sockets of its
//! tunnels; Nomad stops and purges the job), and marks the task `completed` and the `vms` row
//! `destroyed`. A failed attempt records `error_message` and waits `min(2^attempts s,
//! max_backoff)` before the next. A local sandbox can only be stopped by the process that
//! started it, so a process takes only its own instance's tasks, and those of local instances
//! on this machine that have ended: their sandboxes died with them (`--die-with-parent`), and
//! the driver sweeps the directories they left.

use std::time::Duration;

use uuid::Uuid;

use super::Login;
use crate::error::Result;

/// What one attempt did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// Nothing due that this process may take.
    Idle,
    Completed {
        vm_id: String,
    },
    Failed {
        vm_id: String,
        error: String,
    },
}

impl Login {
    /// Queues the teardown of `vm_id` (once: a pending task is not doubled) and wakes this
    /// process's worker.
    pub async fn schedule_cleanup(&self, vm_id: &str, session: Uuid) -> Result<()> {
        sqlx::query!(
            "INSERT INTO vm_cleanup_tasks (vm_id, session_id, cleanup_at, status, attempts)
             VALUES ($1, $2, NOW(), 'pending', 0)
             ON CONFLICT (vm_id) WHERE status = 'pending' DO NOTHING",
            vm_id,
            session.to_string()
        )
        .execute(&self.pool)
        .await?;
        sqlx::query!(
            "UPDATE vms SET status = 'stopping' WHERE vm_id = $1 AND destroyed_at IS NULL",
            vm_id
        )
        .execute(&self.pool)
        .await?;
        self.cleanup.notify_one();
        Ok(())
    }

    /// The orchestrator instances whose due tasks this process may take.
    async fn instances_to_clean(&self) -> Result<Vec<String>> {
        let Some(runtime) = &self.runtime else {
            return Ok(Vec::new());
        };
        let mine = runtime.orchestrator.instance();
        let due = sqlx::query_scalar!(
            r#"SELECT DISTINCT v.orchestrator AS "orchestrator!"
               FROM vm_cleanup_tasks t JOIN vms v ON v.vm_id = t.vm_id
               WHERE t.status = 'pending' AND t.cleanup_at <= NOW()
                 AND v.orchestrator IS NOT NULL"#
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(due
            .into_iter()
            .filter(|instance| {
                *instance == mine || crate::runtime::local::instance_alive(instance) == Some(false)
            })
            .collect())
    }

    /// Takes one due task and tries to tear its sandbox down.
    pub async fn cleanup_once(&self) -> Result<Attempt> {
        let Some(runtime) = &self.runtime else {
            return Ok(Attempt::Idle);
        };
        let instances = self.instances_to_clean().await?;
        if instances.is_empty() {
            return Ok(Attempt::Idle);
        }
        let mine = runtime.orchestrator.instance();
        let mut tx = self.pool.begin().await?;
        let Some(task) = sqlx::query!(
            r#"SELECT t.id, t.vm_id AS "vm_id!", t.attempts, v.container_id,
                      v.orchestrator AS "orchestrator!"
               FROM vm_cleanup_tasks t JOIN vms v ON v.vm_id = t.vm_id
               WHERE t.status = 'pending' AND t.cleanup_at <= NOW()
                 AND v.orchestrator = ANY($1)
               ORDER BY t.cleanup_at
               LIMIT 1
               FOR UPDATE OF t SKIP LOCKED"#,
            &instances
        )
        .fetch_optional(&mut *tx)
        .await?
        else {
            return Ok(Attempt::Idle);
        };
        let torn_down = if task.orchestrator == mine {
            let container = task.container_id.as_deref().unwrap_or(&task.vm_id);
            match runtime.orchestrator.stop(container).await {
                Ok(()) => match runtime.orchestrator.inspect(container).await {
                    Ok(None) => Ok(()),
                    Ok(Some(info)) => Err(format!("still there after stop: {:?}", info.state)),
                    Err(error) => Err(error.to_string()),
                },
                Err(error) => Err(error.to_string()),
            }
        } else {
            // A local instance of this machine that has ended: its sandboxes died with it;
            // what it left on disk goes now.
            runtime
                .orchestrator
                .clean_up_after(&task.orchestrator)
                .await
                .map_err(|e| e.to_string())
        };
        let attempt = match torn_down {
            Ok(()) => {
                sqlx::query!(
                    "UPDATE vm_cleanup_tasks SET status = 'completed', completed_at = NOW(),
                         attempts = attempts + 1
                     WHERE id = $1",
                    task.id
                )
                .execute(&mut *tx)
                .await?;
                sqlx::query!(
                    "UPDATE vms SET status = 'destroyed', destroyed_at = COALESCE(destroyed_at, NOW())
                     WHERE vm_id = $1",
                    task.vm_id
                )
                .execute(&mut *tx)
                .await?;
                Attempt::Completed {
                    vm_id: task.vm_id.clone(),
                }
            }
            Err(error) => {
                let backoff = self.backoff(task.attempts + 1);
                sqlx::query!(
                    "UPDATE vm_cleanup_tasks SET attempts = attempts + 1, error_message = $2,
                         cleanup_at = NOW() + make_interval(secs => $3)
                     WHERE id = $1",
                    task.id,
                    super::truncate(&error, 500),
                    backoff.as_secs_f64()
                )
                .execute(&mut *tx)
                .await?;
                tracing::warn!(vm = %task.vm_id, %error, ?backoff, "login sandbox teardown failed; will retry");
                Attempt::Failed {
                    vm_id: task.vm_id.clone(),
                    error,
                }
            }
        };
        tx.commit().await?;
        Ok(attempt)
    }

    /// The wait after `attempts` failed attempts: 2^(attempts - 1) × the sweep interval,
    /// at most `max_backoff`.
    fn backoff(&self, attempts: i64) -> Duration {
        let exponent = u32::try_from(attempts.clamp(1, 20) - 1).unwrap_or(0);
        self.config
            .sweep_interval
            .saturating_mul(2u32.saturating_pow(exponent))
            .min(self.config.max_backoff)
    }

    pub(crate) async fn cleanup_loop(self, shutdown: tokio_util::sync::CancellationToken) {
        loop {
            // Drain what is due, then wait for a wake-up or the interval.
            loop {
                match self.cleanup_once().await {
                    Ok(Attempt::Idle) => break,
                    Ok(Attempt::Completed { vm_id }) => {
                        tracing::info!(vm = %vm_id, "login sandbox torn down")
                    }
                    Ok(Attempt::Failed { .. }) => {}
                    Err(error) => {
                        tracing::warn!(%error, "login cleanup failed");
                        break;
                    }
                }
                if shutdown.is_cancelled() {
                    return;
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = self.cleanup.notified() => {}
                () = tokio::time::sleep(self.config.sweep_interval) => {}
            }
        }
    }
}
