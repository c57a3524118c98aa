//! `/v1/chat`: one chat API over both legacy chat systems.

use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use uuid::Uuid;

use super::{ApiError, ApiJson, ApiPath, Authenticated};
use crate::api::NewSession;
use crate::app::AppState;
use crate::chat::{self, ChatMessage, ChatSession, NewMessage, SessionRename};

const MAX_MESSAGE_BODY: usize = 2 * 1024 * 1024;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/chat/sessions", get(sessions).post(create_session))
        .route(
            "/v1/chat/sessions/{id}",
            axum::routing::patch(rename_session).delete(delete_session),
        )
        .route(
            "/v1/chat/sessions/{id}/messages",
            get(messages)
                .post(add_message)
                .layer(DefaultBodyLimit::max(MAX_MESSAGE_BODY)),
        )
}

async fn sessions(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
) -> Result<Json<Vec<ChatSession>>, ApiError> {
    Ok(Json(
        chat::list_sessions(&state.pool, caller.user_id).await?,
    ))
}

async fn create_session(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    ApiJson(session): ApiJson<NewSession>,
) -> Result<(StatusCode, Json<ChatSession>), ApiError> {
    let (session, created) = chat::create_session(&state.pool, caller.user_id, &session).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(session)))
}

async fn messages(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<Vec<ChatMessage>>, ApiError> {
    Ok(Json(
        chat::list_messages(&state.pool, caller.user_id, id).await?,
    ))
}

/// 201 with the new message; 200 with the stored one when the same message (same id, same
/// content) is sent again.
async fn add_message(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(message): ApiJson<NewMessage>,
) -> Result<(StatusCode, Json<ChatMessage>), ApiError> {
    let (added, created) = chat::add_message(&state.pool, caller.user_id, id, &message).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(added)))
}

async fn rename_session(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(rename): ApiJson<SessionRename>,
) -> Result<Json<ChatSession>, ApiError> {
    Ok(Json(
        chat::rename_session(&state.pool, caller.user_id, id, &rename).await?,
    ))
}

/// 200 `{"deleted_messages": n}`: the session and its messages are gone from the database.
async fn delete_session(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let deleted = chat::delete_session(&state.pool, caller.user_id, id).await?;
    Ok(Json(serde_json::json!({ "deleted_messages": deleted })))
}
