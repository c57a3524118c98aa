//! The agent's side of the server's login routes (`/v1/login/agent/{id}/…`), authenticated
//! with the session's bootstrap secret.

use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use zeroize::Zeroizing;

/// What the agent learns of its session.
#[derive(Debug, Clone, Deserialize)]
pub struct AgentInfo {
    pub provider: String,
    pub status: String,
    #[serde(default)]
    pub login_url: Option<String>,
    pub user_public_key: Option<String>,
    pub user_id: Option<String>,
    #[serde(default)]
    pub ice_servers: Vec<IceServer>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct IceServer {
    pub urls: Vec<String>,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub credential: Option<String>,
}

/// A message from the signalling stream.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    /// `event: signal`: a message of the user (`offer`, `candidate`).
    Signal(Value),
    /// `event: status`: the session's new status.
    Status(String),
}

/// Whether a session status is final.
pub fn is_terminal(status: &str) -> bool {
    matches!(
        status,
        "completed" | "failed" | "cancelled" | "canceled" | "expired" | "timeout" | "timed_out"
    )
}

#[derive(Clone)]
pub struct Server {
    client: reqwest::Client,
    base: String,
    secret: std::sync::Arc<Zeroizing<String>>,
}

/// A call's failure: the status (when the server answered) and a short reason.
#[derive(Debug)]
pub struct CallError {
    pub status: Option<u16>,
    pub detail: String,
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.status {
            Some(status) => write!(f, "{} ({status})", self.detail),
            None => f.write_str(&self.detail),
        }
    }
}

impl Server {
    pub fn new(server_url: &str, session_id: &str, secret: Zeroizing<String>) -> Server {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .expect("HTTP client");
        Server {
            client,
            base: format!(
                "{}/v1/login/agent/{session_id}",
                server_url.trim_end_matches('/')
            ),
            secret: std::sync::Arc::new(secret),
        }
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.client
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(self.secret.as_str())
    }

    async fn send(&self, builder: reqwest::RequestBuilder) -> Result<reqwest::Response, CallError> {
        let response = builder
            .timeout(Duration::from_secs(20))
            .send()
            .await
            .map_err(|e| CallError {
                status: None,
                detail: format!("server unreachable: {e}"),
            })?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        let detail = body
            .pointer("/error/message")
            .or_else(|| body.get("message"))
            .and_then(Value::as_str)
            .unwrap_or("refused")
            .to_string();
        Err(CallError {
            status: Some(status),
            detail,
        })
    }

    pub async fn info(&self) -> Result<AgentInfo, CallError> {
        self.send(self.request(reqwest::Method::GET, ""))
            .await?
            .json()
            .await
            .map_err(|e| CallError {
                status: None,
                detail: format!("bad session answer: {e}"),
            })
    }

    async fn post(&self, path: &str, body: Value) -> Result<(), CallError> {
        self.send(self.request(reqwest::Method::POST, path).json(&body))
            .await
            .map(|_| ())
    }

    pub async fn heartbeat(&self) -> Result<(), CallError> {
        self.post("/heartbeat", json!({})).await
    }

    pub async fn connected(&self) -> Result<(), CallError> {
        self.post("/connected", json!({})).await
    }

    pub async fn signal(&self, message: Value) -> Result<(), CallError> {
        self.post("/signal", message).await
    }

    pub async fn credential(&self, sealed: &str, kind: &str) -> Result<(), CallError> {
        self.post("/credential", json!({ "sealed": sealed, "kind": kind }))
            .await
    }

    pub async fn fail(&self, reason: &str) -> Result<(), CallError> {
        self.post("/fail", json!({ "reason": reason })).await
    }

    /// Streams the signalling SSE into `out`, reconnecting after a break; a message whose
    /// `seq` was already seen (the replay after a reconnect) is skipped. Returns when `out` is
    /// closed or the server refuses the stream (the session is over or unknown).
    pub async fn stream_signals(&self, out: mpsc::UnboundedSender<Incoming>) -> CallError {
        let mut last_seq: i64 = -1;
        let mut failures = 0u32;
        loop {
            let response = self
                .send(
                    self.request(reqwest::Method::GET, "/signal")
                        .header("accept", "text/event-stream"),
                )
                .await;
            let mut response = match response {
                Ok(r) => {
                    failures = 0;
                    r
                }
                Err(e) if e.status.is_some_and(|s| (400..500).contains(&s)) => return e,
                Err(e) => {
                    failures += 1;
                    if failures > 10 {
                        return e;
                    }
                    tokio::time::sleep(Duration::from_millis(200 * u64::from(failures))).await;
                    continue;
                }
            };
            let mut parser = SseParser::default();
            while let Ok(Some(chunk)) = response.chunk().await {
                for (event, data) in parser.feed(&chunk) {
                    let Ok(value) = serde_json::from_str::<Value>(&data) else {
                        continue;
                    };
                    let incoming = match event.as_str() {
                        "signal" => {
                            let seq = value.get("seq").and_then(Value::as_i64).unwrap_or(-1);
                            if seq >= 0 && seq <= last_seq {
                                continue;
                            }
                            last_seq = last_seq.max(seq);
                            if value.get("from").and_then(Value::as_str) == Some("agent") {
                                continue;
                            }
                            Incoming::Signal(value)
                        }
                        "status" => match value.get("status").and_then(Value::as_str) {
                            Some(status) => Incoming::Status(status.to_string()),
                            None => continue,
                        },
                        _ => continue,
                    };
                    if out.send(incoming).is_err() {
                        return CallError {
                            status: None,
                            detail: "stopped".into(),
                        };
                    }
                }
            }
            if out.is_closed() {
                return CallError {
                    status: None,
                    detail: "stopped".into(),
                };
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// A Server-Sent Events parser: bytes in, `(event, data)` out.
#[derive(Default)]
pub struct SseParser {
    buffer: Vec<u8>,
    event: String,
    data: Vec<String>,
}

impl SseParser {
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<(String, String)> {
        self.buffer.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(end) = self.buffer.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.buffer.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end_matches(['\n', '\r']);
            if line.is_empty() {
                if !self.data.is_empty() {
                    let event = std::mem::take(&mut self.event);
                    let event = if event.is_empty() {
                        "message".into()
                    } else {
                        event
                    };
                    out.push((event, self.data.join("\n")));
                    self.data.clear();
                }
                self.event.clear();
            } else if let Some(rest) = line.strip_prefix("event:") {
                self.event = rest.trim_start().to_string();
            } else if let Some(rest) = line.strip_prefix("data:") {
                self.data
                    .push(rest.strip_prefix(' ').unwrap_or(rest).to_string());
            }
            // `id:`, `retry:` and `:` comments (keep-alives) need nothing here.
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_events_are_parsed_across_chunk_boundaries() {
        let mut p = SseParser::default();
        assert!(p.feed(b": keep-alive\n\nevent: sig").is_empty());
        let events = p.feed(
            b"nal\ndata: {\"seq\":1}\r\n\r\nevent: status\ndata: {\"status\":\"failed\"}\n\n",
        );
        assert_eq!(
            events,
            vec![
                ("signal".to_string(), "{\"seq\":1}".to_string()),
                ("status".to_string(), "{\"status\":\"failed\"}".to_string())
            ]
        );
    }
}
