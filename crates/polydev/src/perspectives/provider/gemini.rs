//! Google Gemini `models/{model}:generateContent` and `:streamGenerateContent?alt=sse`.

use std::borrow::Cow;

use reqwest::header::HeaderName;
use serde::{Deserialize, Serialize};

use super::{
    Completion, CompletionRequest, ErrorClass, ErrorDetail, ProviderError, StreamState, WireFormat,
    borrowed_str, null_as_default, parse_chunk, parse_json,
};

pub struct Gemini;

/// A `GenerateContentRequest`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct GenerateContentRequest<'a> {
    contents: [Content<'a>; 1],
    generation_config: GenerationConfig,
}

#[derive(Debug, Serialize)]
struct Content<'a> {
    role: &'static str,
    parts: [Part<'a>; 1],
}

#[derive(Debug, Serialize)]
struct Part<'a> {
    text: &'a str,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct GenerationConfig {
    max_output_tokens: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
}

/// A `GenerateContentResponse`: the whole answer, or one chunk of a stream.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct GenerateContentResponse<'a> {
    #[serde(default, borrow, deserialize_with = "null_as_default")]
    candidates: Vec<Candidate<'a>>,
    prompt_feedback: Option<PromptFeedback>,
    usage_metadata: Option<UsageMetadata>,
    /// A failure after the stream had started.
    error: Option<ErrorDetail>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Candidate<'a> {
    /// Absent when the candidate was blocked.
    #[serde(borrow)]
    content: Option<CandidateContent<'a>>,
    finish_reason: Option<String>,
}

#[derive(Debug, Deserialize)]
struct CandidateContent<'a> {
    #[serde(default, borrow, deserialize_with = "null_as_default")]
    parts: Vec<ResponsePart<'a>>,
}

/// A part; only text parts are read (a `thoughtSignature` part has empty text).
#[derive(Debug, Deserialize)]
struct ResponsePart<'a> {
    #[serde(default, borrow, deserialize_with = "borrowed_str")]
    text: Option<Cow<'a, str>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PromptFeedback {
    block_reason: Option<String>,
}

/// In a stream, running usage on every chunk (the last one is final); some chunks carry
/// `usageMetadata` without counts.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct UsageMetadata {
    prompt_token_count: Option<u32>,
    /// Omitted for an empty answer.
    candidates_token_count: Option<u32>,
}

impl<'a> Candidate<'a> {
    /// The text parts joined, borrowed when there is only one.
    fn into_text(self) -> Cow<'a, str> {
        let mut texts = self
            .content
            .into_iter()
            .flat_map(|c| c.parts)
            .filter_map(|p| p.text);
        let Some(first) = texts.next() else {
            return Cow::Borrowed("");
        };
        match texts.next() {
            None => first,
            Some(second) => {
                let mut all = first.into_owned();
                all.push_str(&second);
                texts.for_each(|t| all.push_str(&t));
                Cow::Owned(all)
            }
        }
    }
}

impl WireFormat for Gemini {
    fn request(&self, request: &CompletionRequest, stream: bool) -> (String, Vec<u8>) {
        let body = GenerateContentRequest {
            contents: [Content {
                role: "user",
                parts: [Part {
                    text: &request.prompt,
                }],
            }],
            generation_config: GenerationConfig {
                max_output_tokens: request.max_tokens,
                temperature: request.temperature,
            },
        };
        let path = if stream {
            format!(
                "/v1beta/models/{}:streamGenerateContent?alt=sse",
                request.model
            )
        } else {
            format!("/v1beta/models/{}:generateContent", request.model)
        };
        let body = serde_json::to_vec(&body).expect("a request serializes");
        (path, body)
    }

    fn auth_headers(&self, key: &str) -> Vec<(HeaderName, String)> {
        vec![(HeaderName::from_static("x-goog-api-key"), key.to_string())]
    }

    fn parse_response(&self, body: &[u8]) -> Result<Completion, String> {
        let body: GenerateContentResponse = parse_json(body, "response")?;
        let Some(candidate) = body.candidates.into_iter().next() else {
            let reason = body.prompt_feedback.and_then(|f| f.block_reason);
            return Err(format!(
                "no answer: {}",
                reason.as_deref().unwrap_or("no candidates")
            ));
        };
        let (input_tokens, output_tokens) = match body.usage_metadata {
            Some(UsageMetadata {
                prompt_token_count: Some(input),
                candidates_token_count,
            }) => (input, candidates_token_count.unwrap_or(0)),
            _ => return Err("no usageMetadata.promptTokenCount".into()),
        };
        Ok(Completion {
            finish_reason: candidate.finish_reason.clone(),
            text: candidate.into_text().into_owned(),
            input_tokens,
            output_tokens,
        })
    }

