//! Mock LLM upstreams that speak the real wire formats: OpenAI Chat Completions (and so every
//! OpenAI-compatible endpoint), Anthropic Messages and Google Gemini `generateContent` /
//! `streamGenerateContent`, each non-streaming and streaming (SSE), with usage fields and
//! provider-shaped error bodies.
//!
//! Behaviour is chosen by the model name: `~`-separated directives after any name, e.g.
//! `gpt-x~delay300~flaky2`:
//!
//! | directive | effect |
//! |---|---|
//! | `delay<ms>` | wait before answering |
//! | `trickle<ms>` | streaming: wait this long before each event after the first |
//! | `status<code>` | answer with that HTTP status and the provider's error body |
//! | `flaky<n>` | the first n requests for this model get 503, then success |
//! | `drop` | the connection is cut (non-streaming: before any byte; streaming: mid-stream) |
//! | `malformed` | 200 with a body that is not the provider's JSON |
//! | `nousage` | no usage fields (some OpenAI-compatible servers) |
//!
//! Every request needs an API key header (any value), like the real services.
//!
//! The answer names the model and the last message's text, and, after earlier messages, how
//! many there were (`(after 2 earlier messages)`), so a test sees the context a model got. An
//! OpenAI-format request with `tools` gets a call of the first tool (`{"query": <prompt>}`,
//! streamed in pieces like OpenAI's), unless its last message is a tool's result.

pub mod login_site;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::serve::ListenerExt;
use bytes::Bytes;
use futures_util::stream::{self, Stream, StreamExt};
use serde_json::{Value, json};

/// A running mock, serving all three formats on one address.
pub struct MockUpstream {
    addr: SocketAddr,
    stats: Arc<Stats>,
    _task: tokio::task::JoinHandle<()>,
}

/// Counters a test can read: how many requests arrived, finished, or were abandoned by the
/// client before their response was complete (cancellation reaching the upstream).
#[derive(Default, Debug)]
pub struct Stats {
    pub started: AtomicU64,
    pub completed: AtomicU64,
    pub abandoned: AtomicU64,
    flaky: Mutex<HashMap<String, u32>>,
}

impl MockUpstream {
    /// Starts on a free loopback port.
    pub async fn start() -> MockUpstream {
        Self::start_on("127.0.0.1:0").await
    }

    pub async fn start_on(addr: &str) -> MockUpstream {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .expect("bind mock upstream");
        let addr = listener.local_addr().expect("local addr");
        let stats = Arc::new(Stats::default());
        let app = Router::new()
            .route("/v1/chat/completions", post(openai))
            .route("/v1/messages", post(anthropic))
            .route("/v1beta/models/{call}", post(gemini))
            .with_state(stats.clone());
        // TCP_NODELAY, or small responses wait for delayed ACKs (~40 ms each).
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("mock upstream");
        });
        MockUpstream {
            addr,
            stats,
            _task: task,
        }
    }

    /// `http://127.0.0.1:PORT`: the base URL for every provider kind.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }
}

impl Stats {
    pub fn started(&self) -> u64 {
        self.started.load(Ordering::SeqCst)
    }
    pub fn completed(&self) -> u64 {
        self.completed.load(Ordering::SeqCst)
    }
    pub fn abandoned(&self) -> u64 {
        self.abandoned.load(Ordering::SeqCst)
    }
}

/// The answer the mock gives for a prompt, and the usage it reports for it.
pub fn answer_for(model: &str, prompt: &str) -> (String, u32, u32) {
    answer_in_conversation(model, prompt, 0)
}

/// The answer to a prompt that follows `earlier` messages of a conversation (system messages
/// not counted): the answer says how many, so tests see what context a model was given.
pub fn answer_in_conversation(model: &str, prompt: &str, earlier: usize) -> (String, u32, u32) {
    let name = model.split('~').next().unwrap_or(model);
    let gist: String = prompt.chars().take(48).collect();
    let mut text = format!("{name} thinks about: {gist}");
    if earlier > 0 {
        text.push_str(&format!(" (after {earlier} earlier messages)"));
    }
    let input = prompt.split_whitespace().count() as u32 + 7;
    let output = text.split_whitespace().count() as u32;
    (text, input, output)
}

#[derive(Debug, Default, Clone)]
struct Directives {
    delay: Option<Duration>,
    status: Option<u16>,
    flaky: Option<u32>,
    drop: bool,
    malformed: bool,
    no_usage: bool,
    trickle: Option<Duration>,
}

