//! `/v1/zk`: zero-knowledge key material, the proofs of the owner's secrets, the migration
//! manifest, key rotation, and the client-driven migration of the caller's chat history from
//! plaintext to envelopes (`/v1/zk/migration/*`).

use axum::extract::{DefaultBodyLimit, FromRequestParts, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::routing::{get, post, put};
use axum::{Json, Router};

use super::{ApiError, ApiJson, ApiQuery, Authenticated};
use crate::api::{
    Cleared, ManifestStored, MessageBatch, MigrationQuery, ReplaceKeyMaterial, Resealed, Reset,
    Written,
};
use crate::app::AppState;
use crate::chat::migration::{
    self, EncryptedSession, EncryptedWrite, Item, Plaintext, PlaintextSession, Unverified,
    UnverifiedSession,
};
use crate::error::Error;
use crate::zk::rotation::{self, Commit, ItemsQuery, Reseal, RotationItem, Start};
use crate::zk::{self, ManifestChunk, Proofs, Registered, ZkStatus};

/// A batch of up to 500 envelopes of up to 1 MiB would be too much for one request: 16 MiB.
const MAX_MIGRATION_BODY: usize = 16 * 1024 * 1024;

/// The proofs of the owner's secrets a request presents (`Polydev-Zk-Proof`,
/// `Polydev-Zk-Recovery-Proof`); checked by the domain function that needs them.
pub struct ZkProofs(pub Proofs);

impl<S: Send + Sync> FromRequestParts<S> for ZkProofs {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let header = |name: &str| -> Result<Option<String>, ApiError> {
            match parts.headers.get(name) {
                None => Ok(None),
                Some(value) => value
                    .to_str()
                    .map(|v| Some(v.trim().to_string()))
                    .map_err(|_| ApiError(Error::Invalid(format!("`{name}` is not text")))),
            }
        };
        Ok(ZkProofs(Proofs {
            password: header(zk::PROOF_HEADER)?,
            recovery: header(zk::RECOVERY_PROOF_HEADER)?,
        }))
    }
}

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/zk", get(status))
        .route("/v1/zk/enable", post(enable))
        .route("/v1/zk/proof", post(register_proof))
        .route("/v1/zk/password", put(password))
        .route("/v1/zk/recovery", put(recovery))
        .route(
            "/v1/zk/manifest",
            get(manifest)
                .post(store_manifest)
                .layer(DefaultBodyLimit::max(MAX_MIGRATION_BODY)),
        )
        .route("/v1/zk/rotation", post(start_rotation))
        .route(
            "/v1/zk/rotation/items",
            get(rotation_items)
                .post(reseal)
                .layer(DefaultBodyLimit::max(MAX_MIGRATION_BODY)),
        )
        .route("/v1/zk/rotation/commit", post(commit_rotation))
        .route("/v1/zk/rotation/count", get(rotation_count))
        .route(
            "/v1/zk/migration/sessions",
            get(plaintext_sessions)
                .post(encrypted_sessions)
                .layer(DefaultBodyLimit::max(MAX_MIGRATION_BODY)),
        )
        .route(
            "/v1/zk/migration/sessions/unverified",
            get(unverified_sessions),
        )
        .route("/v1/zk/migration/sessions/clear", post(clear_sessions))
        .route("/v1/zk/migration/sessions/reset", post(reset_sessions))
        .route("/v1/zk/migration", get(migration_status))
        .route("/v1/zk/migration/plaintext", get(plaintext))
        .route(
            "/v1/zk/migration/encrypted",
            post(encrypted).layer(DefaultBodyLimit::max(MAX_MIGRATION_BODY)),
        )
        .route("/v1/zk/migration/unverified", get(unverified))
        .route("/v1/zk/migration/clear", post(clear))
        .route("/v1/zk/migration/reset", post(reset))
}

async fn status(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
) -> Result<Json<ZkStatus>, ApiError> {
    Ok(Json(zk::status(&state.pool, caller.user_id).await?))
}

