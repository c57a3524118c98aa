//! Anthropic Messages (`POST /v1/messages`, `anthropic-version: 2023-06-01`).

use std::borrow::Cow;

use reqwest::header::HeaderName;
use serde::{Deserialize, Serialize};

use super::{
    Completion, CompletionRequest, ErrorClass, ErrorDetail, ProviderError, StreamState, WireFormat,
    parse_chunk, parse_json,
};

pub struct Anthropic;

const VERSION: &str = "2023-06-01";

/// `POST /v1/messages`.
#[derive(Debug, Serialize)]
struct MessagesRequest<'a> {
    model: &'a str,
    max_tokens: u32,
    messages: [Message<'a>; 1],
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
}

#[derive(Debug, Serialize)]
struct Message<'a> {
    role: &'static str,
    content: &'a str,
}

/// A `message`.
#[derive(Debug, Deserialize)]
struct MessagesResponse {
    content: Option<Vec<ContentBlock>>,
    usage: Option<Usage>,
    stop_reason: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ContentBlock {
    Text {
        text: String,
    },
    /// `thinking`, `tool_use` and the other blocks: not part of the answer's text.
    #[serde(other)]
    Other,
}

/// Usage; in `message_delta` it is cumulative and may lack `input_tokens`.
#[derive(Debug, Default, Deserialize)]
struct Usage {
    input_tokens: Option<u32>,
    output_tokens: Option<u32>,
}

/// One server-sent event's data; its `type` is the SSE event name.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum StreamEvent<'a> {
    MessageStart {
        #[serde(default)]
        message: StartedMessage,
    },
    ContentBlockDelta {
        #[serde(borrow)]
        delta: BlockDelta<'a>,
    },
    MessageDelta {
        #[serde(default)]
        delta: MessageDelta,
        usage: Option<Usage>,
    },
    MessageStop,
    Error {
        #[serde(default)]
        error: ErrorDetail,
    },
    /// `ping`, `content_block_start`, `content_block_stop` and any event added later.
    #[serde(other)]
    Other,
}

#[derive(Debug, Default, Deserialize)]
struct StartedMessage {
    usage: Option<Usage>,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum BlockDelta<'a> {
    TextDelta {
        #[serde(borrow)]
        text: Cow<'a, str>,
    },
    /// `thinking_delta`, `input_json_delta`, `signature_delta`, `citations_delta`, ...
    #[serde(other)]
    Other,
}

#[derive(Debug, Default, Deserialize)]
struct MessageDelta {
    stop_reason: Option<String>,
}

