//! The OAuth 2.1 authorization server's endpoints and the protected resource's metadata
//! (docs/api.md#oauth). Errors of the protocol endpoints are RFC 6749 JSON
//! (`{"error", "error_description"}`); that mapping lives here and nowhere else. The
//! authorization endpoint never redirects before the client and its redirect URI are known
//! good: until then it shows an error page.

use std::time::Instant;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use base64::Engine;
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

use super::account_web::expected_csrf;
use super::auth::cookie;
use super::extract::ClientAddr;
use super::pages::{self, esc, hidden};
use super::{ApiError, ApiForm, ApiJson, ApiPath, ApiQuery, AppState, Authenticated};
use crate::accounts::{self, SESSION_COOKIE};
use crate::error::{AuthFailure, Error, OAuthCode};
use crate::oauth::{
    self, AuthorizationParams, AuthorizationRequest, AuthorizeError, ClientCredentials,
    ClientMetadata, Scopes, clients, flow,
};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/.well-known/oauth-protected-resource",
            get(protected_resource),
        )
        .route(
            "/.well-known/oauth-protected-resource/mcp",
            get(protected_resource),
        )
        .route(
            "/.well-known/oauth-authorization-server",
            get(authorization_server),
        )
        .route(
            "/.well-known/openid-configuration",
            get(authorization_server),
        )
        .route("/oauth/register", post(register))
        .route(
            "/oauth/register/{client_id}",
            get(read_client).put(update_client).delete(delete_client),
        )
        .route("/oauth/authorize", get(authorize).post(consent))
        .route("/oauth/token", post(token))
        .route("/oauth/revoke", post(revoke))
        .route("/oauth/device_authorization", post(device_authorization))
        .route("/device", get(device_page).post(device_decision))
        .route("/v1/oauth/grants", get(list_grants))
        .route("/v1/oauth/grants/{id}", delete(revoke_grant))
}

// ---- errors ---------------------------------------------------------------------------------

/// An RFC 6749 error response.
pub struct OAuthError(pub Error);

impl From<Error> for OAuthError {
    fn from(error: Error) -> Self {
        OAuthError(error)
    }
}

impl From<sqlx::Error> for OAuthError {
    fn from(error: sqlx::Error) -> Self {
        OAuthError(error.into())
    }
}

/// The protocol's code and status for a domain error.
fn oauth_code(error: &Error) -> (StatusCode, &'static str) {
    match error {
        Error::OAuth { .. } => (super::status(error), error.code()),
        Error::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
        Error::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "invalid_request"),
        Error::RateLimited { .. } | Error::AuthRateLimited { .. } => {
            (StatusCode::TOO_MANY_REQUESTS, "slow_down")
        }
        Error::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "invalid_token"),
        Error::NotFound(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
        Error::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "temporarily_unavailable"),
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "server_error"),
    }
}

impl IntoResponse for OAuthError {
    fn into_response(self) -> Response {
        let error = self.0;
        error.log();
        let (status, code) = oauth_code(&error);
        let mut response = (
            status,
            axum::Json(json!({ "error": code, "error_description": error.public_message() })),
        )
            .into_response();
        let headers = response.headers_mut();
        no_store(headers);
        if let Error::RateLimited { retry_after, .. } | Error::AuthRateLimited { retry_after } =
            &error
        {
            headers.insert(
                header::RETRY_AFTER,
                HeaderValue::from(retry_after.as_secs()),
            );
        }
        if status == StatusCode::UNAUTHORIZED && code == "invalid_client" {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(r#"Basic realm="polydev""#),
            );
        }
        response
    }
}

fn no_store(headers: &mut HeaderMap) {
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
}

