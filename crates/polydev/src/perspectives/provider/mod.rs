//! Provider adapters. One trait, [`Provider`]; one HTTP driver, [`HttpProvider`], that speaks a
//! provider's [`WireFormat`] (OpenAI Chat Completions, Anthropic Messages, Gemini), with or
//! without SSE streaming, classifies errors and retries only what is worth retrying.

mod anthropic;
mod gemini;
mod openai;
pub(super) mod redact;

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use futures_util::StreamExt;
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use serde::{Deserialize, Deserializer, Serialize};
use sse_stream::SseStream;

use super::catalogue::{ProviderKind, ProviderSpec};
pub use crate::retry::RetryPolicy;
use crate::retry::Verdict;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What one model is asked: a conversation (most often one user message).
#[derive(Debug, Clone)]
pub struct CompletionRequest {
    /// The model name the provider knows.
    pub model: String,
    pub messages: Vec<ChatMessage>,
    pub temperature: Option<f32>,
    pub max_tokens: u32,
    /// Function tools, passed through to providers that speak the OpenAI format.
    pub tools: Option<Tools>,
    /// When the caller stops waiting: no retry is slept for past it.
    pub deadline: Option<std::time::Instant>,
}

impl CompletionRequest {
    /// One user message.
    pub fn user(model: &str, prompt: &str, temperature: Option<f32>, max_tokens: u32) -> Self {
        CompletionRequest {
            model: model.to_string(),
            messages: vec![ChatMessage::text(Role::User, prompt)],
            temperature,
            max_tokens,
            tools: None,
            deadline: None,
        }
    }

    /// Characters of text the model reads (input tokens are estimated from them when a cut
    /// stream reported none).
    pub fn input_chars(&self) -> usize {
        self.messages.iter().map(ChatMessage::chars).sum()
    }
}

/// Who wrote a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    System,
    User,
    Assistant,
    /// A tool's result (OpenAI format only).
    Tool,
}

/// One message of a conversation, in the OpenAI Chat Completions shape (the other formats are
/// translated from it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: Role,
    /// `None` for an assistant message that only calls tools.
    pub content: Option<String>,
    /// An assistant's tool calls, as OpenAI writes them (`[{id, type, function}]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<serde_json::Value>,
    /// The call a `tool` message answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl ChatMessage {
    pub fn text(role: Role, content: &str) -> Self {
        ChatMessage {
            role,
            content: Some(content.to_string()),
            tool_calls: None,
            tool_call_id: None,
            name: None,
        }
    }

    /// Characters of content and tool calls.
    pub fn chars(&self) -> usize {
        self.content.as_deref().map_or(0, |c| c.chars().count())
            + self
                .tool_calls
                .as_ref()
                .map_or(0, |t| t.to_string().chars().count())
    }

    /// Whether the message needs a format that knows tools.
    pub fn uses_tools(&self) -> bool {
        self.role == Role::Tool || self.tool_calls.is_some()
    }
}

/// OpenAI's `tools`, `tool_choice` and `parallel_tool_calls`, passed through as they came.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tools {
    pub tools: serde_json::Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_choice: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallel_tool_calls: Option<bool>,
}

/// A model's answer with the usage the provider reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    pub text: String,
    pub input_tokens: u32,
    pub output_tokens: u32,
    pub finish_reason: Option<String>,
    /// The tools the model asks to call, in OpenAI's shape (`[{id, type, function: {name,
    /// arguments}}]`).
    pub tool_calls: Option<serde_json::Value>,
}

/// The classes of failure, which decide retrying and what users are told.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    BadRequest,
    Auth,
    RateLimited,
    Upstream,
    Timeout,
    Connection,
    #[serde(rename = "malformed_response")]
    Malformed,
    NotConfigured,
    // Not a provider's: the model was not called, its tier's monthly quota is used up.
    QuotaExceeded,
    // Not a provider's: polydev itself failed (the quota or the usage row).
    Internal,
}

