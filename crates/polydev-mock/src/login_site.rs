//! A fake provider sign-in site for the login sessions' tests: the OAuth authorization page a
//! provider CLI's `login` sends the user to, and the token endpoint the CLI then calls.
//!
//! - `GET /oauth/authorize?client_id&redirect_uri&state`: an HTML form (e-mail `#email`,
//!   password `#password`, button `#sign-in` at a fixed place: x 40–280, y 420–476 CSS px). `redirect_uri` must be a loopback
//!   `http://127.0.0.1:<port>/…` address, as for real CLI logins.
//! - `POST /oauth/authorize` (form): right e-mail and password → `302` to
//!   `redirect_uri?code=…&state=…`; wrong ones → the form again with an error (`401`).
//! - `POST /oauth/token` (JSON `{"code"}`): a code issued once → `{access_token,
//!   refresh_token}`; a used or unknown code → `400 invalid_grant`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::{Form, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};

/// A running fake sign-in site.
pub struct MockLoginSite {
    addr: SocketAddr,
    state: Arc<SiteState>,
    _task: tokio::task::JoinHandle<()>,
}

struct SiteState {
    email: String,
    password: String,
    /// Issued codes not yet exchanged.
    codes: Mutex<HashMap<String, ()>>,
    /// Access tokens handed out, in order.
    tokens: Mutex<Vec<String>>,
    failed_sign_ins: Mutex<u32>,
}

impl MockLoginSite {
    /// Starts on a free loopback port; `email` and `password` are the only right ones.
    pub async fn start(email: &str, password: &str) -> MockLoginSite {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind login site");
        let addr = listener.local_addr().expect("local addr");
        let state = Arc::new(SiteState {
            email: email.into(),
            password: password.into(),
            codes: Mutex::default(),
            tokens: Mutex::default(),
            failed_sign_ins: Mutex::new(0),
        });
        let app = Router::new()
            .route("/oauth/authorize", get(form).post(sign_in))
            .route("/oauth/token", post(token))
            .with_state(state.clone());
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("login site");
        });
        MockLoginSite {
            addr,
            state,
            _task: task,
        }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The access tokens issued so far (what a CLI's credential file should hold).
    pub fn issued_tokens(&self) -> Vec<String> {
        self.state.tokens.lock().unwrap().clone()
    }

    pub fn failed_sign_ins(&self) -> u32 {
        *self.state.failed_sign_ins.lock().unwrap()
    }
}

fn random_hex() -> String {
    use std::hash::{BuildHasher, Hasher};
    // Test data only: unique per call, not a secret.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    format!("{:016x}", h.finish())
}

fn loopback_redirect(uri: &str) -> bool {
    uri.strip_prefix("http://127.0.0.1:")
        .and_then(|rest| rest.split('/').next())
        .is_some_and(|port| port.parse::<u16>().is_ok())
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn page(redirect_uri: &str, state: &str, error: Option<&str>) -> Html<String> {
    let error = error
        .map(|e| format!(r#"<p id="error" style="color:#b00">{}</p>"#, escape(e)))
        .unwrap_or_default();
    Html(format!(
        r#"<!doctype html><html><head><meta charset="utf-8"><title>Fake provider · sign in</title>
<style>body{{font:18px sans-serif;margin:40px}}input{{font-size:18px;display:block;margin:8px 0 16px;width:320px}}
#sign-in{{position:absolute;left:40px;top:420px;width:240px;height:56px;font-size:18px}}</style></head>
<body><h1>Sign in to Fake Provider</h1>{error}
<form method="post" action="/oauth/authorize">
<input type="hidden" name="redirect_uri" value="{}"><input type="hidden" name="state" value="{}">
<label>E-mail<input id="email" name="email" type="email" autofocus></label>
<label>Password<input id="password" name="password" type="password"></label>
<button id="sign-in" type="submit">Sign in</button>
</form></body></html>"#,
        escape(redirect_uri),
        escape(state)
    ))
}

async fn form(Query(q): Query<HashMap<String, String>>) -> Response {
    let redirect_uri = q
        .get("redirect_uri")
        .map(String::as_str)
        .unwrap_or_default();
    if !loopback_redirect(redirect_uri) {
        return (
            StatusCode::BAD_REQUEST,
            "redirect_uri must be a loopback address",
        )
            .into_response();
    }
    page(
        redirect_uri,
        q.get("state").map(String::as_str).unwrap_or_default(),
        None,
    )
    .into_response()
}

async fn sign_in(
    State(site): State<Arc<SiteState>>,
    Form(f): Form<HashMap<String, String>>,
) -> Response {
    let get = |k: &str| f.get(k).map(String::as_str).unwrap_or_default();
    let (redirect_uri, state) = (get("redirect_uri"), get("state"));
    if !loopback_redirect(redirect_uri) {
        return (
            StatusCode::BAD_REQUEST,
            "redirect_uri must be a loopback address",
        )
            .into_response();
    }
    if get("email") != site.email || get("password") != site.password {
        *site.failed_sign_ins.lock().unwrap() += 1;
        return (
            StatusCode::UNAUTHORIZED,
            page(redirect_uri, state, Some("Wrong e-mail or password")),
        )
            .into_response();
    }
    let code = random_hex();
    site.codes.lock().unwrap().insert(code.clone(), ());
    let location = format!(
        "{redirect_uri}?code={code}&state={}",
        state.replace(
            |c: char| !c.is_ascii_alphanumeric() && c != '-' && c != '_',
            ""
        )
    );
    (StatusCode::FOUND, [(header::LOCATION, location)]).into_response()
}

async fn token(State(site): State<Arc<SiteState>>, Json(body): Json<Value>) -> Response {
    let code = body.get("code").and_then(Value::as_str).unwrap_or_default();
    if site.codes.lock().unwrap().remove(code).is_none() {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "invalid_grant"})),
        )
            .into_response();
    }
    let access = format!("fake-access-{}", random_hex());
    site.tokens.lock().unwrap().push(access.clone());
    Json(json!({
        "access_token": access,
        "refresh_token": format!("fake-refresh-{}", random_hex()),
        "token_type": "Bearer",
        "expires_in": 3600,
    }))
    .into_response()
}
