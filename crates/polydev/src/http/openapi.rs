//! The OpenAPI 3.1 description of the HTTP API, generated from [`operations`] (one line per
//! route) and the `schemars` types of the bodies, the same types the handlers use and the MCP
//! tools describe themselves with. Served at `GET /openapi.json`, printed by `polydev openapi`,
//! committed as `docs/openapi.json` (CI compares the two).
//!
//! Adding a route: one line in [`operations`], e.g.
//! `post("/v1/things", "Creates a thing").token().body::<NewThing>().status(201).returns::<Thing>()`.
//! The scope a token needs is not written here: it comes from `MCP_ROUTES`, like the server's
//! own check. A test fails while a route of the docs/api.md scope table has no line here.
//!
//! Why not `aide` or `utoipa`: aide's release (0.15) is built on schemars 0.9, not the
//! schemars 1 types the handlers and MCP tools already derive (only its 0.16 alpha moves), and
//! it wants every router rebuilt as its `ApiRouter` with trait impls for our extractors;
//! utoipa derives a second, parallel schema (`ToSchema`) for every type. A table and
//! `schemars`' own 2020-12 generator (the dialect of OpenAPI 3.1) need neither.

use std::sync::OnceLock;

use axum::Router;
use axum::http::{Method, header};
use axum::response::IntoResponse;
use axum::routing;
use schemars::generate::SchemaSettings;
use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde_json::{Map, Value, json};

use super::auth::required_scope;
use crate::api::{self, ErrorResponse};
use crate::app::AppState;
use crate::{accounts, chat, perspectives};

pub fn routes() -> Router<AppState> {
    Router::new().route("/openapi.json", routing::get(serve))
}

async fn serve() -> impl IntoResponse {
    static TEXT: OnceLock<String> = OnceLock::new();
    let text = TEXT.get_or_init(text);
    ([(header::CONTENT_TYPE, "application/json")], text.as_str())
}

/// The document as committed (`docs/openapi.json`): pretty-printed, with a final newline.
pub fn text() -> String {
    let mut text = serde_json::to_string_pretty(&document()).expect("a JSON value serializes");
    text.push('\n');
    text
}

