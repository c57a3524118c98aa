//! The OpenAI-compatible surface (docs/openai.md): `POST /v1/chat/completions`, JSON or a
//! stream of `chat.completion.chunk` events, and `GET /v1/models/{id}` (the list itself is
//! `GET /v1/models`, which carries OpenAI's list shape next to polydev's). A call is a
//! one-model `get_perspectives`: the same reservation, usage row, refunds and idempotency.
//! Errors are OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::{Stream, StreamExt, stream};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use tokio::sync::mpsc;
use tracing::Instrument;
use uuid::Uuid;

use super::{ApiError, ApiJson, Authenticated};
use crate::api::ErrorResponse;
use crate::app::AppState;
use crate::error::{Error, Result};
use crate::perspectives::provider::{ChatMessage, ErrorClass, Role, Tools};
use crate::perspectives::{
    self, Conversation, ModelResult, PerspectivesRequest, PerspectivesResult, Progress,
    ProgressSink, Status,
};

/// A conversation may be 400,000 characters of up to 4 bytes each, plus its JSON.
const MAX_COMPLETIONS_BODY: usize = 2 * 1024 * 1024;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/v1/chat/completions",
            post(completions).layer(DefaultBodyLimit::max(MAX_COMPLETIONS_BODY)),
        )
        .route("/v1/models/{id}", get(model))
}

// --- Errors ----------------------------------------------------------------------------------

/// An error in OpenAI's shape. The status and headers (`WWW-Authenticate`, `Retry-After`) are
/// polydev's own ([`ApiError`]), but for a used-up quota, which OpenAI answers with 429
/// `insufficient_quota` where polydev says 402.
pub struct OpenAiError {
    status: Option<StatusCode>,
    message: String,
    kind: &'static str,
    param: Option<String>,
    code: String,
    /// The polydev error behind it, for its status and headers.
    source: Option<Box<Error>>,
}

impl OpenAiError {
    fn invalid(message: impl Into<String>, param: Option<&str>, code: &str) -> Self {
        OpenAiError {
            status: Some(StatusCode::BAD_REQUEST),
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(str::to_string),
            code: code.to_string(),
            source: None,
        }
    }

