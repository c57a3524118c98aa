//! The login agent (docs/login.md, "The login agent"): one process per login session, in the
//! session's login sandbox. It runs headless Chromium and the provider CLI's login command,
//! shows the browser to the user over WebRTC (screen frames and input on data channels), and
//! when the CLI has written its credential file seals it to the user's X25519 key and hands
//! the sealed box to the server. The credential exists in plaintext only in the sandbox.

pub mod cdp;
pub mod peer;
pub mod provider;
pub mod server;
pub mod stream;

use std::path::PathBuf;
use std::time::Duration;

use base64::Engine;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use zeroize::Zeroizing;

use crate::peer::{Peer, PeerEvent, Shared};
use crate::server::{Incoming, Server, is_terminal};

/// Namespace of the sealed credential's header (user = the session's user, row = the session).
pub const CREDENTIAL_NAMESPACE: &str = "login.credential";
/// How often the agent tells the server it is alive.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(5);
/// How long the agent waits for the CLI to print a login URL before opening the configured one.
const URL_WAIT: Duration = Duration::from_secs(20);

/// The agent's configuration, from its environment.
pub struct Config {
    pub server_url: String,
    pub session_id: String,
    pub secret: Zeroizing<String>,
    pub provider: String,
    /// The provider CLI's login command line (run by `/bin/sh -c`).
    pub cli: String,
    /// The file the CLI writes its credential to (relative: under `home`).
    pub credential_file: String,
    pub chromium: PathBuf,
    /// Where the WebRTC peer binds its UDP socket (`0.0.0.0:0`: every interface).
    pub udp: String,
    pub home: PathBuf,
    pub width: u32,
    pub height: u32,
}

impl Config {
    pub fn from_env() -> Result<Config, String> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let need = |name: &str| var(name).ok_or_else(|| format!("{name} is not set"));
        let provider = need("POLYDEV_LOGIN_PROVIDER")?;
        let (cli, file) = provider::defaults(&provider)
            .ok_or_else(|| format!("unknown provider {provider:?}"))?;
        let (width, height) = match var("POLYDEV_LOGIN_WINDOW") {
            Some(size) => size
                .split_once('x')
                .and_then(|(w, h)| Some((w.parse().ok()?, h.parse().ok()?)))
                .filter(|&(w, h): &(u32, u32)| {
                    (200..=4096).contains(&w) && (200..=4096).contains(&h)
                })
                .ok_or("POLYDEV_LOGIN_WINDOW must be WIDTHxHEIGHT")?,
            None => (1280, 800),
        };
        Ok(Config {
            server_url: need("POLYDEV_SERVER_URL")?,
            session_id: need("POLYDEV_LOGIN_SESSION_ID")?,
            secret: Zeroizing::new(need("POLYDEV_LOGIN_SECRET")?),
            cli: var("POLYDEV_LOGIN_CLI").unwrap_or_else(|| cli.into()),
            credential_file: var("POLYDEV_LOGIN_CREDENTIAL_FILE").unwrap_or_else(|| file.into()),
            chromium: var("POLYDEV_LOGIN_CHROMIUM")
                .map(PathBuf::from)
                .unwrap_or_else(default_chromium),
            udp: var("POLYDEV_LOGIN_UDP").unwrap_or_else(|| "0.0.0.0:0".into()),
            home: var("HOME")
                .map(PathBuf::from)
                .unwrap_or_else(std::env::temp_dir),
            provider,
            width,
            height,
        })
    }
}

/// Debian's browser binary itself when it is there: its `/usr/bin/chromium` wrapper script
/// sources `/etc/chromium.d`, which a sandbox does not have.
fn default_chromium() -> PathBuf {
    let binary = PathBuf::from("/usr/lib/chromium/chromium");
    if binary.exists() {
        binary
    } else {
        PathBuf::from("/usr/bin/chromium")
    }
}

fn log(message: &str) {
    eprintln!("polydev-login-agent: {message}");
}

/// How a run ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The sealed credential was delivered.
    Delivered,
    /// The session ended elsewhere (cancelled, timed out, failed by the server) or the agent
    /// was told to stop.
    Stopped(String),
    /// The agent failed; the reason was reported to the server.
    Failed(String),
}

/// Runs the agent to its end. Every error is reported with `/fail` (fixed words, never a
/// secret or a credential).
pub async fn run(config: Config) -> Outcome {
    let server = Server::new(
        &config.server_url,
        &config.session_id,
        config.secret.clone(),
    );
    let outcome = session(&config, &server).await;
    if let Outcome::Failed(reason) = &outcome {
        log(&format!("failed: {reason}"));
        if let Err(e) = server.fail(reason).await {
            log(&format!("could not report the failure: {e}"));
        }
    }
    outcome
}