fn directives(model: &str) -> Directives {
    let mut d = Directives::default();
    for part in model.split('~').skip(1) {
        let number = |prefix: &str| {
            part.strip_prefix(prefix)
                .and_then(|n| n.parse::<u64>().ok())
        };
        if let Some(ms) = number("delay") {
            d.delay = Some(Duration::from_millis(ms));
        } else if let Some(code) = number("status") {
            d.status = Some(code as u16);
        } else if let Some(ms) = number("trickle") {
            d.trickle = Some(Duration::from_millis(ms));
        } else if let Some(n) = number("flaky") {
            d.flaky = Some(n as u32);
        } else {
            match part {
                "drop" => d.drop = true,
                "malformed" => d.malformed = true,
                "nousage" => d.no_usage = true,
                _ => {}
            }
        }
    }
    d
}

#[derive(Clone, Copy, PartialEq)]
enum Format {
    OpenAi,
    Anthropic,
    Gemini,
}

/// Counts a request as abandoned if its handler future is dropped before it finishes.
struct Guard {
    stats: Arc<Stats>,
    done: bool,
}

impl Guard {
    fn new(stats: &Arc<Stats>) -> Guard {
        stats.started.fetch_add(1, Ordering::SeqCst);
        Guard {
            stats: stats.clone(),
            done: false,
        }
    }
    fn finish(mut self) {
        self.done = true;
        self.stats.completed.fetch_add(1, Ordering::SeqCst);
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if !self.done {
            self.stats.abandoned.fetch_add(1, Ordering::SeqCst);
        }
    }
}

fn has_key(headers: &HeaderMap) -> bool {
    ["authorization", "x-api-key", "x-goog-api-key"]
        .iter()
        .any(|h| headers.get(*h).is_some_and(|v| !v.is_empty()))
}

fn error(format: Format, status: u16, message: &str) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = match format {
        Format::OpenAi => {
            json!({ "error": { "message": message, "type": "mock_error", "code": status.as_u16() } })
        }
        Format::Anthropic => {
            json!({ "type": "error", "error": { "type": "mock_error", "message": message } })
        }
        Format::Gemini => {
            json!({ "error": { "code": status.as_u16(), "message": message, "status": "MOCK_ERROR" } })
        }
    };
    let mut response = (status, axum::Json(body)).into_response();
    if status == StatusCode::TOO_MANY_REQUESTS {
        response
            .headers_mut()
            .insert("retry-after", "1".parse().expect("header"));
    }
    response
}

/// Shared by every format: auth, directives, delay; then `ok` builds the success response.
async fn respond(
    stats: Arc<Stats>,
    format: Format,
    headers: &HeaderMap,
    model: &str,
    ok: impl FnOnce(&Directives, Guard) -> Response,
) -> Response {
    let guard = Guard::new(&stats);
    if !has_key(headers) {
        guard.finish();
        return error(format, 401, "missing API key");
    }
    let d = directives(model);
    if let Some(delay) = d.delay {
        tokio::time::sleep(delay).await;
    }
    if let Some(n) = d.flaky {
        let mut flaky = stats.flaky.lock().expect("lock");
        let seen = flaky.entry(model.to_string()).or_insert(0);
        *seen += 1;
        if *seen <= n {
            drop(flaky);
            guard.finish();
            return error(format, 503, "temporarily overloaded");
        }
    }
    if let Some(status) = d.status {
        guard.finish();
        return error(format, status, &format!("mock status {status}"));
    }
    if d.malformed {
        guard.finish();
        return (StatusCode::OK, "{\"this is\": not json").into_response();
    }
    ok(&d, guard)
}

fn json_response(value: Value, guard: Guard) -> Response {
    guard.finish();
    axum::Json(value).into_response()
}

