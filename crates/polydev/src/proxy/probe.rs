//! The health probe: through each allocated port, an HTTP `CONNECT` to the configured check
//! URL's host and port, with the gate's credentials. A `2xx` answer within the timeout is
//! healthy; anything else (refused, timed out, `407`, `502`, a garbled answer) is unhealthy with
//! the reason in `last_error`. Every `polydev serve` runs passes in the background
//! ([`Proxies::spawn_background`]); one pass at a time across replicas (an advisory lock), and
//! every row of a port is updated in one statement.

use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::Proxies;
use crate::error::Result;

/// The advisory lock key of a probe pass (`pg_try_advisory_xact_lock`): "polyprx2".
pub const PROBE_LOCK: i64 = 0x706f_6c79_7072_7832;
/// Ports probed at once.
const CONCURRENCY: usize = 16;
/// The most of a proxy's answer head that is read.
const MAX_HEAD: usize = 8 * 1024;

/// What one pass found (`None` from [`Proxies::check_all`]: another process was running one).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Checked {
    pub healthy: Vec<u16>,
    /// Each unhealthy port with why.
    pub unhealthy: Vec<(u16, String)>,
}

impl Proxies {
    /// One `CONNECT` through `port`: `Ok` on a `2xx`, else why not (never with credentials).
    pub async fn check_port(&self, port: u16) -> std::result::Result<(), String> {
        let config = &self.config;
        let target = config.check_target()?;
        let attempt = async {
            let addr = config.addr(port).await.map_err(|e| e.public_message())?;
            let mut stream = TcpStream::connect(addr)
                .await
                .map_err(|e| format!("connecting to the gate: {e}"))?;
            let mut request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
            if let Some(credentials) = &config.credentials {
                request.push_str(&format!(
                    "Proxy-Authorization: {}\r\n",
                    credentials.authorization()
                ));
            }
            request.push_str("\r\n");
            stream
                .write_all(request.as_bytes())
                .await
                .map_err(|e| format!("sending CONNECT: {e}"))?;
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = stream
                    .read(&mut buf)
                    .await
                    .map_err(|e| format!("reading the answer: {e}"))?;
                if n == 0 {
                    return Err("the proxy closed the connection without an answer".to_string());
                }
                head.extend_from_slice(&buf[..n]);
                if head.len() > MAX_HEAD {
                    return Err("the proxy's answer head is too long".into());
                }
            }
            let head = String::from_utf8_lossy(&head);
            let status_line = head.lines().next().unwrap_or_default();
            let code = status_line
                .strip_prefix("HTTP/1.")
                .and_then(|rest| rest.get(2..5))
                .and_then(|code| code.parse::<u16>().ok())
                .ok_or_else(|| format!("not an HTTP answer: {}", truncate(status_line, 80)))?;
            if (200..300).contains(&code) {
                Ok(())
            } else {
                Err(format!("CONNECT {target}: {}", truncate(status_line, 120)))
            }
        };
        match tokio::time::timeout(config.check_timeout, attempt).await {
            Ok(outcome) => outcome,
            Err(_) => Err(format!(
                "no answer within {} s",
                config.check_timeout.as_secs_f64()
            )),
        }
    }

    /// One pass over every allocated port, if no other process is running one. Unhealthy
    /// ports are logged (port and reason; never credentials) and recorded.
    pub async fn check_all(&self) -> Result<Option<Checked>> {
        let mut lock = self.pool.begin().await?;
        let locked = sqlx::query_scalar!(
            r#"SELECT pg_try_advisory_xact_lock($1) AS "locked!""#,
            PROBE_LOCK
        )
        .fetch_one(&mut *lock)
        .await?;
        if !locked {
            return Ok(None);
        }
        let ports = sqlx::query_scalar!(
            r#"SELECT DISTINCT proxy_port AS "port!" FROM user_proxy_ports
               WHERE proxy_port BETWEEN 1 AND 65535 ORDER BY 1"#
        )
        .fetch_all(&self.pool)
        .await?;
        let results: Vec<(u16, std::result::Result<(), String>)> =
            futures_util::stream::iter(ports.into_iter().map(|port| port as u16))
                .map(|port| async move { (port, self.check_port(port).await) })
                .buffer_unordered(CONCURRENCY)
                .collect()
                .await;
        let mut checked = Checked::default();
        let (mut ports, mut oks, mut errors) = (Vec::new(), Vec::new(), Vec::new());
        for (port, outcome) in results {
            ports.push(i32::from(port));
            oks.push(outcome.is_ok());
            match outcome {
                Ok(()) => checked.healthy.push(port),
                Err(why) => {
                    tracing::warn!(port, reason = %why, "proxy port unhealthy");
                    errors.push(Some(why.clone()));
                    checked.unhealthy.push((port, why));
                    continue;
                }
            }
            errors.push(None);
        }
        sqlx::query!(
            "UPDATE user_proxy_ports u
             SET healthy = r.ok, last_checked_at = NOW(), last_error = r.error,
                 last_verified_at = CASE WHEN r.ok THEN NOW() ELSE u.last_verified_at END
             FROM UNNEST($1::int[], $2::bool[], $3::text[]) AS r(port, ok, error)
             WHERE u.proxy_port = r.port",
            &ports,
            &oks,
            &errors as &[Option<String>]
        )
        .execute(&self.pool)
        .await?;
        lock.commit().await?;
        checked.healthy.sort_unstable();
        checked.unhealthy.sort_unstable();
        Ok(Some(checked))
    }

    /// Runs [`Proxies::check_all`] now and every `check_interval`, until `shutdown`.
    pub fn spawn_background(&self, shutdown: CancellationToken) -> tokio::task::JoinHandle<()> {
        let proxies = self.clone();
        tokio::spawn(async move {
            loop {
                match proxies.check_all().await {
                    Ok(Some(checked)) => tracing::info!(
                        healthy = checked.healthy.len(),
                        unhealthy = checked.unhealthy.len(),
                        "proxy ports checked"
                    ),
                    Ok(None) => {}
                    Err(error) => tracing::warn!(%error, "proxy port check failed"),
                }
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(proxies.config.check_interval) => {}
                }
            }
        })
    }
}

fn truncate(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}
