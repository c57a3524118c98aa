//! Anthropic Messages (`POST /v1/messages`, `anthropic-version: 2023-06-01`).

use reqwest::header::HeaderName;
use serde_json::{Value, json};

use super::{
    Completion, CompletionRequest, ErrorClass, ProviderError, StreamState, WireFormat, usage_field,
};

pub struct Anthropic;

const VERSION: &str = "2023-06-01";

impl WireFormat for Anthropic {
    fn request(&self, request: &CompletionRequest, stream: bool) -> (String, Value) {
        let mut body = json!({
            "model": request.model,
            "max_tokens": request.max_tokens,
            "messages": [{ "role": "user", "content": request.prompt }],
            "stream": stream,
        });
        if let Some(t) = request.temperature {
            // Anthropic accepts 0..=1; the tool accepts 0..=2 like OpenAI.
            body["temperature"] = json!(t.min(1.0));
        }
        ("/v1/messages".into(), body)
    }

    fn auth_headers(&self, key: &str) -> Vec<(HeaderName, String)> {
        vec![
            (HeaderName::from_static("x-api-key"), key.to_string()),
            (
                HeaderName::from_static("anthropic-version"),
                VERSION.to_string(),
            ),
        ]
    }

    fn parse_response(&self, body: &Value) -> Result<Completion, String> {
        let blocks = body["content"]
            .as_array()
            .ok_or("no content array in the response")?;
        let text: String = blocks
            .iter()
            .filter(|b| b["type"] == "text")
            .filter_map(|b| b["text"].as_str())
            .collect();
        let usage = &body["usage"];
        Ok(Completion {
            text,
            input_tokens: usage_field(&usage["input_tokens"]).ok_or("no usage.input_tokens")?,
            output_tokens: usage_field(&usage["output_tokens"]).ok_or("no usage.output_tokens")?,
            finish_reason: body["stop_reason"].as_str().map(str::to_string),
        })
    }

    fn parse_event(
        &self,
        event: Option<&str>,
        data: &str,
        state: &mut StreamState,
    ) -> Result<Option<String>, ProviderError> {
        let value: Value = serde_json::from_str(data).map_err(|e| {
            ProviderError::new(ErrorClass::Malformed, format!("invalid stream event: {e}"))
        })?;
        let kind = event.or_else(|| value["type"].as_str()).unwrap_or_default();
        match kind {
            "message_start" => {
                let usage = &value["message"]["usage"];
                state.input_tokens = usage_field(&usage["input_tokens"]);
                state.output_tokens = usage_field(&usage["output_tokens"]);
            }
            "content_block_delta" if value["delta"]["type"] == "text_delta" => {
                return Ok(value["delta"]["text"].as_str().map(str::to_string));
            }
            "message_delta" => {
                // Usage in message_delta is cumulative.
                if let Some(out) = usage_field(&value["usage"]["output_tokens"]) {
                    state.output_tokens = Some(out);
                }
                if let Some(input) = usage_field(&value["usage"]["input_tokens"]) {
                    state.input_tokens = Some(input);
                }
                if let Some(reason) = value["delta"]["stop_reason"].as_str() {
                    state.finish_reason = Some(reason.to_string());
                }
            }
            "message_stop" => state.done = true,
            "error" => {
                let kind = value["error"]["type"].as_str().unwrap_or_default();
                let class = match kind {
                    "overloaded_error" | "api_error" => ErrorClass::Upstream,
                    "rate_limit_error" => ErrorClass::RateLimited,
                    _ => ErrorClass::BadRequest,
                };
                let message = self
                    .error_message(&value)
                    .unwrap_or_else(|| kind.to_string());
                return Err(ProviderError::new(class, message));
            }
            _ => {}
        }
        Ok(None)
    }

    fn error_message(&self, body: &Value) -> Option<String> {
        body["error"]["message"].as_str().map(str::to_string)
    }
}
