//! Login sessions in `auth_sessions` and their state machine:
//!
//! ```text
//!            first heartbeat                 credential stored
//! pending ─────────────────▶ authenticating ─────────────────▶ completed
//!    │                              │
//!    └──────────────────────────────┴──▶ failed  (timeout, heartbeat lost, sandbox exited,
//!                                                 agent's failure, cancelled by the user)
//! failed / pending / authenticating ──retry──▶ pending (retry_count + 1, a new sandbox)
//! ```
//!
//! `started_at` is when the current attempt's sandbox was asked for, `completed_at` when the
//! session finished (either way), `timeout_at` the attempt's deadline. Every finish schedules
//! the sandbox's teardown ([`super::vm_cleanup_tasks`]) and announces the new state to the
//! signalling streams.

use std::time::{Duration, SystemTime};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use uuid::Uuid;

use super::signal::notify_status;
use super::{IceServer, Login, sha256_hex, truncate};
use crate::error::{AuthFailure, Error, Result};

/// Namespace of the sealed credential a login agent stores (row = the session id, user = the
/// session's user, recipient = the user's runtime X25519 key).
pub const CREDENTIAL_NAMESPACE: &str = "login.credential";
/// Longest `kind` of a credential.
const MAX_KIND: usize = 64;
/// Longest failure reason kept.
const MAX_REASON: usize = 500;
/// The seed of the per-user advisory lock that serialises session starts.
const START_LOCK_SEED: i64 = 0x706f_6c79_6c6f_6731; // "polylog1"

/// True for `pending` and `authenticating`.
pub fn is_live(status: &str) -> bool {
    matches!(status, "pending" | "authenticating")
}

/// A login session as its user (and its agent, on the signalling stream) reads it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Session {
    pub id: Uuid,
    pub provider: String,
    pub status: String,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
    pub timeout_at: Option<DateTime<Utc>>,
    pub last_heartbeat: Option<DateTime<Utc>>,
    pub retry_count: i32,
    pub error_message: Option<String>,
    /// When the agent reported the peers connected.
    pub signaling_completed_at: Option<DateTime<Utc>>,
    /// For `RTCConfiguration.iceServers` (TURN credentials valid for this session only).
    pub ice_servers: Vec<IceServer>,
}

struct Row {
    id: Uuid,
    user_id: Uuid,
    provider: String,
    status: String,
    created_at: DateTime<Utc>,
    started_at: Option<DateTime<Utc>>,
    completed_at: Option<DateTime<Utc>>,
    timeout_at: Option<DateTime<Utc>>,
    last_heartbeat: Option<DateTime<Utc>>,
    retry_count: i32,
    error_message: Option<String>,
    signaling_completed_at: Option<DateTime<Utc>>,
}

/// What the agent reads at start.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AgentView {
    pub provider: String,
    pub status: String,
    /// Where the browser starts (the provider's login page), when the server knows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub login_url: Option<String>,
    /// The user's runtime X25519 public key (base64url, as `/v1/runtime/keys` holds it): seal
    /// the credential to it.
    pub user_public_key: String,
    /// The user this session belongs to (the sealed box's user id).
    pub user_id: Uuid,
    /// The namespace to seal the credential under (row id = the session id).
    pub credential_namespace: String,
    pub ice_servers: Vec<IceServer>,
    pub timeout_at: Option<DateTime<Utc>>,
}

/// The agent of one session, authenticated by its bootstrap secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Agent {
    pub session: Uuid,
    pub user: Uuid,
}

/// What the agent stores when the login completed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Credential {
    /// A polydev-zk sealed box (`pdzs.…`) to the user's runtime key.
    pub sealed: String,
    /// What the credential is (e.g. `claude-code`, `codex`, `gemini-cli`).
    pub kind: String,
}

impl Login {
    fn view(&self, row: Row) -> (Session, Uuid) {
        let ice_servers = self.config.turn.ice_servers(
            row.id,
            SystemTime::now(),
            self.config.session_timeout + Duration::from_secs(300),
        );
        (
            Session {
                id: row.id,
                provider: row.provider,
                status: row.status,
                created_at: row.created_at,
                started_at: row.started_at,
                completed_at: row.completed_at,
                timeout_at: row.timeout_at,
                last_heartbeat: row.last_heartbeat,
                retry_count: row.retry_count,
                error_message: row.error_message,
                signaling_completed_at: row.signaling_completed_at,
                ice_servers,
            },
            row.user_id,
        )
    }

