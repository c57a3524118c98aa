//! Accounts on the web: sign-up, sign-in and sign-out with a session cookie, e-mail
//! verification and password reset. JSON routes under `/v1/account/` (the web app) and small
//! HTML forms under `/account/` (the links in e-mail, and sign-in during an OAuth
//! authorization, which work without script).
//!
//! CSRF: every request here that changes something carries the CSRF token: the session's when
//! the browser has a session cookie, else the pre-session `polydev_csrf` cookie's value
//! (double submit); `GET /v1/account/session` and the HTML forms hand it out.

use std::time::Instant;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;

use super::auth::cookie;
use super::extract::ClientAddr;
use super::pages::{self, esc, hidden};
use super::{ApiError, ApiForm, ApiJson, ApiQuery, AppState, Authenticated};
use crate::accounts::{self, Links, PRE_SESSION_CSRF_COOKIE, SESSION_COOKIE};
use crate::error::{AuthFailure, Error};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/account/session", get(session_info))
        .route("/v1/account/signup", post(sign_up))
        .route("/v1/account/signin", post(sign_in))
        .route("/v1/account/signout", post(sign_out))
        .route("/v1/account/signout-everywhere", post(sign_out_everywhere))
        .route("/v1/account/password-reset", post(request_reset))
        .route("/account/signin", get(sign_in_page).post(sign_in_form))
        .route("/account/verify", get(verify_page).post(verify_form))
        .route("/account/reset", get(reset_page).post(reset_form))
}

/// The CSRF token this browser's forms must carry, if it has one.
pub fn expected_csrf(headers: &HeaderMap) -> Option<String> {
    match cookie(headers, SESSION_COOKIE) {
        Some(session) => Some(accounts::csrf_token(&session)),
        None => cookie(headers, PRE_SESSION_CSRF_COOKIE).filter(|v| v.len() == 64),
    }
}

/// The CSRF token for a page, with the cookie to set when the browser had none.
pub fn csrf_for_page(headers: &HeaderMap, state: &AppState) -> (String, Option<HeaderValue>) {
    match expected_csrf(headers) {
        Some(token) => (token, None),
        None => {
            let token = accounts::random_secret();
            let cookie = set_cookie(state, PRE_SESSION_CSRF_COOKIE, &token, None);
            (token, Some(cookie))
        }
    }
}

pub(super) fn check_csrf_header(headers: &HeaderMap) -> Result<(), ApiError> {
    let presented = headers.get("x-csrf-token").and_then(|v| v.to_str().ok());
    Ok(accounts::check_csrf(
        expected_csrf(headers).as_deref(),
        presented,
    )?)
}

/// `Set-Cookie`: HttpOnly, SameSite=Lax, Path=/, Secure behind https; `max_age` in seconds
/// (`Some(0)` deletes; `None` lasts the browser session).
pub fn set_cookie(state: &AppState, name: &str, value: &str, max_age: Option<i64>) -> HeaderValue {
    let mut cookie = format!("{name}={value}; Path=/; HttpOnly; SameSite=Lax");
    if let Some(age) = max_age {
        cookie.push_str(&format!("; Max-Age={age}"));
    }
    if state.secure_cookies() {
        cookie.push_str("; Secure");
    }
    HeaderValue::from_str(&cookie).expect("cookie values are hex")
}

fn links(state: &AppState) -> Links<'_> {
    Links {
        base: &state.public_url,
        mailer: &state.mailer,
    }
}

/// Sign-in attempts count against the failed-authentication limit of the address.
fn check_address(state: &AppState, address: Option<std::net::IpAddr>) -> Result<(), ApiError> {
    if let Some(address) = address {
        state
            .auth_failures
            .check(address, Instant::now())
            .map_err(|retry_after| Error::AuthRateLimited { retry_after })?;
    }
    Ok(())
}

fn record_failure(state: &AppState, address: Option<std::net::IpAddr>, error: &Error) {
    if let (Some(address), Error::Unauthorized(failure)) = (address, error)
        && failure.is_guess()
    {
        state.auth_failures.record(address, Instant::now());
    }
}