impl WireFormat for Anthropic {
    fn request(&self, request: &CompletionRequest, stream: bool) -> (String, Vec<u8>) {
        let body = MessagesRequest {
            model: &request.model,
            max_tokens: request.max_tokens,
            messages: [Message {
                role: "user",
                content: &request.prompt,
            }],
            stream,
            // Anthropic accepts 0..=1; the tool accepts 0..=2 like OpenAI.
            temperature: request.temperature.map(|t| t.min(1.0)),
        };
        let body = serde_json::to_vec(&body).expect("a request serializes");
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

    fn parse_response(&self, body: &[u8]) -> Result<Completion, String> {
        let body: MessagesResponse = parse_json(body, "response")?;
        let text = body
            .content
            .ok_or("no content array in the response")?
            .into_iter()
            .filter_map(|block| match block {
                ContentBlock::Text { text } => Some(text),
                ContentBlock::Other => None,
            })
            .collect();
        let usage = body.usage.unwrap_or_default();
        Ok(Completion {
            text,
            input_tokens: usage.input_tokens.ok_or("no usage.input_tokens")?,
            output_tokens: usage.output_tokens.ok_or("no usage.output_tokens")?,
            finish_reason: body.stop_reason,
        })
    }

    fn parse_event<'d>(
        &self,
        data: &'d str,
        state: &mut StreamState,
    ) -> Result<Option<Cow<'d, str>>, ProviderError> {
        match parse_chunk(data)? {
            StreamEvent::MessageStart { message } => {
                let usage = message.usage.unwrap_or_default();
                state.input_tokens = usage.input_tokens;
                state.output_tokens = usage.output_tokens;
            }
            StreamEvent::ContentBlockDelta {
                delta: BlockDelta::TextDelta { text },
            } => return Ok(Some(text)),
            StreamEvent::ContentBlockDelta { .. } => {}
            StreamEvent::MessageDelta { delta, usage } => {
                // Usage in message_delta is cumulative.
                let usage = usage.unwrap_or_default();
                if let Some(output) = usage.output_tokens {
                    state.output_tokens = Some(output);
                }
                if let Some(input) = usage.input_tokens {
                    state.input_tokens = Some(input);
                }
                if let Some(reason) = delta.stop_reason {
                    state.finish_reason = Some(reason);
                }
            }
            StreamEvent::MessageStop => state.done = true,
            StreamEvent::Error { error } => {
                let class = match error.kind.as_deref() {
                    Some("overloaded_error" | "api_error") => ErrorClass::Upstream,
                    Some("rate_limit_error") => ErrorClass::RateLimited,
                    _ => ErrorClass::BadRequest,
                };
                return Err(error.into_stream_error(class));
            }
            StreamEvent::Other => {}
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_body_caps_the_temperature() {
        let request = CompletionRequest {
            model: "claude-sonnet-4-5".into(),
            prompt: "Why?".into(),
            temperature: Some(1.5),
            max_tokens: 300,
            deadline: None,
        };
        let (path, body) = Anthropic.request(&request, true);
        assert_eq!(path, "/v1/messages");
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&body).unwrap(),
            serde_json::json!({
                "model": "claude-sonnet-4-5",
                "max_tokens": 300,
                "messages": [{ "role": "user", "content": "Why?" }],
                "stream": true,
                "temperature": 1.0,
            })
        );
    }

    /// The documented response, with a thinking block and fields polydev does not read.
    #[test]
    fn a_response_with_blocks_and_fields_we_do_not_know() {
        let body = br#"{
          "id": "msg_013Zva2CMHLNnXjNJJKqJ2EF",
          "type": "message",
          "role": "assistant",
          "model": "claude-sonnet-4-5-20250929",
          "content": [
            { "type": "thinking", "thinking": "Let me think.", "signature": "EqQBCgIYAhIM" },
            { "type": "text", "text": "Hi! My name is Claude.", "citations": null }
          ],
          "stop_reason": "end_turn",
          "stop_sequence": null,
          "usage": {
            "input_tokens": 2095, "output_tokens": 503,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
            "cache_creation": { "ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0 },
            "service_tier": "standard"
          },
          "container": null
        }"#;
        assert_eq!(
            Anthropic.parse_response(body).unwrap(),
            Completion {
                text: "Hi! My name is Claude.".into(),
                input_tokens: 2095,
                output_tokens: 503,
                finish_reason: Some("end_turn".into()),
            }
        );
        assert!(
            Anthropic
                .parse_response(br#"{"content": [], "usage": {}}"#)
                .unwrap_err()
                .contains("input_tokens")
        );
    }

    /// The documented event flow, with a ping and a thinking delta in between.
    #[test]
    fn a_stream_with_usage_in_message_start_and_message_delta() {
        let events = [
            r#"{"type": "message_start", "message": {"id": "msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY", "type": "message", "role": "assistant", "content": [], "model": "claude-sonnet-4-5-20250929", "stop_reason": null, "stop_sequence": null, "usage": {"input_tokens": 25, "output_tokens": 1, "cache_read_input_tokens": 0}}}"#,
            r#"{"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}"#,
            r#"{"type": "ping"}"#,
            r#"{"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "Hmm"}}"#,
            r#"{"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hello"}}"#,
            r#"{"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "!\n"}}"#,
            r#"{"type": "content_block_stop", "index": 0}"#,
            r#"{"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": 15}}"#,
            r#"{"type": "message_stop"}"#,
        ];
        let mut state = StreamState::default();
        let mut pieces = Vec::new();
        for data in events {
            if let Some(text) = Anthropic.parse_event(data, &mut state).unwrap() {
                pieces.push(text);
            }
        }
        assert!(matches!(pieces[0], Cow::Borrowed("Hello")), "not copied");
        assert_eq!(pieces.concat(), "Hello!\n");
        assert!(state.done);
        assert_eq!(
            (state.input_tokens, state.output_tokens),
            (Some(25), Some(15))
        );
        assert_eq!(state.finish_reason.as_deref(), Some("end_turn"));
    }

    #[test]
    fn error_bodies_and_stream_errors_by_type() {
        let body = r#"{"type": "error", "error": {"type": "not_found_error", "message": "The requested resource could not be found."}, "request_id": "req_011CSHoEeqs5C35K2UUqR7Fy"}"#;
        let parsed: super::super::ErrorBody = serde_json::from_str(body).unwrap();
        assert_eq!(
            parsed.error.message.as_deref(),
            Some("The requested resource could not be found.")
        );
        for (kind, class) in [
            ("overloaded_error", ErrorClass::Upstream),
            ("api_error", ErrorClass::Upstream),
            ("rate_limit_error", ErrorClass::RateLimited),
            ("invalid_request_error", ErrorClass::BadRequest),
        ] {
            let data = format!(
                r#"{{"type": "error", "error": {{"type": "{kind}", "message": "Overloaded"}}}}"#
            );
            let err = Anthropic
                .parse_event(&data, &mut StreamState::default())
                .unwrap_err();
            assert_eq!((err.class, err.message.as_str()), (class, "Overloaded"));
        }
        let err = Anthropic
            .parse_event(
                r#"{"type": "error", "error": {"type": "overloaded_error"}}"#,
                &mut StreamState::default(),
            )
            .unwrap_err();
        assert_eq!(err.message, "overloaded_error", "the type when no message");
    }
}