/// An SSE body of `events`; with `drop`, the stream errors half way, which cuts the connection.
fn sse(events: Vec<String>, d: &Directives, guard: Guard) -> Response {
    let cut = if d.drop { events.len() / 2 } else { usize::MAX };
    let trickle = d.trickle;
    let mut guard = Some(guard);
    let total = events.len();
    let body = stream::iter(events.into_iter().enumerate()).then(move |(i, event)| {
        let finish = (i + 1 == total).then(|| guard.take()).flatten();
        async move {
            match trickle {
                Some(pause) if i > 0 => tokio::time::sleep(pause).await,
                _ => tokio::task::yield_now().await,
            }
            if i >= cut {
                return Err(std::io::Error::other("connection dropped by mock"));
            }
            if let Some(guard) = finish {
                guard.finish();
            }
            Ok::<_, std::io::Error>(Bytes::from(event))
        }
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(body))
        .expect("response")
}

fn dropped() -> Response {
    let body: std::pin::Pin<Box<dyn Stream<Item = Result<Bytes, std::io::Error>> + Send>> =
        Box::pin(stream::once(async {
            Err(std::io::Error::other("connection dropped by mock"))
        }));
    Response::builder()
        .header("content-type", "application/json")
        .body(Body::from_stream(body))
        .expect("response")
}

fn words(text: &str) -> Vec<String> {
    let mut out: Vec<String> = text.split_inclusive(' ').map(str::to_string).collect();
    if out.is_empty() {
        out.push(String::new());
    }
    out
}

fn data(value: Value) -> String {
    format!("data: {value}\n\n")
}

/// `model`, the last message's text and how many messages came before it (system messages
/// not counted), in the shape OpenAI and Anthropic share.
fn model_and_prompt(req: &Value) -> (String, String, usize) {
    let model = req["model"].as_str().unwrap_or_default().to_string();
    let messages = req["messages"].as_array().cloned().unwrap_or_default();
    let prompt = messages
        .last()
        .and_then(|m| m["content"].as_str())
        .unwrap_or_default()
        .to_string();
    let turns = messages.iter().filter(|m| m["role"] != "system").count();
    (model, prompt, turns.saturating_sub(1))
}

/// The function tool the mock calls: the first one offered, unless the last message is
/// already a tool's result (then it answers in text).
fn tool_to_call(req: &Value) -> Option<String> {
    let last_is_tool = req["messages"]
        .as_array()
        .and_then(|m| m.last())
        .is_some_and(|m| m["role"] == "tool");
    if last_is_tool {
        return None;
    }
    req["tools"]
        .as_array()?
        .first()?
        .pointer("/function/name")?
        .as_str()
        .map(str::to_string)
}

// --- OpenAI Chat Completions -------------------------------------------------------------

async fn openai(State(stats): State<Arc<Stats>>, headers: HeaderMap, body: String) -> Response {
    let Ok(req) = serde_json::from_str::<Value>(&body) else {
        return error(Format::OpenAi, 400, "invalid JSON body");
    };
    let (model, prompt, earlier) = model_and_prompt(&req);
    let stream = req["stream"].as_bool().unwrap_or(false);
    let include_usage = req["stream_options"]["include_usage"]
        .as_bool()
        .unwrap_or(false);
    let tool = tool_to_call(&req);
    respond(stats, Format::OpenAi, &headers, &model, |d, guard| {
        let (text, input, mut output) = answer_in_conversation(&model, &prompt, earlier);
        // A tool call's arguments carry the prompt.
        let arguments = json!({ "query": prompt }).to_string();
        if tool.is_some() {
            output = 5;
        }
        let usage = json!({ "prompt_tokens": input, "completion_tokens": output, "total_tokens": input + output });
        if !stream {
            if d.drop {
                return dropped();
            }
            let (message, finish) = match &tool {
                Some(name) => (
                    json!({ "role": "assistant", "content": null, "tool_calls": [{
                        "id": "call_mock_1", "type": "function",
                        "function": { "name": name, "arguments": arguments } }] }),
                    "tool_calls",
                ),
                None => (json!({ "role": "assistant", "content": text }), "stop"),
            };
            let mut body = json!({
                "id": "chatcmpl-mock", "object": "chat.completion", "created": 0, "model": model,
                "choices": [{ "index": 0, "message": message, "finish_reason": finish }],
            });
            if !d.no_usage {
                body["usage"] = usage;
            }
            return json_response(body, guard);
        }
        let chunk = |delta: Value, finish: Value| {
            data(json!({ "id": "chatcmpl-mock", "object": "chat.completion.chunk", "model": model,
                         "choices": [{ "index": 0, "delta": delta, "finish_reason": finish }] }))
        };
        let mut events = vec![chunk(json!({ "role": "assistant", "content": "" }), Value::Null)];
        match &tool {
            Some(name) => {
                // The call in pieces, as OpenAI streams it: id and name first, then the
                // arguments in fragments.
                events.push(chunk(json!({ "tool_calls": [{ "index": 0, "id": "call_mock_1", "type": "function",
                    "function": { "name": name, "arguments": "" } }] }), Value::Null));
                let (head, tail) = arguments.split_at(arguments.len() / 2);
                for piece in [head, tail] {
                    events.push(chunk(json!({ "tool_calls": [{ "index": 0, "function": { "arguments": piece } }] }), Value::Null));
                }
                events.push(chunk(json!({}), json!("tool_calls")));
            }
            None => {
                events.extend(words(&text).into_iter().map(|w| chunk(json!({ "content": w }), Value::Null)));
                events.push(chunk(json!({}), json!("stop")));
            }
        }
        if include_usage && !d.no_usage {
            events.push(data(json!({ "id": "chatcmpl-mock", "object": "chat.completion.chunk", "model": model, "choices": [], "usage": usage })));
        }
        events.push("data: [DONE]\n\n".into());
        sse(events, d, guard)
    })
    .await
}

// --- Anthropic Messages ------------------------------------------------------------------

async fn anthropic(State(stats): State<Arc<Stats>>, headers: HeaderMap, body: String) -> Response {
    let Ok(req) = serde_json::from_str::<Value>(&body) else {
        return error(Format::Anthropic, 400, "invalid JSON body");
    };
    if headers.get("anthropic-version").is_none() {
        return error(
            Format::Anthropic,
            400,
            "anthropic-version header is required",
        );
    }
    if req["max_tokens"].as_u64().is_none() {
        return error(Format::Anthropic, 400, "max_tokens: Field required");
    }
    let (model, prompt, earlier) = model_and_prompt(&req);
    let stream = req["stream"].as_bool().unwrap_or(false);
    respond(stats, Format::Anthropic, &headers, &model, |d, guard| {
        let (text, input, output) = answer_in_conversation(&model, &prompt, earlier);
        if !stream {
            if d.drop {
                return dropped();
            }
            let mut body = json!({
                "id": "msg_mock", "type": "message", "role": "assistant", "model": model,
                "content": [{ "type": "text", "text": text }],
                "stop_reason": "end_turn", "stop_sequence": null,
            });
            if !d.no_usage {
                body["usage"] = json!({ "input_tokens": input, "output_tokens": output });
            }
            return json_response(body, guard);
        }
        let event = |name: &str, value: Value| format!("event: {name}\ndata: {value}\n\n");
        let start_usage = if d.no_usage { json!({}) } else { json!({ "input_tokens": input, "output_tokens": 1 }) };
        let end_usage = if d.no_usage { json!({}) } else { json!({ "output_tokens": output }) };
        let mut events = vec![
            event("message_start", json!({ "type": "message_start", "message": {
                "id": "msg_mock", "type": "message", "role": "assistant", "model": model, "content": [],
                "stop_reason": null, "usage": start_usage } })),
            event("content_block_start", json!({ "type": "content_block_start", "index": 0, "content_block": { "type": "text", "text": "" } })),
            event("ping", json!({ "type": "ping" })),
        ];
        events.extend(words(&text).into_iter().map(|w| {
            event("content_block_delta", json!({ "type": "content_block_delta", "index": 0, "delta": { "type": "text_delta", "text": w } }))
        }));
        events.push(event("content_block_stop", json!({ "type": "content_block_stop", "index": 0 })));
        events.push(event("message_delta", json!({ "type": "message_delta",
            "delta": { "stop_reason": "end_turn", "stop_sequence": null }, "usage": end_usage })));
        events.push(event("message_stop", json!({ "type": "message_stop" })));
        sse(events, d, guard)
    })
    .await
}

// --- Google Gemini -----------------------------------------------------------------------

async fn gemini(
    State(stats): State<Arc<Stats>>,
    Path(call): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let Some((model, method)) = call.split_once(':') else {
        return error(Format::Gemini, 404, "expected models/{model}:{method}");
    };
    let stream = match method {
        "generateContent" => false,
        "streamGenerateContent" => true,
        _ => return error(Format::Gemini, 404, "unknown method"),
    };
    if stream && query.get("alt").map(String::as_str) != Some("sse") {
        return error(Format::Gemini, 400, "this mock streams only with alt=sse");
    }
    let Ok(req) = serde_json::from_str::<Value>(&body) else {
        return error(Format::Gemini, 400, "invalid JSON body");
    };
    let contents = req["contents"].as_array().cloned().unwrap_or_default();
    let prompt = contents
        .last()
        .and_then(|c| c["parts"][0]["text"].as_str())
        .unwrap_or_default()
        .to_string();
    let earlier = contents.len().saturating_sub(1);
    let model = model.to_string();
    respond(stats, Format::Gemini, &headers, &model, |d, guard| {
        let (text, input, output) = answer_in_conversation(&model, &prompt, earlier);
        let usage = |out: u32| json!({ "promptTokenCount": input, "candidatesTokenCount": out, "totalTokenCount": input + out });
        let candidate = |text: &str, finish: Option<&str>| {
            let mut c = json!({ "content": { "parts": [{ "text": text }], "role": "model" }, "index": 0 });
            if let Some(finish) = finish {
                c["finishReason"] = json!(finish);
            }
            c
        };
        if !stream {
            if d.drop {
                return dropped();
            }
            let mut body = json!({ "candidates": [candidate(&text, Some("STOP"))], "modelVersion": model });
            if !d.no_usage {
                body["usageMetadata"] = usage(output);
            }
            return json_response(body, guard);
        }
        let parts = words(&text);
        let last = parts.len() - 1;
        let events = parts
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let mut chunk = json!({ "candidates": [candidate(w, (i == last).then_some("STOP"))], "modelVersion": model });
                if !d.no_usage {
                    // Gemini reports running usage on every chunk; the last one is final.
                    chunk["usageMetadata"] = usage(if i == last { output } else { i as u32 + 1 });
                }
                data(chunk)
            })
            .collect();
        sse(events, d, guard)
    })
    .await
}
