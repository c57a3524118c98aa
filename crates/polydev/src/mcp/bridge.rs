//! `polydev mcp`: a stdio MCP server for IDEs that launch servers as processes. It answers
//! `initialize` and `tools/list` itself, at once and without any network call, and forwards
//! tool calls to a polydev server over streamable HTTP with the token from
//! `POLYDEV_USER_TOKEN`, relaying progress notifications, log notifications and cancellation.
//! `get_perspectives` also asks the CLIs installed on this machine (Claude Code, Codex CLI,
//! Gemini CLI; `--local-clis`) while the server works, and adds their answers to the server's
//! (mcp/local.rs, docs/cli-backends.md).

// MCP logging is deprecated in rmcp (SEP-2577); see server.rs.
#![allow(deprecated)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;

use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, CancelledNotificationParam,
    ClientRequest, ContentBlock, LoggingLevel, LoggingMessageNotificationParam,
    ProgressNotificationParam, ProgressToken, Request, ServerResult, SetLevelRequestParams,
};
use rmcp::service::{
    NotificationContext, Peer, PeerRequestOptions, RequestContext, RunningService,
};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::{ClientHandler, ErrorData, RoleClient, RoleServer, ServerHandler, ServiceExt};
use tokio::sync::{OnceCell, mpsc};

use super::local::{self, LocalBackends, LocalClis, ServerAnswer};
use crate::api::ErrorResponse;
use crate::perspectives::cli::CliBackend;
use crate::perspectives::{ModelResult, PerspectivesRequest, PerspectivesResult, limits};

/// Routes progress notifications of forwarded calls back to the IDE. Notifications that arrive
/// before their call is registered are kept until it is. Log notifications go to the IDE that
/// asked for them with `logging/setLevel`.
#[derive(Clone, Default)]
struct ProgressRelay {
    routes: Arc<Mutex<Relay>>,
    logs_to: Arc<Mutex<Option<Peer<RoleServer>>>>,
}

#[derive(Default)]
struct Relay {
    listeners: HashMap<ProgressToken, mpsc::UnboundedSender<ProgressNotificationParam>>,
    early: HashMap<ProgressToken, Vec<ProgressNotificationParam>>,
}

impl ProgressRelay {
    fn listen(&self, token: ProgressToken) -> mpsc::UnboundedReceiver<ProgressNotificationParam> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut relay = self.routes.lock().expect("relay lock");
        for early in relay.early.remove(&token).unwrap_or_default() {
            let _ = tx.send(early);
        }
        relay.listeners.insert(token, tx);
        rx
    }

    fn forget(&self, token: &ProgressToken) {
        let mut relay = self.routes.lock().expect("relay lock");
        relay.listeners.remove(token);
        relay.early.remove(token);
    }
}

impl ClientHandler for ProgressRelay {
    async fn on_logging_message(
        &self,
        param: LoggingMessageNotificationParam,
        _ctx: NotificationContext<RoleClient>,
    ) {
        let ide = self.logs_to.lock().expect("relay lock").clone();
        if let Some(ide) = ide
            && let Err(error) = ide.notify_logging_message(param).await
        {
            tracing::debug!(%error, "log notification not delivered");
        }
    }

    async fn on_progress(
        &self,
        param: ProgressNotificationParam,
        _ctx: NotificationContext<RoleClient>,
    ) {
        let mut relay = self.routes.lock().expect("relay lock");
        match relay.listeners.get(&param.progress_token) {
            Some(tx) => {
                let _ = tx.send(param);
            }
            None => relay
                .early
                .entry(param.progress_token.clone())
                .or_default()
                .push(param),
        }
    }
}

pub struct Bridge {
    server_url: String,
    token: Option<String>,
    relay: ProgressRelay,
    upstream: OnceCell<RunningService<RoleClient, ProgressRelay>>,
    local: LocalBackends,
    /// The level the IDE set with `logging/setLevel` (for the local CLIs' log notifications).
    log_level: Mutex<Option<LoggingLevel>>,
}

impl Bridge {
    /// A bridge that asks no local CLI (see [`Bridge::with_local_clis`]).
    pub fn new(server_url: String, token: Option<String>) -> Bridge {
        Bridge {
            server_url,
            token,
            relay: ProgressRelay::default(),
            upstream: OnceCell::new(),
            local: LocalBackends::new(LocalClis::Off),
            log_level: Mutex::new(None),
        }
    }

    /// Asks these CLIs of this machine too, when they are installed.
    pub fn with_local_clis(self, choice: LocalClis) -> Bridge {
        Bridge {
            local: LocalBackends::new(choice),
            ..self
        }
    }