async fn session(config: &Config, server: &Server) -> Outcome {
    let mut info = None;
    for attempt in 0..5u64 {
        match server.info().await {
            Ok(i) => {
                info = Some(i);
                break;
            }
            // 409: the session exists but cannot go on (the user has no runtime key): say so.
            Err(e) if e.status == Some(409) => {
                return Outcome::Failed(format!("session refused: {e}"));
            }
            Err(e) if e.status.is_some() => {
                return Outcome::Stopped(format!("session refused: {e}"));
            }
            Err(e) => {
                log(&e.to_string());
                tokio::time::sleep(Duration::from_millis(250 * (attempt + 1))).await;
            }
        }
    }
    let Some(info) = info else {
        return Outcome::Failed("server unreachable".into());
    };
    if is_terminal(&info.status) {
        return Outcome::Stopped(format!("session already {}", info.status));
    }
    if info.provider != config.provider {
        return Outcome::Failed("the session is for another provider".into());
    }
    let (Some(user_key), Some(user_id)) = (info.user_public_key.clone(), info.user_id.clone())
    else {
        return Outcome::Failed("the user has no runtime key to seal the credential to".into());
    };
    if polydev_zk::decode_public_key(&user_key).is_err() {
        return Outcome::Failed("the user's public key is malformed".into());
    }

    let (stop_tx, mut stop) = mpsc::unbounded_channel::<String>();
    let heartbeat = {
        let server = server.clone();
        let stop_tx = stop_tx.clone();
        tokio::spawn(async move {
            let mut misses = 0;
            loop {
                match server.heartbeat().await {
                    Ok(()) => misses = 0,
                    Err(e) if e.status.is_some_and(|s| (400..500).contains(&s)) => {
                        let _ = stop_tx.send(format!("heartbeat refused: {e}"));
                        return;
                    }
                    Err(e) => {
                        misses += 1;
                        if misses >= 6 {
                            let _ = stop_tx.send(format!("server unreachable: {e}"));
                            return;
                        }
                    }
                }
                tokio::time::sleep(HEARTBEAT_EVERY).await;
            }
        })
    };

    let profile_parent = config.home.join(".polydev-login");
    let (browser, mut cdp_events) = match cdp::Browser::launch(
        &config.chromium,
        &profile_parent,
        config.width,
        config.height,
    )
    .await
    {
        Ok(b) => b,
        Err(e) => {
            heartbeat.abort();
            return Outcome::Failed(format!("browser: {e}"));
        }
    };
    let result = drive(
        config,
        server,
        &info,
        &user_key,
        &user_id,
        &browser,
        &mut cdp_events,
        &mut stop,
    )
    .await;
    heartbeat.abort();
    browser.close().await;
    let _ = tokio::fs::remove_dir_all(&profile_parent).await;
    result
}

