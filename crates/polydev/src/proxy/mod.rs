//! The proxy domain (docs/cli-backends.md, "Proxy ports"): every user's runtime traffic leaves
//! through one Decodo port of their own (`user_proxy_ports`, one row per user, reused as the
//! seed holds them).
//!
//! - [`ports`]: allocation of a free port from the configured range, under an advisory lock so
//!   that concurrent first uses never get the same port.
//! - [`probe`]: the periodic health check, a real HTTP `CONNECT` through each port.
//!
//! The gate host and its credentials are configuration ([`ProxyConfig`]); the credentials are
//! never logged (`Debug` hides the password) and never stored.

pub mod ports;
pub mod probe;

use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use crate::error::{Error, Result};

pub use probe::Checked;

/// The gate's username and password (Decodo's "user:pass" authentication).
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

impl Credentials {
    /// The `Proxy-Authorization` header value: `Basic base64(user:pass)`.
    pub fn authorization(&self) -> String {
        format!(
            "Basic {}",
            STANDARD.encode(format!("{}:{}", self.username, self.password))
        )
    }
}

#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// The gate every port is opened on (`gate.decodo.com`); the port picks the egress.
    pub gate_host: String,
    /// New users get the first port of this range that no row holds. Rows that already exist
    /// keep their port, in the range or not.
    pub ports: RangeInclusive<u16>,
    pub credentials: Option<Credentials>,
    /// The probe sends `CONNECT <host>:<port>` for this URL through each port.
    pub check_url: url::Url,
    /// Time between two probe passes.
    pub check_interval: Duration,
    /// A probe that has not got the proxy's answer within this fails.
    pub check_timeout: Duration,
}

impl ProxyConfig {
    /// `START-END` (inclusive), e.g. `10001-10100`.
    pub fn parse_range(text: &str) -> std::result::Result<RangeInclusive<u16>, String> {
        let (start, end) = text
            .split_once('-')
            .ok_or_else(|| format!("`{text}`: expected START-END, e.g. 10001-10100"))?;
        let parse = |s: &str| {
            s.trim()
                .parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| format!("`{s}` is not a port (1-65535)"))
        };
        let (start, end) = (parse(start)?, parse(end)?);
        if start > end {
            return Err(format!("`{text}`: the range is empty (START > END)"));
        }
        Ok(start..=end)
    }

    /// `host:port` of the check URL (default port of its scheme), the `CONNECT` target.
    pub fn check_target(&self) -> std::result::Result<String, String> {
        let host = self
            .check_url
            .host_str()
            .ok_or("the proxy check URL has no host")?;
        let port = self
            .check_url
            .port_or_known_default()
            .ok_or("the proxy check URL has no port")?;
        Ok(if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        })
    }

    /// The proxy URL for a port, as a program's `HTTP(S)_PROXY` names it, credentials included
    /// (percent-encoded). Only for containers whose egress cannot go through a host-side tunnel
    /// that adds them (Nomad): see docs/cli-backends.md.
    pub fn url(&self, port: u16) -> String {
        let mut url = url::Url::parse("http://localhost").expect("a valid URL");
        let _ = url.set_host(Some(&self.gate_host));
        let _ = url.set_port(Some(port));
        if let Some(credentials) = &self.credentials {
            let _ = url.set_username(&credentials.username);
            let _ = url.set_password(Some(&credentials.password));
        }
        url.as_str().trim_end_matches('/').to_string()
    }

    /// The gate's address for a port (DNS is asked each time: the gate may move).
    pub async fn addr(&self, port: u16) -> Result<SocketAddr> {
        tokio::net::lookup_host((self.gate_host.as_str(), port))
            .await
            .ok()
            .and_then(|mut addrs| addrs.next())
            .ok_or_else(|| Error::Proxy {
                code: "proxy_unreachable",
                message: format!(
                    "the proxy gate `{}` cannot be resolved; an operator must check --proxy-gate-host",
                    self.gate_host
                ),
            })
    }
}

