//! The MCP server over streamable HTTP (`/mcp`), authenticated with the `pd_` token by the
//! HTTP layer, which puts the [`Caller`] into the request's extensions.

// MCP logging (`logging/setLevel`, `notifications/message`) is deprecated in rmcp by SEP-2577
// but is part of the 2025-06-18 and 2025-11-25 revisions that IDEs speak today.
#![allow(deprecated)]

use std::sync::Arc;

use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, LoggingLevel,
    LoggingMessageNotificationParam, ProgressNotificationParam, ProgressToken,
    SetLevelRequestParams,
};
use rmcp::service::RequestContext;
use rmcp::{ErrorData, RoleServer, ServerHandler};
use tokio::sync::mpsc;

use crate::accounts::Caller;
use crate::api::{ErrorResponse, ModelList};
use crate::app::AppState;
use crate::error::Error;
use crate::perspectives::{self, ModelResult, PerspectivesRequest, Progress, ProgressSink, Status};

use super::sessions::McpSessions;

/// The handler of an MCP session (one per session, made again when a hibernated session is
/// revived, see [`super::sessions`]).
#[derive(Clone)]
pub struct PolydevMcp {
    state: AppState,
    /// Where each session's log level is kept, across hibernation.
    sessions: Arc<McpSessions>,
}

impl PolydevMcp {
    pub fn new(state: AppState, sessions: Arc<McpSessions>) -> Self {
        PolydevMcp { state, sessions }
    }

    /// The least severe level the session's client asked for with `logging/setLevel`; `None`
    /// (the default) sends no log notifications.
    fn log_level(&self, ctx: &RequestContext<RoleServer>) -> Option<LoggingLevel> {
        session_id(ctx).and_then(|id| self.sessions.log_level(id))
    }

    async fn get_perspectives(
        &self,
        caller: &Caller,
        request: PerspectivesRequest,
        ctx: &RequestContext<RoleServer>,
    ) -> CallToolResult {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let progress_token = ctx.meta.get_progress_token();
        let log_level = self.log_level(ctx);
        let call = perspectives::get_perspectives(
            self.state.pools(),
            &self.state.gateway,
            caller.user_id,
            &request,
            if progress_token.is_some() || log_level.is_some() {
                ProgressSink::new(tx)
            } else {
                ProgressSink::none()
            },
        );
        tokio::pin!(call);
        let mut notifier = ProgressNotifier {
            token: progress_token,
            log_level,
            finished: 0,
            total: None,
        };
        let result = loop {
            tokio::select! {
                biased;
                // notifications/cancelled: dropping `call` aborts the upstream calls still
                // running and gives their quota back.
                () = ctx.ct.cancelled() => {
                    return CallToolResult::error(vec![ContentBlock::text("cancelled by the client")]);
                }
                Some(update) = rx.recv() => notifier.send(update, ctx).await,
                result = &mut call => break result,
            }
        };
        // The last model's event may arrive together with the result.
        while let Ok(update) = rx.try_recv() {
            notifier.send(update, ctx).await;
        }
        match result {
            Ok(result) => {
                let text = result.to_text();
                let mut out =
                    CallToolResult::structured(serde_json::to_value(&result).unwrap_or_default());
                out.content = vec![ContentBlock::text(text)];
                out
            }
            Err(error) => tool_error(error),
        }
    }
}

/// Turns fan-out events into `notifications/progress`: one when the models are chosen, then one
/// per model as it finishes, carrying its answer.
/// With a log level set, each event is also a `notifications/message` (logger `polydev`).
struct ProgressNotifier {
    token: Option<ProgressToken>,
    log_level: Option<LoggingLevel>,
    finished: u32,
    total: Option<f64>,
}

impl ProgressNotifier {
    async fn send(&mut self, update: Progress, ctx: &RequestContext<RoleServer>) {
        self.log(&update, ctx).await;
        let Some(token) = &self.token else { return };
        let message = match update {
            Progress::Started { models } => {
                self.total = Some(models.len() as f64);
                format!("asking {}", models.join(", "))
            }
            Progress::Finished(model) => {
                self.finished += 1;
                super::finished_message(&model)
            }
            Progress::Delta { .. } => return,
        };
        let mut param = ProgressNotificationParam::new(token.clone(), f64::from(self.finished))
            .with_message(message);
        if let Some(total) = self.total {
            param = param.with_total(total);
        }
        if let Err(error) = ctx.peer.notify_progress(param).await {
            tracing::debug!(%error, "progress notification not delivered");
        }
    }
}

/// Errors the model calling the tool should read (bad arguments, quota) are tool errors, not
/// protocol errors: the same code and public message as the REST API, as text and as
/// structured content.
fn tool_error(error: Error) -> CallToolResult {
    error.log();
    let body = ErrorResponse::from(&error);
    let text = format!("{} ({})", body.error.message, body.error.code);
    let mut result = CallToolResult::error(vec![ContentBlock::text(text)]);
    result.structured_content = serde_json::to_value(&body).ok();
    result
}

