//! Claude Code: `claude -p --output-format json` prints one JSON object when it is done, the
//! `result` message of its SDK (docs/cli-backends.md has an example):
//! `{"type": "result", "subtype": "success" | "error_max_turns" | "error_during_execution",
//! "is_error", "result", "usage": {"input_tokens", "output_tokens",
//! "cache_creation_input_tokens", "cache_read_input_tokens", …}, "total_cost_usd", …}`.
//! A failure that still reaches the model loop (not signed in, usage limit) is a `result` with
//! `is_error: true` and the reason in `result`.

use serde::Deserialize;

use super::{Parsed, tokens};
use crate::perspectives::provider::Completion;

#[derive(Deserialize)]
struct ResultMessage {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    subtype: Option<String>,
    #[serde(default)]
    is_error: bool,
    #[serde(default)]
    result: Option<String>,
    #[serde(default)]
    usage: Option<Usage>,
}

#[derive(Deserialize, Default)]
struct Usage {
    #[serde(default)]
    input_tokens: u64,
    #[serde(default)]
    output_tokens: u64,
    #[serde(default)]
    cache_creation_input_tokens: u64,
    #[serde(default)]
    cache_read_input_tokens: u64,
}

pub(super) fn parse(stdout: &str) -> Parsed {
    // One object; tolerate lines before it (a wrapper's or a hook's) by reading the last line
    // that holds JSON.
    let Some(message) = stdout
        .lines()
        .rev()
        .map(str::trim)
        .filter(|l| l.starts_with('{'))
        .find_map(|l| serde_json::from_str::<ResultMessage>(l).ok())
        .or_else(|| serde_json::from_str::<ResultMessage>(stdout.trim()).ok())
    else {
        return Parsed::Unreadable("no `result` JSON object".into());
    };
    if message.kind != "result" {
        return Parsed::Unreadable(format!("a `{}` object instead of `result`", message.kind));
    }
    let subtype = message.subtype.as_deref().unwrap_or("success");
    if message.is_error || subtype != "success" {
        return Parsed::Failed(
            message
                .result
                .filter(|r| !r.trim().is_empty())
                .unwrap_or_else(|| format!("the run ended with `{subtype}`")),
        );
    }
    let Some(text) = message.result else {
        return Parsed::Unreadable("a successful `result` without its text".into());
    };
    let usage = message.usage.unwrap_or_default();
    Parsed::Answer(Completion {
        text,
        // Everything the model read: new, cache-written and cache-read input.
        input_tokens: tokens(
            usage.input_tokens + usage.cache_creation_input_tokens + usage.cache_read_input_tokens,
        ),
        output_tokens: tokens(usage.output_tokens),
        finish_reason: Some(subtype.to_string()),
        tool_calls: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As printed by Claude Code 2.x (`claude -p --output-format json`).
    const SUCCESS: &str = r#"{"type":"result","subtype":"success","is_error":false,"duration_ms":3952,"duration_api_ms":12932,"num_turns":1,"result":"Spaces.","session_id":"8a7c4c1e-2b7e-4d5e-9f0a-1b2c3d4e5f60","total_cost_usd":0.10457895,"usage":{"input_tokens":2,"cache_creation_input_tokens":7924,"cache_read_input_tokens":13368,"output_tokens":9,"server_tool_use":{"web_search_requests":0},"service_tier":"standard","cache_creation":{"ephemeral_1h_input_tokens":0,"ephemeral_5m_input_tokens":7924}},"modelUsage":{"claude-sonnet-4-5-20250929":{"inputTokens":2,"outputTokens":9,"costUSD":0.10457895,"contextWindow":200000}},"permission_denials":[],"uuid":"3eb1e1b4-0000-4000-8000-000000000000"}"#;

    #[test]
    fn a_success_gives_the_text_and_all_input_tokens() {
        let Parsed::Answer(answer) = parse(SUCCESS) else {
            panic!("{:?}", parse(SUCCESS))
        };
        assert_eq!(answer.text, "Spaces.");
        assert_eq!(answer.input_tokens, 2 + 7924 + 13368);
        assert_eq!(answer.output_tokens, 9);
    }

    #[test]
    fn errors_and_other_output_are_told_apart() {
        let login = r#"{"type":"result","subtype":"success","is_error":true,"duration_ms":120,"num_turns":1,"result":"Invalid API key · Please run /login","session_id":"s","total_cost_usd":0,"usage":{"input_tokens":0,"output_tokens":0}}"#;
        assert_eq!(
            parse(login),
            Parsed::Failed("Invalid API key · Please run /login".into())
        );
        let turns = r#"{"type":"result","subtype":"error_max_turns","is_error":false,"num_turns":1,"session_id":"s"}"#;
        assert!(matches!(parse(turns), Parsed::Failed(m) if m.contains("error_max_turns")));
        assert!(matches!(parse("Spaces."), Parsed::Unreadable(_)));
        assert!(matches!(
            parse(r#"{"type":"system","subtype":"init"}"#),
            Parsed::Unreadable(_)
        ));
    }
}
