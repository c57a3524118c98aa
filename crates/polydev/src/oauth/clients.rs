//! OAuth clients: dynamic registration (RFC 7591) and its management (RFC 7592) in the legacy
//! `mcp_registered_clients` table, redirect URI rules, client authentication.
//!
//! Only clients polydev registered (`registration_kind` set) are accepted: legacy rows kept
//! their secrets in plaintext and are ignored (MCP clients register again on `invalid_client`).

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::PgPool;
use subtle::ConstantTimeEq;

use super::{hash_secret, random_hex};
use crate::error::{Error, OAuthCode, Result};

pub const MAX_REDIRECT_URIS: usize = 10;
pub const MAX_URI_LEN: usize = 2000;
pub const MAX_NAME_LEN: usize = 200;

pub const GRANT_AUTHORIZATION_CODE: &str = "authorization_code";
pub const GRANT_REFRESH_TOKEN: &str = "refresh_token";
pub const GRANT_DEVICE_CODE: &str = "urn:ietf:params:oauth:grant-type:device_code";

/// Client metadata as registered (RFC 7591 §2): what a client may send and what is kept.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ClientMetadata {
    #[serde(default)]
    pub redirect_uris: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_uri: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logo_uri: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tos_uri: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_uri: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    #[serde(default)]
    pub grant_types: Vec<String>,
    #[serde(default)]
    pub response_types: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_endpoint_auth_method: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub software_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub software_version: Option<String>,
}

/// A registered client.
#[derive(Debug, Clone)]
pub struct Client {
    pub client_id: String,
    pub metadata: ClientMetadata,
    pub auth_method: AuthMethod,
    secret_hash: Option<String>,
    registration_token_hash: Option<String>,
    pub created_at: Option<chrono::DateTime<chrono::Utc>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    None,
    SecretBasic,
    SecretPost,
}

impl AuthMethod {
    fn parse(value: Option<&str>) -> Result<AuthMethod> {
        match value.unwrap_or("client_secret_basic") {
            "none" => Ok(AuthMethod::None),
            "client_secret_basic" => Ok(AuthMethod::SecretBasic),
            "client_secret_post" => Ok(AuthMethod::SecretPost),
            other => Err(meta_error(format!(
                "token_endpoint_auth_method `{}` is not supported: use `none`, `client_secret_basic` or `client_secret_post`",
                clip(other)
            ))),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::None => "none",
            AuthMethod::SecretBasic => "client_secret_basic",
            AuthMethod::SecretPost => "client_secret_post",
        }
    }
}

impl Client {
    pub fn name(&self) -> &str {
        self.metadata
            .client_name
            .as_deref()
            .unwrap_or(&self.client_id)
    }

    pub fn allows_grant(&self, grant: &str) -> bool {
        self.metadata.grant_types.iter().any(|g| g == grant)
    }

    /// The registered redirect URI `requested` matches: exactly, or, for a loopback address
    /// (RFC 8252 §7.3), with any port.
    pub fn redirect_matches(&self, requested: &str) -> bool {
        self.metadata
            .redirect_uris
            .iter()
            .any(|registered| redirect_uri_matches(registered, requested))
    }
}

pub(super) fn clip(value: &str) -> String {
    value.chars().take(100).collect()
}

fn meta_error(description: String) -> Error {
    Error::oauth(OAuthCode::InvalidClientMetadata, description)
}

fn redirect_error(description: String) -> Error {
    Error::oauth(OAuthCode::InvalidRedirectUri, description)
}

fn is_loopback_host(host: &url::Host<&str>) -> bool {
    match host {
        url::Host::Ipv4(ip) => ip.is_loopback(),
        url::Host::Ipv6(ip) => ip.is_loopback(),
        url::Host::Domain(name) => name.eq_ignore_ascii_case("localhost"),
    }
}

/// Schemes a browser must never be sent to, whatever a client registers.
const FORBIDDEN_SCHEMES: &[&str] = &[
    "javascript",
    "data",
    "vbscript",
    "file",
    "about",
    "blob",
    "filesystem",
    "ftp",
    "ws",
    "wss",
];