    /// A session whoever it belongs to, with its user.
    pub(crate) async fn session_any(&self, id: Uuid) -> Result<(Session, Uuid)> {
        let row = sqlx::query_as!(
            Row,
            r#"SELECT session_id AS id, user_id AS "user_id!", provider AS "provider!",
                      status AS "status!", created_at AS "created_at!", started_at, completed_at,
                      timeout_at, last_heartbeat, COALESCE(retry_count, 0) AS "retry_count!",
                      error_message, signaling_completed_at
               FROM auth_sessions WHERE session_id = $1 AND user_id IS NOT NULL"#,
            id
        )
        .fetch_optional(&self.pool)
        .await?
        .ok_or(Error::NotFound("login session"))?;
        Ok(self.view(row))
    }

    /// The user's session (another user's is "not found").
    pub async fn session(&self, user: Uuid, id: Uuid) -> Result<Session> {
        match self.session_any(id).await? {
            (session, owner) if owner == user => Ok(session),
            _ => Err(Error::NotFound("login session")),
        }
    }

    /// The user's sessions, newest first (at most 100).
    pub async fn list(&self, user: Uuid) -> Result<Vec<Session>> {
        let rows = sqlx::query_as!(
            Row,
            r#"SELECT session_id AS id, user_id AS "user_id!", provider AS "provider!",
                      status AS "status!", created_at AS "created_at!", started_at, completed_at,
                      timeout_at, last_heartbeat, COALESCE(retry_count, 0) AS "retry_count!",
                      error_message, signaling_completed_at
               FROM auth_sessions WHERE user_id = $1
               ORDER BY created_at DESC LIMIT 100"#,
            user
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|row| self.view(row).0).collect())
    }

    /// Starts a session: the row (`pending`), then its sandbox. At most
    /// [`super::LoginConfig::max_live_per_user`] sessions in progress per user.
    pub async fn create(&self, user: Uuid, provider: &str) -> Result<Session> {
        let runtime = self.require_runtime()?;
        let provider = super::check_provider(provider)?;
        let id = Uuid::new_v4();
        let secret = super::random_hex(32);
        let mut tx = self.pool.begin().await?;
        sqlx::query!(
            "SELECT pg_advisory_xact_lock(hashtextextended($1::uuid::text, $2))::text AS locked",
            user,
            START_LOCK_SEED
        )
        .fetch_one(&mut *tx)
        .await?;
        let live = sqlx::query_scalar!(
            r#"SELECT COUNT(*) AS "count!" FROM auth_sessions
               WHERE user_id = $1 AND status IN ('pending', 'authenticating')"#,
            user
        )
        .fetch_one(&mut *tx)
        .await?;
        if live >= self.config.max_live_per_user {
            return Err(Error::Conflict(format!(
                "{live} login sessions are in progress; at most {} at once (cancel one first)",
                self.config.max_live_per_user
            )));
        }
        sqlx::query!(
            "INSERT INTO auth_sessions
                 (session_id, user_id, provider, status, retry_count, started_at, timeout_at,
                  agent_secret_hash)
             VALUES ($1, $2, $3, 'pending', 0, NOW(), NOW() + make_interval(secs => $4), $5)",
            id,
            user,
            provider,
            self.config.session_timeout.as_secs_f64(),
            sha256_hex(&secret)
        )
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        if let Err(error) = self.launch(runtime, id, user, provider, &secret).await {
            self.finish_failed(id, &format!("the login sandbox could not start: {error}"))
                .await?;
            return Err(error);
        }
        self.session(user, id).await
    }

    fn require_runtime(&self) -> Result<&crate::runtime::Runtime> {
        self.runtime.as_ref().ok_or_else(|| {
            Error::NotConfigured(
                "login sessions run in sandboxes and the container runtime is off: start `polydev serve --runtime local` (or nomad)".into(),
            )
        })
    }

    /// Gives up the session (`failed`, "cancelled by the user") and tears its sandbox down.
    pub async fn cancel(&self, user: Uuid, id: Uuid) -> Result<Session> {
        let session = self.session(user, id).await?;
        if !self.finish_failed(id, "cancelled by the user").await? {
            return Err(Error::Conflict(format!(
                "the login session is already {}",
                session.status
            )));
        }
        self.session(user, id).await
    }

    /// Starts the session again with a new sandbox and a new agent secret (the old sandbox is
    /// torn down, its secret stops working): `retry_count` + 1, a new deadline, signalling
    /// cleared. A completed session cannot be retried.
    pub async fn retry(&self, user: Uuid, id: Uuid) -> Result<Session> {
        let runtime = self.require_runtime()?;
        let session = self.session(user, id).await?;
        let secret = super::random_hex(32);
        let old_vm = sqlx::query!(
            "UPDATE auth_sessions s SET
                 status = 'pending', retry_count = COALESCE(s.retry_count, 0) + 1,
                 started_at = NOW(), timeout_at = NOW() + make_interval(secs => $3),
                 completed_at = NULL, error_message = NULL, last_heartbeat = NULL,
                 webrtc_offer = NULL, offer_from = NULL, offer_seq = NULL,
                 webrtc_answer = NULL, answer_from = NULL, answer_seq = NULL,
                 ice_candidates = NULL, signaling_completed_at = NULL,
                 agent_secret_hash = $4, vm_id = NULL
             FROM (SELECT vm_id FROM auth_sessions WHERE session_id = $1 FOR UPDATE) old
             WHERE s.session_id = $1 AND s.user_id = $2 AND s.status <> 'completed'
               AND COALESCE(s.retry_count, 0) < $5
             RETURNING old.vm_id",
            id,
            user,
            self.config.session_timeout.as_secs_f64(),
            sha256_hex(&secret),
            self.config.max_retries
        )
        .fetch_optional(&self.pool)
        .await?;
        let Some(old_vm) = old_vm else {
            return Err(Error::Conflict(if session.status == "completed" {
                "the login session has completed; start a new one".into()
            } else {
                format!(
                    "the login session was retried {} times; start a new one",
                    session.retry_count
                )
            }));
        };
        if let Some(vm) = old_vm.vm_id {
            self.schedule_cleanup(&vm, id).await?;
        }
        notify_status(&self.pool, id).await?;
        if let Err(error) = self
            .launch(runtime, id, user, &session.provider, &secret)
            .await
        {
            self.finish_failed(id, &format!("the login sandbox could not start: {error}"))
                .await?;
            return Err(error);
        }
        self.session(user, id).await
    }

    /// Fails a session in progress with `reason`, schedules its sandbox's teardown and
    /// announces it. False when it had already finished.
    pub async fn finish_failed(&self, id: Uuid, reason: &str) -> Result<bool> {
        let failed = sqlx::query!(
            "UPDATE auth_sessions
             SET status = 'failed', error_message = $2, completed_at = NOW()
             WHERE session_id = $1 AND status IN ('pending', 'authenticating')
             RETURNING vm_id",
            id,
            truncate(reason, MAX_REASON)
        )
        .fetch_optional(&self.pool)
        .await?;
        let Some(failed) = failed else {
            return Ok(false);
        };
        tracing::info!(session = %id, reason, "login session failed");
        if let Some(vm) = failed.vm_id {
            self.schedule_cleanup(&vm, id).await?;
        }
        notify_status(&self.pool, id).await?;
        Ok(true)
    }

    // ---- the agent's side ----

    /// `Authorization: Bearer <POLYDEV_LOGIN_SECRET>` for session `id`: compared in constant
    /// time with the stored hash. A finished or timed-out session's secret no longer works.
    pub async fn authenticate_agent(&self, id: Uuid, header: Option<&str>) -> Result<Agent> {
        let secret = header
            .and_then(|h| h.strip_prefix("Bearer "))
            .ok_or(Error::Unauthorized(AuthFailure::Missing))?;
        let row = sqlx::query!(
            r#"SELECT user_id, agent_secret_hash, status AS "status!",
                      COALESCE(timeout_at > NOW(), false) AS "in_time!"
               FROM auth_sessions WHERE session_id = $1"#,
            id
        )
        .fetch_optional(&self.pool)
        .await?;
        let presented = sha256_hex(secret);
        let Some(row) = row else {
            // The same work as a known session: the answer time tells nothing.
            let _ = presented.as_bytes().ct_eq(sha256_hex("").as_bytes());
            return Err(Error::Unauthorized(AuthFailure::Unknown));
        };
        let stored = row.agent_secret_hash.unwrap_or_default();
        if stored.is_empty() || !bool::from(presented.as_bytes().ct_eq(stored.as_bytes())) {
            return Err(Error::Unauthorized(AuthFailure::Unknown));
        }
        let (Some(user), true, true) = (row.user_id, is_live(&row.status), row.in_time) else {
            return Err(Error::Unauthorized(AuthFailure::Expired));
        };
        Ok(Agent { session: id, user })
    }

    pub async fn agent_view(&self, agent: Agent) -> Result<AgentView> {
        let (session, _) = self.session_any(agent.session).await?;
        let key = sqlx::query_scalar!(
            "SELECT public_key FROM runtime_user_keys WHERE user_id = $1",
            agent.user
        )
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| {
            Error::Conflict(
                "the user has no runtime key (PUT /v1/runtime/keys): the credential could not be sealed".into(),
            )
        })?;
        // In a local sandbox TURN is reachable only through its tunnel, over TCP.
        let tunnelled = self.config.turn_forward.is_some()
            && self
                .runtime
                .as_ref()
                .is_some_and(|r| r.orchestrator.driver() == "local");
        let ice_servers = if tunnelled {
            session
                .ice_servers
                .into_iter()
                .filter(|s| s.credential.is_some())
                .map(|s| IceServer {
                    urls: vec![format!(
                        "turn:{}?transport=tcp",
                        crate::runtime::orchestrator::TURN_INSIDE
                    )],
                    ..s
                })
                .collect()
        } else {
            session.ice_servers
        };
        Ok(AgentView {
            provider: session.provider,
            status: session.status,
            login_url: None,
            user_public_key: key,
            user_id: agent.user,
            credential_namespace: CREDENTIAL_NAMESPACE.into(),
            ice_servers,
            timeout_at: session.timeout_at,
        })
    }

    /// The agent is alive: `last_heartbeat` (session and sandbox), and `pending` becomes
    /// `authenticating` on the first one.
    pub async fn heartbeat(&self, agent: Agent) -> Result<()> {
        let changed = sqlx::query_scalar!(
            r#"UPDATE auth_sessions s SET last_heartbeat = NOW(), status = 'authenticating'
               FROM (SELECT status FROM auth_sessions WHERE session_id = $1 FOR UPDATE) before
               WHERE s.session_id = $1 AND s.status IN ('pending', 'authenticating')
               RETURNING before.status = 'pending' AS "changed!""#,
            agent.session
        )
        .fetch_optional(&self.pool)
        .await?
        .ok_or(Error::Unauthorized(AuthFailure::Expired))?;
        sqlx::query!(
            "UPDATE vms SET last_heartbeat = NOW(), status = 'running'
             WHERE vm_id = (SELECT vm_id FROM auth_sessions WHERE session_id = $1)
               AND destroyed_at IS NULL AND status IN ('starting', 'running')",
            agent.session
        )
        .execute(&self.pool)
        .await?;
        if changed {
            notify_status(&self.pool, agent.session).await?;
        }
        Ok(())
    }

    /// The peers are connected: `signaling_completed_at` (the first time).
    pub async fn connected(&self, agent: Agent) -> Result<()> {
        let changed = sqlx::query_scalar!(
            "UPDATE auth_sessions SET signaling_completed_at = NOW()
             WHERE session_id = $1 AND signaling_completed_at IS NULL
               AND status IN ('pending', 'authenticating')
             RETURNING session_id",
            agent.session
        )
        .fetch_optional(&self.pool)
        .await?;
        if changed.is_some() {
            notify_status(&self.pool, agent.session).await?;
        }
        Ok(())
    }

    /// Stores the captured credential (a sealed box to the user's runtime key, checked: this
    /// user, this session's row, that key) in `cli_credentials`, and completes the session.
    pub async fn store_credential(&self, agent: Agent, credential: &Credential) -> Result<()> {
        if credential.kind.is_empty()
            || credential.kind.len() > MAX_KIND
            || !credential
                .kind
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        {
            return Err(Error::Invalid(format!(
                "`kind` is 1 to {MAX_KIND} of letters, digits, `.`, `_`, `-`"
            )));
        }
        let header = polydev_zk::inspect_sealed(&credential.sealed)
            .map_err(|e| Error::Invalid(format!("`sealed` is not a sealed box: {e}")))?;
        let key = sqlx::query_scalar!(
            "SELECT public_key FROM runtime_user_keys WHERE user_id = $1",
            agent.user
        )
        .fetch_optional(&self.pool)
        .await?;
        if header.namespace != CREDENTIAL_NAMESPACE
            || header.user_id != agent.user.to_string()
            || header.row_id != agent.session.to_string()
            || Some(header.recipient_key()) != key
        {
            return Err(Error::Invalid(format!(
                "`sealed` must be sealed to the user's runtime key for namespace `{CREDENTIAL_NAMESPACE}`, this user and row = the session id"
            )));
        }
        let mut tx = self.pool.begin().await?;
        let session = sqlx::query!(
            r#"UPDATE auth_sessions SET status = 'completed', completed_at = NOW(),
                      error_message = NULL
               WHERE session_id = $1 AND status IN ('pending', 'authenticating')
               RETURNING provider AS "provider!", vm_id"#,
            agent.session
        )
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(Error::Unauthorized(AuthFailure::Expired))?;
        // The row's id is the session's (the sealed box is bound to it).
        sqlx::query!(
            "INSERT INTO cli_credentials
                 (credential_id, user_id, provider, encrypted_data_v2, migrated_to_zk, kind)
             VALUES ($1, $2, $3, $4, true, $5)",
            agent.session,
            agent.user,
            session.provider,
            credential.sealed,
            credential.kind
        )
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        if let Some(vm) = session.vm_id {
            self.schedule_cleanup(&vm, agent.session).await?;
        }
        notify_status(&self.pool, agent.session).await?;
        Ok(())
    }

    /// The agent gives up (`failed` with its reason).
    pub async fn agent_fail(&self, agent: Agent, reason: &str) -> Result<()> {
        let reason = if reason.trim().is_empty() {
            "the login agent failed".to_string()
        } else {
            format!("the login agent failed: {}", reason.trim())
        };
        self.finish_failed(agent.session, &reason).await?;
        Ok(())
    }

    // ---- the sweeper ----

    /// One pass: sessions past their deadline, agents silent too long, sandboxes that ended
    /// fail with a reason (and their sandboxes are scheduled for teardown); login sandboxes no
    /// session owns are stopped. Safe on every replica at once.
    pub async fn sweep(&self) -> Result<usize> {
        let timed_out = sqlx::query!(
            r#"SELECT session_id AS "id!",
                      CASE WHEN timeout_at <= NOW()
                           THEN 'timed out: the login was not completed within '
                                || round(extract(epoch FROM timeout_at - started_at)) || ' s'
                           WHEN last_heartbeat IS NULL
                           THEN 'the login agent did not start (no heartbeat within '
                                || $1::bigint || ' s)'
                           ELSE 'the login agent stopped sending heartbeats (none for '
                                || $1::bigint || ' s)' END AS "reason!"
               FROM auth_sessions
               WHERE status IN ('pending', 'authenticating')
                 AND (timeout_at <= NOW()
                      OR COALESCE(last_heartbeat, started_at, created_at)
                         < NOW() - make_interval(secs => $2))"#,
            self.config.heartbeat_timeout.as_secs() as i64,
            self.config.heartbeat_timeout.as_secs_f64()
        )
        .fetch_all(&self.pool)
        .await?;
        let mut failed = 0;
        for row in timed_out {
            if self.finish_failed(row.id, &row.reason).await? {
                failed += 1;
            }
        }
        for (id, reason) in self.sandboxes_gone().await? {
            if self.finish_failed(id, &reason).await? {
                failed += 1;
            }
        }
        Ok(failed)
    }

    pub(crate) async fn sweep_loop(self, shutdown: tokio_util::sync::CancellationToken) {
        loop {
            match self.sweep().await {
                Ok(0) => {}
                Ok(failed) => tracing::info!(failed, "login sweeper failed sessions"),
                Err(error) => tracing::warn!(%error, "login sweep failed"),
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(self.config.sweep_interval) => {}
            }
        }
    }
}
