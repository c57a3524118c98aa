//! Credential grants and server-run CLI jobs (docs/cli-backends.md, "In runtime containers").
//!
//! A **grant** is the user's CLI credential sealed by a client that holds the user's keys to
//! one claimed container's agent key (namespace `runtime.grant`, row = the container id). The
//! server stores it in the container's row and hands it to that container's agent with each
//! job; it cannot open it. It dies with the container.
//!
//! A **granted run** is a job the server itself submits for a perspectives call: it seals the
//! command (it has the prompt anyway) with an ephemeral X25519 output key of this one call
//! inside, waits for the job, and opens its output in memory. `job_executions` keeps only the
//! envelopes; the ephemeral private key is dropped when the call returns, so nobody can open
//! them later.

use std::time::{Duration, Instant};

use polydev_agent::proto::{
    COMMAND_NAMESPACE, GRANT_NAMESPACE, JobCommand, MAX_SEALED_GRANT, STDERR_NAMESPACE,
    STDOUT_NAMESPACE,
};
use polydev_zk::{Context, X25519KeyPair};
use serde::{Deserialize, Serialize};
use uuid::Uuid;
use zeroize::Zeroizing;

use super::pool::Runtime;
use crate::error::{Error, Result};

/// The CLIs a grant can be for, and the provider pool whose containers run each.
pub const GRANT_CLIS: [(&str, &str); 3] = [
    ("claude", "anthropic"),
    ("codex", "openai"),
    ("gemini", "google"),
];

/// The provider pool whose containers run `cli`.
pub fn provider_of_cli(cli: &str) -> Option<&'static str> {
    GRANT_CLIS
        .iter()
        .find(|(name, _)| *name == cli)
        .map(|(_, provider)| *provider)
}

/// What a client uploads: `PUT /v1/runtime/containers/{id}/grant`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PutGrant {
    /// `claude`, `codex` or `gemini`: the CLI of the container's provider.
    pub cli: String,
    /// A sealed box of a `Grant` (`{"cli", "files"}`) to the container's public key, namespace
    /// `runtime.grant`, this user, row = the container id.
    pub sealed: String,
}

/// A container's grant as its user reads it (no envelope).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct GrantView {
    pub container_id: Uuid,
    pub cli: String,
    pub granted_at: chrono::DateTime<chrono::Utc>,
}

/// How a granted run ended.
#[derive(Debug)]
pub enum GrantedRun {
    /// The user has no live container of this CLI with a grant.
    NotConnected,
    /// The deadline came first; the job was cancelled.
    TimedOut,
    Finished(GrantedOutput),
}

/// A finished granted run, its output opened.
#[derive(Debug)]
pub struct GrantedOutput {
    pub job_id: Uuid,
    pub container_id: Uuid,
    pub exit_code: Option<i32>,
    pub failure_reason: Option<String>,
    pub truncated: bool,
    pub stdout: Zeroizing<Vec<u8>>,
    pub stderr: Zeroizing<Vec<u8>>,
}