/// Every operation of the API. Routes without `.token()` need no credentials.
#[rustfmt::skip]
fn operations() -> Vec<Operation> {
    use accounts::{ApiToken, CreatedToken};
    use api::{Cleared, CreateToken, Health, Stored};
    use chat::{ChatMessage, ChatSession, NewMessage, NewSession};
    use perspectives::{PerspectiveSettings, PerspectivesRequest, PerspectivesResult};
    vec![
        // MCP (streamable HTTP): JSON-RPC messages, described by the MCP specification.
        post("/mcp", "MCP streamable HTTP: a JSON-RPC message").token().json(),
        get("/mcp", "MCP streamable HTTP: the session's event stream").token().events(),
        delete("/mcp", "MCP streamable HTTP: ends the session").token(),
        // Perspectives, usage and settings.
        get("/v1/models", "The model catalogue and which providers are configured").json(),
        post("/v1/perspectives", "Asks several models at once (JSON, or SSE with Accept: text/event-stream)").token().body::<PerspectivesRequest>().returns::<PerspectivesResult>(),
        get("/v1/models/{id}", "One model of the catalogue, in OpenAI's shape").json(),
        post("/v1/chat/completions", "OpenAI-compatible Chat Completions: a one-model call (JSON, or SSE with stream: true; docs/openai.md)").token().json(),
        get("/v1/usage", "This month's quota and usage").token().json(),
        get("/v1/usage/daily", "This month's usage by day and model").token().json(),
        get("/v1/settings", "The caller's perspective settings").token().returns::<PerspectiveSettings>(),
        put("/v1/settings", "Replaces the caller's perspective settings").token().body::<PerspectiveSettings>().returns::<PerspectiveSettings>(),
        get("/v1/me", "The caller: user, profile, plan, quota and the token in use").token().json(),
        // Tokens.
        get("/v1/tokens", "The caller's tokens (never their secrets)").token().returns::<Vec<ApiToken>>(),
        post("/v1/tokens", "Creates a token; its secret is shown once").token().body::<CreateToken>().status(201).returns::<CreatedToken>(),
        delete("/v1/tokens/{id}", "Revokes a token").token().returns::<ApiToken>(),
        // Chat history (both legacy systems).
        get("/v1/chat/sessions", "The caller's chat sessions").token().returns::<Vec<ChatSession>>(),
        post("/v1/chat/sessions", "Creates a chat session").token().body::<NewSession>().status(201).returns::<ChatSession>(),
        patch("/v1/chat/sessions/{id}", "Renames a chat session").token().json(),
        delete("/v1/chat/sessions/{id}", "Deletes a chat session and all its messages").token().json(),
        get("/v1/chat/sessions/{id}/messages", "A session's messages").token().returns::<Vec<ChatMessage>>(),
        post("/v1/chat/sessions/{id}/messages", "Adds a message (201; 200 when its id exists with the same content)").token().body::<NewMessage>().status(201).returns::<ChatMessage>(),
        // Zero-knowledge encryption (docs/crypto.md).
        get("/v1/zk", "Zero-knowledge status and key material").token().json(),
        post("/v1/zk/enable", "Turns zero-knowledge encryption on").token().json(),
        put("/v1/zk/password", "Replaces the password-wrapped key material").token().json(),
        put("/v1/zk/recovery", "Replaces the recovery-wrapped key material").token().json(),
        post("/v1/zk/proof", "Registers the key-possession proofs").token().json(),
        get("/v1/zk/manifest", "The sealed manifest").token().json(),
        post("/v1/zk/manifest", "Stores the sealed manifest").token().json(),
        post("/v1/zk/rotation", "Starts a key rotation").token().json(),
        get("/v1/zk/rotation/items", "Envelopes still to reseal").token().json(),
        post("/v1/zk/rotation/items", "Stores resealed envelopes").token().json(),
        post("/v1/zk/rotation/commit", "Commits a key rotation").token().json(),
        get("/v1/zk/rotation/count", "Envelopes left to reseal").token().json(),
        get("/v1/zk/migration", "Message migration progress").token().json(),
        get("/v1/zk/migration/plaintext", "A batch of plaintext messages to seal").token().json(),
        post("/v1/zk/migration/encrypted", "Stores sealed messages (compare-and-swap)").token().json(),
        get("/v1/zk/migration/unverified", "Sealed messages to verify before clearing").token().json(),
        post("/v1/zk/migration/clear", "Clears verified plaintext").token().json(),
        post("/v1/zk/migration/reset", "Puts messages back to plaintext-only").token().json(),
        get("/v1/zk/migration/sessions", "A batch of session metadata to seal").token().json(),
        post("/v1/zk/migration/sessions", "Stores sealed session metadata").token().json(),
        get("/v1/zk/migration/sessions/unverified", "Sealed session metadata to verify").token().json(),
        post("/v1/zk/migration/sessions/clear", "Clears verified session plaintext").token().json(),
        post("/v1/zk/migration/sessions/reset", "Puts sessions back to plaintext-only").token().json(),
        get("/v1/zk/credentials", "The caller's sealed credentials").token().json(),
        post("/v1/zk/credentials/hand-over", "Legacy credentials, decrypted once for sealing").token().json(),
        post("/v1/zk/credentials/encrypted", "Stores sealed credentials").token().returns::<Stored>(),
        post("/v1/zk/credentials/clear", "Clears legacy credentials that are sealed").token().returns::<Cleared>(),
        // Runtime (docs/runtime.md).
        post("/v1/runtime/containers", "Claims a container of a provider").token().json(),
        get("/v1/runtime/containers/{id}", "A claimed container").token().json(),
        delete("/v1/runtime/containers/{id}", "Releases a container").token().json(),
        put("/v1/runtime/containers/{id}/grant", "Grants a container the caller's sealed CLI credential").token().json(),
        delete("/v1/runtime/containers/{id}/grant", "Removes a container's credential grant").token().json(),
        get("/v1/runtime/proxy", "The caller's proxy port and its health").token().json(),
        get("/v1/runtime/keys", "The caller's job key").token().json(),
        put("/v1/runtime/keys", "Sets the caller's job key").token().json(),
        post("/v1/runtime/jobs", "Submits a sealed job").token().json(),
        get("/v1/runtime/jobs/{id}", "A job").token().json(),
        get("/v1/runtime/jobs/{id}/events", "A job's output as it comes").token().events(),
        post("/v1/runtime/jobs/{id}/cancel", "Cancels a job").token().json(),
        post("/v1/runtime/agent/register", "A container's agent registers (bootstrap secret)").json(),
        get("/v1/runtime/agent/next", "An agent waits for its next job (agent secret)").json(),
        post("/v1/runtime/agent/jobs/{id}/output", "An agent sends job output (agent secret)").json(),
        post("/v1/runtime/agent/jobs/{id}/finish", "An agent finishes a job (agent secret)").json(),
        // Login sessions (docs/login.md): a provider login in a sandboxed browser over WebRTC.
        get("/v1/login/sessions", "The caller's login sessions").token().json(),
        post("/v1/login/sessions", "Starts a login session (and its sandbox) for a provider").token().status(201).json(),
        get("/v1/login/sessions/{id}", "A login session").token().json(),
        post("/v1/login/sessions/{id}/cancel", "Cancels a login session").token().json(),
        post("/v1/login/sessions/{id}/retry", "Retries a login session in a new sandbox").token().json(),
        get("/v1/login/sessions/{id}/signal", "The agent's signalling messages, stored then live").token().events(),
        post("/v1/login/sessions/{id}/signal", "Sends an offer or an ICE candidate to the agent").token().status(202).json(),
        get("/v1/login/agent/{id}", "The session as its agent sees it (bootstrap secret)").json(),
        get("/v1/login/agent/{id}/signal", "The user's signalling messages (bootstrap secret)").events(),
        post("/v1/login/agent/{id}/signal", "Sends an answer or an ICE candidate to the user (bootstrap secret)").status(202).json(),
        post("/v1/login/agent/{id}/heartbeat", "The agent is alive (bootstrap secret)").status(204),
        post("/v1/login/agent/{id}/connected", "The peers are connected (bootstrap secret)").status(204),
        post("/v1/login/agent/{id}/credential", "Stores the sealed credential and completes the session (bootstrap secret)").status(204),
        post("/v1/login/agent/{id}/fail", "Fails the session with a reason (bootstrap secret)").status(204),
        // Accounts in the browser.
        get("/", "The account page (and its files)").html(),
        get("/v1/account/session", "The browser's session, and a CSRF token").json(),
        post("/v1/account/signup", "Creates an account; a verification link is mailed").status(202).json(),
        post("/v1/account/signin", "Signs in with e-mail and password (session cookie)").json(),
        post("/v1/account/signout", "Ends this browser's session").status(204),
        post("/v1/account/signout-everywhere", "Ends every session of the user").token().json(),
        post("/v1/account/password-reset", "Mails a password-reset link").status(202).json(),
        get("/account/signin", "The sign-in page without script").html(),
        post("/account/signin", "The sign-in form").form().status(303),
        get("/account/verify", "The e-mail verification page").html(),
        post("/account/verify", "Confirms an e-mail address").form().html(),
        get("/account/reset", "The password-reset page").html(),
        post("/account/reset", "Sets a new password").form().html(),
        get("/v1/account/passkeys", "The account's passkeys").token().json(),
        delete("/v1/account/passkeys/{id}", "Removes a passkey").token().json(),
        post("/v1/account/passkeys/register/start", "Starts registering a passkey").token().json(),
        post("/v1/account/passkeys/register/finish", "Finishes registering a passkey").token().status(201).json(),
        post("/v1/account/passkeys/signin/start", "Starts a passkey sign-in").json(),
        post("/v1/account/passkeys/signin/finish", "Finishes a passkey sign-in").json(),
        // OAuth 2.1 for MCP clients.
        get("/.well-known/oauth-protected-resource", "Protected resource metadata (RFC 9728)").json(),
        get("/.well-known/oauth-protected-resource/mcp", "Protected resource metadata of /mcp (RFC 9728)").json(),
        get("/.well-known/oauth-authorization-server", "Authorization server metadata (RFC 8414)").json(),
        get("/.well-known/openid-configuration", "Authorization server metadata (OpenID discovery)").json(),
        post("/oauth/register", "Dynamic client registration (RFC 7591)").status(201).json(),
        get("/oauth/register/{client_id}", "A registered client (RFC 7592)").json(),
        put("/oauth/register/{client_id}", "Updates a registered client (RFC 7592)").json(),
        delete("/oauth/register/{client_id}", "Deletes a registered client (RFC 7592)").status(204),
        get("/oauth/authorize", "Authorization request (code + PKCE): sign-in and consent").html(),
        post("/oauth/authorize", "The consent form").form().status(303),
        post("/oauth/token", "Token endpoint").form().json(),
        post("/oauth/revoke", "Token revocation (RFC 7009)").form().json(),
        post("/oauth/device_authorization", "Device authorization (RFC 8628)").form().json(),
        get("/device", "Where a person enters a device's code").html(),
        post("/device", "Allows or denies a device").form().html(),
        get("/v1/oauth/grants", "The user's connected apps").token().json(),
        delete("/v1/oauth/grants/{id}", "Revokes a connected app").token().json(),
        // The admin console (docs/admin.md): an administrator's web session only.
        get("/v1/admin/users", "Users, searched by e-mail or id").token().json(),
        get("/v1/admin/users/{id}", "One user: plan, quota, status, zero-knowledge (never content)").token().json(),
        put("/v1/admin/users/{id}/plan", "Changes a user's plan").token().json(),
        post("/v1/admin/users/{id}/quota/grant", "Grants extra units of one limit this month").token().json(),
        post("/v1/admin/users/{id}/quota/reset", "Resets this month's counters").token().json(),
        put("/v1/admin/users/{id}/status", "Suspends or reactivates a user").token().json(),
        put("/v1/admin/users/{id}/admin", "Makes or removes an administrator").token().json(),
        post("/v1/admin/users/{id}/revoke", "Revokes a user's tokens, sessions and OAuth grants").token().json(),
        get("/v1/admin/plans", "Plan limits").token().json(),
        put("/v1/admin/plans/{tier}", "Edits a plan's limits (compare-and-swap)").token().json(),
        get("/v1/admin/rate-tiers", "Rate limit tiers").token().json(),
        put("/v1/admin/rate-tiers/{tier}", "Edits a rate limit tier (compare-and-swap)").token().json(),
        get("/v1/admin/catalogue", "The catalogue with provider configuration and health").token().json(),
        get("/v1/admin/usage", "Usage by day, model, provider and plan").token().json(),
        get("/v1/admin/usage.csv", "Usage by day, model, provider and plan, as CSV").token().text(),
        get("/v1/admin/audit", "The append-only audit log").token().json(),
        get("/admin", "The admin console page").html(),
        get("/admin.js", "The admin console's script").text(),
        get("/admin.css", "The admin console's style sheet").text(),
        // Operations.
        get("/healthz", "The process is alive").returns::<Health>(),
        get("/readyz", "The database is reachable and migrated (503 otherwise)").returns::<Health>(),
        get("/metrics", "Prometheus metrics (bearer token when serve --metrics-token is set)").text(),
        get("/openapi.json", "This document").json(),
    ]
}

