//! MCP sessions over streamable HTTP that cost almost nothing while idle.
//!
//! rmcp's [`LocalSessionManager`] keeps every session live: a worker task and the handler's
//! service task, with about seven tokio `mpsc` channels whose first block of 32 inline JSON-RPC
//! messages tokio allocates when the channel is made (about 80 KiB a session, measured with
//! heaptrack, docs/benchmarks.md). [`McpSessions`] wraps it and *hibernates* a session that has
//! nothing going on: its worker and service end, and what remains is an [`Entry`] with the
//! client's `initialize` parameters and its log level (well under 1 KiB). The next request to
//! it revives it: a new worker under the same id, a new handler, and the `initialize`
//! handshake replayed with the stored parameters (what rmcp itself does to restore a session
//! from an external store), before the request is passed on.
//!
//! A session is hibernated only when nothing could be lost, judged from what went through it:
//! - it has finished its handshake (`notifications/initialized` reached the handler);
//! - no call into it is running, no client message is queued, no request is being handled
//!   (every request the handler received has had its response handed to the worker);
//! - no SSE stream of it is open (a POST's response stream, the standalone GET stream, a
//!   resumed stream);
//! - it never sent anything that rmcp routes to the standalone stream's replay cache (log
//!   notifications, or any message rmcp cannot tie to a request): such a session stays live
//!   until it expires, so a `Last-Event-ID` resume of the standalone stream still replays;
//! - it has been quiet for [`SHORT_LINGER`].
//!
//! A request's stream is resumable with `Last-Event-ID` while the request is being handled (a
//! session with a request in flight is never hibernated); rmcp 3.11's worker drops a request's
//! replay cache as soon as it routes the response, so nothing is resumable after that either
//! way. The caches it keeps longer (`completed_cache_ttl`) are those of cancelled requests, and
//! a session that saw a cancellation is never hibernated.

// The log level kept per session (`logging/setLevel`): see server.rs.
#![allow(deprecated)]

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::Stream;
use rmcp::model::{
    ClientJsonRpcMessage, ClientNotification, ClientRequest, InitializeRequest,
    InitializeRequestParams, InitializedNotification, JsonRpcMessage, LoggingLevel, NumberOrString,
    ServerJsonRpcMessage, ServerNotification,
};
use rmcp::service::{RoleServer, RxJsonRpcMessage, TxJsonRpcMessage, serve_server_with_ct};
use rmcp::transport::Transport;
use rmcp::transport::WorkerTransport;
use rmcp::transport::streamable_http_server::session::local::{
    LocalSessionManager, LocalSessionManagerError, LocalSessionWorker,
};
use rmcp::transport::streamable_http_server::session::{
    RestoreOutcome, ServerSseMessage, SessionId, SessionManager, SessionState, SessionStore,
    SessionStoreError,
};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::server::PolydevMcp;
use crate::app::AppState;

/// How long a session that has served no request stream stays live after its last activity
/// (the calls a client makes right after `initialize` find it live).
pub const SHORT_LINGER: Duration = Duration::from_millis(100);