impl Runtime {
    /// Stores a grant on the caller's claimed container (replacing any earlier one). Unknown,
    /// foreign and destroyed containers are "not found"; the envelope must be for this user,
    /// this container's row and key, and the CLI of its provider.
    pub async fn put_grant(
        &self,
        user_id: Uuid,
        container_id: Uuid,
        grant: &PutGrant,
    ) -> Result<GrantView> {
        if grant.sealed.len() > MAX_SEALED_GRANT {
            return Err(Error::TooLarge(format!(
                "`sealed` is {} bytes; at most {MAX_SEALED_GRANT}",
                grant.sealed.len()
            )));
        }
        let provider = provider_of_cli(&grant.cli)
            .ok_or_else(|| Error::Invalid("`cli` must be `claude`, `codex` or `gemini`".into()))?;
        let container = sqlx::query!(
            r#"SELECT provider AS "provider!", agent_public_key FROM runtime_containers
               WHERE id = $1 AND user_id = $2 AND status IN ('assigned', 'executing')"#,
            container_id,
            user_id
        )
        .fetch_optional(&self.pool)
        .await?
        .ok_or(Error::NotFound("container"))?;
        if container.provider != provider {
            return Err(Error::Invalid(format!(
                "a `{}` grant is for a container of provider `{provider}`; this one is `{}`",
                grant.cli, container.provider
            )));
        }
        let header = polydev_zk::inspect_sealed(&grant.sealed)
            .map_err(|e| Error::Invalid(format!("`sealed` is not a sealed box: {e}")))?;
        if header.namespace != GRANT_NAMESPACE
            || header.user_id != user_id.to_string()
            || header.row_id != container_id.to_string()
            || Some(header.recipient_key()) != container.agent_public_key
        {
            return Err(Error::Invalid(format!(
                "`sealed` must be sealed to this container's public key for namespace `{GRANT_NAMESPACE}`, this user and row = the container id"
            )));
        }
        sqlx::query_as!(
            GrantView,
            r#"UPDATE runtime_containers
               SET credential_grant = $3, grant_cli = $4, granted_at = NOW()
               WHERE id = $1 AND user_id = $2 AND status IN ('assigned', 'executing')
               RETURNING id AS container_id, grant_cli AS "cli!", granted_at AS "granted_at!""#,
            container_id,
            user_id,
            grant.sealed,
            grant.cli
        )
        .fetch_optional(&self.pool)
        .await?
        .ok_or(Error::NotFound("container"))
    }

    /// Removes the grant of the caller's container (the container stays).
    pub async fn delete_grant(&self, user_id: Uuid, container_id: Uuid) -> Result<()> {
        let removed = sqlx::query_scalar!(
            "UPDATE runtime_containers
             SET credential_grant = NULL, grant_cli = NULL, granted_at = NULL
             WHERE id = $1 AND user_id = $2 AND status IN ('assigned', 'executing')
               AND credential_grant IS NOT NULL
             RETURNING id",
            container_id,
            user_id
        )
        .fetch_optional(&self.pool)
        .await?;
        removed.map(|_| ()).ok_or(Error::NotFound("grant"))
    }

