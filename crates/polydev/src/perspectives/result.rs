//! What `get_perspectives` returns, and the progress events it sends while it runs.

use std::fmt::Write as _;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc::UnboundedSender;
use uuid::Uuid;

use super::catalogue::ModelSpec;
use super::provider::ErrorClass;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// The model answered.
    Ok,
    /// The model call failed (see `error`).
    Error,
    /// The deadline passed first.
    Timeout,
    /// Not called: no quota left for its tier.
    Skipped,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ModelError {
    pub class: ErrorClass,
    pub message: String,
}

/// One model's answer, or why there is none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ModelResult {
    pub model: String,
    pub provider: String,
    pub tier: String,
    pub status: Status,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// True on a replay for a zero-knowledge account: the model answered, but its text was
    /// not kept by the server.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub text_withheld: bool,
    pub latency_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub input_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_tokens: Option<u32>,
    /// USD, as an exact decimal string.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost_usd: Option<String>,
    /// Why the model stopped, in the provider's words (`stop`, `end_turn`, `length`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<String>,
    /// The tools the model asks to call (OpenAI's shape), when the request offered tools.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ModelError>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Totals {
    pub models: usize,
    pub succeeded: usize,
    pub failed: usize,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// USD, as an exact decimal string.
    pub cost_usd: String,
    /// Wall time of the whole call.
    pub elapsed_ms: u64,
}

/// The result of `get_perspectives` (`structuredContent` of the MCP tool, body of the REST call).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct PerspectivesResult {
    /// Also the `session_id` of the call's usage rows.
    pub request_id: Uuid,
    pub perspectives: Vec<ModelResult>,
    pub totals: Totals,
    /// True when this is the stored result of an earlier call with the same idempotency key.
    #[serde(default)]
    pub replayed: bool,
}

impl PerspectivesResult {
    /// The readable form: a section per model, then the totals.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        for p in &self.perspectives {
            let _ = writeln!(out, "## {} ({}, {})", p.model, p.provider, p.tier);
            match (&p.text, &p.error) {
                (Some(text), _) => {
                    let _ = writeln!(
                        out,
                        "_{} ms · {} in / {} out tokens · ${}_\n\n{}\n",
                        p.latency_ms,
                        p.input_tokens.unwrap_or(0),
                        p.output_tokens.unwrap_or(0),
                        p.cost_usd.as_deref().unwrap_or("0"),
                        text.trim_end()
                    );
                }
                (None, _) if p.text_withheld => {
                    let _ = writeln!(
                        out,
                        "_{} ms · {} in / {} out tokens · ${}_\n\n({})\n",
                        p.latency_ms,
                        p.input_tokens.unwrap_or(0),
                        p.output_tokens.unwrap_or(0),
                        p.cost_usd.as_deref().unwrap_or("0"),
                        super::idempotency::TEXT_NOT_KEPT
                    );
                }
                (None, Some(error)) => {
                    let _ = writeln!(
                        out,
                        "_{:?} after {} ms_: {} ({})\n",
                        p.status,
                        p.latency_ms,
                        error.message,
                        error.class.as_str()
                    );
                }
                (None, None) => {
                    let _ = writeln!(out, "_{:?}_\n", p.status);
                }
            }
        }
        let t = &self.totals;
        let _ = write!(
            out,
            "---\n{} of {} models answered · {} in / {} out tokens · ${} · {} ms{}",
            t.succeeded,
            t.models,
            t.input_tokens,
            t.output_tokens,
            t.cost_usd,
            t.elapsed_ms,
            if self.replayed {
                " · replayed (idempotency key)"
            } else {
                ""
            }
        );
        out
    }
}

/// Events while a call runs, for progress notifications and SSE.
#[derive(Debug, Clone)]
pub enum Progress {
    /// The models chosen, before any is called.
    Started { models: Vec<String> },
    /// Text of one model's answer as it streams in.
    Delta { model: String, text: String },
    /// One model is done (answered, failed or timed out).
    Finished(ModelResult),
}

/// Where a call's [`Progress`] events go, if anywhere. Sending never fails the call: events for
/// a receiver that is gone are dropped.
#[derive(Debug, Clone, Default)]
pub struct ProgressSink {
    tx: Option<UnboundedSender<Progress>>,
    deltas: bool,
}

impl ProgressSink {
    /// No events.
    pub fn none() -> Self {
        ProgressSink::default()
    }

    /// `Started` and `Finished` events to `tx`.
    pub fn new(tx: UnboundedSender<Progress>) -> Self {
        ProgressSink {
            tx: Some(tx),
            deltas: false,
        }
    }

    /// `Delta` events too: the text of the answers as it streams in.
    pub fn with_deltas(self) -> Self {
        ProgressSink {
            deltas: true,
            ..self
        }
    }

    /// Whether `delta` sends anything.
    pub(super) fn wants_deltas(&self) -> bool {
        self.deltas && self.tx.is_some()
    }

    pub(super) fn started(&self, models: &[&ModelSpec]) {
        let _ = self.send(|| Progress::Started {
            models: models.iter().map(|m| m.id.clone()).collect(),
        });
    }

    /// Sends a model's text; true when it went to a receiver that is still there.
    pub(super) fn delta(&self, model: &str, text: &str) -> bool {
        self.deltas
            && self.send(|| Progress::Delta {
                model: model.to_string(),
                text: text.to_string(),
            })
    }

    pub(super) fn finished(&self, result: &ModelResult) {
        let _ = self.send(|| Progress::Finished(result.clone()));
    }

    fn send(&self, event: impl FnOnce() -> Progress) -> bool {
        match &self.tx {
            Some(tx) => tx.send(event()).is_ok(),
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_classes_keep_their_wire_names() {
        let classes = [
            (ErrorClass::BadRequest, "bad_request"),
            (ErrorClass::Auth, "auth"),
            (ErrorClass::RateLimited, "rate_limited"),
            (ErrorClass::Upstream, "upstream"),
            (ErrorClass::Timeout, "timeout"),
            (ErrorClass::Connection, "connection"),
            (ErrorClass::Malformed, "malformed_response"),
            (ErrorClass::NotConfigured, "not_configured"),
            (ErrorClass::QuotaExceeded, "quota_exceeded"),
            (ErrorClass::Internal, "internal"),
        ];
        for (class, name) in classes {
            let error = ModelError {
                class,
                message: "m".into(),
            };
            let json = serde_json::to_value(&error).unwrap();
            assert_eq!(json["class"], name);
            assert_eq!(class.as_str(), name);
            assert_eq!(serde_json::from_value::<ModelError>(json).unwrap(), error);
        }
    }

    #[test]
    fn an_absent_sink_sends_nothing_and_deltas_need_asking_for() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        ProgressSink::none().delta("m", "text");
        let events = ProgressSink::new(tx.clone());
        events.delta("m", "text");
        assert!(!events.wants_deltas());
        let deltas = ProgressSink::new(tx).with_deltas();
        assert!(deltas.wants_deltas());
        deltas.delta("m", "text");
        assert!(
            matches!(rx.try_recv(), Ok(Progress::Delta { model, text }) if model == "m" && text == "text")
        );
        assert!(rx.try_recv().is_err());
    }
}
