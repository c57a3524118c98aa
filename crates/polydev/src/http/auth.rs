//! Authentication and scopes, in one place. Every authenticated route takes `Authorization:
//! Bearer pd_...` through [`Authenticated`] (REST) or the `/mcp` middleware; both call
//! [`authenticate`], which also decides the scope a route needs from [`MCP_ROUTES`].
//!
//! The `mcp` scope is an allow-list: a route not listed there needs an `account` token, so a
//! new route is closed to the token in an IDE's configuration until someone decides otherwise
//! (and `tests/it/scopes.rs` checks this list against the table in docs/api.md).

use std::net::SocketAddr;
use std::time::Instant;

use axum::extract::{ConnectInfo, FromRequestParts, MatchedPath};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, header};

use super::{ApiError, AppState};
use crate::accounts::{self, Caller, Scope};
use crate::error::{AuthFailure, Error};
use crate::quota;

/// The routes (method, path as routed) that an `mcp` token may call. `/mcp` itself is
/// checked by its middleware with [`Scope::Mcp`]; `GET /v1/models` and the health routes need
/// no token at all.
pub const MCP_ROUTES: &[(&str, &str)] = &[
    ("GET", "/v1/me"),
    ("POST", "/v1/perspectives"),
    ("GET", "/v1/usage"),
    ("GET", "/v1/settings"),
    ("GET", "/v1/chat/sessions"),
    ("POST", "/v1/chat/sessions"),
    ("GET", "/v1/chat/sessions/{id}/messages"),
    ("POST", "/v1/chat/sessions/{id}/messages"),
    ("GET", "/v1/zk"),
    ("GET", "/v1/zk/migration"),
    ("GET", "/v1/zk/migration/plaintext"),
    ("POST", "/v1/zk/migration/encrypted"),
    ("GET", "/v1/zk/migration/unverified"),
    ("POST", "/v1/chat/completions"),
];

/// The scope a route needs: `mcp` for the routes of [`MCP_ROUTES`], `account` for every other
/// (including a request whose route is unknown).
pub fn required_scope(method: &Method, route: Option<&str>) -> Scope {
    // HEAD is served by the GET handler.
    let method = if method == Method::HEAD {
        "GET"
    } else {
        method.as_str()
    };
    match route {
        Some(route) if MCP_ROUTES.contains(&(method, route)) => Scope::Mcp,
        _ => Scope::Account,
    }
}

/// The caller of a REST handler, with a token whose scope covers the route.
pub struct Authenticated(pub Caller);

impl FromRequestParts<AppState> for Authenticated {
    type Rejection = ApiError;

    /// A bearer token, or (on these REST routes, never on `/mcp`) the browser's session
    /// cookie, which acts with the `account` scope and needs the CSRF token on every request
    /// that may change something.
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let route = parts
            .extensions
            .get::<MatchedPath>()
            .map(MatchedPath::as_str);
        let needed = required_scope(&parts.method, route);
        let session = cookie(&parts.headers, accounts::SESSION_COOKIE);
        if let (None, Some(session)) = (parts.headers.get(AUTHORIZATION), session) {
            return Ok(Authenticated(
                authenticate_session(parts, state, needed, &session).await?,
            ));
        }
        Ok(Authenticated(authenticate(parts, state, needed).await?))
    }
}

/// The value of cookie `name`, if the request has it.
pub fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim().to_string())
}

/// True for methods that change nothing (no CSRF token needed).
pub fn is_safe_method(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// The session-cookie path of [`Authenticated`]: the same address limit, rate limits and scope
/// check as a token; plus the CSRF token (header `X-CSRF-Token`) on unsafe methods.
async fn authenticate_session(
    parts: &Parts,
    state: &AppState,
    needed: Scope,
    session: &str,
) -> Result<Caller, ApiError> {
    let address = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|info| info.0.ip());
    if let Some(address) = address {
        state
            .auth_failures
            .check(address, Instant::now())
            .map_err(|retry_after| Error::AuthRateLimited { retry_after })?;
    }
    let caller = match accounts::session_caller(&state.pool, session).await {
        Ok(caller) => caller,
        Err(Error::Unauthorized(failure)) => {
            if let Some(address) = address
                && failure.is_guess()
            {
                state.auth_failures.record(address, Instant::now());
            }
            return Err(Error::Unauthorized(failure).into());
        }
        Err(other) => return Err(other.into()),
    };
    if !is_safe_method(&parts.method) {
        let presented = parts
            .headers
            .get("x-csrf-token")
            .and_then(|v| v.to_str().ok());
        accounts::check_csrf(Some(&accounts::csrf_token(session)), presented)?;
    }
    tracing::Span::current().record("user", tracing::field::display(caller.user_id));
    accounts::check_rate_limit(&state.relaxed_pool, &caller).await?;
    if !caller.scope.includes(needed) {
        return Err(Error::InsufficientScope {
            required: needed.as_str(),
            held: caller.scope.as_str(),
        }
        .into());
    }
    Ok(caller)
}