/// How the schema of a body is made, from the generator every body shares.
type SchemaFn = fn(&mut SchemaGenerator) -> Schema;

fn schema_of<T: JsonSchema>() -> SchemaFn {
    |generator| generator.subschema_for::<T>()
}

/// What a body is, as far as the document says.
#[derive(Clone, Copy)]
enum Content {
    None,
    /// `application/json` of this type.
    Typed(SchemaFn),
    /// `application/json`, not (yet) described by a type.
    Json,
    Form,
    Html,
    Text,
    Events,
}

/// One method on one path.
pub struct Operation {
    method: Method,
    path: &'static str,
    summary: &'static str,
    token: bool,
    request: Content,
    status: u16,
    response: Content,
}

fn operation(method: Method, path: &'static str, summary: &'static str) -> Operation {
    Operation {
        method,
        path,
        summary,
        token: false,
        request: Content::None,
        status: 200,
        response: Content::None,
    }
}

fn get(path: &'static str, summary: &'static str) -> Operation {
    operation(Method::GET, path, summary)
}
fn post(path: &'static str, summary: &'static str) -> Operation {
    operation(Method::POST, path, summary)
}
fn put(path: &'static str, summary: &'static str) -> Operation {
    operation(Method::PUT, path, summary)
}
fn delete(path: &'static str, summary: &'static str) -> Operation {
    operation(Method::DELETE, path, summary)
}
fn patch(path: &'static str, summary: &'static str) -> Operation {
    operation(Method::PATCH, path, summary)
}

