//! The OAuth 2.1 authorization server that protects `/mcp` (docs/api.md#oauth): dynamic client
//! registration, the authorization code grant with PKCE, refresh-token rotation, revocation,
//! and the grants ("connected apps") users consent to. It owns the SQL of
//! `mcp_registered_clients`, `oauth_grants`, `oauth_codes` and `oauth_refresh_tokens`; access
//! tokens are `pd_` rows that `accounts` issues (so `/mcp` authenticates them like any token
//! and revocation is immediate on every replica).
//!
//! Every secret (client secrets, registration access tokens, codes, refresh tokens) has 256
//! random bits and is stored as its SHA-256; comparisons are constant-time.

pub mod cimd;
pub mod clients;
pub mod device;
pub mod flow;

use sha2::{Digest, Sha256};
use sqlx::PgPool;

use crate::accounts::Scope;
use crate::error::{Error, OAuthCode, Result};

pub use clients::{Client, ClientCredentials, ClientMetadata, Registered};
pub use flow::{AuthorizationParams, AuthorizationRequest, AuthorizeError, Grant, TokenResponse};

/// Where the authorization server and the protected resource live.
#[derive(Debug, Clone)]
pub struct Config {
    /// The issuer: `https://polydev.example.com` (no trailing slash), from `--public-url`.
    pub issuer: String,
    /// Hosts whose client ID metadata documents may be fetched from private addresses
    /// (`--cimd-private-hosts`; for tests and internal deployments).
    pub cimd_private_hosts: Vec<String>,
    /// Roots trusted for client ID metadata documents on top of the system's
    /// (`--cimd-extra-root-ca`; for internal deployments and tests).
    pub cimd_extra_roots: Vec<reqwest::Certificate>,
}

impl Config {
    pub fn new(issuer: &str) -> Config {
        Config {
            issuer: issuer.trim_end_matches('/').to_string(),
            cimd_private_hosts: Vec::new(),
            cimd_extra_roots: Vec::new(),
        }
    }

    /// The protected resource (RFC 8707 / RFC 9728): the MCP endpoint.
    pub fn resource(&self) -> String {
        format!("{}/mcp", self.issuer)
    }

    /// True for this server's own resource indicators (the MCP endpoint, or the server
    /// itself with or without a trailing slash).
    pub fn is_own_resource(&self, value: &str) -> bool {
        let value = value.trim_end_matches('/');
        value == self.issuer || value == self.resource()
    }
}

/// The scopes of an OAuth grant: `mcp` (what an MCP client needs) and, if the user grants it,
/// `account`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scopes {
    pub mcp: bool,
    pub account: bool,
}

impl Scopes {
    pub const MCP: Scopes = Scopes {
        mcp: true,
        account: false,
    };

    /// Space-separated scopes; none means `mcp`. Unknown scopes are refused.
    pub fn parse(value: Option<&str>) -> Result<Scopes> {
        let value = value.unwrap_or("").trim();
        if value.len() > 200 {
            return Err(Error::oauth(
                OAuthCode::InvalidScope,
                "the scope is too long",
            ));
        }
        let mut scopes = Scopes {
            mcp: false,
            account: false,
        };
        for part in value.split_ascii_whitespace() {
            match part {
                "mcp" => scopes.mcp = true,
                "account" => scopes.account = true,
                other => {
                    return Err(Error::oauth(
                        OAuthCode::InvalidScope,
                        format!(
                            "unknown scope `{}`: this server knows `mcp` and `account`",
                            clients::clip(other)
                        ),
                    ));
                }
            }
        }
        if !scopes.mcp && !scopes.account {
            scopes.mcp = true;
        }
        // `account` includes everything `mcp` allows.
        if scopes.account {
            scopes.mcp = true;
        }
        Ok(scopes)
    }

    pub fn contains(self, other: Scopes) -> bool {
        (self.mcp || !other.mcp) && (self.account || !other.account)
    }

    /// The token scope these grant.
    pub fn token_scope(self) -> Scope {
        if self.account {
            Scope::Account
        } else {
            Scope::Mcp
        }
    }
}

impl std::fmt::Display for Scopes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.account {
            f.write_str("mcp account")
        } else {
            f.write_str("mcp")
        }
    }
}

/// SHA-256 (hex) of a high-entropy secret, as stored.
pub(crate) fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(format!("polydev-oauth:{secret}").as_bytes()))
}

pub(crate) fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).expect("the operating system's random source failed");
    hex::encode(buf)
}

/// A client by id: a registered one, or, for an `https` URL, the client its metadata
/// document describes (fetched with the guards of [`cimd`]).
pub async fn find_or_fetch_client(
    pool: &PgPool,
    config: &Config,
    client_id: &str,
) -> Result<Option<Client>> {
    if client_id.starts_with("https://") || client_id.starts_with("http://") {
        return cimd::client(pool, config, client_id).await;
    }
    clients::find_client(pool, client_id).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_default_to_mcp_and_refuse_unknown_ones() {
        assert_eq!(Scopes::parse(None).unwrap(), Scopes::MCP);
        assert_eq!(Scopes::parse(Some("")).unwrap(), Scopes::MCP);
        let both = Scopes::parse(Some("mcp account")).unwrap();
        assert!(both.account && both.mcp);
        assert_eq!(both.to_string(), "mcp account");
        assert!(Scopes::parse(Some("admin")).is_err());
        assert!(both.contains(Scopes::MCP));
        assert!(!Scopes::MCP.contains(both));
    }

    #[test]
    fn the_resource_is_the_mcp_endpoint() {
        let config = Config::new("https://polydev.example.com/");
        assert_eq!(config.resource(), "https://polydev.example.com/mcp");
        assert!(config.is_own_resource("https://polydev.example.com/mcp"));
        assert!(config.is_own_resource("https://polydev.example.com/"));
        assert!(!config.is_own_resource("https://other.example.com/mcp"));
    }
}
