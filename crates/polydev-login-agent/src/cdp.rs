//! Headless Chromium driven over its DevTools pipe (`--remote-debugging-pipe`): commands are
//! JSON messages ending in NUL on the browser's fd 3, answers and events come back the same
//! way on its fd 4. No debugging port is opened, so nothing else on the machine can drive the
//! browser (the login sandbox may share the host's network).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin};
use tokio::sync::{Mutex, mpsc, oneshot};

/// A DevTools event: its method, parameters and the session it belongs to.
#[derive(Debug)]
pub struct CdpEvent {
    pub method: String,
    pub params: Value,
    pub session_id: Option<String>,
}

type Pending = Arc<std::sync::Mutex<HashMap<u64, oneshot::Sender<Result<Value, String>>>>>;

/// The browser process and its DevTools connection.
pub struct Browser {
    child: Child,
    writer: Mutex<ChildStdin>,
    pending: Pending,
    next_id: AtomicU64,
    /// The page's flattened session.
    session: std::sync::Mutex<Option<String>>,
    profile: PathBuf,
}

/// How long one DevTools call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

impl Browser {
    /// Starts `chromium` headless with a fresh profile under `profile_parent`, returning the
    /// browser and its event stream.
    pub async fn launch(
        chromium: &Path,
        profile_parent: &Path,
        width: u32,
        height: u32,
    ) -> Result<(Browser, mpsc::UnboundedReceiver<CdpEvent>), String> {
        let profile = profile_parent.join(format!("chromium-{}", std::process::id()));
        std::fs::create_dir_all(&profile)
            .map_err(|e| format!("browser profile {}: {e}", profile.display()))?;
        // The pipe is the browser's fd 3 (commands) and fd 4 (answers): the shell moves our
        // stdin/stdout pipes there, then becomes the browser. No unsafe pre_exec needed.
        let mut command = tokio::process::Command::new("/bin/sh");
        command
            .arg("-c")
            .arg(r#"exec "$@" 3<&0 4>&1 </dev/null >/dev/null"#)
            .arg("sh")
            .arg(chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-default-apps",
                "--disable-extensions",
                "--disable-sync",
                "--no-first-run",
                "--no-default-browser-check",
                "--mute-audio",
                "--remote-debugging-pipe",
                "--hide-scrollbars",
            ])
            .arg(format!("--window-size={width},{height}"))
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .process_group(0)
            .kill_on_drop(true);
        let mut child = command
            .spawn()
            .map_err(|e| format!("start {}: {e}", chromium.display()))?;
        let writer = child.stdin.take().expect("piped");
        let reader = child.stdout.take().expect("piped");
        let pending: Pending = Arc::default();
        let (events_tx, events) = mpsc::unbounded_channel();
        tokio::spawn(read_loop(reader, pending.clone(), events_tx));
        let browser = Browser {
            child,
            writer: Mutex::new(writer),
            pending,
            next_id: AtomicU64::new(1),
            session: std::sync::Mutex::new(None),
            profile,
        };
        Ok((browser, events))
    }

