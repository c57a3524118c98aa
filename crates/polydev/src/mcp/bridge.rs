//! `polydev mcp`: a stdio MCP server for IDEs that launch servers as processes. It answers
//! `initialize` and `tools/list` itself, at once and without any network call, and forwards
//! tool calls to a polydev server over streamable HTTP with the token from
//! `POLYDEV_USER_TOKEN`, relaying progress notifications, log notifications and cancellation.

// MCP logging is deprecated in rmcp (SEP-2577); see server.rs.
#![allow(deprecated)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CancelledNotificationParam, ClientRequest,
    LoggingMessageNotificationParam, ProgressNotificationParam, ProgressToken, Request,
    ServerResult, SetLevelRequestParams,
};
use rmcp::service::{
    NotificationContext, Peer, PeerRequestOptions, RequestContext, RunningService,
};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::{ClientHandler, ErrorData, RoleClient, RoleServer, ServerHandler, ServiceExt};
use tokio::sync::{OnceCell, mpsc};

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
}

impl Bridge {
    pub fn new(server_url: String, token: Option<String>) -> Bridge {
        Bridge {
            server_url,
            token,
            relay: ProgressRelay::default(),
            upstream: OnceCell::new(),
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
        let local_token = ctx.meta.get_progress_token();
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
                Some(update) = updates.recv() => done = relay(&ctx, local_token.as_ref(), update).await,
                response = &mut response => break match response {
                    Ok(ServerResult::CallToolResult(result)) => Ok(result.into()),
                    Ok(other) => Err(ErrorData::internal_error(format!("unexpected reply: {other:?}"), None)),
                    Err(e) => Err(ErrorData::internal_error(format!("the polydev server failed: {e}"), None)),
                },
            }
        };
        // The server sends every progress notification before its response, but the client
        // dispatches them concurrently: pass on the ones still in flight (until progress
        // reaches its total, for at most 200 ms).
        let grace = tokio::time::Instant::now() + std::time::Duration::from_millis(200);
        while !done && outcome.is_ok() {
            match tokio::time::timeout_at(grace, updates.recv()).await {
                Ok(Some(update)) => done = relay(&ctx, local_token.as_ref(), update).await,
                _ => break,
            }
        }
        // rmcp writes notifications and responses from separate queues; a client drops progress
        // that arrives after the result, so give the last notifications a moment to go first.
        if local_token.is_some() {
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        self.relay.forget(&remote_token);
        outcome
    }
}

/// Passes a progress notification of a forwarded call to the IDE under its own token; true when
/// it is the last one (progress reached total).
async fn relay(
    ctx: &RequestContext<RoleServer>,
    local_token: Option<&ProgressToken>,
    mut update: ProgressNotificationParam,
) -> bool {
    let last = update.total.is_some_and(|total| update.progress >= total);
    if let Some(token) = local_token {
        update.progress_token = token.clone();
        if let Err(error) = ctx.peer.notify_progress(update).await {
            tracing::debug!(%error, "progress notification not delivered");
        }
    }
    last
}
