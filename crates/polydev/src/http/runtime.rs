//! `/v1/runtime/...`: containers, the user's X25519 key, sealed jobs (docs/runtime.md), and the
//! in-container agent's calls (authenticated by the container's bootstrap secret, not a `pd_`
//! token).

use std::convert::Infallible;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::http::StatusCode;
use axum::http::header::AUTHORIZATION;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use futures_util::{Stream, StreamExt};
use polydev_agent::proto::{Finish, OutputBatch, Register, Registered};
use serde::Deserialize;
use uuid::Uuid;

use super::{ApiError, ApiJson, ApiPath, Authenticated};
use crate::app::AppState;
use crate::error::Error;
use crate::runtime::jobs::Agent;
use crate::runtime::pool::ContainerView;
use crate::runtime::{Follow, GrantView, Job, PutGrant, Runtime, SubmitJob, UserKey};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/runtime/containers", post(claim))
        .route(
            "/v1/runtime/containers/{id}",
            get(container).delete(release),
        )
        .route(
            "/v1/runtime/containers/{id}/grant",
            put(put_grant).delete(delete_grant),
        )
        .route("/v1/runtime/keys", get(user_key).put(put_user_key))
        .route("/v1/runtime/proxy", get(proxy_port))
        .route("/v1/runtime/jobs", post(submit))
        .route("/v1/runtime/jobs/{id}", get(job))
        .route("/v1/runtime/jobs/{id}/events", get(follow))
        .route("/v1/runtime/jobs/{id}/cancel", post(cancel))
        .route("/v1/runtime/agent/register", post(agent_register))
        .route("/v1/runtime/agent/next", get(agent_next))
        .route("/v1/runtime/agent/jobs/{id}/output", post(agent_output))
        .route("/v1/runtime/agent/jobs/{id}/finish", post(agent_finish))
}

fn runtime(state: &AppState) -> Result<&Runtime, ApiError> {
    state.runtime.as_ref().ok_or_else(|| {
        ApiError(Error::NotConfigured(
            "the container runtime is off: start `polydev serve --runtime local` (or nomad)".into(),
        ))
    })
}

#[derive(Debug, Deserialize)]
struct ClaimRequest {
    provider: String,
}

async fn claim(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    ApiJson(request): ApiJson<ClaimRequest>,
) -> Result<Response, ApiError> {
    let runtime = runtime(&state)?;
    let claimed = runtime.claim(caller.user_id, &request.provider).await?;
    let view = runtime.container(caller.user_id, claimed.id).await?;
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

async fn container(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<ContainerView>, ApiError> {
    Ok(Json(runtime(&state)?.container(caller.user_id, id).await?))
}

async fn release(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<ContainerView>, ApiError> {
    Ok(Json(runtime(&state)?.release(caller.user_id, id).await?))
}

/// Grants the container the caller's CLI credential, sealed to its agent's key by the client
/// (docs/cli-backends.md, "In runtime containers").
async fn put_grant(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(grant): ApiJson<PutGrant>,
) -> Result<Json<GrantView>, ApiError> {
    Ok(Json(
        runtime(&state)?
            .put_grant(caller.user_id, id, &grant)
            .await?,
    ))
}

async fn delete_grant(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<StatusCode, ApiError> {
    runtime(&state)?.delete_grant(caller.user_id, id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The caller's proxy port and what its last health check found (docs/cli-backends.md).
async fn proxy_port(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
) -> Result<Json<crate::proxy::UserPort>, ApiError> {
    let proxies = runtime(&state)?.proxies.as_ref().ok_or_else(|| {
        ApiError(Error::NotConfigured(
            "proxy ports are off: start `polydev serve` with --proxy-gate-host and --proxy-port-range".into(),
        ))
    })?;
    let port = proxies
        .port_of(caller.user_id)
        .await?
        .ok_or(Error::NotFound("proxy port"))?;
    Ok(Json(port))
}

async fn user_key(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
) -> Result<Json<UserKey>, ApiError> {
    Ok(Json(runtime(&state)?.user_key(caller.user_id).await?))
}

async fn put_user_key(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    ApiJson(key): ApiJson<UserKey>,
) -> Result<StatusCode, ApiError> {
    runtime(&state)?.put_user_key(caller.user_id, &key).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn submit(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    ApiJson(job): ApiJson<SubmitJob>,
) -> Result<Response, ApiError> {
    let job = runtime(&state)?.submit(caller.user_id, &job).await?;
    Ok((StatusCode::CREATED, Json(job)).into_response())
}

async fn job(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<Job>, ApiError> {
    Ok(Json(runtime(&state)?.job(caller.user_id, id).await?))
}

async fn cancel(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<Job>, ApiError> {
    Ok(Json(runtime(&state)?.cancel(caller.user_id, id).await?))
}

/// SSE: `output` events (`{"stream", "sealed"}`) as they arrive, then one `finished` event (the
/// row). A 404 comes as a plain JSON error before the stream starts.
async fn follow(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Response, ApiError> {
    let runtime = runtime(&state)?.clone();
    runtime.job(caller.user_id, id).await?;
    Ok(Sse::new(follow_events(runtime, caller.user_id, id))
        .keep_alive(KeepAlive::default())
        .into_response())
}

fn follow_events(
    runtime: Runtime,
    user_id: Uuid,
    id: Uuid,
) -> impl Stream<Item = Result<Event, Infallible>> {
    runtime.follow(user_id, id).map(|step| {
        Ok(match step {
            Ok(Follow::Output { stream, sealed }) => Event::default()
                .event("output")
                .data(serde_json::json!({ "stream": stream, "sealed": sealed }).to_string()),
            Ok(Follow::Finished(job)) => Event::default()
                .event("finished")
                .data(serde_json::to_string(&job).unwrap_or_default()),
            Err(error) => {
                error.log();
                Event::default().event("error").data(
                    serde_json::to_string(&crate::api::ErrorResponse::from(&error))
                        .unwrap_or_default(),
                )
            }
        })
    })
}

// ---- the agent ----

async fn agent(state: &AppState, parts: &HeaderMap) -> Result<(Runtime, Agent), ApiError> {
    let runtime = runtime(state)?.clone();
    let header = parts.get(AUTHORIZATION).and_then(|v| v.to_str().ok());
    let agent = runtime.authenticate_agent(header).await?;
    Ok((runtime, agent))
}

async fn agent_register(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<Register>,
) -> Result<Json<Registered>, ApiError> {
    let (runtime, agent) = agent(&state, &headers).await?;
    let id = runtime
        .register_agent(agent.container, &body.public_key)
        .await?;
    Ok(Json(Registered {
        container_id: id.to_string(),
    }))
}

async fn agent_next(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (runtime, agent) = agent(&state, &headers).await?;
    Ok(match runtime.next_job(agent).await? {
        Some(assignment) => Json(assignment).into_response(),
        None => StatusCode::NO_CONTENT.into_response(),
    })
}

async fn agent_output(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(batch): ApiJson<OutputBatch>,
) -> Result<Response, ApiError> {
    let (runtime, agent) = agent(&state, &headers).await?;
    Ok(Json(runtime.append_output(agent, id, &batch).await?).into_response())
}

async fn agent_finish(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(finish): ApiJson<Finish>,
) -> Result<StatusCode, ApiError> {
    let (runtime, agent) = agent(&state, &headers).await?;
    runtime.finish_job(agent, id, &finish).await?;
    Ok(StatusCode::NO_CONTENT)
}
