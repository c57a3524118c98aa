//! Client ID metadata documents: an `https` URL as `client_id`, whose JSON document (fetched by
//! this server) is the client's registration. Fetching a URL an anonymous caller chose is a
//! server-side request forgery risk, so:
//! - `https` only, with a path, no credentials or fragment, at most 2000 characters;
//! - the host is resolved once, and every address must be public (no loopback, private,
//!   link-local, CGNAT, multicast, documentation or unspecified address; IPv4-mapped and NAT64
//!   addresses are judged by their IPv4 address) unless the host is listed in
//!   `--cimd-private-hosts`; the connection goes to the checked address (no second lookup
//!   that DNS rebinding could change), without redirects;
//! - at most 5 s and 64 KiB;
//! - the document is cached in `mcp_registered_clients` for an hour;
//! - the server's certificate must chain to the system's roots, or to one added with
//!   `--cimd-extra-root-ca` (an internal CA).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use sqlx::PgPool;

use super::Config;
use super::clients::{self, Client, ClientMetadata, MAX_URI_LEN, clip};
use crate::error::{Error, OAuthCode, Result};

pub const MAX_DOCUMENT_BYTES: usize = 64 * 1024;
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
pub const CACHE_SECS: i64 = 3600;

fn refused(description: impl Into<String>) -> Error {
    Error::oauth(OAuthCode::InvalidClient, description)
}

/// True for an address a server-side fetch must never reach.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_internal_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_internal_v4(v4);
            }
            let s = v6.segments();
            // NAT64 (64:ff9b::/96) embeds an IPv4 address.
            if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] {
                let v4 =
                    Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
                return is_internal_v4(v4);
            }
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local
                || (s[0] & 0xffc0) == 0xfe80 // link-local
                || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
                || v6 == Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 1)
        }
    }
}

fn is_internal_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    ip.is_private()
        || ip.is_loopback()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || a == 0
        || (a == 100 && (64..128).contains(&b)) // CGNAT
        || (a == 192 && b == 0 && c == 0)
        || (a == 198 && (18..20).contains(&b)) // benchmarking
        || a >= 240
}

/// Checks the shape of a client ID URL.
pub fn check_url(client_id: &str) -> Result<url::Url> {
    if client_id.len() > MAX_URI_LEN {
        return Err(refused("the client ID URL is too long"));
    }
    let url = url::Url::parse(client_id)
        .map_err(|e| refused(format!("the client ID is not a URL: {e}")))?;
    if url.scheme() != "https" {
        return Err(refused(
            "a client ID metadata document must be served over https",
        ));
    }
    if url.host().is_none() || url.path() == "/" || url.path().is_empty() {
        return Err(refused("a client ID URL needs a host and a path"));
    }
    if url.fragment().is_some() || !url.username().is_empty() || url.password().is_some() {
        return Err(refused(
            "a client ID URL may not carry credentials or a fragment",
        ));
    }
    Ok(url)
}

/// The addresses of the URL's host, all of them public (or the host allowed).
async fn resolve(config: &Config, url: &url::Url) -> Result<Vec<SocketAddr>> {
    let host = url.host_str().unwrap_or_default();
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let port = url.port_or_known_default().unwrap_or(443);
    let addresses: Vec<SocketAddr> = match bare.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => tokio::time::timeout(FETCH_TIMEOUT, tokio::net::lookup_host((bare, port)))
            .await
            .map_err(|_| refused(format!("resolving `{}` timed out", clip(bare))))?
            .map_err(|e| refused(format!("cannot resolve `{}`: {e}", clip(bare))))?
            .collect(),
    };
    if addresses.is_empty() {
        return Err(refused(format!("`{}` has no address", clip(bare))));
    }
    let allowed = config
        .cimd_private_hosts
        .iter()
        .any(|h| h.eq_ignore_ascii_case(bare));
    if !allowed && addresses.iter().any(|a| is_internal(a.ip())) {
        return Err(refused(format!(
            "the client ID metadata document's host `{}` resolves to a private, loopback or link-local address, which this server does not fetch",
            clip(bare)
        )));
    }
    Ok(addresses)
}

/// Fetches and checks the document at `url`.
async fn fetch(config: &Config, url: &url::Url) -> Result<ClientMetadata> {
    let addresses = resolve(config, url).await?;
    crate::net::install_tls_provider();
    let host = url.host_str().unwrap_or_default().to_string();
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(FETCH_TIMEOUT)
        .connect_timeout(FETCH_TIMEOUT)
        .resolve_to_addrs(&host, &addresses)
        .tls_certs_merge(config.cimd_extra_roots.iter().cloned())
        .user_agent(concat!("polydev/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(Error::internal)?;
    let mut response = http
        .get(url.clone())
        .header("accept", "application/json")
        .send()
        .await
        .map_err(|e| refused(format!("cannot fetch the client ID metadata document: {e}")))?;
    if !response.status().is_success() {
        return Err(refused(format!(
            "fetching the client ID metadata document answered {}",
            response.status()
        )));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| refused(format!("reading the client ID metadata document: {e}")))?
    {
        if body.len() + chunk.len() > MAX_DOCUMENT_BYTES {
            return Err(refused(format!(
                "the client ID metadata document is larger than {} KiB",
                MAX_DOCUMENT_BYTES / 1024
            )));
        }
        body.extend_from_slice(&chunk);
    }
    let document: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|e| refused(format!("the client ID metadata document is not JSON: {e}")))?;
    if document["client_id"].as_str() != Some(url.as_str()) {
        return Err(refused("the document's `client_id` must be its own URL"));
    }
    let mut metadata: ClientMetadata = serde_json::from_value(document)
        .map_err(|e| refused(format!("the client ID metadata document is not valid: {e}")))?;
    // A document is public: its clients cannot hold a secret.
    metadata.token_endpoint_auth_method = Some("none".into());
    clients::normalize_metadata(metadata)
}

/// The client whose ID is the URL `client_id`: from the cache, or fetched.
pub async fn client(pool: &PgPool, config: &Config, client_id: &str) -> Result<Option<Client>> {
    let url = check_url(client_id)?;
    let fresh = sqlx::query_scalar!(
        r#"SELECT fetched_at > now() - make_interval(secs => $2) AS "fresh!"
             FROM mcp_registered_clients
            WHERE client_id = $1 AND registration_kind = 'metadata_document'
              AND fetched_at IS NOT NULL"#,
        url.as_str(),
        CACHE_SECS as f64
    )
    .fetch_optional(pool)
    .await?;
    if fresh != Some(true) {
        let metadata = fetch(config, &url).await?;
        clients::store_metadata_document(pool, url.as_str(), &metadata).await?;
    }
    clients::find_client(pool, url.as_str()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_addresses_are_recognised() {
        for internal in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "224.0.0.1",
            "255.255.255.255",
        ] {
            assert!(is_internal(internal.parse().unwrap()), "{internal}");
        }
        for public in ["93.184.216.34", "1.1.1.1", "2606:4700:4700::1111"] {
            assert!(!is_internal(public.parse().unwrap()), "{public}");
        }
    }

    #[test]
    fn client_id_urls_are_https_with_a_path() {
        assert!(check_url("https://app.example.com/oauth/client.json").is_ok());
        for bad in [
            "http://app.example.com/client.json",
            "https://app.example.com/",
            "https://user:pw@app.example.com/c.json",
            "https://app.example.com/c.json#x",
            "javascript:alert(1)",
        ] {
            assert!(check_url(bad).is_err(), "{bad}");
        }
    }
}