impl ErrorClass {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::BadRequest => "bad_request",
            ErrorClass::Auth => "auth",
            ErrorClass::RateLimited => "rate_limited",
            ErrorClass::Upstream => "upstream",
            ErrorClass::Timeout => "timeout",
            ErrorClass::Connection => "connection",
            ErrorClass::Malformed => "malformed_response",
            ErrorClass::NotConfigured => "not_configured",
            ErrorClass::QuotaExceeded => "quota_exceeded",
            ErrorClass::Internal => "internal",
        }
    }

    fn retryable(self) -> bool {
        matches!(
            self,
            ErrorClass::RateLimited | ErrorClass::Upstream | ErrorClass::Connection
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", class.as_str())]
pub struct ProviderError {
    pub class: ErrorClass,
    pub message: String,
    /// From a `Retry-After` header.
    pub retry_after: Option<Duration>,
}

impl ProviderError {
    pub fn new(class: ErrorClass, message: impl Into<String>) -> Self {
        ProviderError {
            class,
            message: message.into(),
            retry_after: None,
        }
    }
}

/// Receives the text of a streamed answer as it arrives.
pub type DeltaSink<'a> = &'a (dyn Fn(&str) + Send + Sync);

/// A model provider.
pub trait Provider: Send + Sync {
    /// Asks the model, retrying retryable failures. With `deltas`, and when the provider
    /// streams, each piece of text is passed on as it arrives.
    fn complete<'a>(
        &'a self,
        request: &'a CompletionRequest,
        deltas: Option<DeltaSink<'a>>,
    ) -> BoxFuture<'a, Result<Completion, ProviderError>>;

    /// Asks the model for `user_id` (a `cli` provider runs in that user's container; every
    /// other provider is the same for everyone).
    fn complete_for<'a>(
        &'a self,
        user_id: uuid::Uuid,
        request: &'a CompletionRequest,
        deltas: Option<DeltaSink<'a>>,
    ) -> BoxFuture<'a, Result<Completion, ProviderError>> {
        let _ = user_id;
        self.complete(request, deltas)
    }
}

/// How a provider's API looks on the wire: request shape, response and stream parsing. Each
/// adapter keeps its shapes as serde types; what they do not name is ignored.
trait WireFormat: Send + Sync {
    /// The URL (relative to the base URL) and JSON body of a call.
    fn request(&self, request: &CompletionRequest, stream: bool) -> (String, Vec<u8>);
    /// Headers that carry the API key (and any fixed headers).
    fn auth_headers(&self, key: &str) -> Vec<(HeaderName, String)>;
    /// A non-streaming response body.
    fn parse_response(&self, body: &[u8]) -> Result<Completion, String>;
    /// Folds one SSE event's data into `state`; returns text to pass on, borrowed from `data`
    /// when it can be.
    fn parse_event<'d>(
        &self,
        data: &'d str,
        state: &mut StreamState,
    ) -> Result<Option<Cow<'d, str>>, ProviderError>;
}

/// What a stream has said so far.
#[derive(Debug, Default)]
struct StreamState {
    text: String,
    input_tokens: Option<u32>,
    output_tokens: Option<u32>,
    finish_reason: Option<String>,
    /// Tool calls assembled from their pieces (OpenAI streams them by index).
    tool_calls: Vec<StreamedToolCall>,
    done: bool,
}

/// A tool call as its stream pieces arrive: the id, type and name come once, the arguments
/// in fragments.
#[derive(Debug, Default)]
struct StreamedToolCall {
    index: u64,
    id: Option<String>,
    kind: Option<String>,
    name: String,
    arguments: String,
}

impl StreamState {
    fn finish(self) -> Result<Completion, ProviderError> {
        let tool_calls = (!self.tool_calls.is_empty()).then(|| {
            serde_json::Value::Array(
                self.tool_calls
                    .into_iter()
                    .map(|call| {
                        serde_json::json!({
                            "id": call.id.unwrap_or_default(),
                            "type": call.kind.unwrap_or_else(|| "function".into()),
                            "function": { "name": call.name, "arguments": call.arguments },
                        })
                    })
                    .collect(),
            )
        });
        match (self.input_tokens, self.output_tokens) {
            (Some(input_tokens), Some(output_tokens)) => Ok(Completion {
                text: self.text,
                input_tokens,
                output_tokens,
                finish_reason: self.finish_reason,
                tool_calls,
            }),
            _ => Err(ProviderError::new(
                ErrorClass::Malformed,
                "the stream ended without token usage (set `streaming = false` for this provider)",
            )),
        }
    }
}

/// The error body the three APIs share, `{"error": {"message": ..., ...}}` (Anthropic's also
/// has a top-level `"type": "error"`, Gemini's a `code` and `status`): as a failed call's
/// body, and inside a stream.
#[derive(Debug, Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Debug, Default, Deserialize)]
struct ErrorDetail {
    message: Option<String>,
    /// OpenAI's and Anthropic's error type (`rate_limit_error`, `server_error`, ...).
    #[serde(rename = "type")]
    kind: Option<String>,
}

impl ErrorDetail {
    /// A failure reported inside a stream that had started well.
    fn into_stream_error(self, class: ErrorClass) -> ProviderError {
        let message = self
            .message
            .or(self.kind)
            .map(|text| redact::redact(&text))
            .unwrap_or_else(|| "the stream reported an error".into());
        ProviderError::new(class, message)
    }
}

