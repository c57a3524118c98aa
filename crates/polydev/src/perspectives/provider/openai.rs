//! OpenAI Chat Completions, also spoken by every OpenAI-compatible server (OpenRouter, Groq,
//! DeepSeek, Mistral, xAI, Together, Ollama, vLLM).

use std::borrow::Cow;

use reqwest::header::{AUTHORIZATION, HeaderName};
use serde::{Deserialize, Serialize};

use super::{
    Completion, CompletionRequest, ErrorClass, ErrorDetail, ProviderError, StreamState, WireFormat,
    borrowed_str, null_as_default, parse_chunk, parse_json,
};

pub struct OpenAi;

/// `POST /chat/completions`.
#[derive(Debug, Serialize)]
struct ChatRequest<'a> {
    model: &'a str,
    messages: [Message<'a>; 1],
    max_tokens: u32,
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_options: Option<StreamOptions>,
}

#[derive(Debug, Serialize)]
struct Message<'a> {
    role: &'static str,
    content: &'a str,
}

#[derive(Debug, Serialize)]
struct StreamOptions {
    include_usage: bool,
}

/// A `chat.completion`.
#[derive(Debug, Deserialize)]
struct ChatResponse {
    #[serde(default, deserialize_with = "null_as_default")]
    choices: Vec<Choice>,
    usage: Option<Usage>,
}

#[derive(Debug, Deserialize)]
struct Choice {
    message: Option<ResponseMessage>,
    finish_reason: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ResponseMessage {
    /// `null` for a refusal or tool calls.
    content: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct Usage {
    prompt_tokens: Option<u32>,
    completion_tokens: Option<u32>,
}

/// A `chat.completion.chunk`. With `include_usage`, every chunk has `"usage": null` but the
/// last one before `[DONE]`, which has the usage and no choices.
#[derive(Debug, Deserialize)]
struct ChatChunk<'a> {
    #[serde(default, borrow, deserialize_with = "null_as_default")]
    choices: Vec<ChunkChoice<'a>>,
    usage: Option<Usage>,
    /// A failure after the stream had started.
    error: Option<ErrorDetail>,
}

#[derive(Debug, Deserialize)]
struct ChunkChoice<'a> {
    #[serde(borrow)]
    delta: Option<Delta<'a>>,
    finish_reason: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Delta<'a> {
    #[serde(default, borrow, deserialize_with = "borrowed_str")]
    content: Option<Cow<'a, str>>,
}

impl WireFormat for OpenAi {
    fn request(&self, request: &CompletionRequest, stream: bool) -> (String, Vec<u8>) {
        let body = ChatRequest {
            model: &request.model,
            messages: [Message {
                role: "user",
                content: &request.prompt,
            }],
            max_tokens: request.max_tokens,
            stream,
            temperature: request.temperature,
            // Without this, streams carry no usage and the call could not be billed exactly.
            stream_options: stream.then_some(StreamOptions {
                include_usage: true,
            }),
        };
        let body = serde_json::to_vec(&body).expect("a request serializes");
        ("/chat/completions".into(), body)
    }

    fn auth_headers(&self, key: &str) -> Vec<(HeaderName, String)> {
        vec![(AUTHORIZATION, format!("Bearer {key}"))]
    }

    fn parse_response(&self, body: &[u8]) -> Result<Completion, String> {
        let body: ChatResponse = parse_json(body, "response")?;
        let choice = body.choices.into_iter().next();
        let (text, finish_reason) = choice
            .and_then(|c| Some((c.message?.content?, c.finish_reason)))
            .ok_or("no choices[0].message.content in the response")?;
        let usage = body.usage.unwrap_or_default();
        Ok(Completion {
            text,
            input_tokens: usage.prompt_tokens.ok_or("no usage.prompt_tokens")?,
            output_tokens: usage
                .completion_tokens
                .ok_or("no usage.completion_tokens")?,
            finish_reason,
        })
    }

