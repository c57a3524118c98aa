//! Gemini CLI: headless with `--output-format json` it prints one object (`JsonOutput` of
//! packages/core/src/output/types.ts): `{"session_id", "response", "stats": {"models": {"<model>":
//! {"api": {…}, "tokens": {"input", "prompt", "candidates", "total", "cached", "thoughts",
//! "tool"}}}, "tools": {…}, "files": {…}}}`, or on failure `{"error": {"type", "message",
//! "code"}}` (on stderr, with a non-zero exit code: 41 authentication, 42 input, 52
//! configuration, 53 turn limit).

use std::collections::BTreeMap;

use serde::Deserialize;

use super::{Parsed, tokens};
use crate::perspectives::provider::Completion;

#[derive(Deserialize)]
struct JsonOutput {
    #[serde(default)]
    response: Option<String>,
    #[serde(default)]
    stats: Option<Stats>,
    #[serde(default)]
    error: Option<JsonError>,
}

#[derive(Deserialize)]
struct Stats {
    #[serde(default)]
    models: BTreeMap<String, ModelMetrics>,
}

#[derive(Deserialize)]
struct ModelMetrics {
    tokens: Tokens,
}

#[derive(Deserialize)]
struct Tokens {
    /// The whole prompt, cached part included.
    #[serde(default)]
    prompt: u64,
    #[serde(default)]
    candidates: u64,
    #[serde(default)]
    thoughts: u64,
}

#[derive(Deserialize)]
struct JsonError {
    message: String,
}

pub(super) fn parse(output: &str) -> Parsed {
    let trimmed = output.trim();
    // The object, or the last line that is one (the CLI may print notices first).
    let parsed = serde_json::from_str::<JsonOutput>(trimmed)
        .ok()
        .or_else(|| {
            trimmed
                .lines()
                .rev()
                .map(str::trim)
                .filter(|l| l.starts_with('{'))
                .find_map(|l| serde_json::from_str::<JsonOutput>(l).ok())
        });
    let Some(out) = parsed else {
        return Parsed::Unreadable("no JSON object".into());
    };
    if let Some(error) = out.error {
        return Parsed::Failed(error.message);
    }
    let (Some(text), Some(stats)) = (out.response, out.stats) else {
        return Parsed::Unreadable("an object without `response` and `stats`".into());
    };
    // Every model the CLI called for this prompt (it may route a part to a smaller one).
    let (input, output) = stats.models.values().fold((0, 0), |(i, o), m| {
        (
            i + m.tokens.prompt,
            o + m.tokens.candidates + m.tokens.thoughts,
        )
    });
    Parsed::Answer(Completion {
        text,
        input_tokens: tokens(input),
        output_tokens: tokens(output),
        finish_reason: None,
        tool_calls: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As printed by Gemini CLI 0.x (`gemini --output-format json`, prompt on stdin).
    const SUCCESS: &str = r#"{
  "session_id": "c3a1e2f0-5b6d-4e7f-8a9b-0c1d2e3f4a5b",
  "response": "Spaces.",
  "stats": {
    "models": {
      "gemini-2.5-pro": {
        "api": { "totalRequests": 1, "totalErrors": 0, "totalLatencyMs": 1830 },
        "tokens": { "input": 3100, "prompt": 8200, "candidates": 12, "total": 8480, "cached": 5100, "thoughts": 268, "tool": 0 }
      },
      "gemini-2.5-flash-lite": {
        "api": { "totalRequests": 1, "totalErrors": 0, "totalLatencyMs": 400 },
        "tokens": { "input": 700, "prompt": 700, "candidates": 5, "total": 705, "cached": 0, "thoughts": 0, "tool": 0 }
      }
    },
    "tools": { "totalCalls": 0, "totalSuccess": 0, "totalFail": 0, "totalDurationMs": 0, "totalDecisions": { "accept": 0, "reject": 0, "modify": 0, "auto_accept": 0 }, "byName": {} },
    "files": { "totalLinesAdded": 0, "totalLinesRemoved": 0 }
  }
}"#;

    #[test]
    fn the_response_and_the_tokens_of_every_model() {
        let Parsed::Answer(answer) = parse(SUCCESS) else {
            panic!("{:?}", parse(SUCCESS))
        };
        assert_eq!(answer.text, "Spaces.");
        assert_eq!(answer.input_tokens, 8200 + 700);
        assert_eq!(answer.output_tokens, 12 + 268 + 5);
    }

    #[test]
    fn an_error_object_is_the_cli_s_message() {
        let error = r#"{"session_id":"s","error":{"type":"FatalAuthenticationError","message":"Please set an Auth method in your settings.json","code":41}}"#;
        assert_eq!(
            parse(error),
            Parsed::Failed("Please set an Auth method in your settings.json".into())
        );
        assert!(matches!(
            parse("Loaded cached credentials."),
            Parsed::Unreadable(_)
        ));
    }
}