/// How often live sessions are checked for hibernation.
pub const HIBERNATE_EVERY: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum McpSessionError {
    #[error("session not found")]
    NotFound,
    #[error(transparent)]
    Local(#[from] LocalSessionManagerError),
    #[error("reviving the session failed: {0}")]
    Revive(String),
}

/// The session manager of `/mcp` (see the module documentation).
pub struct McpSessions {
    inner: LocalSessionManager,
    entries: Mutex<HashMap<SessionId, Entry>>,
    state: AppState,
    shutdown: CancellationToken,
    next_incarnation: AtomicU64,
    me: Weak<McpSessions>,
}

struct Entry {
    /// The client's `initialize` parameters, replayed when the session is revived; `None`
    /// until its `initialize` is answered.
    init: Option<InitializeRequestParams>,
    /// What `logging/setLevel` asked for (kept across hibernation).
    log_level: Option<LoggingLevel>,
    /// Which worker and handler serve the session: 0 for the first (spawned by rmcp's
    /// service), then one per revival.
    incarnation: u64,
    state: State,
}

enum State {
    Live(Arc<Activity>),
    /// Its worker is being closed; requests wait for the notification, then revive it.
    Hibernating(Arc<Notify>),
    Hibernated,
    /// Being revived by one request; others wait for the notification.
    Reviving(Arc<Notify>),
}

/// What is going on in one incarnation of a session, as counted by the manager, the transport
/// between the worker and the handler, and the streams handed to the HTTP responses.
#[derive(Default)]
struct Activity {
    /// Calls of the manager into the session that have not returned.
    ops: AtomicUsize,
    /// Client messages pushed to the worker that the handler has not received yet.
    queued: AtomicUsize,
    /// Requests the handler received whose response the worker has not taken yet.
    in_flight: AtomicUsize,
    /// SSE streams of the session still open.
    streams: AtomicUsize,
    /// Something went to the standalone stream's replay cache: never hibernate.
    pinned: AtomicBool,
    /// `notifications/initialized` reached the handler.
    initialized: AtomicBool,
    /// [`now_ms`] of the last change.
    last: AtomicU64,
}

static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

fn now_ms() -> u64 {
    EPOCH.elapsed().as_millis() as u64
}

impl Activity {
    fn new() -> Arc<Self> {
        let activity = Activity::default();
        activity.touch();
        Arc::new(activity)
    }

    fn touch(&self) {
        self.last.store(now_ms(), Ordering::SeqCst);
    }

    fn dec(counter: &AtomicUsize) {
        let _ = counter.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
    }

    /// True when the session can be hibernated at `now` (ms). Called with the entries lock
    /// held, so no new call into the session starts meanwhile; the counters are read in the
    /// order work moves through them (a queued message becomes a request in flight before it
    /// leaves the queue), so work moving between them is never missed.
    fn idle(&self, now: u64, linger: Duration) -> bool {
        if self.ops.load(Ordering::SeqCst) != 0
            || self.queued.load(Ordering::SeqCst) != 0
            || self.in_flight.load(Ordering::SeqCst) != 0
            || self.streams.load(Ordering::SeqCst) != 0
            || self.pinned.load(Ordering::SeqCst)
            || !self.initialized.load(Ordering::SeqCst)
        {
            return false;
        }
        now.saturating_sub(self.last.load(Ordering::SeqCst)) >= linger.as_millis() as u64
    }
}

/// One call into a live session: while it exists the session is not hibernated.
struct Op(Arc<Activity>);

impl Drop for Op {
    fn drop(&mut self) {
        self.0.touch();
        Activity::dec(&self.0.ops);
    }
}

/// An SSE stream of the session, counted while it is open.
pub struct Counted {
    inner: Pin<Box<dyn Stream<Item = ServerSseMessage> + Send + Sync>>,
    activity: Arc<Activity>,
}

impl Counted {
    fn new(
        activity: &Arc<Activity>,
        inner: impl Stream<Item = ServerSseMessage> + Send + Sync + 'static,
    ) -> Self {
        activity.streams.fetch_add(1, Ordering::SeqCst);
        activity.touch();
        Counted {
            inner: Box::pin(inner),
            activity: activity.clone(),
        }
    }
}

impl Stream for Counted {
    type Item = ServerSseMessage;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.activity.touch();
        Activity::dec(&self.activity.streams);
    }
}

/// The transport between a session's worker and its handler, counting what goes through.
pub struct Tracked {
    inner: WorkerTransport<LocalSessionWorker>,
    activity: Arc<Activity>,
}

impl Transport<RoleServer> for Tracked {
    type Error = <WorkerTransport<LocalSessionWorker> as Transport<RoleServer>>::Error;

    fn send(
        &mut self,
        item: TxJsonRpcMessage<RoleServer>,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send + 'static {
        let activity = self.activity.clone();
        // What rmcp's session worker may put in the standalone stream's replay cache: anything
        // it cannot route to a request's stream. Responses and progress notifications of a
        // request being handled go to that request's stream.
        let answers = match &item {
            JsonRpcMessage::Response(_) => true,
            JsonRpcMessage::Error(error) => {
                if error.id.is_none() {
                    activity.pinned.store(true, Ordering::SeqCst);
                }
                error.id.is_some()
            }
            JsonRpcMessage::Notification(n) => {
                let progress =
                    matches!(n.notification, ServerNotification::ProgressNotification(_));
                if !progress || activity.in_flight.load(Ordering::SeqCst) == 0 {
                    activity.pinned.store(true, Ordering::SeqCst);
                }
                false
            }
            JsonRpcMessage::Request(_) => {
                activity.pinned.store(true, Ordering::SeqCst);
                false
            }
        };
        let send = self.inner.send(item);
        async move {
            let result = send.await;
            if answers {
                // The worker has taken the response: the request is over.
                activity.touch();
                Activity::dec(&activity.in_flight);
            }
            result
        }
    }

