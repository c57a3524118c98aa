//! `GET /v1/models`, `POST /v1/perspectives` (JSON, or SSE with `Accept: text/event-stream`),
//! `GET /v1/usage`, `GET`/`PUT /v1/settings`.

use std::convert::Infallible;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::{Stream, StreamExt, stream};
use serde_json::json;
use tokio::sync::mpsc;
use tracing::Instrument;

use super::auth::AuthenticatedUncounted;
use super::openai::OpenAiModel;
use super::{ApiError, ApiJson, Authenticated};
use crate::api::{ErrorResponse, ModelList};
use crate::app::AppState;
use crate::perspectives::{
    self, ModelInfo, PerspectiveSettings, PerspectivesRequest, Progress, ProgressSink, UsageReport,
};
use crate::quota;

/// A prompt may be 100,000 characters of up to 4 bytes each, plus the other arguments.
const MAX_PERSPECTIVES_BODY: usize = 512 * 1024;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/models", get(models))
        .route(
            "/v1/perspectives",
            post(create).layer(DefaultBodyLimit::max(MAX_PERSPECTIVES_BODY)),
        )
        .route("/v1/usage", get(usage))
        .route("/v1/settings", get(settings).put(put_settings))
}

/// The catalogue in polydev's shape (`models`) and, for OpenAI's SDKs, in OpenAI's list shape
/// (`object`, `data`).
#[derive(serde::Serialize)]
struct Models {
    object: &'static str,
    data: Vec<OpenAiModel>,
    #[serde(flatten)]
    list: ModelList<ModelInfo>,
}

async fn models(State(state): State<AppState>) -> Json<Models> {
    let models = state.gateway.models();
    Json(Models {
        object: "list",
        data: models
            .iter()
            .map(|m| OpenAiModel::new(&m.model.id, &m.model.provider))
            .collect(),
        list: ModelList { models },
    })
}

/// The request is counted against its rate limits in the statement that reserves its quota
/// (one round trip for both; see [`AuthenticatedUncounted`]).
async fn create(
    State(state): State<AppState>,
    AuthenticatedUncounted(caller, count): AuthenticatedUncounted,
    headers: HeaderMap,
    body: Result<ApiJson<PerspectivesRequest>, ApiError>,
) -> Result<Response, ApiError> {
    // A body that cannot be read is refused, after counting the request like any other.
    let request = match body {
        Ok(ApiJson(request)) => request,
        Err(error) => {
            if let Some(count) = &count {
                quota::count_request(&state.relaxed_pool, count).await?;
            }
            return Err(error);
        }
    };
    let wants_sse = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"));
    if !wants_sse {
        let result = perspectives::get_perspectives_counting(
            state.pools(),
            &state.gateway,
            caller.user_id,
            &request,
            ProgressSink::none(),
            count,
        )
        .await?;
        return Ok(Json(result).into_response());
    }
    // Fail fast on bad input with a plain JSON error rather than an event stream (counted
    // first: over its rate limit, it is refused for that).
    if let Err(error) = request.validate(&state.gateway) {
        if let Some(count) = &count {
            quota::count_request(&state.relaxed_pool, count).await?;
        }
        return Err(error.into());
    }
    Ok(
        Sse::new(event_stream(state, caller.user_id, request, count))
            .keep_alive(KeepAlive::default())
            .into_response(),
    )
}

/// The call runs inside the stream: when the client goes away the stream is dropped, which
/// cancels the upstream calls still running and gives their quota back.
fn event_stream(
    state: AppState,
    user_id: uuid::Uuid,
    request: PerspectivesRequest,
    count: Option<quota::CountRequest>,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let (events, rx) = mpsc::unbounded_channel::<Event>();
    let call = async move {
        let (progress, mut updates) = mpsc::unbounded_channel();
        let call = perspectives::get_perspectives_counting(
            state.pools(),
            &state.gateway,
            user_id,
            &request,
            ProgressSink::new(progress).with_deltas(),
            count,
        );
        tokio::pin!(call);
        let result = loop {
            tokio::select! {
                biased;
                Some(update) = updates.recv() => { let _ = events.send(progress_event(update)); }
                result = &mut call => break result,
            }
        };
        while let Ok(update) = updates.try_recv() {
            let _ = events.send(progress_event(update));
        }
        let last = match result {
            Ok(result) => Event::default()
                .event("result")
                .data(serde_json::to_string(&result).unwrap_or_default()),
            Err(error) => {
                error.log();
                Event::default()
                    .event("error")
                    .data(serde_json::to_string(&ErrorResponse::from(&error)).unwrap_or_default())
            }
        };
        let _ = events.send(last);
    }
    // The stream outlives the handler: keep the request's span (and id) on its log lines.
    .instrument(tracing::Span::current());
    let received = stream::unfold(
        rx,
        |mut rx| async move { rx.recv().await.map(|e| (Ok(e), rx)) },
    );
    // `select` polls the call alongside the events it sends, and owns it.
    stream::select(received, stream::once(call).filter_map(|()| async { None }))
}

fn progress_event(progress: Progress) -> Event {
    let (name, data) = match progress {
        Progress::Started { models } => ("started", json!({ "models": models })),
        Progress::Delta { model, text } => ("delta", json!({ "model": model, "text": text })),
        Progress::Finished(result) => ("model", serde_json::to_value(result).unwrap_or_default()),
    };
    Event::default().event(name).data(data.to_string())
}

async fn usage(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
) -> Result<Json<UsageReport>, ApiError> {
    Ok(Json(
        perspectives::usage_report(&state.pool, caller.user_id).await?,
    ))
}

async fn settings(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
) -> Result<Json<PerspectiveSettings>, ApiError> {
    Ok(Json(
        perspectives::get_settings(&state.pool, caller.user_id).await?,
    ))
}

async fn put_settings(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    ApiJson(settings): ApiJson<PerspectiveSettings>,
) -> Result<Json<PerspectiveSettings>, ApiError> {
    Ok(Json(
        perspectives::put_settings(&state.pool, &state.gateway, caller.user_id, &settings).await?,
    ))
}
