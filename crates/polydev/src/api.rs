//! The HTTP API's request and response bodies, shared by the server's handlers and every client
//! in the repository (`polydev zk`, the bench, the stdio bridge), so both sides read and write
//! the same typed shapes. Domain types that travel as they are (a chat message, a token) stay in
//! their domain; this module holds the wrappers around them.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::accounts::{Profile, Scope, User};
use crate::error::Error;
use crate::quota::QuotaState;

/// Every error body: `{"error": {"code", "message"}}`. Also the `error` SSE event's data and
/// the structured content of an MCP tool error.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, JsonSchema)]
pub struct ErrorResponse {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, JsonSchema)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
}

impl From<&Error> for ErrorResponse {
    fn from(error: &Error) -> Self {
        ErrorResponse {
            error: ErrorDetail {
                code: error.code().to_string(),
                message: error.public_message(),
            },
        }
    }
}

/// `GET /v1/me`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Me {
    pub user: User,
    pub profile: Option<Profile>,
    pub tier: Option<String>,
    pub quota: Option<QuotaState>,
    pub token: TokenInUse,
}

/// The token that authenticated a request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenInUse {
    pub id: Uuid,
    pub rate_limit_tier: Option<String>,
    #[serde(default)]
    pub scope: Scope,
}

/// `GET /healthz`, `GET /readyz`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, JsonSchema)]
pub struct Health {
    /// ok, ready, migrations_pending, database_unreachable
    pub status: String,
}

/// `POST /v1/tokens`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    pub name: String,
    pub expires_in_days: Option<u32>,
    /// `mcp` when omitted; at most the caller's own scope.
    #[serde(default)]
    pub scope: Option<Scope>,
}

/// `POST /v1/chat/sessions` (defined with the chat domain).
pub use crate::chat::NewSession;

/// `?limit=` of the batch reads (migration, credential hand-over).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct BatchQuery {
    pub limit: Option<i64>,
}

/// `POST /v1/zk/credentials/hand-over?limit=&table=&after=`: a batch, from a position.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct HandOverQuery {
    pub limit: Option<i64>,
    /// With `after`: where the previous batch's `next` said to go on.
    pub table: Option<crate::vault::Table>,
    pub after: Option<Uuid>,
}

impl HandOverQuery {
    pub fn position(&self) -> Option<crate::vault::Position> {
        Some(crate::vault::Position {
            table: self.table?,
            after: self.after?,
        })
    }
}

/// `PUT /v1/zk/password`, `PUT /v1/zk/recovery`: a compare-and-swap of the key material. The
/// request also carries the proof of the current password or recovery key in a header.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplaceKeyMaterial {
    /// The envelope being replaced, exactly as fetched.
    pub previous: String,
    pub material: crate::zk::KeyMaterial,
    /// `PUT /v1/zk/password`: the new password's proof (64 hex digits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_proof: Option<String>,
    /// `PUT /v1/zk/recovery`: the new recovery key's proof.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery_proof: Option<String>,
}

/// `?limit=&system=&after=` of the migration's reads (defined with the migration).
pub use crate::chat::migration::MigrationQuery;

/// `POST /v1/zk/manifest`: chunks stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ManifestStored {
    pub stored: u64,
}

/// `POST /v1/zk/rotation/items`: the ids re-sealed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Resealed {
    pub resealed: Vec<String>,
}

/// A batch of rows read for the migration (`messages`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MessageBatch<T> {
    pub messages: Vec<T>,
}

/// `POST /v1/zk/migration/encrypted`: the ids written (the others changed meanwhile).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Written {
    pub written: Vec<Uuid>,
    /// Messages: the SHA-256 (hex) of each envelope as stored, in the order of `written`
    /// (computed by PostgreSQL from the written column), so the client verifies what was stored
    /// against what it sealed without reading it back. Empty for sessions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub envelope_sha256: Vec<String>,
}

/// `POST /v1/zk/migration/clear`, `POST /v1/zk/credentials/clear`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct Cleared {
    pub cleared: u64,
}

/// `POST /v1/zk/migration/reset`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reset {
    pub reset: u64,
}

/// `POST /v1/zk/credentials/encrypted`: the credentials stored.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct Stored {
    pub stored: Vec<Uuid>,
}

/// `GET /v1/models`, the `list_available_models` tool.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelList<M> {
    pub models: Vec<M>,
}

// --- The admin console (`/v1/admin/…`, docs/admin.md) ---

/// `GET /v1/admin/users`: `q` searches e-mail (substring) or matches a user id.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminUserQuery {
    pub q: Option<String>,
    pub limit: Option<i64>,
    pub offset: Option<i64>,
}

/// `PUT /v1/admin/users/{id}/plan`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSetPlan {
    pub plan: String,
}

/// `POST /v1/admin/users/{id}/quota/grant`: `limit` is `messages`, `premium`, `normal` or `eco`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminGrant {
    pub limit: String,
    pub amount: i64,
}

/// `PUT /v1/admin/users/{id}/status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSetStatus {
    pub status: crate::admin::UserStatus,
}

/// `PUT /v1/admin/users/{id}/admin`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSetAdmin {
    pub admin: bool,
}

/// `PUT /v1/admin/rate-tiers/{tier}`: `expected` is the value the editor saw (409 if it changed).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSetRateTier {
    pub requests_per_minute: i32,
    pub expected: Option<i32>,
}

/// `GET /v1/admin/usage`, `GET /v1/admin/usage.csv`: the last `days` days (default 30).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminUsageQuery {
    pub days: Option<i32>,
}

/// `GET /v1/admin/audit`: newest first; `before` pages back; `target` filters by target id.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminAuditQuery {
    pub limit: Option<i64>,
    pub before: Option<i64>,
    pub target: Option<String>,
}