impl ProgressNotifier {
    /// A log notification per event at or above the session's level: `debug` for the models
    /// chosen, `info` for an answer, `warning` for a model that failed or timed out.
    async fn log(&self, update: &Progress, ctx: &RequestContext<RoleServer>) {
        let Some(threshold) = self.log_level else {
            return;
        };
        let (level, data) = match update {
            Progress::Started { models } => (
                LoggingLevel::Debug,
                serde_json::json!({ "event": "started", "models": models }),
            ),
            Progress::Finished(model) => finished_log(model),
            Progress::Delta { .. } => return,
        };
        if severity(level) < severity(threshold) {
            return;
        }
        let param = LoggingMessageNotificationParam::new(level, data).with_logger("polydev");
        if let Err(error) = ctx.peer.notify_logging_message(param).await {
            tracing::debug!(%error, "log notification not delivered");
        }
    }
}

/// The log notification of a finished model: `info` for an answer, `warning` for a model that
/// failed or timed out (also sent by `polydev mcp` for its local CLIs).
pub(super) fn finished_log(model: &ModelResult) -> (LoggingLevel, serde_json::Value) {
    let level = if model.status == Status::Ok {
        LoggingLevel::Info
    } else {
        LoggingLevel::Warning
    };
    let data = serde_json::json!({
        "event": "model_finished",
        "model": model.model,
        "status": model.status,
        "latency_ms": model.latency_ms,
        "error": model.error,
    });
    (level, data)
}

/// RFC 5424's order, least severe first (rmcp's `LoggingLevel` has no `Ord`).
pub(super) fn severity(level: LoggingLevel) -> u8 {
    match level {
        LoggingLevel::Debug => 0,
        LoggingLevel::Info => 1,
        LoggingLevel::Notice => 2,
        LoggingLevel::Warning => 3,
        LoggingLevel::Error => 4,
        LoggingLevel::Critical => 5,
        LoggingLevel::Alert => 6,
        LoggingLevel::Emergency => 7,
    }
}

/// The `Mcp-Session-Id` of the request.
fn session_id(ctx: &RequestContext<RoleServer>) -> Option<&str> {
    ctx.extensions
        .get::<axum::http::request::Parts>()
        .and_then(|parts| parts.headers.get("mcp-session-id"))
        .and_then(|value| value.to_str().ok())
}

fn caller(ctx: &RequestContext<RoleServer>) -> Result<Caller, ErrorData> {
    ctx.extensions
        .get::<axum::http::request::Parts>()
        .and_then(|parts| parts.extensions.get::<Caller>())
        .cloned()
        .ok_or_else(|| ErrorData::invalid_request("not authenticated", None))
}

impl ServerHandler for PolydevMcp {
    super::static_tool_handlers!();

    async fn set_level(
        &self,
        request: SetLevelRequestParams,
        ctx: RequestContext<RoleServer>,
    ) -> Result<(), ErrorData> {
        let id =
            session_id(&ctx).ok_or_else(|| ErrorData::invalid_request("no MCP session", None))?;
        self.sessions.set_log_level(id, request.level);
        Ok(())
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let caller = caller(&ctx)?;
        let arguments = request.arguments.unwrap_or_default();
        let result = match request.name.as_ref() {
            super::GET_PERSPECTIVES => {
                let args: PerspectivesRequest =
                    rmcp::handler::server::tool::parse_json_object(arguments)?;
                self.get_perspectives(&caller, args, &ctx).await
            }
            super::LIST_MODELS => {
                let models = ModelList {
                    models: self.state.gateway.models_for(caller.user_id).await,
                };
                let mut text =
                    String::from("model · provider · tier · $/M in · $/M out · available\n");
                for m in &models.models {
                    text.push_str(&format!(
                        "{} · {} · {} · {} · {} · {}\n",
                        m.model.id,
                        m.model.provider,
                        m.model.tier.as_str(),
                        m.model.input_price,
                        m.model.output_price,
                        m.available
                    ));
                }
                let mut out =
                    CallToolResult::structured(serde_json::to_value(&models).unwrap_or_default());
                out.content = vec![ContentBlock::text(text)];
                out
            }
            super::GET_USAGE => {
                match perspectives::usage_report(&self.state.pool, caller.user_id).await {
                    Ok(report) => {
                        CallToolResult::structured(serde_json::to_value(report).unwrap_or_default())
                    }
                    Err(error) => tool_error(error),
                }
            }
            other => {
                return Err(ErrorData::invalid_params(
                    format!("unknown tool `{other}`"),
                    None,
                ));
            }
        };
        Ok(result.into())
    }
}