    async fn receive(&mut self) -> Option<RxJsonRpcMessage<RoleServer>> {
        let message = self.inner.receive().await?;
        let activity = &self.activity;
        match &message {
            JsonRpcMessage::Request(_) => {
                activity.in_flight.fetch_add(1, Ordering::SeqCst);
            }
            JsonRpcMessage::Notification(n) => match n.notification {
                ClientNotification::InitializedNotification(_) => {
                    activity.initialized.store(true, Ordering::SeqCst);
                }
                // The response of a cancelled request is not routed to its stream any more.
                ClientNotification::CancelledNotification(_) => {
                    activity.pinned.store(true, Ordering::SeqCst);
                }
                _ => {}
            },
            _ => {}
        }
        activity.touch();
        Activity::dec(&activity.queued);
        Some(message)
    }

    async fn close(&mut self) -> Result<(), Self::Error> {
        self.inner.close().await
    }
}

fn touch_and_count(activity: &Activity, counter: &AtomicUsize) {
    counter.fetch_add(1, Ordering::SeqCst);
    activity.touch();
}

impl McpSessions {
    /// A manager whose sessions run `PolydevMcp` on `state`; rmcp's keep-alive of a live
    /// session's worker is `keep_alive`.
    pub fn new(state: AppState, keep_alive: Duration) -> Arc<Self> {
        let mut inner = LocalSessionManager::default();
        inner.session_config.keep_alive = Some(keep_alive);
        let shutdown = state.shutdown.clone();
        Arc::new_cyclic(|me| McpSessions {
            inner,
            entries: Mutex::new(HashMap::new()),
            state,
            shutdown,
            next_incarnation: AtomicU64::new(1),
            me: me.clone(),
        })
    }