    /// A model that was called and did not answer: the status says whose fault it was.
    fn from_model(result: &ModelResult) -> Self {
        let (class, message) = match &result.error {
            Some(error) => (error.class, error.message.clone()),
            None => (ErrorClass::Internal, "the model gave no answer".to_string()),
        };
        let (status, kind, code) = match (result.status, class) {
            (Status::Timeout, _) | (_, ErrorClass::Timeout) => {
                (StatusCode::GATEWAY_TIMEOUT, "api_error", "upstream_timeout")
            }
            (_, ErrorClass::QuotaExceeded) => (
                StatusCode::TOO_MANY_REQUESTS,
                "insufficient_quota",
                "insufficient_quota",
            ),
            (_, ErrorClass::BadRequest) => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "upstream_bad_request",
            ),
            (_, ErrorClass::RateLimited) => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "upstream_rate_limited",
            ),
            (_, ErrorClass::NotConfigured) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "api_error",
                "model_not_available",
            ),
            (_, ErrorClass::Internal) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "internal",
            ),
            (_, ErrorClass::Auth | ErrorClass::Upstream | ErrorClass::Connection)
            | (_, ErrorClass::Malformed) => {
                (StatusCode::BAD_GATEWAY, "api_error", "upstream_error")
            }
        };
        OpenAiError {
            status: Some(status),
            message: format!("{}: {message}", result.model),
            kind,
            param: None,
            code: code.to_string(),
            source: None,
        }
    }

    fn body(&self) -> Value {
        json!({ "error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        } })
    }
}

impl From<Error> for OpenAiError {
    fn from(error: Error) -> Self {
        let ErrorResponse { error: detail } = ErrorResponse::from(&error);
        let (kind, code, status) = match &error {
            Error::Unauthorized(_) => ("authentication_error", detail.code, None),
            Error::InsufficientScope { .. } | Error::Forbidden { .. } => {
                ("permission_error", detail.code, None)
            }
            Error::RateLimited { .. } | Error::AuthRateLimited { .. } => {
                ("rate_limit_error", "rate_limit_exceeded".to_string(), None)
            }
            Error::QuotaExceeded(_) => (
                "insufficient_quota",
                "insufficient_quota".to_string(),
                Some(StatusCode::TOO_MANY_REQUESTS),
            ),
            Error::NotFound(_) => ("invalid_request_error", detail.code, None),
            Error::Invalid(_) | Error::TooLarge(_) => ("invalid_request_error", detail.code, None),
            Error::Conflict(_) | Error::InProgress { .. } => ("conflict_error", detail.code, None),
            _ => ("server_error", detail.code, None),
        };
        OpenAiError {
            status,
            message: detail.message,
            kind,
            param: None,
            code,
            source: Some(Box::new(error)),
        }
    }
}

impl From<ApiError> for OpenAiError {
    fn from(error: ApiError) -> Self {
        error.0.into()
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        let body = self.body().to_string();
        let mut response = match self.source {
            // polydev's status and headers, OpenAI's body.
            Some(error) => ApiError(*error).into_response(),
            None => Response::new(Body::empty()),
        };
        if let Some(status) = self.status {
            *response.status_mut() = status;
        }
        *response.body_mut() = Body::from(body);
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        response
    }
}

// --- Request ---------------------------------------------------------------------------------

/// The body of `POST /v1/chat/completions`. Fields not named here are in `other` and refused
/// unless they are null or at their neutral value (see [`check_other`]).
#[derive(Debug, Deserialize)]
struct ChatCompletionRequest {
    model: Option<String>,
    messages: Option<Vec<InMessage>>,
    #[serde(default)]
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    temperature: Option<f32>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    tools: Option<Value>,
    tool_choice: Option<Value>,
    parallel_tool_calls: Option<bool>,
    #[serde(flatten)]
    other: Map<String, Value>,
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct InMessage {
    role: String,
    #[serde(default)]
    content: Option<Content>,
    tool_calls: Option<Value>,
    tool_call_id: Option<String>,
    name: Option<String>,
}

/// A message's content: a string, or an array of parts of which only text is taken.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

/// Accepted and ignored: they change nothing about the answer.
const IGNORED: &[&str] = &[
    "user",
    "metadata",
    "store",
    "seed",
    "service_tier",
    "prompt_cache_key",
    "safety_identifier",
];

/// Parameters polydev does not pass on are refused (400, `param` names them), unless they are
/// null or at the value that means "the default", which tools often send explicitly.
fn check_other(other: &Map<String, Value>) -> Result<(), OpenAiError> {
    for (name, value) in other {
        let neutral = value.is_null()
            || IGNORED.contains(&name.as_str())
            || match name.as_str() {
                "n" | "top_p" => value.as_f64() == Some(1.0),
                "presence_penalty" | "frequency_penalty" => value.as_f64() == Some(0.0),
                "logprobs" => value == &Value::Bool(false),
                "logit_bias" => value.as_object().is_some_and(Map::is_empty),
                "response_format" => value["type"] == "text",
                _ => false,
            };
        if !neutral {
            return Err(OpenAiError::invalid(
                format!(
                    "`{name}` is not supported by polydev's chat completions (docs/openai.md lists what is)"
                ),
                Some(name),
                "unsupported_parameter",
            ));
        }
    }
    Ok(())
}

impl InMessage {
    fn into_message(self, index: usize) -> Result<ChatMessage, OpenAiError> {
        let param = format!("messages[{index}]");
        let role = match self.role.as_str() {
            "system" | "developer" => Role::System,
            "user" => Role::User,
            "assistant" => Role::Assistant,
            "tool" => Role::Tool,
            other => {
                return Err(OpenAiError::invalid(
                    format!(
                        "`{param}.role` `{other}` is not supported: use system, developer, user, assistant or tool"
                    ),
                    Some(&format!("{param}.role")),
                    "invalid_value",
                ));
            }
        };
        let content = match self.content {
            None => None,
            Some(Content::Text(text)) => Some(text),
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for part in parts {
                    match (part.kind.as_str(), part.text) {
                        ("text", Some(piece)) => text.push_str(&piece),
                        (kind, _) => {
                            return Err(OpenAiError::invalid(
                                format!(
                                    "`{param}.content` has a part of type `{kind}`: only text parts are supported"
                                ),
                                Some(&format!("{param}.content")),
                                "unsupported_content",
                            ));
                        }
                    }
                }
                Some(text)
            }
        };
        let tool_calls = self.tool_calls.filter(|t| !t.is_null());
        if content.is_none() && !(role == Role::Assistant && tool_calls.is_some()) {
            return Err(OpenAiError::invalid(
                format!("`{param}.content` is required"),
                Some(&format!("{param}.content")),
                "missing_required_parameter",
            ));
        }
        if role == Role::Tool && self.tool_call_id.is_none() {
            return Err(OpenAiError::invalid(
                format!("`{param}.tool_call_id` is required for a tool message"),
                Some(&format!("{param}.tool_call_id")),
                "missing_required_parameter",
            ));
        }
        Ok(ChatMessage {
            role,
            content,
            tool_calls,
            tool_call_id: self.tool_call_id,
            name: self.name,
        })
    }
}

/// What the handler needs of a request: the perspectives request and how to answer.
struct Call {
    request: PerspectivesRequest,
    model: String,
    stream: bool,
    include_usage: bool,
}

fn into_call(body: ChatCompletionRequest, headers: &HeaderMap) -> Result<Call, OpenAiError> {
    check_other(&body.other)?;
    let model = body.model.ok_or_else(|| {
        OpenAiError::invalid(
            "`model` is required",
            Some("model"),
            "missing_required_parameter",
        )
    })?;
    let messages = body
        .messages
        .ok_or_else(|| {
            OpenAiError::invalid(
                "`messages` is required",
                Some("messages"),
                "missing_required_parameter",
            )
        })?
        .into_iter()
        .enumerate()
        .map(|(index, message)| message.into_message(index))
        .collect::<Result<Vec<_>, _>>()?;
    let tools = match body.tools.filter(|t| !t.is_null()) {
        Some(tools) if tools.as_array().is_none_or(|a| a.is_empty()) => {
            return Err(OpenAiError::invalid(
                "`tools` must be a non-empty array",
                Some("tools"),
                "invalid_value",
            ));
        }
        Some(tools) => Some(Tools {
            tools,
            tool_choice: body.tool_choice.filter(|c| !c.is_null()),
            parallel_tool_calls: body.parallel_tool_calls,
        }),
        None => None,
    };
    let idempotency_key = match headers.get("idempotency-key") {
        Some(value) => Some(
            value
                .to_str()
                .map_err(|_| {
                    OpenAiError::invalid(
                        "the `Idempotency-Key` header must be visible ASCII",
                        Some("Idempotency-Key"),
                        "invalid_value",
                    )
                })?
                .to_string(),
        ),
        None => None,
    };
    let stream = body.stream.unwrap_or(false);
    let request = PerspectivesRequest {
        models: Some(vec![model.clone()]),
        temperature: body.temperature,
        max_tokens: body.max_completion_tokens.or(body.max_tokens),
        idempotency_key,
        conversation: Some(Conversation { messages, tools }),
        ..Default::default()
    };
    Ok(Call {
        request,
        model,
        stream,
        include_usage: stream
            && body
                .stream_options
                .and_then(|o| o.include_usage)
                .unwrap_or(false),
    })
}

// --- Handlers --------------------------------------------------------------------------------

async fn completions(
    State(state): State<AppState>,
    caller: Result<Authenticated, ApiError>,
    headers: HeaderMap,
    body: Result<ApiJson<ChatCompletionRequest>, ApiError>,
) -> Result<Response, OpenAiError> {
    let Authenticated(caller) = caller?;
    let ApiJson(body) = body?;
    let call = into_call(body, &headers)?;
    if state.gateway.catalogue().model(&call.model).is_none() {
        return Err(OpenAiError {
            status: Some(StatusCode::NOT_FOUND),
            message: format!(
                "the model `{}` does not exist: GET /v1/models lists the models",
                call.model
            ),
            kind: "invalid_request_error",
            param: Some("model".into()),
            code: "model_not_found".into(),
            source: None,
        });
    }
    call.request.validate(&state.gateway)?;
    let completion_id = format!("chatcmpl-{}", Uuid::new_v4().simple());
    let created = chrono::Utc::now().timestamp();
    if !call.stream {
        let result = perspectives::get_perspectives(
            state.pools(),
            &state.gateway,
            caller.user_id,
            &call.request,
            ProgressSink::none(),
        )
        .await?;
        let answer = answer(&result)?;
        return Ok(Json(completion(&result, answer, created)).into_response());
    }
    stream_completion(state, caller.user_id, call, completion_id, created).await
}

/// The one model's answer, or the error that stands for its failure.
fn answer(result: &PerspectivesResult) -> Result<&ModelResult, OpenAiError> {
    let Some(answer) = result.perspectives.first() else {
        return Err(Error::internal("a completion without a model result").into());
    };
    if answer.status != Status::Ok {
        return Err(OpenAiError::from_model(answer));
    }
    if answer.text_withheld {
        return Err(Error::Conflict(
            "this Idempotency-Key's call answered, but a zero-knowledge account's answers are not kept: retry with a new key".into(),
        )
        .into());
    }
    Ok(answer)
}

/// OpenAI's `finish_reason` for the provider's.
fn finish_reason(answer: &ModelResult) -> &'static str {
    if answer.tool_calls.is_some() {
        return "tool_calls";
    }
    match answer.finish_reason.as_deref() {
        Some("length" | "max_tokens" | "MAX_TOKENS") => "length",
        Some("content_filter" | "SAFETY" | "RECITATION" | "refusal" | "PROHIBITED_CONTENT") => {
            "content_filter"
        }
        _ => "stop",
    }
}