impl Operation {
    /// Needs a bearer token (or, on REST routes, the browser session), of the scope
    /// `MCP_ROUTES` gives the route.
    fn token(mut self) -> Self {
        self.token = true;
        self
    }
    /// A JSON request body of type `T`.
    fn body<T: JsonSchema>(mut self) -> Self {
        self.request = Content::Typed(schema_of::<T>());
        self
    }
    /// A form-encoded request body.
    fn form(mut self) -> Self {
        self.request = Content::Form;
        self
    }
    /// The success status (default 200).
    fn status(mut self, status: u16) -> Self {
        self.status = status;
        self
    }
    /// A JSON response of type `T`.
    fn returns<T: JsonSchema>(mut self) -> Self {
        self.response = Content::Typed(schema_of::<T>());
        self
    }
    /// A JSON response not described by a type.
    fn json(mut self) -> Self {
        self.response = Content::Json;
        self
    }
    fn html(mut self) -> Self {
        self.response = Content::Html;
        self
    }
    fn text(mut self) -> Self {
        self.response = Content::Text;
        self
    }
    /// A `text/event-stream` response.
    fn events(mut self) -> Self {
        self.response = Content::Events;
        self
    }
}

/// `{"<media type>": {"schema": …}}` of a body, or `None` when there is none.
fn content(body: Content, generator: &mut SchemaGenerator) -> Option<Value> {
    let (media, schema) = match body {
        Content::None => return None,
        Content::Typed(schema) => ("application/json", schema(generator).to_value()),
        Content::Json => ("application/json", json!({})),
        Content::Form => (
            "application/x-www-form-urlencoded",
            json!({"type": "object"}),
        ),
        Content::Html => ("text/html", json!({"type": "string"})),
        Content::Text => ("text/plain", json!({"type": "string"})),
        Content::Events => ("text/event-stream", json!({"type": "string"})),
    };
    Some(json!({ media: { "schema": schema } }))
}