/// A JSON body or stream chunk into its wire type.
fn parse_json<'a, T: Deserialize<'a>>(json: &'a [u8], what: &str) -> Result<T, String> {
    serde_json::from_slice(json).map_err(|e| format!("invalid {what}: {e}"))
}

/// A stream chunk; its error is `Malformed`.
fn parse_chunk<'a, T: Deserialize<'a>>(data: &'a str) -> Result<T, ProviderError> {
    parse_json(data.as_bytes(), "stream chunk")
        .map_err(|message| ProviderError::new(ErrorClass::Malformed, message))
}

/// For `#[serde(deserialize_with)]`: `null` as the type's default, as absence already is with
/// `#[serde(default)]` (some OpenAI-compatible servers send `"choices": null`).
fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

/// For `#[serde(deserialize_with)]`: an optional string borrowed from the input when it has
/// no escapes (stream deltas are then not copied before being passed on).
fn borrowed_str<'de, D>(deserializer: D) -> Result<Option<Cow<'de, str>>, D::Error>
where
    D: Deserializer<'de>,
{
    #[derive(Deserialize)]
    struct Borrowed<'a>(#[serde(borrow)] Cow<'a, str>);
    Ok(Option::<Borrowed<'de>>::deserialize(deserializer)?.map(|b| b.0))
}

/// Provider calls: three attempts, from 200 ms apart, and never a wait over 5 s (a fan-out
/// waiting on one slow provider is worse than its error).
const DEFAULT_RETRY: RetryPolicy = RetryPolicy {
    max_attempts: 3,
    base_delay: Duration::from_millis(200),
    max_wait: Duration::from_secs(5),
};

/// A provider reached over HTTP.
pub struct HttpProvider {
    name: String,
    base_url: String,
    api_key: Option<String>,
    /// False when the catalogue names a key variable that is not set.
    configured: bool,
    streaming: bool,
    format: Box<dyn WireFormat>,
    client: reqwest::Client,
    retry: RetryPolicy,
}

impl std::fmt::Debug for HttpProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the API key.
        f.debug_struct("HttpProvider")
            .field("name", &self.name)
            .field("base_url", &self.base_url)
            .field("has_api_key", &self.api_key.is_some())
            .finish()
    }
}

impl HttpProvider {
    /// Builds a provider from its catalogue entry. The API key and a base-URL override come from
    /// the environment (`api_key_env`, `POLYDEV_PROVIDER_<NAME>_BASE_URL`).
    pub fn from_spec(name: &str, spec: &ProviderSpec, client: reqwest::Client) -> HttpProvider {
        let env_name = format!(
            "POLYDEV_PROVIDER_{}_BASE_URL",
            name.to_ascii_uppercase().replace('-', "_")
        );
        let base_url = std::env::var(env_name).unwrap_or_else(|_| spec.base_url.clone());
        let api_key = spec
            .api_key_env
            .as_deref()
            .and_then(|var| std::env::var(var).ok())
            .filter(|key| !key.is_empty());
        let mut provider = Self::new(name, spec.kind, &base_url, api_key, spec.streaming, client);
        // No `api_key_env` means a keyless server (a local Ollama or vLLM).
        provider.configured = spec.api_key_env.is_none() || provider.api_key.is_some();
        provider
    }

    pub fn new(
        name: &str,
        kind: ProviderKind,
        base_url: &str,
        api_key: Option<String>,
        streaming: bool,
        client: reqwest::Client,
    ) -> HttpProvider {
        let format: Box<dyn WireFormat> = match kind {
            ProviderKind::Openai | ProviderKind::OpenaiCompatible => Box::new(openai::OpenAi),
            ProviderKind::Anthropic => Box::new(anthropic::Anthropic),
            ProviderKind::Gemini => Box::new(gemini::Gemini),
            // Never reached: the gateway runs `cli` providers in runtime containers.
            ProviderKind::Cli => Box::new(openai::OpenAi),
        };
        HttpProvider {
            name: name.to_string(),
            base_url: base_url.trim_end_matches('/').to_string(),
            api_key,
            configured: true,
            streaming,
            format,
            client,
            retry: DEFAULT_RETRY,
        }
    }

    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    pub fn is_configured(&self) -> bool {
        self.configured
    }

