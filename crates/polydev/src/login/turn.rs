//! STUN and TURN servers for a session's two peers. TURN credentials are short-lived and per
//! session, in coturn's REST-API scheme (`use-auth-secret` + `static-auth-secret`): the
//! username is `<expiry, Unix seconds>:<session id>` and the password is
//! `base64(HMAC-SHA1(shared secret, username))`. coturn checks the HMAC and refuses the
//! username once its expiry has passed; the shared secret never leaves the servers.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha1::Sha1;
use uuid::Uuid;

/// Where peers find STUN and TURN.
#[derive(Debug, Clone, Default)]
pub struct TurnConfig {
    /// `stun:host:port` URLs, handed out as they are.
    pub stun_urls: Vec<String>,
    /// `turn:host:port?transport=udp|tcp`, `turns:...` URLs; only with a secret.
    pub turn_urls: Vec<String>,
    /// coturn's `static-auth-secret`. Without it no TURN server is handed out.
    pub secret: Option<String>,
    /// How long a credential is valid [default: the session's timeout + 5 minutes].
    pub ttl: Option<Duration>,
}

/// One entry of `RTCConfiguration.iceServers`, as the browser takes it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct IceServer {
    pub urls: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
}

/// The TURN password of `username` under `secret`.
pub fn credential(secret: &str, username: &str) -> String {
    let mut mac = <Hmac<Sha1> as KeyInit>::new_from_slice(secret.as_bytes()).expect("any key");
    mac.update(username.as_bytes());
    STANDARD.encode(mac.finalize().into_bytes())
}

impl TurnConfig {
    /// The ICE servers of `session`: STUN as configured; TURN with a credential valid for
    /// `ttl` from `now` (`default_ttl` when none is configured).
    pub fn ice_servers(
        &self,
        session: Uuid,
        now: SystemTime,
        default_ttl: Duration,
    ) -> Vec<IceServer> {
        let mut servers = Vec::new();
        if !self.stun_urls.is_empty() {
            servers.push(IceServer {
                urls: self.stun_urls.clone(),
                username: None,
                credential: None,
            });
        }
        if let Some(secret) = self
            .secret
            .as_deref()
            .filter(|_| !self.turn_urls.is_empty())
        {
            let expiry = now
                .checked_add(self.ttl.unwrap_or(default_ttl))
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_secs());
            let username = format!("{expiry}:{session}");
            servers.push(IceServer {
                urls: self.turn_urls.clone(),
                credential: Some(credential(secret, &username)),
                username: Some(username),
            });
        }
        servers
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_credential_is_coturns_hmac_sha1_in_base64() {
        // `echo -n "1700000000:user" | openssl dgst -sha1 -hmac secret -binary | base64`
        assert_eq!(
            credential("secret", "1700000000:user"),
            "I/MZeIG6MwzOV8Uubr9liB2556o="
        );
    }

    #[test]
    fn turn_needs_a_secret_and_urls_and_expires_after_the_ttl() {
        let session = Uuid::nil();
        let now = UNIX_EPOCH + Duration::from_secs(1_000);
        let mut config = TurnConfig {
            stun_urls: vec!["stun:127.0.0.1:3478".into()],
            turn_urls: vec!["turn:127.0.0.1:3478?transport=udp".into()],
            secret: None,
            ttl: None,
        };
        assert_eq!(
            config
                .ice_servers(session, now, Duration::from_secs(60))
                .len(),
            1
        );
        config.secret = Some("s3cret".into());
        let servers = config.ice_servers(session, now, Duration::from_secs(60));
        let turn = &servers[1];
        let username = turn.username.as_deref().unwrap();
        assert_eq!(username, format!("1060:{session}"));
        assert_eq!(
            turn.credential.as_deref(),
            Some(credential("s3cret", username).as_str())
        );
        config.ttl = Some(Duration::from_secs(5));
        let servers = config.ice_servers(session, now, Duration::from_secs(60));
        assert!(servers[1].username.as_deref().unwrap().starts_with("1005:"));
    }
}