/// Authenticates a request and checks that its token's scope includes `needed`:
/// 1. a client address over its failed authentications is refused (429) before the database
///    is asked;
/// 2. the token is looked up (401 with the reason; malformed and unknown tokens count against
///    the address);
/// 3. the request counts against the token's and the user's rate limits (429);
/// 4. the scope is checked (403 `insufficient_scope`).
pub async fn authenticate(
    parts: &Parts,
    state: &AppState,
    needed: Scope,
) -> Result<Caller, ApiError> {
    Ok(authenticate_counting(parts, state, needed, false).await?.0)
}

/// [`authenticate`]; with `defer`, a request whose scope covers the route is not counted
/// against its rate limits here: the count is returned for the handler to run.
async fn authenticate_counting(
    parts: &Parts,
    state: &AppState,
    needed: Scope,
    defer: bool,
) -> Result<(Caller, Option<quota::CountRequest>), ApiError> {
    let address = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|info| info.0.ip());
    if let Some(address) = address {
        state
            .auth_failures
            .check(address, Instant::now())
            .map_err(|retry_after| Error::AuthRateLimited { retry_after })?;
    }
    let header = parts
        .headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let caller = match accounts::authenticate_cached(&state.pool, &state.token_cache, header).await
    {
        Ok(caller) => caller,
        Err(Error::Unauthorized(failure)) => {
            if let Some(address) = address
                && failure.is_guess()
            {
                state.auth_failures.record(address, Instant::now());
            }
            return Err(Error::Unauthorized(failure).into());
        }
        Err(other) => return Err(other.into()),
    };
    // An OAuth access token is good only for the resource it was issued for (RFC 8707).
    if let Some(audience) = &caller.audience
        && !state.oauth().is_own_resource(audience)
    {
        return Err(Error::Unauthorized(AuthFailure::WrongAudience).into());
    }
    tracing::Span::current().record("user", tracing::field::display(caller.user_id));
    let deferred = defer && caller.scope.includes(needed);
    if !deferred {
        accounts::check_rate_limit(&state.relaxed_pool, &caller).await?;
    }
    if !caller.scope.includes(needed) {
        return Err(Error::InsufficientScope {
            required: needed.as_str(),
            held: caller.scope.as_str(),
        }
        .into());
    }
    state.last_used.touch(&state.relaxed_pool, caller.token_id);
    let count = deferred.then(|| accounts::count_request_of(&caller));
    Ok((caller, count))
}

/// The caller of a REST handler that counts the request against its rate limits itself, in
/// the statement that reserves its quota (`perspectives::get_perspectives_counting`): the
/// second field is that pending count, `None` when it was counted already (a browser session,
/// or a token whose scope does not cover the route: then the request is refused, after being
/// counted, like any other).
pub struct AuthenticatedUncounted(pub Caller, pub Option<quota::CountRequest>);

impl FromRequestParts<AppState> for AuthenticatedUncounted {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        if parts.headers.get(AUTHORIZATION).is_none() {
            let Authenticated(caller) = Authenticated::from_request_parts(parts, state).await?;
            return Ok(AuthenticatedUncounted(caller, None));
        }
        let route = parts
            .extensions
            .get::<MatchedPath>()
            .map(MatchedPath::as_str);
        let needed = required_scope(&parts.method, route);
        let (caller, count) = authenticate_counting(parts, state, needed, true).await?;
        Ok(AuthenticatedUncounted(caller, count))
    }
}