/// Signs in and returns the session cookie headers (the new session; the pre-session CSRF
/// cookie deleted).
pub(super) async fn start_session(
    state: &AppState,
    headers: &HeaderMap,
    user_id: uuid::Uuid,
) -> Result<(HeaderMap, String), ApiError> {
    let previous = cookie(headers, SESSION_COOKIE);
    let user_agent = headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok());
    let session =
        accounts::start_session(&state.pool, user_id, previous.as_deref(), user_agent).await?;
    let mut out = HeaderMap::new();
    out.append(
        header::SET_COOKIE,
        set_cookie(
            state,
            SESSION_COOKIE,
            &session.secret,
            Some(accounts::SESSION_DAYS * 86_400),
        ),
    );
    out.append(
        header::SET_COOKIE,
        set_cookie(state, PRE_SESSION_CSRF_COOKIE, "", Some(0)),
    );
    Ok((out, accounts::csrf_token(&session.secret)))
}

async fn session_info(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let (csrf, set) = csrf_for_page(&headers, &state);
    let user = match cookie(&headers, SESSION_COOKIE) {
        Some(session) => accounts::session_caller(&state.pool, &session).await.ok(),
        None => None,
    };
    let email = match &user {
        Some(caller) => accounts::find_user(&state.pool, caller.user_id)
            .await
            .ok()
            .and_then(|u| u.email),
        None => None,
    };
    let body = json!({
        "signed_in": user.is_some(),
        "user_id": user.as_ref().map(|u| u.user_id),
        "email": email,
        "csrf_token": csrf,
    });
    let mut response = axum::Json(body).into_response();
    if let Some(set) = set {
        response.headers_mut().append(header::SET_COOKIE, set);
    }
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

#[derive(Deserialize)]
struct Credentials {
    email: String,
    password: String,
}

/// Requests that send e-mail: 10 per address per 10 minutes.
fn limit_mail(state: &AppState, address: Option<std::net::IpAddr>) -> Result<(), ApiError> {
    if let Some(address) = address {
        let now = Instant::now();
        state
            .oauth_limits
            .mail
            .check(address, now)
            .map_err(|retry_after| Error::RateLimited {
                limit: 10,
                retry_after,
            })?;
        state.oauth_limits.mail.record(address, now);
    }
    Ok(())
}

async fn sign_up(
    State(state): State<AppState>,
    ClientAddr(client): ClientAddr,
    headers: HeaderMap,
    ApiJson(body): ApiJson<Credentials>,
) -> Result<Response, ApiError> {
    check_csrf_header(&headers)?;
    limit_mail(&state, client)?;
    accounts::sign_up(&state.pool, &links(&state), &body.email, &body.password).await?;
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(json!({
            "status": "check_your_mail",
            "message": "If this address can be used, a message is on its way to it: follow its link to continue."
        })),
    )
        .into_response())
}

async fn sign_in(
    State(state): State<AppState>,
    ClientAddr(client): ClientAddr,
    headers: HeaderMap,
    ApiJson(body): ApiJson<Credentials>,
) -> Result<Response, ApiError> {
    check_csrf_header(&headers)?;
    let address = client;
    check_address(&state, address)?;
    let user_id =
        match accounts::sign_in(&state.pool, &links(&state), &body.email, &body.password).await {
            Ok(user_id) => user_id,
            Err(error) => {
                record_failure(&state, address, &error);
                return Err(error.into());
            }
        };
    let (cookies, csrf) = start_session(&state, &headers, user_id).await?;
    Ok((
        cookies,
        axum::Json(json!({ "user_id": user_id, "csrf_token": csrf })),
    )
        .into_response())
}

/// Ends this browser's session (with its CSRF token).
async fn sign_out(State(state): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    check_csrf_header(&headers)?;
    if let Some(session) = cookie(&headers, SESSION_COOKIE) {
        accounts::end_session(&state.pool, &session).await?;
    }
    let mut response = StatusCode::NO_CONTENT.into_response();
    response.headers_mut().append(
        header::SET_COOKIE,
        set_cookie(&state, SESSION_COOKIE, "", Some(0)),
    );
    Ok(response)
}

/// Ends every session of the account (an `account` token or a session with its CSRF token).
async fn sign_out_everywhere(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
) -> Result<Response, ApiError> {
    let ended = accounts::end_all_sessions(&state.pool, caller.user_id).await?;
    let mut response = axum::Json(json!({ "sessions_ended": ended })).into_response();
    response.headers_mut().append(
        header::SET_COOKIE,
        set_cookie(&state, SESSION_COOKIE, "", Some(0)),
    );
    Ok(response)
}