    /// Serves MCP on stdin/stdout until the IDE closes it.
    pub async fn run(self) -> anyhow::Result<()> {
        if self.token.is_none() {
            eprintln!(
                "polydev mcp: POLYDEV_USER_TOKEN is not set and `polydev login` stored no token for this server. \
                 Run `polydev login`, or create a token with `polydev token create` (or in your account) \
                 and set it in your IDE's MCP server configuration. \
                 Tools will answer with an error until then."
            );
        }
        self.local.detect_in_background();
        let running = self.serve(rmcp::transport::stdio()).await?;
        running.waiting().await?;
        Ok(())
    }

    async fn upstream(&self) -> Result<&RunningService<RoleClient, ProgressRelay>, ErrorData> {
        let Some(token) = &self.token else {
            return Err(ErrorData::invalid_request(
                "POLYDEV_USER_TOKEN is not set: create a token with `polydev token create` and set it in the MCP server's environment",
                None,
            ));
        };
        self.upstream
            .get_or_try_init(|| async {
                let url = format!("{}/mcp", self.server_url.trim_end_matches('/'));
                let transport = StreamableHttpClientTransport::from_config(
                    StreamableHttpClientTransportConfig::with_uri(url.clone())
                        .auth_header(token.clone()),
                );
                self.relay.clone().serve(transport).await.map_err(|e| {
                    ErrorData::internal_error(
                        format!("cannot reach the polydev server at {url}: {e}"),
                        None,
                    )
                })
            })
            .await
    }
}

impl ServerHandler for Bridge {
    super::static_tool_handlers!();

    async fn set_level(
        &self,
        request: SetLevelRequestParams,
        ctx: RequestContext<RoleServer>,
    ) -> Result<(), ErrorData> {
        let upstream = self.upstream().await?;
        *self.relay.logs_to.lock().expect("relay lock") = Some(ctx.peer.clone());
        *self.log_level.lock().expect("log level lock") = Some(request.level);
        upstream
            .peer()
            .set_level(request)
            .await
            .map_err(|e| ErrorData::internal_error(format!("the polydev server failed: {e}"), None))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let upstream = self.upstream().await?;
        let plan = self.local_plan(&request).await;
        let progress = Progress::new(
            ctx.meta.get_progress_token(),
            plan.as_ref().map_or(0, |p| p.backends.len()),
        );
        let lists_models = request.name == super::LIST_MODELS;
        let outcome = match plan {
            None if lists_models => {
                let out = self.forward(upstream, request, &ctx, &progress).await;
                match out {
                    Ok(out) => Ok(with_local_models(out, &self.local.available().await)),
                    Err(error) => Err(error),
                }
            }
            None => self.forward(upstream, request, &ctx, &progress).await,
            Some(plan) => {
                self.with_local(upstream, request, &ctx, &progress, plan)
                    .await
            }
        };
        // rmcp writes notifications and responses from separate queues; a client drops progress
        // that arrives after the result, so give the last notifications a moment to go first.
        if progress.token.is_some() {
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        outcome.map(Into::into)
    }
}

/// The server's model list with the local CLIs this bridge detected added (`provider`
/// `cli`, `tier` `subscription`, `local: true`, the CLI's version): the models
/// `get_perspectives` adds from this machine.
fn with_local_models(mut out: CallToolResult, backends: &[CliBackend]) -> CallToolResult {
    if backends.is_empty() || out.is_error == Some(true) {
        return out;
    }
    if let Some(models) = out
        .structured_content
        .as_mut()
        .and_then(|s| s.get_mut("models"))
        .and_then(|m| m.as_array_mut())
    {
        for backend in backends {
            models.push(serde_json::json!({
                "id": backend.kind.model_id(),
                "provider": crate::perspectives::cli::PROVIDER,
                "tier": crate::perspectives::cli::TIER,
                "input_price": "0",
                "output_price": "0",
                "available": true,
                "local": true,
                "version": backend.version,
            }));
        }
    }
    let mut text = String::new();
    for backend in backends {
        text.push_str(&format!(
            "{} · {} · {} · 0 · 0 · true (on this machine: `{}` {})\n",
            backend.kind.model_id(),
            crate::perspectives::cli::PROVIDER,
            crate::perspectives::cli::TIER,
            backend.kind.command(),
            backend.version
        ));
    }
    out.content.push(ContentBlock::text(text));
    out
}

/// The local CLIs a `get_perspectives` call asks, and with what.
struct LocalPlan {
    backends: Vec<CliBackend>,
    prompt: String,
    timeout: Duration,
}

impl Bridge {
    /// The local CLIs to ask for `request`: none for other tools, for arguments the server
    /// will refuse anyway, or when none is installed and signed in.
    async fn local_plan(&self, request: &CallToolRequestParams) -> Option<LocalPlan> {
        if request.name != super::GET_PERSPECTIVES {
            return None;
        }
        let arguments = serde_json::Value::Object(request.arguments.clone().unwrap_or_default());
        let args: PerspectivesRequest = serde_json::from_value(arguments).ok()?;
        let chars = args.prompt.chars().count();
        if args.prompt.trim().is_empty() || chars > limits::MAX_PROMPT_CHARS {
            return None;
        }
        let backends = self.local.available().await;
        if backends.is_empty() {
            return None;
        }
        Some(LocalPlan {
            backends,
            timeout: Duration::from_millis(args.deadline_ms()),
            prompt: args.prompt,
        })
    }