    /// Calls `method` on the browser (no session) or on the page's session.
    async fn call_in(
        &self,
        session: Option<String>,
        method: &str,
        params: Value,
    ) -> Result<Value, String> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut message = json!({ "id": id, "method": method, "params": params });
        if let Some(session) = session {
            message["sessionId"] = json!(session);
        }
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap().insert(id, tx);
        let mut bytes = serde_json::to_vec(&message).expect("json");
        bytes.push(0);
        {
            let mut writer = self.writer.lock().await;
            if let Err(e) = writer.write_all(&bytes).await {
                self.pending.lock().unwrap().remove(&id);
                return Err(format!("browser pipe: {e}"));
            }
        }
        match tokio::time::timeout(CALL_TIMEOUT, rx).await {
            Ok(Ok(result)) => result.map_err(|e| format!("{method}: {e}")),
            Ok(Err(_)) => Err("the browser closed its DevTools pipe".into()),
            Err(_) => {
                self.pending.lock().unwrap().remove(&id);
                Err(format!("{method}: no answer from the browser"))
            }
        }
    }

    /// Calls `method` on the page.
    pub async fn call(&self, method: &str, params: Value) -> Result<Value, String> {
        let session = self.session.lock().unwrap().clone();
        self.call_in(session, method, params).await
    }

    /// Opens the page (one tab) and attaches to it; starts the screencast of JPEG frames.
    pub async fn open_page(&self, width: u32, height: u32) -> Result<(), String> {
        let target = self
            .call_in(None, "Target.createTarget", json!({ "url": "about:blank" }))
            .await?;
        let target_id = target["targetId"]
            .as_str()
            .ok_or("no targetId")?
            .to_string();
        let attached = self
            .call_in(
                None,
                "Target.attachToTarget",
                json!({ "targetId": target_id, "flatten": true }),
            )
            .await?;
        let session = attached["sessionId"].as_str().ok_or("no sessionId")?;
        *self.session.lock().unwrap() = Some(session.to_string());
        self.call("Page.enable", json!({})).await?;
        // Headless pages are never "focused": without this, autofocus and the caret stay off.
        self.call(
            "Emulation.setFocusEmulationEnabled",
            json!({ "enabled": true }),
        )
        .await?;
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": width, "height": height, "deviceScaleFactor": 1, "mobile": false }),
        )
        .await?;
        self.call(
            "Page.startScreencast",
            json!({ "format": "jpeg", "quality": 70, "maxWidth": width, "maxHeight": height, "everyNthFrame": 1 }),
        )
        .await?;
        Ok(())
    }

    pub async fn navigate(&self, url: &str) -> Result<(), String> {
        let result = self.call("Page.navigate", json!({ "url": url })).await?;
        match result.get("errorText").and_then(Value::as_str) {
            Some(error) if !error.is_empty() => Err(format!("navigate: {error}")),
            _ => Ok(()),
        }
    }

    /// Acknowledges a screencast frame (Chromium sends the next one only after it).
    pub async fn ack_frame(&self, session_id: u64) -> Result<(), String> {
        self.call(
            "Page.screencastFrameAck",
            json!({ "sessionId": session_id }),
        )
        .await
        .map(|_| ())
    }

    /// Kills the browser and every process it started (its own process group), and removes
    /// the profile.
    pub async fn close(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.child.kill().await;
        let _ = tokio::fs::remove_dir_all(&self.profile).await;
    }
}

async fn read_loop(
    reader: tokio::process::ChildStdout,
    pending: Pending,
    events: mpsc::UnboundedSender<CdpEvent>,
) {
    let mut reader = BufReader::with_capacity(1 << 20, reader);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(0, &mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        if buf.last() == Some(&0) {
            buf.pop();
        }
        let Ok(message) = serde_json::from_slice::<Value>(&buf) else {
            continue;
        };
        if let Some(id) = message.get("id").and_then(Value::as_u64) {
            if let Some(tx) = pending.lock().unwrap().remove(&id) {
                let result = match message.get("error") {
                    Some(error) => Err(error
                        .get("message")
                        .and_then(Value::as_str)
                        .unwrap_or("error")
                        .to_string()),
                    None => Ok(message.get("result").cloned().unwrap_or(Value::Null)),
                };
                let _ = tx.send(result);
            }
        } else if let Some(method) = message.get("method").and_then(Value::as_str) {
            let _ = events.send(CdpEvent {
                method: method.to_string(),
                session_id: message
                    .get("sessionId")
                    .and_then(Value::as_str)
                    .map(str::to_string),
                params: message.get("params").cloned().unwrap_or(Value::Null),
            });
        }
    }
    // The pipe closed: every caller still waiting gets an error.
    pending.lock().unwrap().clear();
    let _ = events.send(CdpEvent {
        method: "Polydev.browserClosed".into(),
        params: Value::Null,
        session_id: None,
    });
}