/// The whole document.
pub fn document() -> Value {
    let mut settings = SchemaSettings::draft2020_12();
    settings.definitions_path = "/components/schemas".into();
    let mut generator = settings.into_generator();
    let error = generator.subschema_for::<ErrorResponse>().to_value();
    let mut paths = Map::new();
    for op in operations() {
        let mut out = Map::new();
        out.insert("summary".into(), op.summary.into());
        out.insert(
            "operationId".into(),
            operation_id(&op.method, op.path).into(),
        );
        let parameters: Vec<Value> = path_parameters(op.path)
            .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        if !parameters.is_empty() {
            out.insert("parameters".into(), parameters.into());
        }
        if op.token {
            // `/mcp` is guarded apart (http/mcp.rs) and takes `mcp` tokens, like MCP_ROUTES.
            let scope = if op.path == "/mcp" {
                accounts::Scope::Mcp
            } else {
                required_scope(&op.method, Some(op.path))
            };
            let scope = scope.as_str();
            let mut security = vec![json!({ "bearer": [scope] })];
            if op.path != "/mcp" {
                security.push(json!({ "session": [scope] }));
            }
            out.insert("security".into(), security.into());
        }
        if let Some(content) = content(op.request, &mut generator) {
            out.insert(
                "requestBody".into(),
                json!({"required": true, "content": content}),
            );
        }
        let mut success = json!({ "description": reason(op.status) });
        if let Some(content) = content(op.response, &mut generator) {
            success["content"] = content;
        }
        out.insert(
            "responses".into(),
            json!({
                op.status.to_string(): success,
                "default": {
                    "description": "An error (docs/api.md, errors)",
                    "content": {"application/json": {"schema": error}},
                },
            }),
        );
        let item = paths
            .entry(op.path)
            .or_insert_with(|| Value::Object(Map::new()));
        item[op.method.as_str().to_ascii_lowercase()] = Value::Object(out);
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Polydev",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Multi-model AI perspectives over MCP and REST. Errors are `{\"error\": {\"code\", \"message\"}}`; the scope each token needs is in docs/api.md.",
        },
        "jsonSchemaDialect": "https://json-schema.org/draft/2020-12/schema",
        "paths": paths,
        "components": {
            "schemas": generator.take_definitions(true),
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A `pd_` token (polydev token create, POST /v1/tokens, or OAuth). The role listed is the token scope the operation needs: `mcp` or `account`.",
                },
                "session": {
                    "type": "apiKey",
                    "in": "cookie",
                    "name": accounts::SESSION_COOKIE,
                    "description": "The browser's session (state-changing requests also send the CSRF token).",
                },
            },
        },
    })
}

/// `get_v1_chat_sessions_id_messages`.
fn operation_id(method: &Method, path: &str) -> String {
    let mut id = method.as_str().to_ascii_lowercase();
    for word in path.split(|c: char| !c.is_ascii_alphanumeric()) {
        if !word.is_empty() {
            id.push('_');
            id.push_str(word);
        }
    }
    if path == "/" {
        id.push_str("_root");
    }
    id
}

/// The `{name}` segments of a route.
fn path_parameters(path: &str) -> impl Iterator<Item = &str> {
    path.split('/')
        .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
}

fn reason(status: u16) -> &'static str {
    axum::http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Success")
}