    /// The handler of one incarnation of a session.
    pub fn handler(self: &Arc<Self>) -> PolydevMcp {
        PolydevMcp::new(self.state.clone(), self.clone())
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<SessionId, Entry>> {
        self.entries.lock().expect("MCP sessions lock")
    }

    /// The ids of the sessions that exist, live or hibernated.
    pub fn ids(&self) -> Vec<String> {
        self.entries().keys().map(|id| id.to_string()).collect()
    }

    /// (live, hibernated) sessions.
    pub fn counts(&self) -> (usize, usize) {
        let entries = self.entries();
        let hibernated = entries
            .values()
            .filter(|e| matches!(e.state, State::Hibernated))
            .count();
        (entries.len() - hibernated, hibernated)
    }

    pub fn log_level(&self, id: &str) -> Option<LoggingLevel> {
        self.entries().get(id).and_then(|e| e.log_level)
    }

    pub fn set_log_level(&self, id: &str, level: LoggingLevel) {
        if let Some(entry) = self.entries().get_mut(id) {
            entry.log_level = Some(level);
        }
    }

    /// Ends a session for good (DELETE, expiry, eviction): forgets it and closes its worker.
    pub async fn end(&self, id: &str) {
        let removed = self.entries().remove(id);
        if let Some(entry) = removed
            && !matches!(entry.state, State::Hibernated)
            && let Err(error) = self.inner.close_session(&SessionId::from(id)).await
        {
            tracing::debug!(%error, "closing an MCP session");
        }
    }

    /// The worker and handler of `incarnation` have ended. Unless that was a hibernation (or a
    /// newer incarnation serves the session now), the session is over.
    async fn ended(&self, id: &SessionId, incarnation: u64) {
        let over = {
            let mut entries = self.entries();
            let over = entries
                .get(id)
                .is_some_and(|e| e.incarnation == incarnation && matches!(e.state, State::Live(_)));
            if over {
                entries.remove(id);
            }
            over
        };
        if over && let Err(error) = self.inner.close_session(id).await {
            tracing::debug!(%error, "closing an ended MCP session");
        }
    }

    /// Hibernates the sessions that are idle; returns how many.
    pub async fn hibernate_idle(&self) -> usize {
        let now = now_ms();
        let chosen: Vec<(SessionId, Arc<Notify>)> = {
            let mut entries = self.entries();
            entries
                .iter_mut()
                .filter(|(_, e)| {
                    e.init.is_some()
                        && matches!(&e.state, State::Live(a) if a.idle(now, SHORT_LINGER))
                })
                .map(|(id, e)| {
                    let notify = Arc::new(Notify::new());
                    e.state = State::Hibernating(notify.clone());
                    (id.clone(), notify)
                })
                .collect()
        };
        for (id, notify) in &chosen {
            // Ends the worker, whose end ends the handler's service.
            if let Err(error) = self.inner.close_session(id).await {
                tracing::debug!(%error, "hibernating an MCP session");
            }
            if let Some(entry) = self.entries().get_mut(id)
                && matches!(&entry.state, State::Hibernating(n) if Arc::ptr_eq(n, notify))
            {
                entry.state = State::Hibernated;
            }
            notify.notify_waiters();
        }
        chosen.len()
    }

    /// Enters a session for one call, reviving it if it is hibernated.
    async fn enter(&self, id: &SessionId) -> Result<Op, McpSessionError> {
        enum Next {
            Wait(Arc<Notify>),
            Revive(Box<InitializeRequestParams>, u64, Arc<Notify>),
        }
        loop {
            let next = {
                let mut entries = self.entries();
                let entry = entries.get_mut(id).ok_or(McpSessionError::NotFound)?;
                match &entry.state {
                    State::Live(activity) => {
                        touch_and_count(activity, &activity.ops);
                        return Ok(Op(activity.clone()));
                    }
                    State::Hibernating(notify) | State::Reviving(notify) => {
                        Next::Wait(notify.clone())
                    }
                    State::Hibernated => {
                        let init = Box::new(entry.init.clone().ok_or(McpSessionError::NotFound)?);
                        let notify = Arc::new(Notify::new());
                        let incarnation = self.next_incarnation.fetch_add(1, Ordering::SeqCst);
                        entry.incarnation = incarnation;
                        entry.state = State::Reviving(notify.clone());
                        Next::Revive(init, incarnation, notify)
                    }
                }
            };
            match next {
                Next::Revive(init, incarnation, notify) => {
                    let revived = self.revive(id, init, incarnation).await;
                    let result = self.revived(id, incarnation, revived);
                    if result.is_err() {
                        let _ = self.inner.close_session(id).await;
                    }
                    notify.notify_waiters();
                    return result;
                }
                Next::Wait(wait) => {
                    // Registered before the state is looked at again, so the notification of a
                    // transition that ends meanwhile is not missed.
                    let notified = wait.notified();
                    tokio::pin!(notified);
                    notified.as_mut().enable();
                    if self.in_transition(id, &wait) {
                        notified.await;
                    }
                }
            }
        }
    }

    fn in_transition(&self, id: &SessionId, transition: &Arc<Notify>) -> bool {
        self.entries().get(id).is_some_and(|e| {
            matches!(&e.state, State::Hibernating(n) | State::Reviving(n) if Arc::ptr_eq(n, transition))
        })
    }

    /// Makes a revived session live, and enters it; or forgets it when the revival failed or
    /// the session was ended meanwhile.
    fn revived(
        &self,
        id: &SessionId,
        incarnation: u64,
        revived: Result<Arc<Activity>, McpSessionError>,
    ) -> Result<Op, McpSessionError> {
        let mut entries = self.entries();
        match (revived, entries.get_mut(id)) {
            (Ok(activity), Some(entry)) if entry.incarnation == incarnation => {
                touch_and_count(&activity, &activity.ops);
                entry.state = State::Live(activity.clone());
                Ok(Op(activity))
            }
            (revived, _) => {
                if entries
                    .get(id)
                    .is_some_and(|e| e.incarnation == incarnation)
                {
                    entries.remove(id);
                }
                Err(revived.err().unwrap_or(McpSessionError::NotFound))
            }
        }
    }

    /// A new worker and handler for a hibernated session, the `initialize` handshake replayed.
    async fn revive(
        &self,
        id: &SessionId,
        init: Box<InitializeRequestParams>,
        incarnation: u64,
    ) -> Result<Arc<Activity>, McpSessionError> {
        let me = self.me.upgrade().ok_or(McpSessionError::NotFound)?;
        let transport = match self.inner.restore_session(id.clone()).await? {
            RestoreOutcome::Restored(transport) => transport,
            _ => {
                return Err(McpSessionError::Revive(
                    "the worker is still running".into(),
                ));
            }
        };
        let activity = Activity::new();
        let transport = Tracked {
            inner: transport,
            activity: activity.clone(),
        };
        let handler = me.handler();
        let (ready, handshake) = tokio::sync::oneshot::channel();
        let ct = self.shutdown.child_token();
        let session = id.clone();
        tokio::spawn(async move {
            match serve_server_with_ct(handler, transport, ct).await {
                Ok(service) => {
                    let _ = ready.send(());
                    let _ = service.waiting().await;
                }
                Err(error) => tracing::debug!(%error, "reviving an MCP session"),
            }
            me.ended(&session, incarnation).await;
        });
        let initialize = ClientJsonRpcMessage::request(
            ClientRequest::InitializeRequest(InitializeRequest::new(*init)),
            NumberOrString::Number(0),
        );
        activity.queued.fetch_add(2, Ordering::SeqCst);
        self.inner.initialize_session(id, initialize).await?;
        let initialized = ClientJsonRpcMessage::notification(
            ClientNotification::InitializedNotification(InitializedNotification::default()),
        );
        self.inner.accept_message(id, initialized).await?;
        handshake
            .await
            .map_err(|_| McpSessionError::Revive("the handshake failed".into()))?;
        Ok(activity)
    }
}

impl SessionManager for McpSessions {
    type Error = McpSessionError;
    type Transport = Tracked;

