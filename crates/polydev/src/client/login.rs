//! `polydev login`: the OAuth device authorization grant (RFC 8628) against a polydev server.
//! The CLI registers itself as a public client, shows a short code and a URL, polls until the
//! person approves in the browser, and stores the tokens in its config directory
//! (`credentials.json`, mode 0600). `polydev mcp` uses them when `POLYDEV_USER_TOKEN` is unset.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

const DEVICE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";

/// What `polydev login` stores.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredLogin {
    pub server_url: String,
    pub client_id: String,
    pub access_token: String,
    pub refresh_token: Option<String>,
    /// Unix seconds.
    pub expires_at: i64,
    pub scope: String,
}

/// `POLYDEV_CONFIG_DIR`, else `$XDG_CONFIG_HOME/polydev`, else `~/.config/polydev`.
pub fn config_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("POLYDEV_CONFIG_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".config")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("polydev")
}

pub fn credentials_path() -> PathBuf {
    config_dir().join("credentials.json")
}

/// Writes the credentials with mode 0600 (in a 0700 directory), atomically.
pub fn save(login: &StoredLogin) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let dir = config_dir();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let path = credentials_path();
    let temporary = dir.join(format!(".credentials.{}.tmp", std::process::id()));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temporary)
        .with_context(|| format!("cannot write {}", temporary.display()))?;
    file.write_all(serde_json::to_string_pretty(login)?.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&temporary, &path)?;
    Ok(path)
}

pub fn load() -> Option<StoredLogin> {
    let text = std::fs::read_to_string(credentials_path()).ok()?;
    serde_json::from_str(&text).ok()
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

async fn form(
    client: &reqwest::Client,
    url: &str,
    fields: &[(&str, &str)],
) -> anyhow::Result<(u16, Value)> {
    let response = client
        .post(url)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(serde_urlencoded::to_string(fields)?)
        .send()
        .await
        .with_context(|| format!("cannot reach {url}"))?;
    let status = response.status().as_u16();
    Ok((status, response.json().await.unwrap_or_default()))
}

fn describe(body: &Value) -> String {
    format!(
        "{}: {}",
        body["error"].as_str().unwrap_or("error"),
        body["error_description"].as_str().unwrap_or("")
    )
}

/// Runs the device grant against `server_url`, printing the instructions to `out`.
pub async fn login(server_url: &str, out: &mut impl Write) -> anyhow::Result<StoredLogin> {
    let server = server_url.trim_end_matches('/');
    let http = crate::net::http_client();
    let registration = http
        .post(format!("{server}/oauth/register"))
        .json(&json!({
            "client_name": "polydev CLI",
            "grant_types": [DEVICE_GRANT, "refresh_token"],
            "token_endpoint_auth_method": "none",
            "scope": "mcp",
        }))
        .send()
        .await
        .with_context(|| format!("cannot reach the polydev server at {server}"))?;
    let status = registration.status();
    let registration: Value = registration.json().await.unwrap_or_default();
    if !status.is_success() {
        bail!("registering the CLI failed: {}", describe(&registration));
    }
    let client_id = registration["client_id"]
        .as_str()
        .context("no client_id in the registration")?
        .to_string();
    let (status, started) = form(
        &http,
        &format!("{server}/oauth/device_authorization"),
        &[("client_id", &client_id), ("scope", "mcp")],
    )
    .await?;
    if status != 200 {
        bail!("starting the sign-in failed: {}", describe(&started));
    }
    let device_code = started["device_code"].as_str().context("no device_code")?;
    let user_code = started["user_code"].as_str().unwrap_or_default();
    let mut interval = started["interval"].as_u64().unwrap_or(5).max(1);
    let expires_in = started["expires_in"].as_u64().unwrap_or(600);
    writeln!(
        out,
        "To sign in, open {}\n(or open {} and enter the code {user_code})",
        started["verification_uri_complete"]
            .as_str()
            .unwrap_or_default(),
        started["verification_uri"].as_str().unwrap_or_default(),
    )?;
    writeln!(out, "Waiting for approval…")?;
    out.flush()?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(expires_in);
    loop {
        tokio::time::sleep(Duration::from_secs(interval)).await;
        if tokio::time::Instant::now() > deadline {
            bail!("the code expired before it was approved: run `polydev login` again");
        }
        let (status, body) = form(
            &http,
            &format!("{server}/oauth/token"),
            &[
                ("grant_type", DEVICE_GRANT),
                ("device_code", device_code),
                ("client_id", &client_id),
            ],
        )
        .await?;
        if status == 200 {
            let login = StoredLogin {
                server_url: server.to_string(),
                client_id,
                access_token: body["access_token"]
                    .as_str()
                    .context("no access_token")?
                    .to_string(),
                refresh_token: body["refresh_token"].as_str().map(str::to_string),
                expires_at: now() + body["expires_in"].as_i64().unwrap_or(3600),
                scope: body["scope"].as_str().unwrap_or("mcp").to_string(),
            };
            return Ok(login);
        }
        match body["error"].as_str() {
            Some("authorization_pending") => {}
            Some("slow_down") => interval += 5,
            Some("access_denied") => bail!("the sign-in was denied in the browser"),
            Some("expired_token") => {
                bail!("the code expired before it was approved: run `polydev login` again")
            }
            _ => bail!("the sign-in failed: {}", describe(&body)),
        }
    }
}

/// The stored access token for `server_url`, refreshed first when it expires within a day.
pub async fn token_for(server_url: &str) -> Option<String> {
    let mut login = load()?;
    if login.server_url.trim_end_matches('/') != server_url.trim_end_matches('/') {
        return None;
    }
    if login.expires_at - now() < 86_400
        && let Some(refresh) = login.refresh_token.clone()
    {
        let http = crate::net::http_client();
        let refreshed = form(
            &http,
            &format!("{}/oauth/token", login.server_url),
            &[
                ("grant_type", "refresh_token"),
                ("refresh_token", &refresh),
                ("client_id", &login.client_id),
            ],
        )
        .await;
        if let Ok((200, body)) = refreshed
            && let Some(access) = body["access_token"].as_str()
        {
            login.access_token = access.to_string();
            login.refresh_token = body["refresh_token"].as_str().map(str::to_string);
            login.expires_at = now() + body["expires_in"].as_i64().unwrap_or(3600);
            if let Err(error) = save(&login) {
                eprintln!("polydev: could not store the refreshed token: {error}");
            }
        }
    }
    Some(login.access_token)
}
