//! Google Gemini `models/{model}:generateContent` and `:streamGenerateContent?alt=sse`.

use reqwest::header::HeaderName;
use serde_json::{Value, json};

use super::{
    Completion, CompletionRequest, ProviderError, StreamState, WireFormat, stream_chunk,
    usage_field,
};

pub struct Gemini;

fn candidate_text(chunk: &Value) -> String {
    chunk["candidates"][0]["content"]["parts"]
        .as_array()
        .map(|parts| parts.iter().filter_map(|p| p["text"].as_str()).collect())
        .unwrap_or_default()
}

impl WireFormat for Gemini {
    fn request(&self, request: &CompletionRequest, stream: bool) -> (String, Value) {
        let mut config = json!({ "maxOutputTokens": request.max_tokens });
        if let Some(t) = request.temperature {
            config["temperature"] = json!(t);
        }
        let body = json!({
            "contents": [{ "role": "user", "parts": [{ "text": request.prompt }] }],
            "generationConfig": config,
        });
        let path = if stream {
            format!(
                "/v1beta/models/{}:streamGenerateContent?alt=sse",
                request.model
            )
        } else {
            format!("/v1beta/models/{}:generateContent", request.model)
        };
        (path, body)
    }

    fn auth_headers(&self, key: &str) -> Vec<(HeaderName, String)> {
        vec![(HeaderName::from_static("x-goog-api-key"), key.to_string())]
    }

    fn parse_response(&self, body: &Value) -> Result<Completion, String> {
        if body["candidates"][0].is_null() {
            let reason = body["promptFeedback"]["blockReason"]
                .as_str()
                .unwrap_or("no candidates");
            return Err(format!("no answer: {reason}"));
        }
        let usage = &body["usageMetadata"];
        Ok(Completion {
            text: candidate_text(body),
            input_tokens: usage_field(&usage["promptTokenCount"])
                .ok_or("no usageMetadata.promptTokenCount")?,
            // Gemini omits candidatesTokenCount for an empty answer.
            output_tokens: usage_field(&usage["candidatesTokenCount"]).unwrap_or(0),
            finish_reason: body["candidates"][0]["finishReason"]
                .as_str()
                .map(str::to_string),
        })
    }

    fn parse_event(
        &self,
        _event: Option<&str>,
        data: &str,
        state: &mut StreamState,
    ) -> Result<Option<String>, ProviderError> {
        let chunk = stream_chunk(data, |c| self.error_message(c))?;
        // Every chunk carries the running usage; the last one is final.
        let usage = &chunk["usageMetadata"];
        if let Some(input) = usage_field(&usage["promptTokenCount"]) {
            state.input_tokens = Some(input);
            state.output_tokens = Some(usage_field(&usage["candidatesTokenCount"]).unwrap_or(0));
        }
        if let Some(reason) = chunk["candidates"][0]["finishReason"].as_str() {
            state.finish_reason = Some(reason.to_string());
        }
        let text = candidate_text(&chunk);
        Ok((!text.is_empty()).then_some(text))
    }

    fn error_message(&self, body: &Value) -> Option<String> {
        body["error"]["message"].as_str().map(str::to_string)
    }
}