/// A user's port and what the last probe found.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UserPort {
    pub user_id: Uuid,
    pub port: u16,
    /// The stable egress IP the seed recorded for the port (`proxy_ip`), if any.
    pub egress_ip: Option<String>,
    pub assigned_at: Option<DateTime<Utc>>,
    /// `None`: not checked yet; `Some(false)`: the last check failed.
    pub healthy: Option<bool>,
    pub last_checked_at: Option<DateTime<Utc>>,
    /// The last successful check.
    pub last_verified_at: Option<DateTime<Utc>>,
    /// Why the last check failed.
    pub last_error: Option<String>,
}

impl UserPort {
    /// Refuses a port whose last check failed: the runtime never starts a user's work on an
    /// unhealthy egress, nor falls back to another.
    pub fn ensure_healthy(&self) -> Result<()> {
        if self.healthy == Some(false) {
            let when = self
                .last_checked_at
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
                .unwrap_or_default();
            return Err(Error::Proxy {
                code: "proxy_unhealthy",
                message: format!(
                    "your proxy port {} failed its health check at {when} ({}); containers start only through it, so none was started: retry once the port is healthy again",
                    self.port,
                    self.last_error.as_deref().unwrap_or("no detail")
                ),
            });
        }
        Ok(())
    }
}

/// The proxy domain's handle.
#[derive(Clone)]
pub struct Proxies {
    pub pool: PgPool,
    pub config: Arc<ProxyConfig>,
}

impl Proxies {
    pub fn new(pool: PgPool, config: ProxyConfig) -> Proxies {
        Proxies {
            pool,
            config: Arc::new(config),
        }
    }
}

impl std::fmt::Debug for Proxies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxies")
            .field("config", &self.config)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ProxyConfig {
        ProxyConfig {
            gate_host: "gate.decodo.com".into(),
            ports: 10001..=10100,
            credentials: Some(Credentials {
                username: "user-1".into(),
                password: "p@ss:word/1".into(),
            }),
            check_url: "https://ip.decodo.com/json".parse().unwrap(),
            check_interval: Duration::from_secs(300),
            check_timeout: Duration::from_secs(10),
        }
    }

    #[test]
    fn port_ranges_parse_and_bad_ones_say_why() {
        assert_eq!(ProxyConfig::parse_range("10001-10100"), Ok(10001..=10100));
        assert_eq!(ProxyConfig::parse_range(" 7 - 7 "), Ok(7..=7));
        for bad in ["10001", "0-10", "10-9", "a-b", "1-70000"] {
            assert!(ProxyConfig::parse_range(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_proxy_url_carries_encoded_credentials_and_debug_hides_them() {
        let config = config();
        assert_eq!(
            config.url(10007),
            "http://user-1:p%40ss%3Aword%2F1@gate.decodo.com:10007"
        );
        assert_eq!(config.check_target().unwrap(), "ip.decodo.com:443");
        let shown = format!("{config:?}");
        assert!(
            shown.contains("user-1") && !shown.contains("p@ss"),
            "{shown}"
        );
        assert_eq!(
            config.credentials.unwrap().authorization(),
            format!("Basic {}", STANDARD.encode("user-1:p@ss:word/1"))
        );
    }

    #[test]
    fn an_unhealthy_port_is_refused_with_its_reason() {
        let mut port = UserPort {
            user_id: Uuid::nil(),
            port: 10003,
            egress_ip: None,
            assigned_at: None,
            healthy: None,
            last_checked_at: None,
            last_verified_at: None,
            last_error: None,
        };
        assert!(
            port.ensure_healthy().is_ok(),
            "not checked yet is not unhealthy"
        );
        port.healthy = Some(false);
        port.last_error = Some("CONNECT x:443: HTTP/1.1 502 Bad Gateway".into());
        let error = port.ensure_healthy().unwrap_err();
        assert_eq!(error.code(), "proxy_unhealthy");
        assert!(error.public_message().contains("10003") && error.public_message().contains("502"));
    }
}
