//! Sealed jobs in `job_executions` (docs/runtime.md): the user's side (keys, submit, read,
//! follow, cancel) and the agent's (register, next, output, finish). The server handles only
//! envelopes: it checks their headers (who, where, to whom) and never holds a key that opens
//! them.

use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::{Stream, StreamExt};
use polydev_agent::proto::{
    Assignment, COMMAND_NAMESPACE, Finish, Limits, OutputAck, OutputBatch, output_row,
};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use uuid::Uuid;

use super::pool::{Runtime, sha256_hex};
use crate::error::{Error, Result};

/// The largest sealed command (the API refuses bodies over 64 KiB).
pub const MAX_SEALED_COMMAND: usize = 48 * 1024;
/// Sealed output stored per stream of a job; beyond it chunks are dropped and the job marked
/// truncated (the agent's plaintext limit normally stops output well before).
pub const MAX_STORED_OUTPUT: usize = 4 * 1024 * 1024;
/// How long the agent's `next` waits for a job before answering "nothing yet".
pub const NEXT_WAIT: Duration = Duration::from_secs(25);

/// A job as its user reads it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Job {
    pub id: Uuid,
    pub container_id: Option<Uuid>,
    pub job_type: String,
    pub status: String,
    pub encrypted_command: String,
    /// Sealed chunks, one per line, in order (namespace `job.stdout`, row `<job>/<seq>`).
    pub encrypted_stdout: Option<String>,
    pub encrypted_stderr: Option<String>,
    pub encryption_metadata: Option<serde_json::Value>,
    pub exit_code: Option<i32>,
    pub duration_ms: Option<i32>,
    pub output_truncated: bool,
    pub failure_reason: Option<String>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
}

impl Job {
    pub fn is_finished(&self) -> bool {
        matches!(self.status.as_str(), "succeeded" | "failed" | "cancelled")
    }
}

/// What a user submits.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SubmitJob {
    /// Chosen by the client: the sealed command is bound to it.
    pub id: Uuid,
    pub container_id: Uuid,
    #[serde(default = "default_job_type")]
    pub job_type: String,
    /// A sealed box to the container's public key (namespace `job.command`, row = `id`).
    pub encrypted_command: String,
    #[serde(default)]
    pub encryption_metadata: Option<serde_json::Value>,
    /// At most the server's limit (and the default).
    #[serde(default)]
    pub wall_clock_ms: Option<u64>,
}

fn default_job_type() -> String {
    "cli".into()
}

/// A user's X25519 public key and wrapped private key.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct UserKey {
    pub public_key: String,
    pub wrapped_private_key: String,
}

/// One step of a followed job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Follow {
    Output {
        stream: &'static str,
        sealed: String,
    },
    Finished(Box<Job>),
}

/// An agent, authenticated by its container's bootstrap secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Agent {
    pub container: Uuid,
}

