//! OpenAI Chat Completions, also spoken by every OpenAI-compatible server (OpenRouter, Groq,
//! DeepSeek, Mistral, xAI, Together, Ollama, vLLM).

use reqwest::header::{AUTHORIZATION, HeaderName};
use serde_json::{Value, json};

use super::{
    Completion, CompletionRequest, ProviderError, StreamState, WireFormat, stream_chunk,
    usage_field,
};

pub struct OpenAi;

impl WireFormat for OpenAi {
    fn request(&self, request: &CompletionRequest, stream: bool) -> (String, Value) {
        let mut body = json!({
            "model": request.model,
            "messages": [{ "role": "user", "content": request.prompt }],
            "max_tokens": request.max_tokens,
            "stream": stream,
        });
        if let Some(t) = request.temperature {
            body["temperature"] = json!(t);
        }
        if stream {
            // Without this, streams carry no usage and the call could not be billed exactly.
            body["stream_options"] = json!({ "include_usage": true });
        }
        ("/chat/completions".into(), body)
    }

    fn auth_headers(&self, key: &str) -> Vec<(HeaderName, String)> {
        vec![(AUTHORIZATION, format!("Bearer {key}"))]
    }

    fn parse_response(&self, body: &Value) -> Result<Completion, String> {
        let choice = &body["choices"][0];
        let text = choice["message"]["content"]
            .as_str()
            .ok_or("no choices[0].message.content in the response")?;
        let usage = &body["usage"];
        Ok(Completion {
            text: text.to_string(),
            input_tokens: usage_field(&usage["prompt_tokens"]).ok_or("no usage.prompt_tokens")?,
            output_tokens: usage_field(&usage["completion_tokens"])
                .ok_or("no usage.completion_tokens")?,
            finish_reason: choice["finish_reason"].as_str().map(str::to_string),
        })
    }

    fn parse_event(
        &self,
        _event: Option<&str>,
        data: &str,
        state: &mut StreamState,
    ) -> Result<Option<String>, ProviderError> {
        if data.trim() == "[DONE]" {
            state.done = true;
            return Ok(None);
        }
        let chunk = stream_chunk(data, |c| self.error_message(c))?;
        if let Some(usage) = chunk.get("usage").filter(|u| u.is_object()) {
            state.input_tokens = usage_field(&usage["prompt_tokens"]);
            state.output_tokens = usage_field(&usage["completion_tokens"]);
        }
        let choice = &chunk["choices"][0];
        if let Some(reason) = choice["finish_reason"].as_str() {
            state.finish_reason = Some(reason.to_string());
        }
        Ok(choice["delta"]["content"]
            .as_str()
            .filter(|t| !t.is_empty())
            .map(str::to_string))
    }

    fn error_message(&self, body: &Value) -> Option<String> {
        body["error"]["message"].as_str().map(str::to_string)
    }
}
