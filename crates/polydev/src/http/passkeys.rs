//! Passkeys: register (signed in, with the CSRF token), list, remove, and sign in with one
//! (before sign-in: the pre-session CSRF token). Passkeys need `--public-url` with a host name
//! (WebAuthn does not accept an IP address as the relying party).

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;
use webauthn_rs::prelude::{PublicKeyCredential, RegisterPublicKeyCredential};

use super::account_web::{check_csrf_header, start_session};
use super::{ApiError, ApiJson, ApiPath, AppState, Authenticated};
use crate::accounts;
use crate::error::Error;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/account/passkeys", get(list))
        .route("/v1/account/passkeys/{id}", delete(remove))
        .route("/v1/account/passkeys/register/start", post(register_start))
        .route(
            "/v1/account/passkeys/register/finish",
            post(register_finish),
        )
        .route("/v1/account/passkeys/signin/start", post(sign_in_start))
        .route("/v1/account/passkeys/signin/finish", post(sign_in_finish))
}

fn webauthn(state: &AppState) -> Result<&webauthn_rs::Webauthn, ApiError> {
    state.webauthn.as_deref().ok_or_else(|| {
        ApiError(Error::NotConfigured(
            "passkeys need --public-url with a host name (not an IP address)".into(),
        ))
    })
}

async fn list(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
) -> Result<Response, ApiError> {
    let passkeys = accounts::list_passkeys(&state.pool, caller.user_id).await?;
    Ok(axum::Json(json!({ "passkeys": passkeys })).into_response())
}

async fn remove(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<StatusCode, ApiError> {
    accounts::delete_passkey(&state.pool, caller.user_id, id).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn register_start(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
) -> Result<Response, ApiError> {
    let webauthn = webauthn(&state)?;
    let user = accounts::find_user(&state.pool, caller.user_id).await?;
    let email = user.email.unwrap_or_else(|| caller.user_id.to_string());
    let (challenge_id, options) =
        accounts::start_passkey_registration(&state.pool, webauthn, caller.user_id, &email).await?;
    Ok(axum::Json(json!({ "challenge_id": challenge_id, "options": options })).into_response())
}

#[derive(Deserialize)]
struct RegisterFinish {
    challenge_id: Uuid,
    #[serde(default)]
    name: String,
    credential: RegisterPublicKeyCredential,
}

async fn register_finish(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    ApiJson(body): ApiJson<RegisterFinish>,
) -> Result<Response, ApiError> {
    let webauthn = webauthn(&state)?;
    let passkey = accounts::finish_passkey_registration(
        &state.pool,
        webauthn,
        caller.user_id,
        body.challenge_id,
        &body.name,
        &body.credential,
    )
    .await?;
    Ok((StatusCode::CREATED, axum::Json(passkey)).into_response())
}

async fn sign_in_start(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_csrf_header(&headers)?;
    let webauthn = webauthn(&state)?;
    let (challenge_id, options) = accounts::start_passkey_sign_in(&state.pool, webauthn).await?;
    Ok(axum::Json(json!({ "challenge_id": challenge_id, "options": options })).into_response())
}

#[derive(Deserialize)]
struct SignInFinish {
    challenge_id: Uuid,
    credential: PublicKeyCredential,
}

async fn sign_in_finish(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<SignInFinish>,
) -> Result<Response, ApiError> {
    check_csrf_header(&headers)?;
    let webauthn = webauthn(&state)?;
    let user_id = accounts::finish_passkey_sign_in(
        &state.pool,
        webauthn,
        body.challenge_id,
        &body.credential,
    )
    .await?;
    let (cookies, csrf) = start_session(&state, &headers, user_id).await?;
    Ok((
        cookies,
        axum::Json(json!({ "user_id": user_id, "csrf_token": csrf })),
    )
        .into_response())
}