fn usage(answer: &ModelResult) -> Value {
    let input = answer.input_tokens.unwrap_or(0);
    let output = answer.output_tokens.unwrap_or(0);
    json!({ "prompt_tokens": input, "completion_tokens": output, "total_tokens": input + output })
}

/// What polydev adds to OpenAI's shape (clients ignore it): the cost and the usage row's key.
fn polydev_extra(result: &PerspectivesResult, answer: &ModelResult) -> Value {
    json!({
        "request_id": result.request_id,
        "provider": answer.provider,
        "tier": answer.tier,
        "latency_ms": answer.latency_ms,
        "cost_usd": answer.cost_usd,
        "replayed": result.replayed,
    })
}

fn response_message(answer: &ModelResult) -> Value {
    let text = answer.text.as_deref().filter(|t| !t.is_empty());
    let mut message = json!({
        "role": "assistant",
        "content": if answer.tool_calls.is_some() { text } else { Some(text.unwrap_or_default()) },
        "refusal": null,
    });
    if let Some(calls) = &answer.tool_calls {
        message["tool_calls"] = calls.clone();
    }
    message
}

/// A `chat.completion`.
fn completion(result: &PerspectivesResult, answer: &ModelResult, created: i64) -> Value {
    json!({
        "id": format!("chatcmpl-{}", result.request_id.simple()),
        "object": "chat.completion",
        "created": created,
        "model": answer.model,
        "system_fingerprint": null,
        "choices": [{
            "index": 0,
            "message": response_message(answer),
            "logprobs": null,
            "finish_reason": finish_reason(answer),
        }],
        "usage": usage(answer),
        "polydev": polydev_extra(result, answer),
    })
}