impl Runtime {
    pub async fn put_user_key(&self, user_id: Uuid, key: &UserKey) -> Result<()> {
        super::check_public_key(&key.public_key)?;
        let header = polydev_zk::inspect(&key.wrapped_private_key).map_err(|e| {
            Error::Invalid(format!("`wrapped_private_key` is not an envelope: {e}"))
        })?;
        let user = user_id.to_string();
        if header.namespace.as_deref() != Some(polydev_zk::USER_KEY_NAMESPACE)
            || header.user_id != user
            || header.row_id.as_deref() != Some(user.as_str())
        {
            return Err(Error::Invalid(format!(
                "`wrapped_private_key` must be an item envelope of namespace `{}` for this user (row = the user id)",
                polydev_zk::USER_KEY_NAMESPACE
            )));
        }
        if key.wrapped_private_key.len() > 4096 {
            return Err(Error::TooLarge("`wrapped_private_key` is too large".into()));
        }
        sqlx::query!(
            "INSERT INTO runtime_user_keys (user_id, public_key, wrapped_private_key)
             VALUES ($1, $2, $3)
             ON CONFLICT (user_id) DO UPDATE
                 SET public_key = EXCLUDED.public_key,
                     wrapped_private_key = EXCLUDED.wrapped_private_key",
            user_id,
            key.public_key,
            key.wrapped_private_key
        )
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn user_key(&self, user_id: Uuid) -> Result<UserKey> {
        sqlx::query_as!(
            UserKey,
            "SELECT public_key, wrapped_private_key FROM runtime_user_keys WHERE user_id = $1",
            user_id
        )
        .fetch_optional(&self.pool)
        .await?
        .ok_or(Error::NotFound("runtime key"))
    }

    /// Queues a job on the user's container. Unknown containers and other users' are "not
    /// found"; the sealed command must be for this user, this job and this container's key.
    pub async fn submit(&self, user_id: Uuid, job: &SubmitJob) -> Result<Job> {
        if job.encrypted_command.len() > MAX_SEALED_COMMAND {
            return Err(Error::TooLarge(format!(
                "`encrypted_command` is {} bytes; at most {MAX_SEALED_COMMAND}",
                job.encrypted_command.len()
            )));
        }
        if !matches!(job.job_type.as_str(), "cli" | "tool" | "function") {
            return Err(Error::Invalid(
                "`job_type` must be `cli`, `tool` or `function`".into(),
            ));
        }
        if job
            .encryption_metadata
            .as_ref()
            .is_some_and(|m| m.to_string().len() > 4096)
        {
            return Err(Error::TooLarge("`encryption_metadata` is too large".into()));
        }
        let mut tx = self.pool.begin().await?;
        let container = sqlx::query!(
            r#"SELECT agent_public_key AS "public_key!" FROM runtime_containers
               WHERE id = $1 AND user_id = $2 AND status IN ('assigned', 'executing')
               FOR UPDATE"#,
            job.container_id,
            user_id
        )
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(Error::NotFound("container"))?;
        let has_key = sqlx::query_scalar!(
            r#"SELECT EXISTS (SELECT 1 FROM runtime_user_keys WHERE user_id = $1) AS "exists!""#,
            user_id
        )
        .fetch_one(&mut *tx)
        .await?;
        if !has_key {
            return Err(Error::Conflict(
                "register your X25519 public key first (PUT /v1/runtime/keys): job output is sealed to it"
                    .into(),
            ));
        }
        let header = polydev_zk::inspect_sealed(&job.encrypted_command)
            .map_err(|e| Error::Invalid(format!("`encrypted_command` is not a sealed box: {e}")))?;
        if header.namespace != COMMAND_NAMESPACE
            || header.user_id != user_id.to_string()
            || header.row_id != job.id.to_string()
        {
            return Err(Error::Invalid(format!(
                "`encrypted_command` must be sealed for namespace `{COMMAND_NAMESPACE}`, this user and row = the job id"
            )));
        }
        if header.recipient_key() != container.public_key {
            return Err(Error::Invalid(
                "`encrypted_command` is sealed to another key than this container's".into(),
            ));
        }
        let id = sqlx::query_scalar!(
            "INSERT INTO job_executions
                 (id, user_id, container_id, job_type, encrypted_command, encryption_metadata,
                  status, output_truncated)
             VALUES ($1, $2, $3, $4, $5, $6, 'queued', false)
             RETURNING id",
            job.id,
            user_id,
            job.container_id,
            job.job_type,
            job.encrypted_command,
            job.encryption_metadata
        )
        .fetch_one(&mut *tx)
        .await?;
        sqlx::query!(
            "UPDATE runtime_containers SET last_used_at = NOW() WHERE id = $1",
            job.container_id
        )
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        self.jobs.notify_waiters();
        self.job(user_id, id).await
    }

    pub async fn job(&self, user_id: Uuid, id: Uuid) -> Result<Job> {
        sqlx::query_as!(
            Job,
            r#"SELECT id, container_id, job_type, status AS "status!", encrypted_command,
                      encrypted_stdout, encrypted_stderr, encryption_metadata, exit_code,
                      duration_ms, COALESCE(output_truncated, false) AS "output_truncated!",
                      failure_reason, created_at, started_at, completed_at
               FROM job_executions WHERE id = $1 AND user_id = $2"#,
            id,
            user_id
        )
        .fetch_optional(&self.pool)
        .await?
        .ok_or(Error::NotFound("job"))
    }

    /// Cancels a queued or running job (the agent kills it at its next report).
    pub async fn cancel(&self, user_id: Uuid, id: Uuid) -> Result<Job> {
        let cancelled = sqlx::query_scalar!(
            "UPDATE job_executions
             SET status = 'cancelled', failure_reason = 'cancelled by the user',
                 completed_at = NOW()
             WHERE id = $1 AND user_id = $2 AND status IN ('queued', 'running')
             RETURNING id",
            id,
            user_id
        )
        .fetch_optional(&self.pool)
        .await?;
        let job = self.job(user_id, id).await?;
        if cancelled.is_none() {
            return Err(Error::Conflict(format!(
                "the job is already {}",
                job.status
            )));
        }
        self.jobs.notify_waiters();
        Ok(job)
    }

    /// The job's output as it comes, then the finished row. Ends when the job has finished.
    pub fn follow(
        &self,
        user_id: Uuid,
        id: Uuid,
    ) -> impl Stream<Item = Result<Follow>> + Send + use<> {
        let runtime = self.clone();
        futures_util::stream::unfold(
            (runtime, [0usize, 0usize], false),
            move |(runtime, mut offsets, done)| async move {
                if done {
                    return None;
                }
                let jobs = runtime.jobs.clone();
                loop {
                    let notified = jobs.notified();
                    tokio::pin!(notified);
                    notified.as_mut().enable();
                    let job = match runtime.job(user_id, id).await {
                        Ok(job) => job,
                        Err(error) => return Some((vec![Err(error)], (runtime, offsets, true))),
                    };
                    let mut steps = Vec::new();
                    for (i, (stream, text)) in [
                        ("stdout", &job.encrypted_stdout),
                        ("stderr", &job.encrypted_stderr),
                    ]
                    .into_iter()
                    .enumerate()
                    {
                        let text = text.as_deref().unwrap_or("");
                        if text.len() > offsets[i] {
                            for line in text[offsets[i]..].lines().filter(|l| !l.is_empty()) {
                                steps.push(Ok(Follow::Output {
                                    stream,
                                    sealed: line.to_string(),
                                }));
                            }
                            offsets[i] = text.len();
                        }
                    }
                    let finished = job.is_finished();
                    if finished {
                        steps.push(Ok(Follow::Finished(Box::new(job))));
                    }
                    if !steps.is_empty() {
                        return Some((steps, (runtime, offsets, finished)));
                    }
                    // Woken by this process; other processes' writes are seen within 250 ms.
                    let _ = tokio::time::timeout(Duration::from_millis(250), notified).await;
                }
            },
        )
        .flat_map(futures_util::stream::iter)
    }

    // ---- the agent's side ----

    /// `Bearer <container id>.<bootstrap secret>`: the container, if the secret is its own and
    /// it is not destroyed.
    pub async fn authenticate_agent(&self, header: Option<&str>) -> Result<Agent> {
        let credential = header
            .and_then(|h| h.strip_prefix("Bearer "))
            .ok_or(Error::Unauthorized(crate::error::AuthFailure::Missing))?;
        let (id, secret) = credential.split_once('.').ok_or_else(unknown_agent)?;
        let id: Uuid = id.parse().map_err(|_| unknown_agent())?;
        let stored = sqlx::query_scalar!(
            "SELECT bootstrap_hash FROM runtime_containers
             WHERE id = $1 AND status IS DISTINCT FROM 'destroyed'",
            id
        )
        .fetch_optional(&self.pool)
        .await?
        .flatten()
        .ok_or_else(unknown_agent)?;
        let presented = sha256_hex(secret);
        if !bool::from(presented.as_bytes().ct_eq(stored.as_bytes())) {
            return Err(unknown_agent());
        }
        Ok(Agent { container: id })
    }

    /// The next queued job of the agent's container (waiting up to [`NEXT_WAIT`]), marked
    /// running, its container executing.
    pub async fn next_job(&self, agent: Agent) -> Result<Option<Assignment>> {
        let deadline = tokio::time::Instant::now() + NEXT_WAIT;
        loop {
            let notified = self.jobs.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(assignment) = self.take_job(agent).await? {
                return Ok(Some(assignment));
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(None);
            }
            let _ = tokio::time::timeout(Duration::from_millis(250), notified).await;
        }
    }

    async fn take_job(&self, agent: Agent) -> Result<Option<Assignment>> {
        /// Whether a container in `status` takes a job now (destroyed: never again).
        fn takes_jobs(status: Option<&str>) -> Result<bool> {
            match status {
                Some("destroyed") => Err(Error::NotFound("container")),
                Some("assigned") => Ok(true),
                _ => Ok(false), // not claimed yet, or busy
            }
        }
        // Read before locking: the agent of a warm container polls until it is claimed, and a
        // lock on its row at the moment of a claim would make the claim skip it
        // (`SKIP LOCKED`) and find no container ready.
        let status = sqlx::query_scalar!(
            "SELECT status FROM runtime_containers WHERE id = $1",
            agent.container
        )
        .fetch_one(&self.pool)
        .await?;
        if !takes_jobs(status.as_deref())? {
            return Ok(None);
        }
        let mut tx = self.pool.begin().await?;
        let container = sqlx::query!(
            "SELECT status, decodo_port, credential_grant FROM runtime_containers
             WHERE id = $1 FOR UPDATE",
            agent.container
        )
        .fetch_one(&mut *tx)
        .await?;
        if !takes_jobs(container.status.as_deref())? {
            return Ok(None);
        }
        let Some(job) = sqlx::query!(
            "UPDATE job_executions SET status = 'running', started_at = NOW()
             WHERE id = (SELECT id FROM job_executions
                         WHERE container_id = $1 AND status = 'queued'
                         ORDER BY created_at LIMIT 1 FOR UPDATE SKIP LOCKED)
             RETURNING id, user_id, encrypted_command, output_public_key",
            agent.container
        )
        .fetch_optional(&mut *tx)
        .await?
        else {
            return Ok(None);
        };
        // A job with its own output key (a server-run CLI call) needs no user key.
        let user_key = sqlx::query_scalar!(
            "SELECT public_key FROM runtime_user_keys WHERE user_id = $1",
            job.user_id
        )
        .fetch_optional(&mut *tx)
        .await?
        .or(job.output_public_key)
        .ok_or_else(|| Error::Internal("a queued job whose output has no key".into()))?;
        sqlx::query!(
            "UPDATE runtime_containers SET status = 'executing', last_used_at = NOW()
             WHERE id = $1",
            agent.container
        )
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        // The local driver's sandbox names its tunnel in `HTTP(S)_PROXY` (the host end adds
        // the gate's credentials); a Nomad task reaches the gate itself, so the job is handed
        // the user's port with the credentials (docs/cli-backends.md, "Proxy ports").
        let proxy = match (&self.proxies, container.decodo_port) {
            (Some(proxies), Some(port)) if self.orchestrator.driver() == "nomad" => {
                Some(proxies.config.url(port as u16))
            }
            _ => None,
        };
        Ok(Some(Assignment {
            job_id: job.id.to_string(),
            user_id: job.user_id.to_string(),
            user_public_key: user_key,
            encrypted_command: job.encrypted_command,
            limits: Limits {
                wall_clock_ms: self.config.job_wall_clock.as_millis() as u64,
                max_output_bytes: self.config.max_output_bytes,
            },
            proxy,
            grant: container.credential_grant,
        }))
    }

    /// Appends sealed output chunks (checked: each for this job's user, row and key).
    pub async fn append_output(
        &self,
        agent: Agent,
        job_id: Uuid,
        batch: &OutputBatch,
    ) -> Result<OutputAck> {
        let job = sqlx::query!(
            r#"SELECT j.user_id AS "user_id!", j.status AS "status!",
                      COALESCE(j.output_public_key, k.public_key) AS public_key
               FROM job_executions j LEFT JOIN runtime_user_keys k ON k.user_id = j.user_id
               WHERE j.id = $1 AND j.container_id = $2"#,
            job_id,
            agent.container
        )
        .fetch_optional(&self.pool)
        .await?
        .ok_or(Error::NotFound("job"))?;
        // Sealed to the job's own output key when it has one, else to the user's.
        if job.status != "running" {
            return Ok(OutputAck {
                cancelled: job.status == "cancelled",
            });
        }
        let user = job.user_id.to_string();
        let (mut stdout, mut stderr) = (String::new(), String::new());
        for chunk in &batch.chunks {
            let header = polydev_zk::inspect_sealed(&chunk.sealed)
                .map_err(|e| Error::Invalid(format!("an output chunk is not a sealed box: {e}")))?;
            if header.namespace != chunk.stream.namespace()
                || header.user_id != user
                || header.row_id != output_row(&job_id.to_string(), chunk.seq)
                || Some(header.recipient_key()) != job.public_key
            {
                return Err(Error::Invalid(
                    "an output chunk is not sealed for this job's user, row and key".into(),
                ));
            }
            let text = match chunk.stream {
                polydev_agent::proto::Stream::Stdout => &mut stdout,
                polydev_agent::proto::Stream::Stderr => &mut stderr,
            };
            text.push_str(&chunk.sealed);
            text.push('\n');
        }
        let max = MAX_STORED_OUTPUT as i32;
        let status = sqlx::query_scalar!(
            r#"UPDATE job_executions SET
                 encrypted_stdout = CASE WHEN COALESCE(length(encrypted_stdout), 0) + length($3) <= $6
                                         THEN COALESCE(encrypted_stdout, '') || $3
                                         ELSE encrypted_stdout END,
                 encrypted_stderr = CASE WHEN COALESCE(length(encrypted_stderr), 0) + length($4) <= $6
                                         THEN COALESCE(encrypted_stderr, '') || $4
                                         ELSE encrypted_stderr END,
                 output_truncated = COALESCE(output_truncated, false) OR $5
                     OR COALESCE(length(encrypted_stdout), 0) + length($3) > $6
                     OR COALESCE(length(encrypted_stderr), 0) + length($4) > $6
               WHERE id = $1 AND container_id = $2
               RETURNING status AS "status!""#,
            job_id,
            agent.container,
            stdout,
            stderr,
            batch.truncated,
            max
        )
        .fetch_one(&self.pool)
        .await?;
        if !batch.chunks.is_empty() {
            self.jobs.notify_waiters();
        }
        Ok(OutputAck {
            cancelled: status == "cancelled",
        })
    }

    /// Records how the job ended; its container is free for the next job.
    pub async fn finish_job(&self, agent: Agent, job_id: Uuid, finish: &Finish) -> Result<()> {
        let error = finish.error.as_deref().map(|e| truncate(e, 200));
        let duration = i32::try_from(finish.duration_ms).unwrap_or(i32::MAX);
        let mut tx = self.pool.begin().await?;
        let updated = sqlx::query_scalar!(
            "UPDATE job_executions SET
                 status = CASE WHEN status = 'cancelled' THEN 'cancelled'
                               WHEN $4::text IS NULL AND $3::int = 0 THEN 'succeeded'
                               ELSE 'failed' END,
                 exit_code = $3, duration_ms = $5,
                 failure_reason = COALESCE(failure_reason, $4),
                 output_truncated = COALESCE(output_truncated, false) OR $6,
                 completed_at = COALESCE(completed_at, NOW())
             WHERE id = $1 AND container_id = $2 AND status IN ('running', 'cancelled')
                   AND exit_code IS NULL AND duration_ms IS NULL
             RETURNING id",
            job_id,
            agent.container,
            finish.exit_code,
            error,
            duration,
            finish.truncated
        )
        .fetch_optional(&mut *tx)
        .await?;
        if updated.is_none() {
            return Err(Error::NotFound("running job"));
        }
        sqlx::query!(
            "UPDATE runtime_containers SET status = 'assigned', last_used_at = NOW()
             WHERE id = $1 AND status = 'executing'",
            agent.container
        )
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        self.jobs.notify_waiters();
        Ok(())
    }
}

fn unknown_agent() -> Error {
    Error::Unauthorized(crate::error::AuthFailure::Unknown)
}

fn truncate(text: &str, max: usize) -> String {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}