    /// The CLIs the user has a live container with a grant for (one query).
    pub async fn granted_clis(&self, user_id: Uuid) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar!(
            r#"SELECT DISTINCT grant_cli AS "cli!" FROM runtime_containers
               WHERE user_id = $1 AND grant_cli IS NOT NULL AND credential_grant IS NOT NULL
                 AND agent_public_key IS NOT NULL AND status IN ('assigned', 'executing')"#,
            user_id
        )
        .fetch_all(&self.pool)
        .await?)
    }

    async fn granted_container(&self, user_id: Uuid, cli: &str) -> Result<Option<(Uuid, String)>> {
        let row = sqlx::query!(
            r#"SELECT id, agent_public_key AS "public_key!" FROM runtime_containers
               WHERE user_id = $1 AND grant_cli = $2 AND credential_grant IS NOT NULL
                 AND agent_public_key IS NOT NULL AND status IN ('assigned', 'executing')
               ORDER BY granted_at DESC LIMIT 1"#,
            user_id,
            cli
        )
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| (r.id, r.public_key)))
    }

    /// Runs `command` in the user's container granted for `cli`, until `deadline`: sealed to
    /// the container with an ephemeral output key, whose private half opens the output here and
    /// is then dropped. At the deadline the job is cancelled.
    pub async fn run_granted(
        &self,
        user_id: Uuid,
        cli: &str,
        mut command: JobCommand,
        deadline: Instant,
    ) -> Result<GrantedRun> {
        let Some((container_id, container_key)) = self.granted_container(user_id, cli).await?
        else {
            return Ok(GrantedRun::NotConnected);
        };
        let output_keys = X25519KeyPair::generate()
            .map_err(|e| Error::Internal(format!("cannot make an output key: {e}")))?;
        command.output_public_key = Some(output_keys.public_key());
        let job_id = Uuid::new_v4();
        let (user, row) = (user_id.to_string(), job_id.to_string());
        let plain = Zeroizing::new(
            serde_json::to_vec(&command)
                .map_err(|e| Error::Internal(format!("a job command: {e}")))?,
        );
        let sealed = polydev_zk::seal_to(
            &container_key,
            &Context {
                namespace: COMMAND_NAMESPACE,
                user_id: &user,
                row_id: &row,
            },
            &plain,
        )
        .map_err(|e| Error::Internal(format!("cannot seal the job: {e}")))?;
        drop(plain);
        // From here on the caller may stop waiting at any await (its deadline cut the call, the
        // client left), even while the row commits: the job is then cancelled by a task of its
        // own, and the agent kills the CLI at its next report.
        let mut guard = CancelOnDrop {
            runtime: self.clone(),
            user_id,
            job_id,
            armed: true,
        };
        let mut tx = self.pool.begin().await?;
        sqlx::query!(
            "INSERT INTO job_executions
                 (id, user_id, container_id, job_type, encrypted_command, status,
                  output_truncated, output_public_key)
             VALUES ($1, $2, $3, 'cli', $4, 'queued', false, $5)",
            job_id,
            user_id,
            container_id,
            sealed,
            command.output_public_key
        )
        .execute(&mut *tx)
        .await?;
        sqlx::query!(
            "UPDATE runtime_containers SET last_used_at = NOW() WHERE id = $1",
            container_id
        )
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        self.jobs.notify_waiters();
        let job = loop {
            let notified = self.jobs.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let job = self.job(user_id, job_id).await?;
            if job.is_finished() {
                break job;
            }
            let now = Instant::now();
            if now >= deadline {
                // The guard cancels it: not here, where the caller's own deadline (the same
                // instant) could drop this future before the cancel is written.
                return Ok(GrantedRun::TimedOut);
            }
            // Woken by this process; other processes' writes are seen within 250 ms.
            let wait = (deadline - now).min(Duration::from_millis(250));
            let _ = tokio::time::timeout(wait, notified).await;
        };
        guard.armed = false;
        let open = |text: Option<&str>, namespace: &str| -> Result<Zeroizing<Vec<u8>>> {
            let mut out = Zeroizing::new(Vec::new());
            let prefix = format!("{job_id}/");
            for line in text.unwrap_or("").lines().filter(|l| !l.is_empty()) {
                let header = polydev_zk::inspect_sealed(line)
                    .map_err(|e| Error::Internal(format!("a stored output chunk: {e}")))?;
                if !header.row_id.starts_with(&prefix) || header.namespace != namespace {
                    return Err(Error::Internal("an output chunk of another job".into()));
                }
                let ctx = Context {
                    namespace,
                    user_id: &user,
                    row_id: &header.row_id,
                };
                let piece = output_keys
                    .open(&ctx, line)
                    .map_err(|_| Error::Internal("an output chunk does not open".into()))?;
                out.extend_from_slice(&piece);
            }
            Ok(out)
        };
        Ok(GrantedRun::Finished(GrantedOutput {
            job_id,
            container_id,
            exit_code: job.exit_code,
            failure_reason: job.failure_reason.clone(),
            truncated: job.output_truncated,
            stdout: open(job.encrypted_stdout.as_deref(), STDOUT_NAMESPACE)?,
            stderr: open(job.encrypted_stderr.as_deref(), STDERR_NAMESPACE)?,
        }))
    }
}

/// Cancels a granted run's job when its waiter goes away before it finished.
struct CancelOnDrop {
    runtime: Runtime,
    user_id: Uuid,
    job_id: Uuid,
    armed: bool,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (runtime, user_id, job_id) = (self.runtime.clone(), self.user_id, self.job_id);
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                // `Conflict`: it finished in between; nothing to cancel.
                let _ = runtime.cancel(user_id, job_id).await;
            });
        }
    }
}