/// A redirect URI a client may register: `https`, `http` on a loopback address (a native app's
/// local listener), or a private-use scheme (`com.example.app:/callback`, RFC 8252 §7.1);
/// never a fragment, never `javascript:` and the like.
pub fn check_redirect_uri(uri: &str) -> Result<url::Url> {
    if uri.len() > MAX_URI_LEN {
        return Err(redirect_error(format!(
            "a redirect URI may be at most {MAX_URI_LEN} characters"
        )));
    }
    let parsed = url::Url::parse(uri).map_err(|e| {
        redirect_error(format!(
            "the redirect URI `{}` is not an absolute URI: {e}",
            clip(uri)
        ))
    })?;
    if parsed.fragment().is_some() {
        return Err(redirect_error(format!(
            "the redirect URI `{}` has a fragment, which OAuth forbids",
            clip(uri)
        )));
    }
    let scheme = parsed.scheme();
    if FORBIDDEN_SCHEMES.contains(&scheme) {
        return Err(redirect_error(format!(
            "the redirect URI scheme `{scheme}:` is not allowed"
        )));
    }
    match scheme {
        "https" => {
            if parsed.host().is_none() {
                return Err(redirect_error("an https redirect URI needs a host".into()));
            }
        }
        "http" => {
            let loopback = parsed.host().as_ref().is_some_and(is_loopback_host);
            if !loopback {
                return Err(redirect_error(format!(
                    "the redirect URI `{}` uses http on a host that is not loopback: use https, or http://127.0.0.1 / http://[::1] / http://localhost for a local app",
                    clip(uri)
                )));
            }
        }
        // A private-use scheme (RFC 8252 §7.1): a native app's own.
        _ => {
            if !scheme.contains('.') && parsed.host().is_some() {
                // `myapp://host/...`: accepted, but reverse-DNS names are recommended.
            }
        }
    }
    Ok(parsed)
}

/// Exact match, except that a loopback `http` redirect may use any port (RFC 8252 §7.3).
pub fn redirect_uri_matches(registered: &str, requested: &str) -> bool {
    if registered == requested {
        return true;
    }
    let (Ok(a), Ok(b)) = (url::Url::parse(registered), url::Url::parse(requested)) else {
        return false;
    };
    let loopback = a.scheme() == "http"
        && a.host().as_ref().is_some_and(is_loopback_host)
        && b.scheme() == "http";
    loopback
        && a.host_str() == b.host_str()
        && a.path() == b.path()
        && a.query() == b.query()
        && b.fragment().is_none()
        && a.username() == b.username()
        && a.password() == b.password()
}

fn check_optional_uri(field: &str, value: &Option<String>) -> Result<()> {
    if let Some(value) = value {
        let ok = value.len() <= MAX_URI_LEN
            && url::Url::parse(value).is_ok_and(|u| u.scheme() == "https" || u.scheme() == "http");
        if !ok {
            return Err(meta_error(format!(
                "`{field}` must be an http(s) URL of at most {MAX_URI_LEN} characters"
            )));
        }
    }
    Ok(())
}

/// Checks and completes metadata: defaults (grant types, response types, auth method, scope)
/// filled in, every field within its limits.
pub fn normalize_metadata(mut m: ClientMetadata) -> Result<ClientMetadata> {
    if m.grant_types.is_empty() {
        m.grant_types = vec![GRANT_AUTHORIZATION_CODE.into(), GRANT_REFRESH_TOKEN.into()];
    }
    for grant in &m.grant_types {
        if ![
            GRANT_AUTHORIZATION_CODE,
            GRANT_REFRESH_TOKEN,
            GRANT_DEVICE_CODE,
        ]
        .contains(&grant.as_str())
        {
            return Err(meta_error(format!(
                "grant type `{}` is not supported: use authorization_code, refresh_token or {GRANT_DEVICE_CODE}",
                clip(grant)
            )));
        }
    }
    if m.response_types.is_empty() {
        m.response_types = vec!["code".into()];
    }
    if m.response_types.iter().any(|r| r != "code") {
        return Err(meta_error(
            "only the response type `code` is supported".into(),
        ));
    }
    let auth = AuthMethod::parse(m.token_endpoint_auth_method.as_deref())?;
    m.token_endpoint_auth_method = Some(auth.as_str().into());
    if m.grant_types.iter().any(|g| g == GRANT_AUTHORIZATION_CODE) && m.redirect_uris.is_empty() {
        return Err(redirect_error(
            "`redirect_uris` is required for the authorization_code grant".into(),
        ));
    }
    if m.redirect_uris.len() > MAX_REDIRECT_URIS {
        return Err(redirect_error(format!(
            "at most {MAX_REDIRECT_URIS} redirect URIs"
        )));
    }
    for uri in &m.redirect_uris {
        check_redirect_uri(uri)?;
    }
    for (field, value) in [
        ("client_name", &mut m.client_name),
        ("software_id", &mut m.software_id),
        ("software_version", &mut m.software_version),
    ] {
        if let Some(v) = value {
            *v = v.trim().to_string();
            if v.chars().count() > MAX_NAME_LEN || v.chars().any(char::is_control) {
                return Err(meta_error(format!(
                    "`{field}` must be at most {MAX_NAME_LEN} printable characters"
                )));
            }
        }
    }
    check_optional_uri("client_uri", &m.client_uri)?;
    check_optional_uri("logo_uri", &m.logo_uri)?;
    check_optional_uri("tos_uri", &m.tos_uri)?;
    check_optional_uri("policy_uri", &m.policy_uri)?;
    let scope = super::Scopes::parse(m.scope.as_deref())?;
    m.scope = Some(scope.to_string());
    Ok(m)
}