    fn parse_event<'d>(
        &self,
        data: &'d str,
        state: &mut StreamState,
    ) -> Result<Option<Cow<'d, str>>, ProviderError> {
        if data.trim() == "[DONE]" {
            state.done = true;
            return Ok(None);
        }
        let chunk: ChatChunk<'d> = parse_chunk(data)?;
        if let Some(error) = chunk.error {
            return Err(error.into_stream_error(ErrorClass::Upstream));
        }
        if let Some(usage) = chunk.usage {
            state.input_tokens = usage.prompt_tokens;
            state.output_tokens = usage.completion_tokens;
        }
        let Some(choice) = chunk.choices.into_iter().next() else {
            return Ok(None);
        };
        if let Some(reason) = choice.finish_reason {
            state.finish_reason = Some(reason);
        }
        Ok(choice.delta.and_then(|d| d.content))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(temperature: Option<f32>) -> CompletionRequest {
        CompletionRequest {
            model: "gpt-4.1".into(),
            prompt: "Say \"hi\"".into(),
            temperature,
            max_tokens: 64,
            deadline: None,
        }
    }

    fn json(body: &[u8]) -> serde_json::Value {
        serde_json::from_slice(body).unwrap()
    }

    #[test]
    fn the_request_body() {
        let (path, body) = OpenAi.request(&request(Some(0.2)), false);
        assert_eq!(path, "/chat/completions");
        assert_eq!(
            json(&body),
            serde_json::json!({
                "model": "gpt-4.1",
                "messages": [{ "role": "user", "content": "Say \"hi\"" }],
                "max_tokens": 64,
                "stream": false,
                "temperature": 0.2,
            })
        );
        let (_, body) = OpenAi.request(&request(None), true);
        let body = json(&body);
        assert_eq!(body["stream_options"]["include_usage"], true);
        assert!(body.get("temperature").is_none());
    }

    /// The documented response, with fields polydev does not read.
    #[test]
    fn a_response_with_fields_we_do_not_know() {
        let body = br#"{
          "id": "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT",
          "object": "chat.completion",
          "created": 1741569952,
          "model": "gpt-4.1-2025-04-14",
          "choices": [{
            "index": 0,
            "message": { "role": "assistant", "content": "Hello! How can I assist you today?",
                         "refusal": null, "annotations": [] },
            "logprobs": null,
            "finish_reason": "stop"
          }],
          "usage": {
            "prompt_tokens": 19, "completion_tokens": 10, "total_tokens": 29,
            "prompt_tokens_details": { "cached_tokens": 0, "audio_tokens": 0 },
            "completion_tokens_details": { "reasoning_tokens": 0, "audio_tokens": 0,
              "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0 }
          },
          "service_tier": "default",
          "a_field_from_the_future": { "nested": [1, 2, 3] }
        }"#;
        assert_eq!(
            OpenAi.parse_response(body).unwrap(),
            Completion {
                text: "Hello! How can I assist you today?".into(),
                input_tokens: 19,
                output_tokens: 10,
                finish_reason: Some("stop".into()),
            }
        );
    }

    #[test]
    fn a_response_without_content_or_usage_is_refused() {
        let refusal = br#"{"choices": [{"index": 0, "message": {"role": "assistant",
            "content": null, "refusal": "I can't help with that."}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 7}}"#;
        assert!(
            OpenAi
                .parse_response(refusal)
                .unwrap_err()
                .contains("content")
        );
        let no_usage = br#"{"choices": [{"message": {"content": "x"}, "finish_reason": "stop"}]}"#;
        assert!(
            OpenAi
                .parse_response(no_usage)
                .unwrap_err()
                .contains("prompt_tokens")
        );
        assert!(OpenAi.parse_response(b"{\"this is\": not json").is_err());
    }

    /// A documented stream with `include_usage`: `"usage": null` on every chunk but the last.
    #[test]
    fn a_stream_with_its_usage_chunk() {
        let events = [
            r#"{"id":"chatcmpl-123","object":"chat.completion.chunk","created":1694268190,"model":"gpt-4o-mini","system_fingerprint":"fp_44709d6fcb","choices":[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"logprobs":null,"finish_reason":null}],"usage":null}"#,
            r#"{"id":"chatcmpl-123","object":"chat.completion.chunk","created":1694268190,"model":"gpt-4o-mini","choices":[{"index":0,"delta":{"content":"Hello"},"logprobs":null,"finish_reason":null}],"usage":null}"#,
            r#"{"id":"chatcmpl-123","object":"chat.completion.chunk","created":1694268190,"model":"gpt-4o-mini","choices":[{"index":0,"delta":{"content":" \"world\"\n"},"logprobs":null,"finish_reason":null}],"usage":null}"#,
            r#"{"id":"chatcmpl-123","object":"chat.completion.chunk","created":1694268190,"model":"gpt-4o-mini","choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}],"usage":null}"#,
            r#"{"id":"chatcmpl-123","object":"chat.completion.chunk","created":1694268190,"model":"gpt-4o-mini","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":3,"total_tokens":12,"prompt_tokens_details":{"cached_tokens":0},"completion_tokens_details":{"reasoning_tokens":0}}}"#,
            "[DONE]",
        ];
        let mut state = StreamState::default();
        let mut pieces = Vec::new();
        for data in events {
            if let Some(text) = OpenAi.parse_event(data, &mut state).unwrap() {
                pieces.push(text);
            }
        }
        assert!(matches!(pieces[1], Cow::Borrowed("Hello")), "not copied");
        assert_eq!(pieces.concat(), "Hello \"world\"\n");
        assert!(state.done);
        assert_eq!(
            (state.input_tokens, state.output_tokens),
            (Some(9), Some(3))
        );
        assert_eq!(state.finish_reason.as_deref(), Some("stop"));
    }

    #[test]
    fn a_usage_chunk_with_null_choices_from_a_compatible_server() {
        let mut state = StreamState::default();
        let data = r#"{"id":"x","choices":null,"usage":{"prompt_tokens":4,"completion_tokens":2}}"#;
        assert_eq!(OpenAi.parse_event(data, &mut state).unwrap(), None);
        assert_eq!(
            (state.input_tokens, state.output_tokens),
            (Some(4), Some(2))
        );
    }

    #[test]
    fn an_error_body_and_an_error_inside_a_stream() {
        let body = r#"{"error": {"message": "Incorrect API key provided: sk-abc***. You can find your API key at https://platform.openai.com/account/api-keys.", "type": "invalid_request_error", "param": null, "code": "invalid_api_key"}}"#;
        let parsed: super::super::ErrorBody = serde_json::from_str(body).unwrap();
        assert!(
            parsed
                .error
                .message
                .unwrap()
                .starts_with("Incorrect API key")
        );
        let err = OpenAi
            .parse_event(
                r#"{"error": {"message": "The server had an error while processing your request.", "type": "server_error", "param": null, "code": null}}"#,
                &mut StreamState::default(),
            )
            .unwrap_err();
        assert_eq!(err.class, ErrorClass::Upstream);
        assert!(err.message.contains("server had an error"), "{err}");
    }
}