    /// Forwards the call and asks the local CLIs at the same time; their answers join the
    /// server's result. A server error other than `no_provider_configured` stops the CLIs and
    /// is the answer.
    async fn with_local(
        &self,
        upstream: &RunningService<RoleClient, ProgressRelay>,
        request: CallToolRequestParams,
        ctx: &RequestContext<RoleServer>,
        progress: &Progress,
        plan: LocalPlan,
    ) -> Result<CallToolResult, ErrorData> {
        let started = Instant::now();
        let forward = self.forward(upstream, request, ctx, progress);
        let prompt = plan.prompt.as_str();
        let timeout = plan.timeout;
        let local = async {
            let mut pending: FuturesUnordered<_> = plan
                .backends
                .iter()
                .enumerate()
                .map(|(index, backend)| async move {
                    (index, self.local.ask(backend, prompt, timeout).await)
                })
                .collect();
            let mut results: Vec<(usize, ModelResult)> = Vec::new();
            while let Some((index, result)) = pending.next().await {
                progress.local(ctx, &result).await;
                self.log_local(&result).await;
                results.push((index, result));
            }
            results.sort_by_key(|(index, _)| *index);
            results.into_iter().map(|(_, r)| r).collect::<Vec<_>>()
        };
        tokio::pin!(forward, local);
        let mut server: Option<CallToolResult> = None;
        let mut answers: Option<Vec<ModelResult>> = None;
        loop {
            tokio::select! {
                out = &mut forward, if server.is_none() => {
                    // Cancelled, or the server failed: dropping `local` kills the CLIs.
                    let out = out?;
                    if !keeps_local_answers(&out) {
                        return Ok(out);
                    }
                    server = Some(out);
                }
                out = &mut local, if answers.is_none() => answers = Some(out),
            }
            if let (Some(_), Some(_)) = (&server, &answers) {
                break;
            }
        }
        let (Some(server), Some(answers)) = (server, answers) else {
            unreachable!("the loop ends with both")
        };
        let Some(answer) = server_answer(&server) else {
            return Ok(server);
        };
        let elapsed_ms = started.elapsed().as_millis() as u64;
        Ok(match local::merge(answer, answers, elapsed_ms) {
            Ok(result) => tool_result(&result),
            Err(_) => server,
        })
    }