/// `/mcp`'s answer to a request it refuses: the usual error, with a challenge that points MCP
/// clients at the protected resource metadata (RFC 9728 §5.1) and the scope they need.
pub fn with_resource_metadata(error: ApiError, state: &AppState) -> Response {
    let mut response = error.into_response();
    let status = response.status();
    if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
        let existing = response
            .headers()
            .get(header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("Bearer")
            .to_string();
        let rest: Vec<&str> = existing
            .trim_start_matches("Bearer")
            .split(", ")
            .map(str::trim)
            .filter(|p| !p.is_empty() && !p.starts_with("realm=") && !p.starts_with("scope="))
            .collect();
        let mut challenge = format!(
            r#"Bearer resource_metadata="{}/.well-known/oauth-protected-resource/mcp", scope="mcp""#,
            state.public_url
        );
        for part in rest {
            challenge.push_str(", ");
            challenge.push_str(part);
        }
        if let Ok(value) = HeaderValue::from_str(&challenge) {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, value);
        }
    }
    response
}

// ---- metadata -------------------------------------------------------------------------------

/// RFC 9728: the protected resource (`/mcp`) and its authorization server.
async fn protected_resource(State(state): State<AppState>) -> Response {
    let config = state.oauth();
    let mut response = axum::Json(json!({
        "resource": config.resource(),
        "authorization_servers": [config.issuer],
        "scopes_supported": ["mcp", "account"],
        "bearer_methods_supported": ["header"],
        "resource_name": "Polydev MCP",
        "resource_documentation": format!("{}/", config.issuer),
    }))
    .into_response();
    cors(response.headers_mut());
    response
}

/// RFC 8414 (also served at the OpenID discovery path, which clients probe).
async fn authorization_server(State(state): State<AppState>) -> Response {
    let issuer = state.oauth().issuer;
    let mut response = axum::Json(json!({
        "issuer": issuer,
        "authorization_endpoint": format!("{issuer}/oauth/authorize"),
        "token_endpoint": format!("{issuer}/oauth/token"),
        "registration_endpoint": format!("{issuer}/oauth/register"),
        "revocation_endpoint": format!("{issuer}/oauth/revoke"),
        "scopes_supported": ["mcp", "account"],
        "response_types_supported": ["code"],
        "response_modes_supported": ["query"],
        "device_authorization_endpoint": format!("{issuer}/oauth/device_authorization"),
        "grant_types_supported": [clients::GRANT_AUTHORIZATION_CODE, clients::GRANT_REFRESH_TOKEN, clients::GRANT_DEVICE_CODE],
        "token_endpoint_auth_methods_supported": ["none", "client_secret_basic", "client_secret_post"],
        "revocation_endpoint_auth_methods_supported": ["none", "client_secret_basic", "client_secret_post"],
        "code_challenge_methods_supported": ["S256"],
        "authorization_response_iss_parameter_supported": true,
        "client_id_metadata_document_supported": true,
    }))
    .into_response();
    cors(response.headers_mut());
    response
}

/// Metadata is public; browser-based clients may read it from another origin.
fn cors(headers: &mut HeaderMap) {
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
}

// ---- registration (RFC 7591, RFC 7592) ------------------------------------------------------

fn limit(
    limiter: &crate::accounts::FailedAuthLimiter,
    address: Option<std::net::IpAddr>,
) -> Result<(), OAuthError> {
    if let Some(address) = address {
        let now = Instant::now();
        limiter
            .check(address, now)
            .map_err(|retry_after| OAuthError(Error::AuthRateLimited { retry_after }))?;
        limiter.record(address, now);
    }
    Ok(())
}

/// The registration body: RFC 7591 metadata (anything else is ignored).
fn parse_metadata(body: Value) -> Result<ClientMetadata, OAuthError> {
    serde_json::from_value(body).map_err(|e| {
        OAuthError(Error::oauth(
            OAuthCode::InvalidClientMetadata,
            format!("the client metadata is not valid: {e}"),
        ))
    })
}