    async fn attempt(
        &self,
        request: &CompletionRequest,
        deltas: Option<DeltaSink<'_>>,
        streamed: &mut bool,
    ) -> Result<Completion, ProviderError> {
        let stream = self.streaming;
        let (path, body) = self.format.request(request, stream);
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        for (name, value) in self
            .format
            .auth_headers(self.api_key.as_deref().unwrap_or(""))
        {
            let value = HeaderValue::from_str(&value).map_err(|_| {
                ProviderError::new(
                    ErrorClass::NotConfigured,
                    "the API key is not a valid header value",
                )
            })?;
            headers.insert(name, value);
        }
        let response = self
            .client
            .post(format!("{}{path}", self.base_url))
            .headers(headers)
            .body(body)
            .send()
            .await
            .map_err(transport_error)?;
        let status = response.status();
        if !status.is_success() {
            let retry_after = crate::retry::retry_after(response.headers());
            let text = response.text().await.unwrap_or_default();
            // The provider's own words, masked; a body that is not its error JSON (a proxy's
            // HTML page) is not shown at all.
            let detail = match serde_json::from_str::<ErrorBody>(&text)
                .ok()
                .and_then(|body| body.error.message)
            {
                Some(message) => redact::redact(&message),
                None => format!("a body of {} bytes that is not an error JSON", text.len()),
            };
            let class = match status.as_u16() {
                401 | 403 => ErrorClass::Auth,
                408 => ErrorClass::Timeout,
                429 => ErrorClass::RateLimited,
                500..=599 => ErrorClass::Upstream,
                _ => ErrorClass::BadRequest,
            };
            return Err(ProviderError {
                class,
                message: format!("{} returned {status}: {detail}", self.name),
                retry_after,
            });
        }
        if !stream {
            let bytes = response.bytes().await.map_err(transport_error)?;
            return self.format.parse_response(&bytes).map_err(|e| {
                ProviderError::new(ErrorClass::Malformed, format!("{}: {e}", self.name))
            });
        }
        let mut events = SseStream::from_bytes_stream(response.bytes_stream());
        let mut state = StreamState::default();
        while let Some(event) = events.next().await {
            let event = event.map_err(|e| {
                ProviderError::new(
                    ErrorClass::Connection,
                    format!("{} stream broke: {e}", self.name),
                )
            })?;
            let Some(data) = event.data.as_deref() else {
                continue;
            };
            if let Some(text) = self
                .format
                .parse_event(data, &mut state)?
                .filter(|text| !text.is_empty())
            {
                state.text.push_str(&text);
                if let Some(sink) = deltas {
                    *streamed = true;
                    sink(&text);
                }
            }
            if state.done {
                break;
            }
        }
        state.finish().map_err(|mut e| {
            e.message = format!("{}: {}", self.name, e.message);
            e
        })
    }
}

fn transport_error(error: reqwest::Error) -> ProviderError {
    let class = if error.is_timeout() {
        ErrorClass::Timeout
    } else if error.is_decode() {
        ErrorClass::Malformed
    } else {
        ErrorClass::Connection
    };
    // reqwest's message names the URL but never headers, so no key can leak here.
    ProviderError::new(class, error.to_string())
}

impl Provider for HttpProvider {
    fn complete<'a>(
        &'a self,
        request: &'a CompletionRequest,
        deltas: Option<DeltaSink<'a>>,
    ) -> BoxFuture<'a, Result<Completion, ProviderError>> {
        Box::pin(async move {
            if !self.is_configured() {
                return Err(ProviderError::new(
                    ErrorClass::NotConfigured,
                    format!("provider `{}` has no API key configured", self.name),
                ));
            }
            let (result, _) = self
                .retry
                .run_until(
                    request.deadline,
                    move || async move {
                        let mut streamed = false;
                        let result = self.attempt(request, deltas, &mut streamed).await;
                        (result, streamed)
                    },
                    |(result, streamed)| match result {
                        // Text already passed on cannot be taken back: no retry after it.
                        Err(error) if !streamed && error.class.retryable() => Verdict::Retry {
                            after: error.retry_after,
                        },
                        _ => Verdict::Done,
                    },
                    |(result, _), attempt, wait| {
                        if let Err(error) = result {
                            tracing::debug!(provider = %self.name, attempt, ?wait, %error, "retrying");
                        }
                    },
                )
                .await;
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_transient_failures_are_retried() {
        for class in [
            ErrorClass::BadRequest,
            ErrorClass::Auth,
            ErrorClass::Malformed,
            ErrorClass::Timeout,
            ErrorClass::NotConfigured,
        ] {
            assert!(!class.retryable(), "{class:?}");
        }
        for class in [
            ErrorClass::RateLimited,
            ErrorClass::Upstream,
            ErrorClass::Connection,
        ] {
            assert!(class.retryable(), "{class:?}");
        }
    }
}