    /// Forwards a tool call to the server, relaying its progress and the client's cancellation.
    async fn forward(
        &self,
        upstream: &RunningService<RoleClient, ProgressRelay>,
        request: CallToolRequestParams,
        ctx: &RequestContext<RoleServer>,
        progress: &Progress,
    ) -> Result<CallToolResult, ErrorData> {
        let handle = upstream
            .send_cancellable_request(
                ClientRequest::CallToolRequest(Request::new(request)),
                PeerRequestOptions::no_options(),
            )
            .await
            .map_err(|e| {
                ErrorData::internal_error(format!("forwarding the call failed: {e}"), None)
            })?;
        let remote_token = handle.progress_token.clone();
        let mut updates = self.relay.listen(remote_token.clone());
        let (request_id, peer) = (handle.id.clone(), upstream.peer().clone());
        let response = handle.await_response();
        tokio::pin!(response);
        let mut done = false;
        let outcome = loop {
            tokio::select! {
                biased;
                () = ctx.ct.cancelled() => {
                    let _ = peer
                        .notify_cancelled(CancelledNotificationParam::new(Some(request_id), Some("cancelled by the client".into())))
                        .await;
                    break Err(ErrorData::internal_error("cancelled by the client", None));
                }
                Some(update) = updates.recv() => done = progress.server(ctx, update).await,
                response = &mut response => break match response {
                    Ok(ServerResult::CallToolResult(result)) => Ok(result),
                    Ok(other) => Err(ErrorData::internal_error(format!("unexpected reply: {other:?}"), None)),
                    Err(e) => Err(ErrorData::internal_error(format!("the polydev server failed: {e}"), None)),
                },
            }
        };
        // The server sends every progress notification before its response, but the client
        // dispatches them concurrently: pass on the ones still in flight (until progress
        // reaches its total, for at most 200 ms). Only when the IDE asked for progress: else
        // there is nothing to pass on, and the wait would only delay the answer.
        let grace = tokio::time::Instant::now() + Duration::from_millis(200);
        while !done && outcome.is_ok() && progress.token.is_some() {
            match tokio::time::timeout_at(grace, updates.recv()).await {
                Ok(Some(update)) => done = progress.server(ctx, update).await,
                _ => break,
            }
        }
        self.relay.forget(&remote_token);
        outcome
    }
}

impl Bridge {
    /// A log notification for a local CLI that finished, as the server sends for its models.
    async fn log_local(&self, result: &ModelResult) {
        let Some(threshold) = *self.log_level.lock().expect("log level lock") else {
            return;
        };
        let (level, data) = super::server::finished_log(result);
        if super::server::severity(level) < super::server::severity(threshold) {
            return;
        }
        let ide = self.relay.logs_to.lock().expect("relay lock").clone();
        if let Some(ide) = ide {
            let param = LoggingMessageNotificationParam::new(level, data).with_logger("polydev");
            if let Err(error) = ide.notify_logging_message(param).await {
                tracing::debug!(%error, "log notification not delivered");
            }
        }
    }
}

/// Whether the local CLIs' answers still count: the server answered, or it had no provider
/// for the call (the CLIs' answers then are the result).
fn keeps_local_answers(result: &CallToolResult) -> bool {
    match server_answer(result) {
        Some(ServerAnswer::Result(_)) => true,
        Some(ServerAnswer::Error(error)) => error.error.code == "no_provider_configured",
        None => false,
    }
}

/// The server's `get_perspectives` answer, read from its structured content.
fn server_answer(result: &CallToolResult) -> Option<ServerAnswer> {
    let structured = result.structured_content.clone()?;
    if result.is_error == Some(true) {
        serde_json::from_value::<ErrorResponse>(structured)
            .ok()
            .map(ServerAnswer::Error)
    } else {
        serde_json::from_value::<PerspectivesResult>(structured)
            .ok()
            .map(ServerAnswer::Result)
    }
}

/// A result as the server words it: readable text and the structured result.
fn tool_result(result: &PerspectivesResult) -> CallToolResult {
    let mut out = CallToolResult::structured(serde_json::to_value(result).unwrap_or_default());
    out.content = vec![ContentBlock::text(result.to_text())];
    out
}

/// The progress of one call, server models and local CLIs together: `progress` counts both,
/// `total` is the server's total plus the number of CLIs asked.
struct Progress {
    token: Option<ProgressToken>,
    counts: Mutex<Counts>,
}

#[derive(Default)]
struct Counts {
    local_total: usize,
    local_done: usize,
    server_total: Option<f64>,
    server_progress: f64,
}

impl Counts {
    fn total(&self) -> Option<f64> {
        match (self.server_total, self.local_total) {
            (None, 0) => None,
            (server, local) => Some(server.unwrap_or(0.0) + local as f64),
        }
    }

    fn progress(&self) -> f64 {
        self.server_progress + self.local_done as f64
    }
}

impl Progress {
    fn new(token: Option<ProgressToken>, local_total: usize) -> Progress {
        Progress {
            token,
            counts: Mutex::new(Counts {
                local_total,
                ..Counts::default()
            }),
        }
    }

    /// Passes a progress notification of the forwarded call to the IDE under its own token;
    /// true when it is the server's last one (its progress reached its total).
    async fn server(
        &self,
        ctx: &RequestContext<RoleServer>,
        mut update: ProgressNotificationParam,
    ) -> bool {
        let last = update.total.is_some_and(|total| update.progress >= total);
        let Some(token) = &self.token else {
            return last;
        };
        {
            let mut counts = self.counts.lock().expect("progress lock");
            counts.server_total = update.total.or(counts.server_total);
            counts.server_progress = update.progress;
            update.progress = counts.progress();
            update.total = counts.total();
        }
        update.progress_token = token.clone();
        if let Err(error) = ctx.peer.notify_progress(update).await {
            tracing::debug!(%error, "progress notification not delivered");
        }
        last
    }

    /// A notification for a local CLI that finished, with its answer (or error).
    async fn local(&self, ctx: &RequestContext<RoleServer>, result: &ModelResult) {
        let Some(token) = &self.token else { return };
        let (progress, total) = {
            let mut counts = self.counts.lock().expect("progress lock");
            counts.local_done += 1;
            (counts.progress(), counts.total())
        };
        let mut param = ProgressNotificationParam::new(token.clone(), progress)
            .with_message(super::finished_message(result));
        if let Some(total) = total {
            param = param.with_total(total);
        }
        if let Err(error) = ctx.peer.notify_progress(param).await {
            tracing::debug!(%error, "progress notification not delivered");
        }
    }
}