    async fn create_session(&self) -> Result<(SessionId, Tracked), McpSessionError> {
        let (id, transport) = self.inner.create_session().await?;
        let activity = Activity::new();
        self.entries().insert(
            id.clone(),
            Entry {
                init: None,
                log_level: None,
                incarnation: 0,
                state: State::Live(activity.clone()),
            },
        );
        Ok((
            id,
            Tracked {
                inner: transport,
                activity,
            },
        ))
    }

    async fn initialize_session(
        &self,
        id: &SessionId,
        message: ClientJsonRpcMessage,
    ) -> Result<ServerJsonRpcMessage, McpSessionError> {
        let op = self.enter(id).await?;
        let params = match &message {
            JsonRpcMessage::Request(request) => match &request.request {
                ClientRequest::InitializeRequest(init) => Some(init.params.clone()),
                _ => None,
            },
            _ => None,
        };
        op.0.queued.fetch_add(1, Ordering::SeqCst);
        let response = self.inner.initialize_session(id, message).await;
        if response.is_err() {
            Activity::dec(&op.0.queued);
        } else if let Some(entry) = self.entries().get_mut(id) {
            entry.init = params;
        }
        Ok(response?)
    }

    async fn has_session(&self, id: &SessionId) -> Result<bool, McpSessionError> {
        Ok(self.entries().contains_key(id))
    }

    /// Called by rmcp when the service it spawned for a session's first incarnation ends, and
    /// for DELETE (followed by [`SessionStore::delete`], which ends the session in any case).
    async fn close_session(&self, id: &SessionId) -> Result<(), McpSessionError> {
        self.ended(id, 0).await;
        Ok(())
    }

    async fn create_stream(
        &self,
        id: &SessionId,
        message: ClientJsonRpcMessage,
    ) -> Result<impl Stream<Item = ServerSseMessage> + Send + Sync + 'static, McpSessionError> {
        let op = self.enter(id).await?;
        op.0.queued.fetch_add(1, Ordering::SeqCst);
        match self.inner.create_stream(id, message).await {
            Ok(stream) => Ok(Counted::new(&op.0, stream)),
            Err(error) => {
                Activity::dec(&op.0.queued);
                Err(error.into())
            }
        }
    }

    async fn accept_message(
        &self,
        id: &SessionId,
        message: ClientJsonRpcMessage,
    ) -> Result<(), McpSessionError> {
        let op = self.enter(id).await?;
        op.0.queued.fetch_add(1, Ordering::SeqCst);
        let result = self.inner.accept_message(id, message).await;
        if result.is_err() {
            Activity::dec(&op.0.queued);
        }
        Ok(result?)
    }

    async fn create_standalone_stream(
        &self,
        id: &SessionId,
    ) -> Result<impl Stream<Item = ServerSseMessage> + Send + Sync + 'static, McpSessionError> {
        let op = self.enter(id).await?;
        let stream = self.inner.create_standalone_stream(id).await?;
        Ok(Counted::new(&op.0, stream))
    }

    async fn resume(
        &self,
        id: &SessionId,
        last_event_id: String,
    ) -> Result<impl Stream<Item = ServerSseMessage> + Send + Sync + 'static, McpSessionError> {
        let op = self.enter(id).await?;
        let stream = self.inner.resume(id, last_event_id).await?;
        Ok(Counted::new(&op.0, stream))
    }
}

/// rmcp calls [`SessionStore::delete`] after a client's DELETE: that ends the session. Nothing
/// is stored or loaded (sessions live in this process; [`McpSessions`] revives its own).
pub struct DeleteSignal(pub Weak<McpSessions>);

#[async_trait::async_trait]
impl SessionStore for DeleteSignal {
    async fn load(&self, _id: &str) -> Result<Option<SessionState>, SessionStoreError> {
        Ok(None)
    }

    async fn store(&self, _id: &str, _state: &SessionState) -> Result<(), SessionStoreError> {
        Ok(())
    }

    async fn delete(&self, id: &str) -> Result<(), SessionStoreError> {
        if let Some(sessions) = self.0.upgrade() {
            sessions.end(id).await;
        }
        Ok(())
    }
}
