//! Codex CLI: `codex exec --json` prints one JSON event per line (`ThreadEvent` of
//! codex-rs/exec/src/exec_events.rs): `thread.started`, `turn.started`, `item.started` /
//! `item.updated` / `item.completed` with an `item` (`{"id", "type": "agent_message" |
//! "reasoning" | "command_execution" | "error" | …, "text", …}`), then `turn.completed` with
//! `usage: {input_tokens, cached_input_tokens, output_tokens}`, or `turn.failed` with
//! `error: {message}`, or a fatal `error` with `message`. The answer is the last completed
//! `agent_message`.

use serde::Deserialize;

use super::{Parsed, tokens};
use crate::perspectives::provider::Completion;

#[derive(Deserialize)]
#[serde(tag = "type")]
enum Event {
    #[serde(rename = "item.completed")]
    ItemCompleted { item: Item },
    #[serde(rename = "turn.completed")]
    TurnCompleted { usage: Usage },
    #[serde(rename = "turn.failed")]
    TurnFailed { error: ErrorMessage },
    #[serde(rename = "error")]
    Error { message: String },
    /// `thread.started`, `turn.started`, `item.started`, `item.updated`, and newer ones.
    #[serde(other)]
    Other,
}

#[derive(Deserialize)]
struct Item {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

#[derive(Deserialize)]
struct Usage {
    #[serde(default)]
    input_tokens: u64,
    #[serde(default)]
    output_tokens: u64,
}

#[derive(Deserialize)]
struct ErrorMessage {
    message: String,
}

pub(super) fn parse(stdout: &str) -> Parsed {
    let mut answer: Option<String> = None;
    let mut usage: Option<Usage> = None;
    let mut errors: Vec<String> = Vec::new();
    let mut events = 0;
    for line in stdout.lines().map(str::trim).filter(|l| !l.is_empty()) {
        // Codex prints a few plain lines (warnings) around its events: skip what is not one.
        let Ok(event) = serde_json::from_str::<Event>(line) else {
            continue;
        };
        events += 1;
        match event {
            Event::ItemCompleted { item } if item.kind == "agent_message" => {
                answer = item.text.or(answer);
            }
            Event::ItemCompleted { item } if item.kind == "error" => {
                if let Some(message) = item.message.or(item.text) {
                    errors.push(message);
                }
            }
            Event::TurnCompleted { usage: u } => usage = Some(u),
            Event::TurnFailed { error } => errors.push(error.message),
            Event::Error { message } => errors.push(message),
            _ => {}
        }
    }
    match (answer, usage) {
        // Error items beside a completed turn were not fatal.
        (Some(text), Some(usage)) => Parsed::Answer(Completion {
            text,
            // `cached_input_tokens` is a part of `input_tokens`.
            input_tokens: tokens(usage.input_tokens),
            output_tokens: tokens(usage.output_tokens),
            finish_reason: Some("turn.completed".into()),
            tool_calls: None,
        }),
        _ if !errors.is_empty() => Parsed::Failed(errors.join("; ")),
        _ if events == 0 => Parsed::Unreadable("no JSON events".into()),
        (None, _) => Parsed::Unreadable("no completed `agent_message`".into()),
        (Some(_), None) => Parsed::Unreadable("no `turn.completed` with usage".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As printed by Codex CLI 0.4x–0.17x (`codex exec --json`).
    const SUCCESS: &str = r#"{"type":"thread.started","thread_id":"019a2d7a-41c4-78b1-b7cc-a45d62a89cd5"}
{"type":"turn.started"}
{"type":"item.completed","item":{"id":"item_0","type":"reasoning","text":"**Answering briefly**"}}
{"type":"item.completed","item":{"id":"item_1","type":"agent_message","text":"Spaces."}}
{"type":"turn.completed","usage":{"input_tokens":2946,"cached_input_tokens":2048,"output_tokens":7}}
"#;

    #[test]
    fn the_last_agent_message_and_the_turn_usage() {
        let Parsed::Answer(answer) = parse(SUCCESS) else {
            panic!("{:?}", parse(SUCCESS))
        };
        assert_eq!(answer.text, "Spaces.");
        assert_eq!((answer.input_tokens, answer.output_tokens), (2946, 7));
    }

    #[test]
    fn failures_are_the_cli_s_messages() {
        let failed = "{\"type\":\"thread.started\",\"thread_id\":\"t\"}\n{\"type\":\"turn.started\"}\n{\"type\":\"error\",\"message\":\"unexpected status 401 Unauthorized\"}\n{\"type\":\"turn.failed\",\"error\":{\"message\":\"unexpected status 401 Unauthorized\"}}\n";
        assert!(matches!(parse(failed), Parsed::Failed(m) if m.contains("401 Unauthorized")));
        assert!(matches!(
            parse("Reading prompt from stdin...\n"),
            Parsed::Unreadable(_)
        ));
        let no_usage = "{\"type\":\"item.completed\",\"item\":{\"id\":\"i\",\"type\":\"agent_message\",\"text\":\"x\"}}\n";
        assert!(matches!(parse(no_usage), Parsed::Unreadable(_)));
    }
}
