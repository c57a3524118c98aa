//! `/v1/login/...`: login sessions (docs/login.md). The user's routes (`account` scope: the
//! web session cookie with its CSRF token, or an account token) and the login agent's
//! (`Authorization: Bearer <POLYDEV_LOGIN_SECRET>`, that session only).

use axum::extract::State;
use axum::http::header::AUTHORIZATION;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{ApiError, ApiJson, ApiPath, Authenticated};
use crate::app::AppState;
use crate::error::Error;
use crate::login::auth_sessions::{Agent, Credential};
use crate::login::{AgentView, Login, Session, Side, Signal, Step};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/login/sessions", get(list).post(create))
        .route("/v1/login/sessions/{id}", get(session))
        .route("/v1/login/sessions/{id}/cancel", post(cancel))
        .route("/v1/login/sessions/{id}/retry", post(retry))
        .route(
            "/v1/login/sessions/{id}/signal",
            get(user_follow).post(user_signal),
        )
        .route("/v1/login/agent/{id}", get(agent_view))
        .route(
            "/v1/login/agent/{id}/signal",
            get(agent_follow).post(agent_signal),
        )
        .route("/v1/login/agent/{id}/heartbeat", post(agent_heartbeat))
        .route("/v1/login/agent/{id}/connected", post(agent_connected))
        .route("/v1/login/agent/{id}/credential", post(agent_credential))
        .route("/v1/login/agent/{id}/fail", post(agent_fail))
}

fn login(state: &AppState) -> Result<&Login, ApiError> {
    state.login.as_ref().ok_or_else(|| {
        ApiError(Error::NotConfigured(
            "login sessions are not available on this server".into(),
        ))
    })
}

#[derive(Debug, Deserialize)]
struct CreateRequest {
    provider: String,
}

async fn create(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    ApiJson(request): ApiJson<CreateRequest>,
) -> Result<Response, ApiError> {
    let session = login(&state)?
        .create(caller.user_id, &request.provider)
        .await?;
    Ok((StatusCode::CREATED, Json(session)).into_response())
}

#[derive(Debug, Serialize)]
struct Sessions {
    sessions: Vec<Session>,
}

async fn list(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
) -> Result<Json<Sessions>, ApiError> {
    Ok(Json(Sessions {
        sessions: login(&state)?.list(caller.user_id).await?,
    }))
}

async fn session(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<Session>, ApiError> {
    Ok(Json(login(&state)?.session(caller.user_id, id).await?))
}

async fn cancel(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<Session>, ApiError> {
    Ok(Json(login(&state)?.cancel(caller.user_id, id).await?))
}

async fn retry(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<Session>, ApiError> {
    Ok(Json(login(&state)?.retry(caller.user_id, id).await?))
}

#[derive(Debug, Serialize)]
struct Posted {
    seq: i64,
}

async fn user_signal(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(signal): ApiJson<Signal>,
) -> Result<Response, ApiError> {
    let seq = login(&state)?
        .post_signal(id, Some(caller.user_id), Side::User, &signal)
        .await?;
    Ok((StatusCode::ACCEPTED, Json(Posted { seq })).into_response())
}

async fn user_follow(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Response, ApiError> {
    follow(&state, id, Some(caller.user_id), Side::User).await
}

/// SSE: `event: signal` (`{"seq", "from", …the posted object…}`) and `event: status` (the
/// session). A refusal (unknown, finished) comes as a plain JSON error before the stream.
async fn follow(
    state: &AppState,
    id: Uuid,
    owner: Option<Uuid>,
    side: Side,
) -> Result<Response, ApiError> {
    let steps = login(state)?
        .follow(id, owner, side, state.shutdown.clone())
        .await?;
    let events = steps.map(|step| {
        Ok::<_, std::convert::Infallible>(match step {
            Step::Signal(message) => Event::default().event("signal").data(message.to_string()),
            Step::Status(session) => Event::default()
                .event("status")
                .data(serde_json::to_string(&session).unwrap_or_default()),
        })
    });
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response())
}

// ---- the agent ----

async fn agent(
    state: &AppState,
    id: Uuid,
    headers: &HeaderMap,
) -> Result<(Login, Agent), ApiError> {
    let login = login(state)?.clone();
    let header = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok());
    let agent = login.authenticate_agent(id, header).await?;
    Ok((login, agent))
}

async fn agent_view(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<AgentView>, ApiError> {
    let (login, agent) = agent(&state, id, &headers).await?;
    Ok(Json(login.agent_view(agent).await?))
}

async fn agent_signal(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(signal): ApiJson<Signal>,
) -> Result<Response, ApiError> {
    let (login, agent) = agent(&state, id, &headers).await?;
    let seq = login
        .post_signal(agent.session, None, Side::Agent, &signal)
        .await?;
    Ok((StatusCode::ACCEPTED, Json(Posted { seq })).into_response())
}

async fn agent_follow(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Response, ApiError> {
    let (_, agent) = agent(&state, id, &headers).await?;
    follow(&state, agent.session, None, Side::Agent).await
}

async fn agent_heartbeat(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<StatusCode, ApiError> {
    let (login, agent) = agent(&state, id, &headers).await?;
    login.heartbeat(agent).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn agent_connected(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<StatusCode, ApiError> {
    let (login, agent) = agent(&state, id, &headers).await?;
    login.connected(agent).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn agent_credential(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(credential): ApiJson<Credential>,
) -> Result<StatusCode, ApiError> {
    let (login, agent) = agent(&state, id, &headers).await?;
    login.store_credential(agent, &credential).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
struct Fail {
    #[serde(default)]
    reason: String,
}

async fn agent_fail(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(fail): ApiJson<Fail>,
) -> Result<StatusCode, ApiError> {
    let (login, agent) = agent(&state, id, &headers).await?;
    login.agent_fail(agent, &fail.reason).await?;
    Ok(StatusCode::NO_CONTENT)
}