/// A registration: the client and, once only, its secrets.
#[derive(Debug, Clone, Serialize)]
pub struct Registered {
    pub client_id: String,
    pub client_id_issued_at: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_secret: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_secret_expires_at: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub registration_access_token: Option<String>,
    #[serde(flatten)]
    pub metadata: ClientMetadata,
}

/// Registers a client (RFC 7591). Secrets (the client secret of a confidential client, the
/// registration access token) are returned once and stored as SHA-256.
pub async fn register(pool: &PgPool, metadata: ClientMetadata) -> Result<Registered> {
    let metadata = normalize_metadata(metadata)?;
    let auth = AuthMethod::parse(metadata.token_endpoint_auth_method.as_deref())?;
    let client_id = format!("pdc_{}", random_hex(16));
    let secret = (auth != AuthMethod::None).then(|| format!("pds_{}", random_hex(32)));
    let registration_token = format!("pdrat_{}", random_hex(32));
    let row = sqlx::query!(
        r#"INSERT INTO mcp_registered_clients
               (client_id, client_name, redirect_uris, scope, client_uri, logo_uri, tos_uri,
                policy_uri, client_secret_hash, registration_token_hash,
                token_endpoint_auth_method, metadata, registration_kind)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, 'dynamic')
           RETURNING extract(epoch FROM created_at)::int8 AS "issued_at!""#,
        &client_id,
        metadata.client_name,
        serde_json::to_value(&metadata.redirect_uris).map_err(Error::internal)?,
        metadata.scope,
        metadata.client_uri,
        metadata.logo_uri,
        metadata.tos_uri,
        metadata.policy_uri,
        secret.as_deref().map(hash_secret),
        hash_secret(&registration_token),
        auth.as_str(),
        serde_json::to_value(&metadata).map_err(Error::internal)?
    )
    .fetch_one(pool)
    .await?;
    tracing::info!(%client_id, name = ?metadata.client_name, "OAuth client registered");
    Ok(Registered {
        client_id,
        client_id_issued_at: row.issued_at,
        client_secret_expires_at: secret.as_ref().map(|_| 0),
        client_secret: secret,
        registration_access_token: Some(registration_token),
        metadata,
    })
}