async fn enable(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    ApiJson(request): ApiJson<zk::Enable>,
) -> Result<StatusCode, ApiError> {
    zk::enable(&state.pool, caller.user_id, &request).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn register_proof(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    ApiJson(request): ApiJson<zk::RegisterProofs>,
) -> Result<Json<Registered>, ApiError> {
    Ok(Json(
        zk::register_proofs(&state.pool, caller.user_id, &request).await?,
    ))
}

async fn password(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    ZkProofs(proofs): ZkProofs,
    ApiJson(r): ApiJson<ReplaceKeyMaterial>,
) -> Result<StatusCode, ApiError> {
    zk::replace_password_envelope(
        &state.pool,
        caller.user_id,
        &proofs,
        &r.previous,
        &r.material,
        r.password_proof.as_deref(),
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn recovery(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    ZkProofs(proofs): ZkProofs,
    ApiJson(r): ApiJson<ReplaceKeyMaterial>,
) -> Result<StatusCode, ApiError> {
    zk::replace_recovery_envelope(
        &state.pool,
        caller.user_id,
        &proofs,
        &r.previous,
        &r.material,
        r.recovery_proof.as_deref(),
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn manifest(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
) -> Result<Json<Vec<ManifestChunk>>, ApiError> {
    Ok(Json(zk::manifest(&state.pool, caller.user_id).await?))
}

async fn store_manifest(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    ZkProofs(proofs): ZkProofs,
    ApiJson(chunks): ApiJson<Vec<ManifestChunk>>,
) -> Result<Json<ManifestStored>, ApiError> {
    let stored = zk::store_manifest(&state.pool, caller.user_id, &proofs, &chunks).await?;
    Ok(Json(ManifestStored { stored }))
}

async fn start_rotation(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    ZkProofs(proofs): ZkProofs,
    ApiJson(request): ApiJson<Start>,
) -> Result<StatusCode, ApiError> {
    rotation::start(&state.pool, caller.user_id, &proofs, &request).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn rotation_items(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    ApiQuery(query): ApiQuery<ItemsQuery>,
) -> Result<Json<Vec<RotationItem>>, ApiError> {
    Ok(Json(
        rotation::items(&state.pool, caller.user_id, &query).await?,
    ))
}

async fn rotation_count(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
) -> Result<Json<rotation::Count>, ApiError> {
    Ok(Json(rotation::Count {
        total: rotation::count(&state.pool, caller.user_id).await?,
    }))
}

async fn reseal(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    ZkProofs(proofs): ZkProofs,
    ApiJson(request): ApiJson<Reseal>,
) -> Result<Json<Resealed>, ApiError> {
    let resealed = rotation::reseal(&state.pool, caller.user_id, &proofs, &request).await?;
    Ok(Json(Resealed { resealed }))
}

async fn commit_rotation(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    ZkProofs(proofs): ZkProofs,
    ApiJson(request): ApiJson<Commit>,
) -> Result<StatusCode, ApiError> {
    rotation::commit(&state.pool, caller.user_id, &proofs, &request).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn plaintext_sessions(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    ApiQuery(query): ApiQuery<MigrationQuery>,
) -> Result<Json<MessageBatch<PlaintextSession>>, ApiError> {
    let messages = migration::plaintext_sessions(&state.pool, caller.user_id, query).await?;
    Ok(Json(MessageBatch { messages }))
}

async fn encrypted_sessions(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    ApiJson(writes): ApiJson<Vec<EncryptedSession>>,
) -> Result<Json<Written>, ApiError> {
    let written = migration::write_sessions(&state.pool, caller.user_id, &writes).await?;
    Ok(Json(Written {
        written,
        envelope_sha256: Vec::new(),
    }))
}

async fn unverified_sessions(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    ApiQuery(query): ApiQuery<MigrationQuery>,
) -> Result<Json<MessageBatch<UnverifiedSession>>, ApiError> {
    let messages = migration::unverified_sessions(&state.pool, caller.user_id, query).await?;
    Ok(Json(MessageBatch { messages }))
}

async fn clear_sessions(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    ZkProofs(proofs): ZkProofs,
    ApiJson(items): ApiJson<Vec<Item>>,
) -> Result<Json<Cleared>, ApiError> {
    let cleared = migration::clear_sessions(&state.pool, caller.user_id, &proofs, &items).await?;
    Ok(Json(Cleared { cleared }))
}

async fn reset_sessions(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    ApiJson(items): ApiJson<Vec<Item>>,
) -> Result<Json<Reset>, ApiError> {
    let reset = migration::reset_sessions(&state.pool, caller.user_id, &items).await?;
    Ok(Json(Reset { reset }))
}

async fn migration_status(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
) -> Result<Json<migration::Status>, ApiError> {
    Ok(Json(migration::status(&state.pool, caller.user_id).await?))
}

async fn plaintext(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    ApiQuery(query): ApiQuery<MigrationQuery>,
) -> Result<Json<MessageBatch<Plaintext>>, ApiError> {
    let messages = migration::plaintext_batch(&state.pool, caller.user_id, query).await?;
    Ok(Json(MessageBatch { messages }))
}

async fn encrypted(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    ApiJson(writes): ApiJson<Vec<EncryptedWrite>>,
) -> Result<Json<Written>, ApiError> {
    let (written, envelope_sha256) =
        migration::write_encrypted(&state.pool, caller.user_id, &writes)
            .await?
            .into_iter()
            .unzip();
    Ok(Json(Written {
        written,
        envelope_sha256,
    }))
}

async fn unverified(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    ApiQuery(query): ApiQuery<MigrationQuery>,
) -> Result<Json<MessageBatch<Unverified>>, ApiError> {
    let messages = migration::unverified_batch(&state.pool, caller.user_id, query).await?;
    Ok(Json(MessageBatch { messages }))
}

async fn clear(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    ZkProofs(proofs): ZkProofs,
    ApiJson(items): ApiJson<Vec<Item>>,
) -> Result<Json<Cleared>, ApiError> {
    let cleared = migration::clear_plaintext(&state.pool, caller.user_id, &proofs, &items).await?;
    Ok(Json(Cleared { cleared }))
}

async fn reset(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    ApiJson(items): ApiJson<Vec<Item>>,
) -> Result<Json<Reset>, ApiError> {
    let reset = migration::reset(&state.pool, caller.user_id, &items).await?;
    Ok(Json(Reset { reset }))
}
