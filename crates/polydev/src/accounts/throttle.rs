//! Failed authentications per client address, in process memory: a flood of made-up tokens
//! must not cost a database lookup each. Once an address has had `limit` malformed or unknown
//! tokens in a fixed window, every request from it is refused before the database is asked,
//! until the window ends.
//!
//! The address is the TCP peer: behind a reverse proxy it is the proxy's, so every client of
//! the proxy shares one budget (docs/api.md#rate-limits).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Failures allowed per address per window.
pub const AUTH_FAILURES_PER_MINUTE: u32 = 30;
/// Addresses remembered at most; beyond it (after dropping ended windows) a new address is not
/// tracked until room frees up.
const MAX_ADDRESSES: usize = 65_536;

#[derive(Debug)]
pub struct FailedAuthLimiter {
    limit: u32,
    window: Duration,
    windows: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

impl Default for FailedAuthLimiter {
    fn default() -> Self {
        FailedAuthLimiter::new(AUTH_FAILURES_PER_MINUTE, Duration::from_secs(60))
    }
}

impl FailedAuthLimiter {
    pub fn new(limit: u32, window: Duration) -> Self {
        FailedAuthLimiter {
            limit,
            window,
            windows: Mutex::new(HashMap::new()),
        }
    }

    /// `Err(retry_after)` when `address` has used up its failures in the current window.
    pub fn check(&self, address: IpAddr, now: Instant) -> Result<(), Duration> {
        let key = key(address);
        let windows = self.windows.lock().expect("limiter lock poisoned");
        match windows.get(&key) {
            Some(&(start, count)) if count >= self.limit => {
                let elapsed = now.saturating_duration_since(start);
                if elapsed < self.window {
                    // Whole seconds, at least one (Retry-After).
                    let left = self.window - elapsed;
                    Err(Duration::from_secs(
                        left.as_secs_f64().ceil().max(1.0) as u64
                    ))
                } else {
                    Ok(())
                }
            }
            _ => Ok(()),
        }
    }

    /// Counts one failed authentication from `address`.
    pub fn record(&self, address: IpAddr, now: Instant) {
        let key = key(address);
        let mut windows = self.windows.lock().expect("limiter lock poisoned");
        if !windows.contains_key(&key) && windows.len() >= MAX_ADDRESSES {
            let window = self.window;
            windows.retain(|_, (start, _)| now.saturating_duration_since(*start) < window);
            if windows.len() >= MAX_ADDRESSES {
                tracing::warn!("failed-authentication limiter full; address not tracked");
                return;
            }
        }
        let entry = windows.entry(key).or_insert((now, 0));
        if now.saturating_duration_since(entry.0) >= self.window {
            *entry = (now, 0);
        }
        entry.1 = entry.1.saturating_add(1);
    }
}

/// IPv4 addresses count alone; IPv6 ones by their /64, which one client typically holds whole.
fn key(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V4(_) => address,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut segments = v6.segments();
                segments[4..].fill(0);
                IpAddr::V6(segments.into())
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_is_refused_after_its_failures_until_the_window_ends() {
        let limiter = FailedAuthLimiter::new(3, Duration::from_secs(60));
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let t0 = Instant::now();
        for i in 0..3 {
            assert!(limiter.check(a, t0).is_ok(), "{i}");
            limiter.record(a, t0);
        }
        let retry = limiter
            .check(a, t0 + Duration::from_millis(500))
            .unwrap_err();
        assert_eq!(retry, Duration::from_secs(60));
        assert!(
            limiter.check(b, t0).is_ok(),
            "other addresses are not affected"
        );
        assert!(limiter.check(a, t0 + Duration::from_secs(60)).is_ok());
        limiter.record(a, t0 + Duration::from_secs(61));
        assert!(limiter.check(a, t0 + Duration::from_secs(61)).is_ok());
    }

    #[test]
    fn ipv6_addresses_share_their_64_and_mapped_ipv4_is_ipv4() {
        let limiter = FailedAuthLimiter::new(1, Duration::from_secs(60));
        let t0 = Instant::now();
        limiter.record("2001:db8:1:2::1".parse().unwrap(), t0);
        assert!(
            limiter
                .check("2001:db8:1:2:ffff::9".parse().unwrap(), t0)
                .is_err()
        );
        assert!(
            limiter
                .check("2001:db8:1:3::1".parse().unwrap(), t0)
                .is_ok()
        );
        limiter.record("::ffff:10.0.0.7".parse().unwrap(), t0);
        assert!(limiter.check("10.0.0.7".parse().unwrap(), t0).is_err());
    }
}