/// Stores (or refreshes) the cached registration of a client ID metadata document.
pub(super) async fn store_metadata_document(
    pool: &PgPool,
    client_id: &str,
    metadata: &ClientMetadata,
) -> Result<()> {
    sqlx::query!(
        "INSERT INTO mcp_registered_clients
             (client_id, client_name, redirect_uris, scope, client_uri, logo_uri, tos_uri,
              policy_uri, token_endpoint_auth_method, metadata, registration_kind, fetched_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'none', $9, 'metadata_document', now())
         ON CONFLICT (client_id) DO UPDATE SET client_name = EXCLUDED.client_name,
             redirect_uris = EXCLUDED.redirect_uris, scope = EXCLUDED.scope,
             client_uri = EXCLUDED.client_uri, logo_uri = EXCLUDED.logo_uri,
             tos_uri = EXCLUDED.tos_uri, policy_uri = EXCLUDED.policy_uri,
             metadata = EXCLUDED.metadata, fetched_at = now(), updated_at = now()
         WHERE mcp_registered_clients.registration_kind = 'metadata_document'",
        client_id,
        metadata.client_name,
        serde_json::to_value(&metadata.redirect_uris).map_err(Error::internal)?,
        metadata.scope,
        metadata.client_uri,
        metadata.logo_uri,
        metadata.tos_uri,
        metadata.policy_uri,
        serde_json::to_value(metadata).map_err(Error::internal)?
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// A registered client by id (`None` for unknown ids and legacy rows).
pub async fn find_client(pool: &PgPool, client_id: &str) -> Result<Option<Client>> {
    if client_id.len() > MAX_URI_LEN {
        return Ok(None);
    }
    let row = sqlx::query!(
        r#"SELECT client_id, metadata AS "metadata!", client_secret_hash, registration_token_hash,
                  token_endpoint_auth_method AS "auth!", created_at
             FROM mcp_registered_clients
            WHERE client_id = $1 AND registration_kind IS NOT NULL AND metadata IS NOT NULL
              AND token_endpoint_auth_method IS NOT NULL"#,
        client_id
    )
    .fetch_optional(pool)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let metadata: ClientMetadata = serde_json::from_value::<ClientMetadata>(row.metadata)
        .map_err(|e| Error::internal(format!("stored client metadata: {e}")))?;
    Ok(Some(Client {
        client_id: row.client_id,
        metadata,
        auth_method: AuthMethod::parse(Some(&row.auth))?,
        secret_hash: row.client_secret_hash,
        registration_token_hash: row.registration_token_hash,
        created_at: row.created_at,
    }))
}

/// How a client authenticated at the token or revocation endpoint.
#[derive(Debug, Default, Clone)]
pub struct ClientCredentials {
    /// From `Authorization: Basic` (client_secret_basic).
    pub basic: Option<(String, String)>,
    /// From the form (`client_id`, `client_secret`).
    pub form_id: Option<String>,
    pub form_secret: Option<String>,
}

fn invalid_client(description: &str) -> Error {
    Error::oauth(OAuthCode::InvalidClient, description)
}

/// The client that `credentials` authenticate, by its registered method.
pub async fn authenticate_client(pool: &PgPool, credentials: &ClientCredentials) -> Result<Client> {
    let client_id = match (&credentials.basic, &credentials.form_id) {
        (Some((id, _)), Some(form)) if id != form => {
            return Err(invalid_client(
                "client_id differs between the Authorization header and the body",
            ));
        }
        (Some((id, _)), _) => id.clone(),
        (None, Some(id)) => id.clone(),
        (None, None) => {
            return Err(invalid_client(
                "no client_id: send it in the body or with HTTP Basic",
            ));
        }
    };
    let Some(client) = find_client(pool, &client_id).await? else {
        return Err(invalid_client(
            "unknown client_id: register the client again",
        ));
    };
    let presented = match client.auth_method {
        AuthMethod::None => None,
        AuthMethod::SecretBasic => credentials.basic.as_ref().map(|(_, s)| s.clone()),
        AuthMethod::SecretPost => credentials.form_secret.clone(),
    };
    if client.auth_method != AuthMethod::None {
        let ok = match (&presented, &client.secret_hash) {
            (Some(secret), Some(stored)) => {
                bool::from(hash_secret(secret).as_bytes().ct_eq(stored.as_bytes()))
            }
            _ => false,
        };
        if !ok {
            return Err(invalid_client(&format!(
                "client authentication failed (this client uses {})",
                client.auth_method.as_str()
            )));
        }
    }
    Ok(client)
}

/// RFC 7592: the client whose registration access token is `token`.
pub async fn client_for_management(
    pool: &PgPool,
    client_id: &str,
    token: Option<&str>,
) -> Result<Client> {
    let refused = || {
        Error::oauth(
            OAuthCode::InvalidToken,
            "the registration access token is missing or wrong",
        )
    };
    let token = token.ok_or_else(refused)?;
    let client = find_client(pool, client_id).await?.ok_or_else(refused)?;
    let ok = client
        .registration_token_hash
        .as_ref()
        .is_some_and(|stored| bool::from(hash_secret(token).as_bytes().ct_eq(stored.as_bytes())));
    if ok { Ok(client) } else { Err(refused()) }
}

/// What RFC 7592 reads return (never a secret; the secret is shown only at registration).
pub fn describe(client: &Client) -> Value {
    let mut value = serde_json::to_value(&client.metadata).unwrap_or_default();
    value["client_id"] = Value::String(client.client_id.clone());
    if let Some(at) = client.created_at {
        value["client_id_issued_at"] = Value::from(at.timestamp());
    }
    value
}

/// RFC 7592 update: replaces the metadata (the client id, secret and token stay).
pub async fn update_client(
    pool: &PgPool,
    client: &Client,
    metadata: ClientMetadata,
) -> Result<Client> {
    let mut metadata = normalize_metadata(metadata)?;
    // The authentication method is fixed at registration (a public client gets no secret later).
    metadata.token_endpoint_auth_method = Some(client.auth_method.as_str().into());
    sqlx::query!(
        "UPDATE mcp_registered_clients SET client_name = $2, redirect_uris = $3, scope = $4,
                client_uri = $5, logo_uri = $6, tos_uri = $7, policy_uri = $8, metadata = $9,
                updated_at = now()
          WHERE client_id = $1",
        &client.client_id,
        metadata.client_name,
        serde_json::to_value(&metadata.redirect_uris).map_err(Error::internal)?,
        metadata.scope,
        metadata.client_uri,
        metadata.logo_uri,
        metadata.tos_uri,
        metadata.policy_uri,
        serde_json::to_value(&metadata).map_err(Error::internal)?
    )
    .execute(pool)
    .await?;
    Ok(Client {
        metadata,
        ..client.clone()
    })
}

/// RFC 7592 delete: the client goes, and every grant to it is revoked.
pub async fn delete_client(pool: &PgPool, client: &Client) -> Result<()> {
    let mut tx = pool.begin().await?;
    let grants = sqlx::query_scalar!(
        "SELECT id FROM oauth_grants WHERE client_id = $1 AND revoked_at IS NULL",
        &client.client_id
    )
    .fetch_all(&mut *tx)
    .await?;
    for grant in grants {
        super::flow::revoke_grant_in(&mut tx, grant).await?;
    }
    sqlx::query!(
        "DELETE FROM mcp_registered_clients WHERE client_id = $1",
        &client.client_id
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    tracing::info!(client_id = %client.client_id, "OAuth client deleted");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirect_uris_are_checked() {
        for ok in [
            "https://app.example.com/cb",
            "http://127.0.0.1:3000/callback",
            "http://localhost/cb",
            "http://[::1]:9/cb",
            "com.example.app:/oauth",
            "cursor://anysphere.cursor-retrieval/oauth/callback",
        ] {
            assert!(check_redirect_uri(ok).is_ok(), "{ok}");
        }
        for bad in [
            "javascript:alert(1)",
            "JavaScript:alert(1)",
            "data:text/html,hi",
            "http://evil.example/cb",
            "http://10.0.0.1/cb",
            "https://app.example.com/cb#frag",
            "/relative",
            "file:///etc/passwd",
        ] {
            assert!(check_redirect_uri(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn loopback_redirects_match_any_port_and_others_exactly() {
        let m = redirect_uri_matches;
        assert!(m("http://127.0.0.1:1234/cb", "http://127.0.0.1:5555/cb"));
        assert!(m("http://127.0.0.1/cb", "http://127.0.0.1:5555/cb"));
        assert!(m("http://localhost:1/cb", "http://localhost:2/cb"));
        assert!(!m(
            "http://127.0.0.1:1234/cb",
            "http://127.0.0.1:5555/other"
        ));
        assert!(!m("http://127.0.0.1:1234/cb", "http://localhost:1234/cb"));
        assert!(!m("https://a.example/cb", "https://a.example/cb/"));
        assert!(!m("https://a.example/cb", "https://a.example:8443/cb"));
        assert!(!m("https://a.example/cb", "https://a.example/cb?x=1"));
        assert!(m("https://a.example/cb", "https://a.example/cb"));
    }
}