// --- Streaming -------------------------------------------------------------------------------

type CallFuture = Pin<Box<dyn Future<Output = Result<PerspectivesResult>> + Send>>;

/// Builds the chunks of one stream.
struct Chunks {
    id: String,
    created: i64,
    model: String,
    include_usage: bool,
}

impl Chunks {
    fn chunk(&self, delta: Value, finish: Option<&str>) -> Event {
        let mut chunk = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": null,
            "choices": [{ "index": 0, "delta": delta, "logprobs": null, "finish_reason": finish }],
        });
        if self.include_usage {
            chunk["usage"] = Value::Null;
        }
        Event::default().data(chunk.to_string())
    }

    fn text(&self, text: &str) -> Event {
        self.chunk(json!({ "content": text }), None)
    }

    /// The chunks after the last text: tool calls, the finish reason, the usage, `[DONE]`; or
    /// an error chunk when the model failed after its first text.
    fn end(&self, outcome: Result<PerspectivesResult>) -> Vec<Event> {
        let mut events = Vec::new();
        let result = match outcome {
            Ok(result) => result,
            Err(error) => {
                error.log();
                events.push(error_event(&OpenAiError::from(error)));
                return events;
            }
        };
        let answer = match answer(&result) {
            Ok(answer) => answer,
            Err(error) => {
                events.push(error_event(&error));
                return events;
            }
        };
        // The text not sent as deltas (a provider that does not stream, a replay).
        if let Some(text) = answer.text.as_deref().filter(|t| !t.is_empty()) {
            events.push(self.text(text));
        }
        if let Some(Value::Array(calls)) = &answer.tool_calls {
            // Each call whole, in one piece, with its index.
            let calls: Vec<Value> = calls
                .iter()
                .enumerate()
                .map(|(index, call)| {
                    let mut call = call.clone();
                    call["index"] = json!(index);
                    call
                })
                .collect();
            events.push(self.chunk(json!({ "tool_calls": calls }), None));
        }
        events.push(self.chunk(json!({}), Some(finish_reason(answer))));
        if self.include_usage {
            let chunk = json!({
                "id": self.id,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.model,
                "system_fingerprint": null,
                "choices": [],
                "usage": usage(answer),
                "polydev": polydev_extra(&result, answer),
            });
            events.push(Event::default().data(chunk.to_string()));
        }
        events.push(Event::default().data("[DONE]"));
        events
    }
}

fn error_event(error: &OpenAiError) -> Event {
    Event::default().data(error.body().to_string())
}