    fn parse_event<'d>(
        &self,
        data: &'d str,
        state: &mut StreamState,
    ) -> Result<Option<Cow<'d, str>>, ProviderError> {
        let chunk: GenerateContentResponse<'d> = parse_chunk(data)?;
        if let Some(error) = chunk.error {
            return Err(error.into_stream_error(ErrorClass::Upstream));
        }
        if let Some(UsageMetadata {
            prompt_token_count: Some(input),
            candidates_token_count,
        }) = chunk.usage_metadata
        {
            state.input_tokens = Some(input);
            state.output_tokens = Some(candidates_token_count.unwrap_or(0));
        }
        let Some(mut candidate) = chunk.candidates.into_iter().next() else {
            return Ok(None);
        };
        if let Some(reason) = candidate.finish_reason.take() {
            state.finish_reason = Some(reason);
        }
        Ok(Some(candidate.into_text()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_body_and_paths() {
        let request = CompletionRequest {
            model: "gemini-2.5-flash".into(),
            prompt: "Why?".into(),
            temperature: Some(0.5),
            max_tokens: 100,
            deadline: None,
        };
        let (path, body) = Gemini.request(&request, false);
        assert_eq!(path, "/v1beta/models/gemini-2.5-flash:generateContent");
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&body).unwrap(),
            serde_json::json!({
                "contents": [{ "role": "user", "parts": [{ "text": "Why?" }] }],
                "generationConfig": { "maxOutputTokens": 100, "temperature": 0.5 },
            })
        );
        let (path, _) = Gemini.request(&request, true);
        assert_eq!(
            path,
            "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
        );
    }

    /// The documented response, with fields polydev does not read.
    #[test]
    fn a_response_with_fields_we_do_not_know() {
        let body = br#"{
          "candidates": [{
            "content": { "parts": [{ "text": "AI learns " }, { "text": "patterns from data." }],
                         "role": "model" },
            "finishReason": "STOP",
            "avgLogprobs": -0.12,
            "safetyRatings": [{ "category": "HARM_CATEGORY_HARASSMENT", "probability": "NEGLIGIBLE" }],
            "index": 0
          }],
          "usageMetadata": {
            "promptTokenCount": 8, "candidatesTokenCount": 6, "totalTokenCount": 40,
            "thoughtsTokenCount": 26,
            "promptTokensDetails": [{ "modality": "TEXT", "tokenCount": 8 }]
          },
          "modelVersion": "gemini-2.5-flash",
          "responseId": "tTCwacuEBMvnitYP06qsgQY"
        }"#;
        assert_eq!(
            Gemini.parse_response(body).unwrap(),
            Completion {
                text: "AI learns patterns from data.".into(),
                input_tokens: 8,
                output_tokens: 6,
                finish_reason: Some("STOP".into()),
            }
        );
    }

    #[test]
    fn a_blocked_prompt_says_why() {
        let body = br#"{"promptFeedback": {"blockReason": "SAFETY", "safetyRatings": []},
                        "usageMetadata": {"promptTokenCount": 5, "totalTokenCount": 5}}"#;
        assert_eq!(
            Gemini.parse_response(body).unwrap_err(),
            "no answer: SAFETY"
        );
    }

    /// A real stream: usage without counts on the first chunks, then the final counts, and a
    /// last part that is only a thought signature.
    #[test]
    fn a_stream_with_running_usage() {
        let events = [
            r#"{"candidates": [{"content": {"role": "model","parts": [{"text": "Hello!"}]}}],"usageMetadata": {"trafficType": "ON_DEMAND"},"modelVersion": "gemini-3.1-flash-lite-preview","responseId": "tTCwacuEBMvnitYP06qsgQY"}"#,
            r#"{"candidates": [{"content": {"role": "model","parts": [{"text": " How can I help you today"}]}}],"usageMetadata": {"promptTokenCount": 1,"candidatesTokenCount": 5},"modelVersion": "gemini-3.1-flash-lite-preview"}"#,
            r#"{"candidates": [{"content": {"role": "model","parts": [{"text": "?"}]}}],"modelVersion": "gemini-3.1-flash-lite-preview"}"#,
            r#"{"candidates": [{"content": {"role": "model","parts": [{"text": "","thoughtSignature": "AY89a18iOcFus5wr5bW5xN6z"}]},"finishReason": "STOP"}],"usageMetadata": {"promptTokenCount": 1,"candidatesTokenCount": 9,"totalTokenCount": 10,"promptTokensDetails": [{"modality": "TEXT","tokenCount": 1}]},"modelVersion": "gemini-3.1-flash-lite-preview"}"#,
        ];
        let mut state = StreamState::default();
        let mut pieces = Vec::new();
        for data in events {
            if let Some(text) = Gemini.parse_event(data, &mut state).unwrap() {
                pieces.push(text);
            }
        }
        assert!(matches!(pieces[0], Cow::Borrowed("Hello!")), "not copied");
        assert_eq!(pieces.concat(), "Hello! How can I help you today?");
        assert_eq!(
            (state.input_tokens, state.output_tokens),
            (Some(1), Some(9))
        );
        assert_eq!(state.finish_reason.as_deref(), Some("STOP"));
    }

    #[test]
    fn an_error_body_and_an_error_inside_a_stream() {
        let body = r#"{"error": {"code": 400, "message": "API key not valid. Please pass a valid API key.", "status": "INVALID_ARGUMENT", "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID", "domain": "googleapis.com", "metadata": {"service": "generativelanguage.googleapis.com"}}]}}"#;
        let parsed: super::super::ErrorBody = serde_json::from_str(body).unwrap();
        assert_eq!(
            parsed.error.message.as_deref(),
            Some("API key not valid. Please pass a valid API key.")
        );
        let err = Gemini
            .parse_event(
                r#"{"error": {"code": 503, "message": "The model is overloaded. Please try again later.", "status": "UNAVAILABLE"}}"#,
                &mut StreamState::default(),
            )
            .unwrap_err();
        assert_eq!(err.class, ErrorClass::Upstream);
        assert!(err.message.contains("overloaded"), "{err}");
    }
}
