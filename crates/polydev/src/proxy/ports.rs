//! One port per user (`user_proxy_ports`): the row the user already has, else the first port of
//! the configured range that no row holds.
//!
//! Allocation runs in a transaction that first takes an advisory lock (one key for the whole
//! table), so the search for a free port of one first use always sees the ports that every
//! earlier one committed: concurrent first uses never get the same port, in one process or
//! across replicas. A user's row is their primary key, so the same user twice at once still
//! gets one row (the second waits for the lock and finds it). Users who already have a port
//! (every later use) read it without the lock.

use uuid::Uuid;

use super::{Proxies, UserPort};
use crate::error::{Error, Result};

/// The advisory lock key of port allocation (`pg_advisory_xact_lock`): "polyprx1".
pub const ALLOCATE_LOCK: i64 = 0x706f_6c79_7072_7831;

struct Row {
    user_id: Uuid,
    proxy_port: Option<i32>,
    proxy_ip: Option<String>,
    assigned_at: Option<chrono::DateTime<chrono::Utc>>,
    healthy: Option<bool>,
    last_checked_at: Option<chrono::DateTime<chrono::Utc>>,
    last_verified_at: Option<chrono::DateTime<chrono::Utc>>,
    last_error: Option<String>,
}

impl Row {
    fn into_port(self) -> Result<Option<UserPort>> {
        let Some(port) = self.proxy_port else {
            return Ok(None);
        };
        let port = u16::try_from(port).ok().filter(|p| *p > 0).ok_or_else(|| {
            Error::internal(format!(
                "user_proxy_ports.proxy_port {port} of user {} is not a port",
                self.user_id
            ))
        })?;
        Ok(Some(UserPort {
            user_id: self.user_id,
            port,
            egress_ip: self.proxy_ip,
            assigned_at: self.assigned_at,
            healthy: self.healthy,
            last_checked_at: self.last_checked_at,
            last_verified_at: self.last_verified_at,
            last_error: self.last_error,
        }))
    }
}

impl Proxies {
    /// The user's port, if they have one (no allocation).
    pub async fn port_of(&self, user_id: Uuid) -> Result<Option<UserPort>> {
        let row = sqlx::query_as!(
            Row,
            "SELECT user_id, proxy_port, proxy_ip, assigned_at, healthy, last_checked_at,
                    last_verified_at, last_error
             FROM user_proxy_ports WHERE user_id = $1",
            user_id
        )
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(row) => row.into_port(),
            None => Ok(None),
        }
    }

    /// The user's port: the existing row's, else a newly allocated one. A full range is a
    /// `proxy_ports_exhausted` error (nothing is written).
    pub async fn port_for(&self, user_id: Uuid) -> Result<UserPort> {
        if let Some(port) = self.port_of(user_id).await? {
            return Ok(port);
        }
        let (start, end) = (
            i32::from(*self.config.ports.start()),
            i32::from(*self.config.ports.end()),
        );
        let mut tx = self.pool.begin().await?;
        sqlx::query!("SELECT pg_advisory_xact_lock($1)", ALLOCATE_LOCK)
            .execute(&mut *tx)
            .await?;
        // Under the lock this statement's snapshot holds every allocation committed before it.
        // A row without a port (the seed allows it) gets one; a row with a port is kept.
        let row = sqlx::query_as!(
            Row,
            "INSERT INTO user_proxy_ports (user_id, proxy_port, assigned_at)
             SELECT $1, p, NOW() FROM generate_series($2::int, $3::int) AS p
             WHERE NOT EXISTS (SELECT 1 FROM user_proxy_ports u WHERE u.proxy_port = p)
             LIMIT 1
             ON CONFLICT (user_id) DO UPDATE
                 SET proxy_port = EXCLUDED.proxy_port, assigned_at = EXCLUDED.assigned_at
                 WHERE user_proxy_ports.proxy_port IS NULL
             RETURNING user_id, proxy_port, proxy_ip, assigned_at, healthy, last_checked_at,
                       last_verified_at, last_error",
            user_id,
            start,
            end
        )
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        if let Some(port) = row.map(Row::into_port).transpose()?.flatten() {
            tracing::info!(%user_id, port = port.port, "proxy port allocated");
            return Ok(port);
        }
        // Nothing inserted: another call gave this user a port first, or the range is full.
        if let Some(port) = self.port_of(user_id).await? {
            return Ok(port);
        }
        Err(Error::Proxy {
            code: "proxy_ports_exhausted",
            message: format!(
                "every proxy port of the configured range {start}-{end} is taken, so no container can start for a new user; an operator must widen --proxy-port-range"
            ),
        })
    }
}