/// `Origin`, when a request carries one, must be the server's own (the scheme-less authority
/// equals the request's `Host`, itself one of the allowed hosts) or one of `allowed`
/// (`scheme://host[:port]`, compared with default ports filled in).
pub fn check_origin(
    headers: &HeaderMap,
    allowed_hosts: &[String],
    allowed: &[String],
) -> Result<(), ApiError> {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    let refused = |shown: &str| {
        ApiError(Error::OriginNotAllowed(format!(
            "requests from the origin `{}` are not accepted here (see --allowed-origins)",
            shown.chars().take(100).collect::<String>()
        )))
    };
    let shown = origin.to_str().unwrap_or("(not text)");
    let Some(origin_tuple) = origin.to_str().ok().and_then(parse_origin) else {
        return Err(refused(shown));
    };
    if allowed
        .iter()
        .filter_map(|a| parse_origin(a))
        .any(|a| a == origin_tuple)
    {
        return Ok(());
    }
    // Same origin: the browser page was served by this host (any scheme: TLS may end at a
    // proxy in front of the server).
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.parse::<axum::http::uri::Authority>().ok());
    if let Some(host) = host {
        let (_, origin_host, origin_port) = &origin_tuple;
        let host_name = normalize_host(host.host());
        let same_port = match host.port_u16() {
            Some(port) => *origin_port == port,
            // No port in Host: the client used its scheme's default, and so did the page.
            None => default_port_of(&origin_tuple),
        };
        let host_allowed =
            allowed_hosts.is_empty() || allowed_hosts.iter().any(|h| host_name_of(h) == host_name);
        if *origin_host == host_name && same_port && host_allowed {
            return Ok(());
        }
    }
    Err(refused(shown))
}

/// (scheme, host, port) of an origin such as `https://app.example.com` or
/// `http://127.0.0.1:8080`; the port is the scheme's default when absent.
fn parse_origin(value: &str) -> Option<(String, String, u16)> {
    let uri: axum::http::Uri = value.trim().trim_end_matches('/').parse().ok()?;
    let scheme = uri.scheme_str()?.to_ascii_lowercase();
    let authority = uri.authority()?;
    let port = authority.port_u16().or(match scheme.as_str() {
        "http" => Some(80),
        "https" => Some(443),
        _ => None,
    })?;
    if uri.path() != "/" && !uri.path().is_empty() {
        return None;
    }
    Some((scheme, normalize_host(authority.host()), port))
}

fn default_port_of((scheme, _, port): &(String, String, u16)) -> bool {
    matches!((scheme.as_str(), port), ("http", 80) | ("https", 443))
}

/// The host name of an `--allowed-hosts` entry (`name`, `name:port`, `::1`, `[::1]:port`).
fn host_name_of(entry: &str) -> String {
    let entry = entry.trim();
    if entry.matches(':').count() > 1 && !entry.starts_with('[') {
        return normalize_host(entry); // a bare IPv6 address
    }
    match entry.parse::<axum::http::uri::Authority>() {
        Ok(authority) => normalize_host(authority.host()),
        Err(_) => normalize_host(entry),
    }
}

fn normalize_host(host: &str) -> String {
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_listed_routes_are_open_to_mcp_tokens() {
        assert_eq!(required_scope(&Method::GET, Some("/v1/me")), Scope::Mcp);
        assert_eq!(required_scope(&Method::HEAD, Some("/v1/me")), Scope::Mcp);
        assert_eq!(
            required_scope(&Method::PUT, Some("/v1/settings")),
            Scope::Account
        );
        assert_eq!(
            required_scope(&Method::GET, Some("/v1/tokens")),
            Scope::Account
        );
        assert_eq!(required_scope(&Method::GET, None), Scope::Account);
    }

    fn headers(host: &str, origin: Option<&str>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, host.parse().unwrap());
        if let Some(origin) = origin {
            headers.insert(header::ORIGIN, origin.parse().unwrap());
        }
        headers
    }

    #[test]
    fn origins_are_the_servers_own_or_listed() {
        let hosts = vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
            "::1".to_string(),
        ];
        let listed = vec!["https://app.example.com".to_string()];
        let ok = |host: &str, origin: Option<&str>| {
            check_origin(&headers(host, origin), &hosts, &listed).is_ok()
        };
        assert!(ok("127.0.0.1:8080", None));
        assert!(ok("127.0.0.1:8080", Some("http://127.0.0.1:8080")));
        assert!(ok("localhost:8080", Some("https://LOCALHOST:8080")));
        assert!(ok("localhost", Some("http://localhost")));
        assert!(ok("127.0.0.1:8080", Some("https://app.example.com")));
        assert!(ok("127.0.0.1:8080", Some("https://app.example.com:443")));
        assert!(!ok("127.0.0.1:8080", Some("http://127.0.0.1:3000")));
        assert!(!ok("127.0.0.1:8080", Some("http://localhost:8080")));
        assert!(!ok("127.0.0.1:8080", Some("https://evil.example")));
        assert!(!ok("127.0.0.1:8080", Some("http://app.example.com")));
        assert!(!ok("127.0.0.1:8080", Some("null")));
        assert!(!ok("evil.example:8080", Some("http://evil.example:8080")));
        assert!(!ok("localhost", Some("http://localhost:8080")));
        assert!(ok("[::1]:8080", Some("http://[::1]:8080")));
    }
}