async fn register(
    State(state): State<AppState>,
    ClientAddr(client): ClientAddr,
    body: Result<ApiJson<Value>, ApiError>,
) -> Result<Response, OAuthError> {
    limit(&state.oauth_limits.register, client)?;
    let ApiJson(body) = body.map_err(|e| OAuthError(e.0))?;
    let metadata = parse_metadata(body)?;
    let registered = clients::register(&state.pool, metadata).await?;
    let mut value = serde_json::to_value(&registered).map_err(Error::internal)?;
    value["registration_client_uri"] = Value::String(format!(
        "{}/oauth/register/{}",
        state.public_url, registered.client_id
    ));
    let mut response = (StatusCode::CREATED, axum::Json(value)).into_response();
    no_store(response.headers_mut());
    Ok(response)
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

async fn read_client(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath(client_id): ApiPath<String>,
) -> Result<Response, OAuthError> {
    let client = clients::client_for_management(&state.pool, &client_id, bearer(&headers)).await?;
    let mut value = clients::describe(&client);
    value["registration_client_uri"] = Value::String(format!(
        "{}/oauth/register/{}",
        state.public_url, client.client_id
    ));
    let mut response = axum::Json(value).into_response();
    no_store(response.headers_mut());
    Ok(response)
}

async fn update_client(
    State(state): State<AppState>,
    ClientAddr(client): ClientAddr,
    headers: HeaderMap,
    ApiPath(client_id): ApiPath<String>,
    body: Result<ApiJson<Value>, ApiError>,
) -> Result<Response, OAuthError> {
    limit(&state.oauth_limits.register, client)?;
    let client = clients::client_for_management(&state.pool, &client_id, bearer(&headers)).await?;
    let ApiJson(body) = body.map_err(|e| OAuthError(e.0))?;
    if body
        .get("client_id")
        .and_then(Value::as_str)
        .is_some_and(|id| id != client.client_id)
    {
        return Err(OAuthError(Error::oauth(
            OAuthCode::InvalidClientMetadata,
            "`client_id` in the body must be this client's",
        )));
    }
    let metadata = parse_metadata(body)?;
    let client = clients::update_client(&state.pool, &client, metadata).await?;
    let mut value = clients::describe(&client);
    value["registration_client_uri"] = Value::String(format!(
        "{}/oauth/register/{}",
        state.public_url, client.client_id
    ));
    Ok(axum::Json(value).into_response())
}

async fn delete_client(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath(client_id): ApiPath<String>,
) -> Result<Response, OAuthError> {
    let client = clients::client_for_management(&state.pool, &client_id, bearer(&headers)).await?;
    clients::delete_client(&state.pool, &client).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

// ---- authorization endpoint -----------------------------------------------------------------

/// Appends the response parameters (and RFC 9207 `iss`) to a checked redirect URI.
fn redirect_to(redirect_uri: &str, params: &[(&str, &str)], issuer: &str) -> Response {
    let Ok(mut url) = url::Url::parse(redirect_uri) else {
        return pages::error_page(
            StatusCode::BAD_REQUEST,
            "Authorization failed",
            "the redirect URI cannot be used",
        );
    };
    {
        let mut query = url.query_pairs_mut();
        for (k, v) in params {
            query.append_pair(k, v);
        }
        query.append_pair("iss", issuer);
    }
    let mut response = StatusCode::SEE_OTHER.into_response();
    match HeaderValue::from_str(url.as_str()) {
        Ok(location) => {
            response.headers_mut().insert(header::LOCATION, location);
            no_store(response.headers_mut());
            response
        }
        Err(_) => pages::error_page(
            StatusCode::BAD_REQUEST,
            "Authorization failed",
            "the redirect URI cannot be used",
        ),
    }
}

fn error_redirect(
    redirect_uri: &str,
    state: Option<&str>,
    error: &Error,
    issuer: &str,
) -> Response {
    let (_, code) = oauth_code(error);
    let description = error.public_message();
    let mut params = vec![("error", code), ("error_description", description.as_str())];
    if let Some(state) = state {
        params.push(("state", state));
    }
    redirect_to(redirect_uri, &params, issuer)
}

fn authorize_failure(failure: AuthorizeError, issuer: &str) -> Response {
    match failure {
        AuthorizeError::Page(error) => {
            error.log();
            let status = match &error {
                Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
                Error::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::BAD_REQUEST,
            };
            pages::error_page(
                status,
                "This app cannot connect",
                &format!(
                    "{} — nothing was sent to the app. Check its configuration, or ask its developer.",
                    error.public_message()
                ),
            )
        }
        AuthorizeError::Redirect {
            redirect_uri,
            state,
            error,
        } => error_redirect(&redirect_uri, state.as_deref(), &error, issuer),
    }
}

/// The signed-in user of this browser, if any.
async fn browser_user(state: &AppState, headers: &HeaderMap) -> Result<Option<Uuid>, Error> {
    let Some(session) = cookie(headers, SESSION_COOKIE) else {
        return Ok(None);
    };
    match accounts::session_caller(&state.pool, &session).await {
        Ok(caller) => Ok(Some(caller.user_id)),
        Err(Error::Unauthorized(AuthFailure::SessionInvalid)) => Ok(None),
        Err(other) => Err(other),
    }
}

/// `GET /oauth/authorize`: checks the request; signs the user in (a redirect to the sign-in
/// form that comes back here); issues a code at once when the user already consented to this
/// client, else shows the consent page.
async fn authorize(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: axum::http::Uri,
    query: Result<ApiQuery<AuthorizationParams>, ApiError>,
) -> Response {
    let config = state.oauth();
    let params = match query {
        Ok(ApiQuery(params)) => params,
        Err(error) => return authorize_failure(AuthorizeError::Page(error.0), &config.issuer),
    };
    let request = match flow::check_authorization(&state.pool, &config, &params).await {
        Ok(request) => request,
        Err(failure) => return authorize_failure(failure, &config.issuer),
    };
    let user_id = match browser_user(&state, &headers).await {
        Ok(Some(user_id)) => user_id,
        Ok(None) => {
            let here = uri
                .path_and_query()
                .map(|p| p.as_str().to_string())
                .unwrap_or_default();
            let next: String = url::form_urlencoded::byte_serialize(here.as_bytes()).collect();
            let mut response = StatusCode::SEE_OTHER.into_response();
            if let Ok(location) = HeaderValue::from_str(&format!("/account/signin?next={next}")) {
                response.headers_mut().insert(header::LOCATION, location);
            }
            return response;
        }
        Err(error) => return authorize_failure(AuthorizeError::Page(error), &config.issuer),
    };
    let forced = params
        .prompt
        .as_deref()
        .is_some_and(|p| p.split(' ').any(|p| p == "consent"));
    if !forced {
        match flow::remembered_grant(&state.pool, user_id, &request).await {
            Ok(Some(grant)) => {
                // Remembered consent: what was granted, within what is asked.
                let held = Scopes::parse(Some(&grant.scope)).unwrap_or(Scopes::MCP);
                let granted = Scopes {
                    mcp: true,
                    account: held.account && request.scopes.account,
                };
                return issue_code(&state, user_id, &request, granted).await;
            }
            Ok(None) => {}
            Err(error) => return authorize_failure(AuthorizeError::Page(error), &config.issuer),
        }
    }
    let csrf = expected_csrf(&headers).unwrap_or_default();
    consent_page(&request, &params, &csrf)
}

async fn issue_code(
    state: &AppState,
    user_id: Uuid,
    request: &AuthorizationRequest,
    granted: Scopes,
) -> Response {
    let issuer = state.oauth().issuer;
    match flow::approve(&state.pool, user_id, request, granted).await {
        Ok(code) => {
            let mut params = vec![("code", code.as_str())];
            if let Some(s) = request.state.as_deref() {
                params.push(("state", s));
            }
            redirect_to(&request.redirect_uri, &params, &issuer)
        }
        Err(error) => error_redirect(
            &request.redirect_uri,
            request.state.as_deref(),
            &error,
            &issuer,
        ),
    }
}

/// Where the browser goes back to, as the user should read it: the host (or the app's own
/// scheme for a native app).
fn redirect_host(redirect_uri: &str) -> String {
    match url::Url::parse(redirect_uri) {
        Ok(url) => match url.host_str() {
            Some(host) => match url.port() {
                Some(port) => format!("{}://{host}:{port}", url.scheme()),
                None => format!("{}://{host}", url.scheme()),
            },
            None => format!("{}:", url.scheme()),
        },
        Err(_) => "(unknown)".into(),
    }
}

fn consent_page(
    request: &AuthorizationRequest,
    params: &AuthorizationParams,
    csrf: &str,
) -> Response {
    let fields: String = [
        ("response_type", &params.response_type),
        ("client_id", &params.client_id),
        ("redirect_uri", &Some(request.redirect_uri.clone())),
        ("scope", &params.scope),
        ("state", &params.state),
        ("code_challenge", &params.code_challenge),
        ("code_challenge_method", &params.code_challenge_method),
        ("resource", &params.resource),
    ]
    .iter()
    .filter_map(|(k, v)| v.as_deref().map(|v| hidden(k, v)))
    .collect();
    let account = if request.scopes.account {
        r#"<label class="check"><input id="grant-account" type="checkbox" name="grant_account" value="yes"> Also let it manage your account: create and revoke tokens, change settings and keys (<code>account</code>)</label>"#
    } else {
        ""
    };
    let body = format!(
        r#"<p><strong id="client-name">{name}</strong> wants to use Polydev as you.</p>
<p>It will be sent back to <strong id="redirect-host">{host}</strong>. This app registered itself: make sure you started it and trust it.</p>
<ul><li>Ask for perspectives and use your chat history through MCP (<code>mcp</code>)</li></ul>
<form method="post" action="/oauth/authorize">{fields}{csrf}
{account}
<button id="approve" type="submit" name="decision" value="approve">Allow</button>
<button id="deny" type="submit" name="decision" value="deny">Deny</button>
</form>
<p>You can disconnect it at any time under “Connected apps”.</p>"#,
        name = esc(request.client.name()),
        host = esc(&redirect_host(&request.redirect_uri)),
        csrf = hidden("csrf_token", csrf),
    );
    pages::page(StatusCode::OK, "Connect an app", &body)
}

#[derive(Deserialize)]
struct ConsentForm {
    response_type: Option<String>,
    client_id: Option<String>,
    redirect_uri: Option<String>,
    scope: Option<String>,
    state: Option<String>,
    code_challenge: Option<String>,
    code_challenge_method: Option<String>,
    resource: Option<String>,
    csrf_token: Option<String>,
    decision: Option<String>,
    grant_account: Option<String>,
}

/// `POST /oauth/authorize`: the consent form (CSRF-checked against the session).
async fn consent(
    State(state): State<AppState>,
    headers: HeaderMap,
    form: Result<ApiForm<ConsentForm>, ApiError>,
) -> Response {
    let issuer = state.oauth().issuer;
    let form = match form {
        Ok(ApiForm(form)) => form,
        Err(error) => return authorize_failure(AuthorizeError::Page(error.0), &issuer),
    };
    if let Err(error) = accounts::check_csrf(
        expected_csrf(&headers).as_deref(),
        form.csrf_token.as_deref(),
    ) {
        return ApiError(error).into_response();
    }
    let user_id = match browser_user(&state, &headers).await {
        Ok(Some(user_id)) => user_id,
        Ok(None) => {
            return pages::error_page(
                StatusCode::UNAUTHORIZED,
                "Signed out",
                "your session has ended: start again from the app",
            );
        }
        Err(error) => return authorize_failure(AuthorizeError::Page(error), &issuer),
    };
    let params = AuthorizationParams {
        response_type: form.response_type,
        client_id: form.client_id,
        redirect_uri: form.redirect_uri,
        scope: form.scope,
        state: form.state,
        code_challenge: form.code_challenge,
        code_challenge_method: form.code_challenge_method,
        resource: form.resource,
        prompt: None,
    };
    let request = match flow::check_authorization(&state.pool, &state.oauth(), &params).await {
        Ok(request) => request,
        Err(failure) => return authorize_failure(failure, &issuer),
    };
    if form.decision.as_deref() != Some("approve") {
        let error = Error::oauth(OAuthCode::AccessDenied, "the user denied the request");
        return error_redirect(
            &request.redirect_uri,
            request.state.as_deref(),
            &error,
            &issuer,
        );
    }
    let granted = Scopes {
        mcp: true,
        account: request.scopes.account && form.grant_account.as_deref() == Some("yes"),
    };
    issue_code(&state, user_id, &request, granted).await
}

// ---- token and revocation endpoints ---------------------------------------------------------

#[derive(Deserialize, Default)]
struct TokenForm {
    grant_type: Option<String>,
    code: Option<String>,
    redirect_uri: Option<String>,
    code_verifier: Option<String>,
    refresh_token: Option<String>,
    scope: Option<String>,
    resource: Option<String>,
    client_id: Option<String>,
    client_secret: Option<String>,
    token: Option<String>,
    token_type_hint: Option<String>,
    device_code: Option<String>,
}

/// `Authorization: Basic` credentials (RFC 6749 §2.3.1: each part form-urlencoded).
fn basic_credentials(headers: &HeaderMap) -> Result<Option<(String, String)>, OAuthError> {
    let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return Ok(None);
    };
    let Some(encoded) = value
        .strip_prefix("Basic ")
        .or_else(|| value.strip_prefix("basic "))
    else {
        return Ok(None);
    };
    let malformed = || {
        OAuthError(Error::oauth(
            OAuthCode::InvalidClient,
            "the Basic credentials are malformed",
        ))
    };
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|_| malformed())?;
    let decoded = String::from_utf8(decoded).map_err(|_| malformed())?;
    let (id, secret) = decoded.split_once(':').ok_or_else(malformed)?;
    let decode = |s: &str| -> String {
        url::form_urlencoded::parse(format!("v={s}").as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default()
    };
    Ok(Some((decode(id), decode(secret))))
}

async fn client_of(
    state: &AppState,
    headers: &HeaderMap,
    form: &TokenForm,
) -> Result<oauth::Client, OAuthError> {
    let credentials = ClientCredentials {
        basic: basic_credentials(headers)?,
        form_id: form.client_id.clone(),
        form_secret: form.client_secret.clone(),
    };
    Ok(clients::authenticate_client(&state.pool, &credentials).await?)
}

async fn token(
    State(state): State<AppState>,
    ClientAddr(client): ClientAddr,
    headers: HeaderMap,
    form: Result<ApiForm<TokenForm>, ApiError>,
) -> Result<Response, OAuthError> {
    limit(&state.oauth_limits.token, client)?;
    let ApiForm(form) = form.map_err(|e| OAuthError(e.0))?;
    let config = state.oauth();
    let client = client_of(&state, &headers, &form).await?;
    let missing = |field: &str| {
        OAuthError(Error::oauth(
            OAuthCode::InvalidRequest,
            format!("`{field}` is missing"),
        ))
    };
    let response = match form.grant_type.as_deref() {
        Some(clients::GRANT_AUTHORIZATION_CODE) => {
            let code = form.code.as_deref().ok_or_else(|| missing("code"))?;
            flow::exchange_code(
                &state.pool,
                &config,
                &client,
                code,
                form.redirect_uri.as_deref(),
                form.code_verifier.as_deref(),
                form.resource.as_deref(),
            )
            .await?
        }
        Some(clients::GRANT_REFRESH_TOKEN) => {
            let refresh_token = form
                .refresh_token
                .as_deref()
                .ok_or_else(|| missing("refresh_token"))?;
            let refreshed = flow::refresh(
                &state.pool,
                &config,
                &client,
                refresh_token,
                form.scope.as_deref(),
                form.resource.as_deref(),
            )
            .await?;
            // The old access token is retired: this process forgets it at once rather than
            // when the database's notification arrives (other replicas wait for that).
            state.token_cache.clear();
            refreshed
        }
        Some(clients::GRANT_DEVICE_CODE) => {
            let device_code = form
                .device_code
                .as_deref()
                .ok_or_else(|| missing("device_code"))?;
            oauth::device::poll(&state.pool, &client, device_code).await?
        }
        None => return Err(missing("grant_type")),
        Some(other) => {
            return Err(OAuthError(Error::oauth(
                OAuthCode::UnsupportedGrantType,
                format!(
                    "the grant type `{}` is not supported: use authorization_code, refresh_token or the device_code grant",
                    other.chars().take(100).collect::<String>()
                ),
            )));
        }
    };
    let mut response = axum::Json(response).into_response();
    no_store(response.headers_mut());
    Ok(response)
}

/// RFC 7009: always 200 for a well-formed request by an authenticated client, whether or not
/// the token existed.
async fn revoke(
    State(state): State<AppState>,
    ClientAddr(client): ClientAddr,
    headers: HeaderMap,
    form: Result<ApiForm<TokenForm>, ApiError>,
) -> Result<Response, OAuthError> {
    limit(&state.oauth_limits.token, client)?;
    let ApiForm(form) = form.map_err(|e| OAuthError(e.0))?;
    let client = client_of(&state, &headers, &form).await?;
    let token = form.token.as_deref().ok_or_else(|| {
        OAuthError(Error::oauth(
            OAuthCode::InvalidRequest,
            "`token` is missing",
        ))
    })?;
    let _ = form.token_type_hint; // both kinds are recognised by their shape
    flow::revoke(&state.pool, &client, token).await?;
    // As after a refresh: refused here at once, not when the notification arrives.
    state.token_cache.clear();
    let mut response = StatusCode::OK.into_response();
    no_store(response.headers_mut());
    Ok(response)
}

// ---- device authorization (RFC 8628) ----------------------------------------------------------

async fn device_authorization(
    State(state): State<AppState>,
    ClientAddr(client): ClientAddr,
    headers: HeaderMap,
    form: Result<ApiForm<TokenForm>, ApiError>,
) -> Result<Response, OAuthError> {
    limit(&state.oauth_limits.token, client)?;
    let ApiForm(form) = form.map_err(|e| OAuthError(e.0))?;
    let oauth_client = client_of(&state, &headers, &form).await?;
    let started = oauth::device::start(
        &state.pool,
        &state.oauth(),
        &oauth_client,
        form.scope.as_deref(),
        form.resource.as_deref(),
    )
    .await?;
    let mut response = axum::Json(started).into_response();
    no_store(response.headers_mut());
    Ok(response)
}

#[derive(Deserialize, Default)]
struct DeviceQuery {
    user_code: Option<String>,
}

/// `GET /device`: sign in first; then the code's request (client, scopes) with Allow / Deny,
/// or a form to type the code.
async fn device_page(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: axum::http::Uri,
    query: Result<ApiQuery<DeviceQuery>, ApiError>,
) -> Response {
    let query = query.map(|q| q.0).unwrap_or_default();
    match browser_user(&state, &headers).await {
        Ok(Some(_)) => {}
        Ok(None) => {
            let here = uri
                .path_and_query()
                .map(|p| p.as_str().to_string())
                .unwrap_or_default();
            let next: String = url::form_urlencoded::byte_serialize(here.as_bytes()).collect();
            let mut response = StatusCode::SEE_OTHER.into_response();
            if let Ok(location) = HeaderValue::from_str(&format!("/account/signin?next={next}")) {
                response.headers_mut().insert(header::LOCATION, location);
            }
            return response;
        }
        Err(error) => return ApiError(error).into_response(),
    }
    let csrf = expected_csrf(&headers).unwrap_or_default();
    let Some(code) = query.user_code.filter(|c| !c.trim().is_empty()) else {
        return pages::page(
            StatusCode::OK,
            "Connect a device",
            r#"<form method="get" action="/device"><label>The code your terminal shows <input id="user-code" name="user_code" autocomplete="off" autocapitalize="characters" required maxlength="16"></label>
<button id="device-continue" type="submit">Continue</button></form>"#,
        );
    };
    match oauth::device::find_pending(&state.pool, &state.oauth(), &code).await {
        Ok(pending) => {
            let body = format!(
                r#"<p><strong id="client-name">{name}</strong> on a device or terminal asks to use Polydev as you, with the code <strong id="user-code">{code}</strong>.</p>
<p>Only allow it if you started it yourself and the code matches what it shows.</p>
<p>Scopes: <code>{scope}</code></p>
<form method="post" action="/device">{user_code}{csrf}
<button id="approve" type="submit" name="decision" value="approve">Allow</button>
<button id="deny" type="submit" name="decision" value="deny">Deny</button></form>"#,
                name = esc(pending.client.name()),
                code = esc(&pending.user_code),
                scope = esc(&pending.scope),
                user_code = hidden("user_code", &pending.user_code),
                csrf = hidden("csrf_token", &csrf),
            );
            pages::page(StatusCode::OK, "Connect a device", &body)
        }
        Err(Error::Invalid(message)) => {
            pages::error_page(StatusCode::BAD_REQUEST, "Code not valid", &message)
        }
        Err(error) => ApiError(error).into_response(),
    }
}

#[derive(Deserialize)]
struct DeviceDecision {
    user_code: String,
    csrf_token: Option<String>,
    decision: Option<String>,
}

async fn device_decision(
    State(state): State<AppState>,
    headers: HeaderMap,
    form: Result<ApiForm<DeviceDecision>, ApiError>,
) -> Response {
    let form = match form {
        Ok(ApiForm(form)) => form,
        Err(error) => return error.into_response(),
    };
    if let Err(error) = accounts::check_csrf(
        expected_csrf(&headers).as_deref(),
        form.csrf_token.as_deref(),
    ) {
        return ApiError(error).into_response();
    }
    let user_id = match browser_user(&state, &headers).await {
        Ok(Some(user_id)) => user_id,
        Ok(None) => {
            return pages::error_page(
                StatusCode::UNAUTHORIZED,
                "Signed out",
                "your session has ended: sign in and enter the code again",
            );
        }
        Err(error) => return ApiError(error).into_response(),
    };
    let approve = form.decision.as_deref() == Some("approve");
    match oauth::device::decide(&state.pool, user_id, &form.user_code, approve).await {
        Ok(()) if approve => pages::page(
            StatusCode::OK,
            "Device connected",
            r#"<p id="done">Done: go back to your terminal.</p>"#,
        ),
        Ok(()) => pages::page(
            StatusCode::OK,
            "Request denied",
            r#"<p id="done">Denied: the device gets no access.</p>"#,
        ),
        Err(Error::Invalid(message)) => {
            pages::error_page(StatusCode::BAD_REQUEST, "Code not valid", &message)
        }
        Err(error) => ApiError(error).into_response(),
    }
}

// ---- connected apps ---------------------------------------------------------------------------

async fn list_grants(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
) -> Result<Response, ApiError> {
    let grants = flow::list_grants(&state.pool, caller.user_id).await?;
    Ok(axum::Json(json!({ "grants": grants })).into_response())
}

async fn revoke_grant(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<StatusCode, ApiError> {
    flow::revoke_grant(&state.pool, caller.user_id, id).await?;
    state.token_cache.evict_user(caller.user_id);
    Ok(StatusCode::NO_CONTENT)
}