/// Runs the call until its first text arrives. A call that fails before that is an HTTP error
/// with its status (not a stream that starts well and then fails); after that, the text goes
/// out as it comes. The call runs inside the stream, so a client that goes away cancels it
/// and gets its quota back, as on `POST /v1/perspectives`.
async fn stream_completion(
    state: AppState,
    user_id: Uuid,
    call: Call,
    id: String,
    created: i64,
) -> Result<Response, OpenAiError> {
    let (progress, mut updates) = mpsc::unbounded_channel();
    let request = call.request;
    let mut running: CallFuture = Box::pin(
        async move {
            perspectives::get_perspectives(
                state.pools(),
                &state.gateway,
                user_id,
                &request,
                ProgressSink::new(progress).with_deltas(),
            )
            .await
        }
        .instrument(tracing::Span::current()),
    );
    let chunks = Chunks {
        id,
        created,
        model: call.model,
        include_usage: call.include_usage,
    };
    // Either the first text, or the outcome of a call that ended before any.
    let first = loop {
        tokio::select! {
            biased;
            Some(update) = updates.recv() => {
                if let Progress::Delta { text, .. } = update {
                    break Ok(text);
                }
            }
            outcome = &mut running => break Err(outcome),
        }
    };
    let mut opening = vec![chunks.chunk(json!({ "role": "assistant", "content": "" }), None)];
    let events: Box<dyn Stream<Item = Event> + Send + Unpin> = match first {
        Ok(text) => {
            opening.push(chunks.text(&text));
            Box::new(relay(running, updates, chunks, opening))
        }
        // Done before any text streamed: answer errors with their status, the rest at once.
        Err(outcome) => {
            let outcome = outcome?;
            answer(&outcome)?;
            opening.extend(chunks.end(Ok(outcome)));
            Box::new(stream::iter(opening))
        }
    };
    Ok(Sse::new(events.map(Ok::<_, Infallible>))
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// The events of a call already streaming: `opening`, then each delta as it comes, then the
/// end. The stream owns the call: dropping it cancels the call.
fn relay(
    running: CallFuture,
    updates: mpsc::UnboundedReceiver<Progress>,
    chunks: Chunks,
    opening: Vec<Event>,
) -> impl Stream<Item = Event> + Send + Unpin {
    struct Relay {
        running: Option<CallFuture>,
        updates: mpsc::UnboundedReceiver<Progress>,
        chunks: Chunks,
        queue: VecDeque<Event>,
    }
    let relay = Relay {
        running: Some(running),
        updates,
        chunks,
        queue: opening.into(),
    };
    Box::pin(stream::unfold(relay, |mut relay| async move {
        loop {
            if let Some(event) = relay.queue.pop_front() {
                return Some((event, relay));
            }
            let running = relay.running.as_mut()?;
            tokio::select! {
                biased;
                Some(update) = relay.updates.recv() => {
                    if let Progress::Delta { text, .. } = update {
                        let event = relay.chunks.text(&text);
                        relay.queue.push_back(event);
                    }
                }
                outcome = running => {
                    relay.running = None;
                    // Deltas sent before the call returned come first.
                    while let Ok(update) = relay.updates.try_recv() {
                        if let Progress::Delta { text, .. } = update {
                            let event = relay.chunks.text(&text);
                            relay.queue.push_back(event);
                        }
                    }
                    let end = relay.chunks.end(outcome.map(without_text));
                    relay.queue.extend(end);
                }
            }
        }
    }))
}

/// The result with its text already streamed removed, so the end does not send it again.
fn without_text(mut result: PerspectivesResult) -> PerspectivesResult {
    for answer in &mut result.perspectives {
        answer.text = None;
    }
    result
}

// --- Models ----------------------------------------------------------------------------------

/// A model in OpenAI's shape.
#[derive(Debug, Serialize)]
pub struct OpenAiModel {
    pub id: String,
    pub object: &'static str,
    pub created: i64,
    pub owned_by: String,
}

impl OpenAiModel {
    pub fn new(id: &str, provider: &str) -> Self {
        OpenAiModel {
            id: id.to_string(),
            object: "model",
            // The catalogue has no creation dates.
            created: 0,
            owned_by: provider.to_string(),
        }
    }
}

async fn model(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<OpenAiModel>, OpenAiError> {
    match state.gateway.catalogue().model(&id) {
        Some(model) => Ok(Json(OpenAiModel::new(&model.id, &model.provider))),
        None => Err(OpenAiError {
            status: Some(StatusCode::NOT_FOUND),
            message: format!("the model `{id}` does not exist"),
            kind: "invalid_request_error",
            param: Some("model".into()),
            code: "model_not_found".into(),
            source: None,
        }),
    }
}