#[derive(Deserialize)]
struct ResetRequest {
    email: String,
}

async fn request_reset(
    State(state): State<AppState>,
    ClientAddr(client): ClientAddr,
    headers: HeaderMap,
    ApiJson(body): ApiJson<ResetRequest>,
) -> Result<Response, ApiError> {
    check_csrf_header(&headers)?;
    limit_mail(&state, client)?;
    accounts::request_password_reset(&state.pool, &links(&state), &body.email).await?;
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(json!({
            "status": "check_your_mail",
            "message": "If this address has an account, a reset link is on its way to it."
        })),
    )
        .into_response())
}

// ---- HTML forms -------------------------------------------------------------------------

fn with_cookie(mut response: Response, set: Option<HeaderValue>) -> Response {
    if let Some(set) = set {
        response.headers_mut().append(header::SET_COOKIE, set);
    }
    response
}

/// Where a sign-in form may send the browser afterwards: a path on this server only.
fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(n)
            if n.starts_with('/')
                && !n.starts_with("//")
                && !n.contains('\\')
                && n.len() <= 4000
                && !n.chars().any(char::is_control) =>
        {
            n.to_string()
        }
        _ => "/".to_string(),
    }
}

#[derive(Deserialize, Default)]
pub struct NextQuery {
    pub next: Option<String>,
}