#[allow(clippy::too_many_arguments)]
async fn drive(
    config: &Config,
    server: &Server,
    info: &server::AgentInfo,
    user_key: &str,
    user_id: &str,
    browser: &cdp::Browser,
    cdp_events: &mut mpsc::UnboundedReceiver<cdp::CdpEvent>,
    stop: &mut mpsc::UnboundedReceiver<String>,
) -> Outcome {
    if let Err(e) = browser.open_page(config.width, config.height).await {
        return Outcome::Failed(format!("browser: {e}"));
    }
    let (mut cli, mut urls) = match provider::ProviderCli::start(&config.cli, &config.home) {
        Ok(c) => c,
        Err(e) => return Outcome::Failed(e),
    };
    let (signals_tx, mut signals) = mpsc::unbounded_channel();
    let signalling = {
        let server = server.clone();
        tokio::spawn(async move { server.stream_signals(signals_tx).await })
    };
    let (peer_tx, mut peer_events) = mpsc::unbounded_channel();
    let shared = Shared::new(peer_tx);
    let mut peer: Option<Peer> = None;
    let mut early_candidates: Vec<Value> = Vec::new();
    let mut opened_url = false;
    let url_wait = tokio::time::sleep(URL_WAIT);
    tokio::pin!(url_wait);
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("a SIGTERM handler");

    let outcome = loop {
        tokio::select! {
            Some(url) = urls.recv(), if !opened_url => {
                opened_url = true;
                if let Err(e) = browser.navigate(&url).await {
                    break Outcome::Failed(format!("browser: {e}"));
                }
            }
            () = &mut url_wait, if !opened_url => {
                opened_url = true;
                match &info.login_url {
                    Some(url) => if let Err(e) = browser.navigate(url).await {
                        break Outcome::Failed(format!("browser: {e}"));
                    },
                    None => break Outcome::Failed("the provider CLI printed no login URL".into()),
                }
            }
            code = cli.wait() => {
                if code != 0 {
                    break Outcome::Failed(format!("the provider CLI exited with code {code} before it wrote a credential"));
                }
                break deliver(config, server, user_key, user_id).await;
            }
            Some(event) = cdp_events.recv() => match event.method.as_str() {
                "Page.screencastFrame" => {
                    if let Some(id) = event.params.get("sessionId").and_then(Value::as_u64) {
                        let _ = browser.ack_frame(id).await;
                    }
                    let data = event.params.get("data").and_then(Value::as_str).unwrap_or_default();
                    if let Ok(jpeg) = base64::engine::general_purpose::STANDARD.decode(data) {
                        shared.frame(jpeg).await;
                    }
                }
                "Polydev.browserClosed" => break Outcome::Failed("the browser exited".into()),
                _ => {}
            },
            Some(incoming) = signals.recv() => match incoming {
                Incoming::Status(status) if is_terminal(&status) => {
                    break Outcome::Stopped(format!("session {status}"));
                }
                Incoming::Status(_) => {}
                Incoming::Signal(message) => match message.get("type").and_then(Value::as_str) {
                    Some("offer") => {
                        let Some(sdp) = message.get("sdp").and_then(Value::as_str) else { continue };
                        if let Some(old) = peer.take() {
                            old.close().await;
                        }
                        match Peer::answer(sdp.to_string(), &info.ice_servers, &config.udp, shared.clone()).await {
                            Ok((p, answer)) => {
                                if let Err(e) = server.signal(json!({"type": "answer", "sdp": answer})).await {
                                    break Outcome::Failed(format!("signalling: {e}"));
                                }
                                for candidate in early_candidates.drain(..) {
                                    if let Err(e) = p.add_candidate(&candidate).await {
                                        log(&e);
                                    }
                                }
                                peer = Some(p);
                            }
                            Err(e) => break Outcome::Failed(e),
                        }
                    }
                    Some("candidate") => {
                        let candidate = message.get("candidate").cloned().unwrap_or(Value::Null);
                        match &peer {
                            Some(p) => if let Err(e) = p.add_candidate(&candidate).await { log(&e) },
                            None => early_candidates.push(candidate),
                        }
                    }
                    _ => {}
                },
            },
            Some(event) = peer_events.recv() => match event {
                PeerEvent::Candidate(message) => {
                    if let Err(e) = server.signal(message).await {
                        log(&format!("candidate not sent: {e}"));
                    }
                }
                PeerEvent::Connected => {
                    if let Err(e) = server.connected().await {
                        log(&format!("connected not reported: {e}"));
                    }
                }
                // The user may reconnect with a new offer; the session's timeout ends it
                // otherwise.
                PeerEvent::Disconnected(why) => log(&why),
                PeerEvent::Input(message) => match stream::input_to_cdp(&message) {
                    Ok((method, params)) => {
                        if let Err(e) = browser.call(method, params).await {
                            log(&format!("input: {e}"));
                        }
                    }
                    Err(stream::BadInput(why)) => log(&format!("input refused: {why}")),
                },
            },
            Some(why) = stop.recv() => break Outcome::Stopped(why),
            _ = terminate.recv() => break Outcome::Stopped("terminated".into()),
        }
    };
    signalling.abort();
    if let Some(p) = peer.take() {
        p.close().await;
    }
    cli.kill().await;
    outcome
}

/// Reads the CLI's credential file, seals it to the user's key and hands it to the server.
async fn deliver(config: &Config, server: &Server, user_key: &str, user_id: &str) -> Outcome {
    let path = provider::credential_path(&config.home, &config.credential_file);
    let metadata = match tokio::fs::metadata(&path).await {
        Ok(m) => m,
        Err(_) => {
            return Outcome::Failed(
                "the provider CLI exited without writing its credential file".into(),
            );
        }
    };
    if metadata.len() == 0 || metadata.len() > provider::MAX_CREDENTIAL {
        return Outcome::Failed("the credential file is empty or too large".into());
    }
    let plaintext = match tokio::fs::read(&path).await {
        Ok(bytes) => Zeroizing::new(bytes),
        Err(_) => return Outcome::Failed("the credential file could not be read".into()),
    };
    let ctx = polydev_zk::Context {
        namespace: CREDENTIAL_NAMESPACE,
        user_id,
        row_id: &config.session_id,
    };
    let sealed = match polydev_zk::seal_to(user_key, &ctx, &plaintext) {
        Ok(s) => s,
        Err(e) => return Outcome::Failed(format!("sealing the credential: {e}")),
    };
    // The plaintext leaves the sandbox's disk as soon as it is sealed.
    let _ = tokio::fs::remove_file(&path).await;
    match server.credential(&sealed, "cli").await {
        Ok(()) => Outcome::Delivered,
        Err(e) => Outcome::Failed(format!("the server refused the credential: {e}")),
    }
}
