//! Extractors that reject with [`ApiError`], so a malformed body, query or path gets the same
//! JSON error shape as everything else, and handlers take `ApiJson(body)` instead of spelling
//! out `Result<Json<T>, JsonRejection>`.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use serde::de::DeserializeOwned;

use super::ApiError;
use crate::error::Error;

/// A JSON body. Refuses a NUL character anywhere in it (PostgreSQL text cannot hold one), so
/// no route can reach the database with one.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        if !is_json(request.headers()) {
            return Err(ApiError(Error::Invalid(
                "expected a JSON body with `Content-Type: application/json`".into(),
            )));
        }
        let bytes = Bytes::from_request(request, state).await.map_err(|e| {
            ApiError(if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                Error::TooLarge(e.body_text())
            } else {
                Error::Invalid(e.body_text())
            })
        })?;
        if has_nul_escape(&bytes) {
            return Err(ApiError(Error::Invalid(
                "the body contains a NUL character (\\u0000), which cannot be stored".into(),
            )));
        }
        let value = serde_json::from_slice(&bytes)
            .map_err(|e| ApiError(Error::Invalid(format!("the JSON body is not valid: {e}"))))?;
        Ok(ApiJson(value))
    }
}

fn is_json(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|mime| {
            let mime = mime.trim().to_ascii_lowercase();
            mime == "application/json"
                || (mime.starts_with("application/") && mime.ends_with("+json"))
        })
        .unwrap_or(false)
}

/// True when a JSON text holds `\u0000`. JSON can carry NUL only as that escape (raw control
/// characters are invalid), and an escaped backslash before `u0000` is not one.
fn has_nul_escape(json: &[u8]) -> bool {
    let mut i = 0;
    while i < json.len() {
        if json[i] == b'\\' {
            if json[i + 1..].starts_with(b"u0000") {
                return true;
            }
            i += 2; // skip the escaped character, whatever it is
        } else {
            i += 1;
        }
    }
    false
}

/// An `application/x-www-form-urlencoded` body (HTML forms, the OAuth token endpoint).
/// Refuses a NUL character (`%00`) anywhere in it.
pub struct ApiForm<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiForm<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let is_form = request
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|m| {
                m.trim()
                    .eq_ignore_ascii_case("application/x-www-form-urlencoded")
            });
        if !is_form {
            return Err(ApiError(Error::Invalid(
                "expected a form body with `Content-Type: application/x-www-form-urlencoded`"
                    .into(),
            )));
        }
        let bytes = Bytes::from_request(request, state).await.map_err(|e| {
            ApiError(if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                Error::TooLarge(e.body_text())
            } else {
                Error::Invalid(e.body_text())
            })
        })?;
        if bytes.windows(3).any(|w| w == b"%00") || bytes.contains(&0) {
            return Err(ApiError(Error::Invalid(
                "the form contains a NUL character (%00), which cannot be stored".into(),
            )));
        }
        let value = serde_urlencoded::from_bytes(&bytes)
            .map_err(|e| ApiError(Error::Invalid(format!("the form is not valid: {e}"))))?;
        Ok(ApiForm(value))
    }
}

/// The client's address (the TCP peer), when the server knows it.
pub struct ClientAddr(pub Option<std::net::IpAddr>);

impl<S: Send + Sync> FromRequestParts<S> for ClientAddr {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(ClientAddr(
            parts
                .extensions
                .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
                .map(|info| info.0.ip()),
        ))
    }
}

/// A query string.
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        if parts.uri.query().is_some_and(|q| q.contains("%00")) {
            return Err(ApiError(Error::Invalid(
                "the query string contains a NUL character (%00)".into(),
            )));
        }
        let Query(value) = Query::<T>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError(Error::Invalid(e.body_text())))?;
        Ok(ApiQuery(value))
    }
}

/// Path parameters.
pub struct ApiPath<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(value) = Path::<T>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError(Error::Invalid(e.body_text())))?;
        Ok(ApiPath(value))
    }
}

#[cfg(test)]
mod tests {
    use super::has_nul_escape;

    #[test]
    fn nul_escapes_are_found_and_escaped_backslashes_are_not() {
        assert!(has_nul_escape(br#"{"a":"x\u0000y"}"#));
        assert!(has_nul_escape(br#"{"a\u0000":1}"#));
        assert!(!has_nul_escape(br#"{"a":"x\\u0000y"}"#));
        assert!(has_nul_escape(br#"{"a":"x\\\u0000y"}"#));
        assert!(has_nul_escape(br#"{"a":"\u00001"}"#));
        assert!(!has_nul_escape(br#"{"a":"\u0001"}"#));
        assert!(!has_nul_escape(br#"{"a":"trailing\"#));
    }
}