fn sign_in_form_html(csrf: &str, next: &str, error: Option<&str>) -> String {
    let error = error
        .map(|e| format!(r#"<p id="error" role="alert">{}</p>"#, esc(e)))
        .unwrap_or_default();
    format!(
        r#"{error}<form method="post" action="/account/signin">
{csrf}{next}
<label>E-mail <input name="email" type="email" autocomplete="username" required maxlength="254"></label>
<label>Password <input name="password" type="password" autocomplete="current-password" required maxlength="1024"></label>
<button id="signin-submit" type="submit">Sign in</button>
</form>
<p><a href="/#signup">Create an account</a> · <a href="/#reset">Forgot your password?</a></p>"#,
        csrf = hidden("csrf_token", csrf),
        next = hidden("next", next),
    )
}

async fn sign_in_page(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiQuery(query): ApiQuery<NextQuery>,
) -> Response {
    let (csrf, set) = csrf_for_page(&headers, &state);
    let next = safe_next(query.next.as_deref());
    with_cookie(
        pages::page(
            StatusCode::OK,
            "Sign in",
            &sign_in_form_html(&csrf, &next, None),
        ),
        set,
    )
}

#[derive(Deserialize)]
struct SignInForm {
    email: String,
    password: String,
    csrf_token: Option<String>,
    next: Option<String>,
}

async fn sign_in_form(
    State(state): State<AppState>,
    ClientAddr(client): ClientAddr,
    headers: HeaderMap,
    ApiForm(form): ApiForm<SignInForm>,
) -> Result<Response, ApiError> {
    accounts::check_csrf(
        expected_csrf(&headers).as_deref(),
        form.csrf_token.as_deref(),
    )?;
    let address = client;
    check_address(&state, address)?;
    let next = safe_next(form.next.as_deref());
    match accounts::sign_in(&state.pool, &links(&state), &form.email, &form.password).await {
        Ok(user_id) => {
            let (cookies, _) = start_session(&state, &headers, user_id).await?;
            let mut response = (StatusCode::SEE_OTHER, cookies).into_response();
            response.headers_mut().insert(
                header::LOCATION,
                HeaderValue::from_str(&next).map_err(Error::internal)?,
            );
            Ok(response)
        }
        Err(error @ (Error::Unauthorized(_) | Error::Forbidden { .. } | Error::Invalid(_))) => {
            record_failure(&state, address, &error);
            let status = super::status(&error);
            let message = match &error {
                Error::Unauthorized(AuthFailure::BadCredentials) => {
                    AuthFailure::BadCredentials.message().to_string()
                }
                other => other.public_message(),
            };
            let csrf = form.csrf_token.unwrap_or_default();
            Ok(pages::page(
                status,
                "Sign in",
                &sign_in_form_html(&csrf, &next, Some(&message)),
            ))
        }
        Err(other) => Err(other.into()),
    }
}

#[derive(Deserialize, Default)]
struct TokenQuery {
    token: Option<String>,
}

/// The page a verification link opens: one button (a GET never uses the link, so a mail
/// scanner that follows it changes nothing).
async fn verify_page(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiQuery(query): ApiQuery<TokenQuery>,
) -> Response {
    let (csrf, set) = csrf_for_page(&headers, &state);
    let token = query.token.unwrap_or_default();
    let body = format!(
        r#"<p>Confirm that this e-mail address is yours.</p>
<form method="post" action="/account/verify">{}{}
<button id="verify-submit" type="submit">Confirm my address</button></form>"#,
        hidden("csrf_token", &csrf),
        hidden("token", &token)
    );
    with_cookie(
        pages::page(StatusCode::OK, "Confirm your e-mail", &body),
        set,
    )
}

#[derive(Deserialize)]
struct LinkForm {
    token: String,
    csrf_token: Option<String>,
    password: Option<String>,
    password_again: Option<String>,
}

async fn verify_form(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiForm(form): ApiForm<LinkForm>,
) -> Result<Response, ApiError> {
    accounts::check_csrf(
        expected_csrf(&headers).as_deref(),
        form.csrf_token.as_deref(),
    )?;
    match accounts::verify_email(&state.pool, &form.token).await {
        Ok(_) => Ok(pages::page(
            StatusCode::OK,
            "Address confirmed",
            r#"<p id="done">Your e-mail address is confirmed. <a href="/account/signin">Sign in</a>.</p>"#,
        )),
        Err(Error::Invalid(message)) => Ok(pages::error_page(
            StatusCode::BAD_REQUEST,
            "Link not valid",
            &message,
        )),
        Err(other) => Err(other.into()),
    }
}

fn reset_form_html(csrf: &str, token: &str, error: Option<&str>) -> String {
    let error = error
        .map(|e| format!(r#"<p id="error" role="alert">{}</p>"#, esc(e)))
        .unwrap_or_default();
    format!(
        r#"{error}<form method="post" action="/account/reset">{}{}
<label>New password <input name="password" type="password" autocomplete="new-password" required minlength="10" maxlength="1024"></label>
<label>Repeat it <input name="password_again" type="password" autocomplete="new-password" required maxlength="1024"></label>
<button id="reset-submit" type="submit">Set the new password</button></form>"#,
        hidden("csrf_token", csrf),
        hidden("token", token)
    )
}

async fn reset_page(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiQuery(query): ApiQuery<TokenQuery>,
) -> Response {
    let (csrf, set) = csrf_for_page(&headers, &state);
    let token = query.token.unwrap_or_default();
    with_cookie(
        pages::page(
            StatusCode::OK,
            "Choose a new password",
            &reset_form_html(&csrf, &token, None),
        ),
        set,
    )
}

async fn reset_form(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiForm(form): ApiForm<LinkForm>,
) -> Result<Response, ApiError> {
    let csrf = expected_csrf(&headers);
    accounts::check_csrf(csrf.as_deref(), form.csrf_token.as_deref())?;
    let password = form.password.unwrap_or_default();
    let again = form.password_again.unwrap_or_default();
    let csrf = csrf.unwrap_or_default();
    if password != again {
        return Ok(pages::page(
            StatusCode::BAD_REQUEST,
            "Choose a new password",
            &reset_form_html(&csrf, &form.token, Some("the two passwords differ")),
        ));
    }
    match accounts::reset_password(&state.pool, &form.token, &password).await {
        Ok(_) => Ok(pages::page(
            StatusCode::OK,
            "Password changed",
            r#"<p id="done">Your password is changed, and every session was signed out. <a href="/account/signin">Sign in</a>.</p>"#,
        )),
        Err(Error::Invalid(message)) => Ok(pages::page(
            StatusCode::BAD_REQUEST,
            "Choose a new password",
            &reset_form_html(&csrf, &form.token, Some(&message)),
        )),
        Err(other) => Err(other.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::safe_next;

    #[test]
    fn next_stays_on_this_server() {
        assert_eq!(
            safe_next(Some("/oauth/authorize?a=b")),
            "/oauth/authorize?a=b"
        );
        for bad in ["//evil.example", "https://evil.example", "/\\evil", "evil"] {
            assert_eq!(safe_next(Some(bad)), "/", "{bad}");
        }
        assert_eq!(safe_next(None), "/");
    }
}
