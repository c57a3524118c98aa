//! `ApiError`: how a domain error becomes an HTTP response (`{"error": {"code", "message"}}`).

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::error::Error;

#[derive(Debug)]
pub struct ApiError(pub Error);

impl From<Error> for ApiError {
    fn from(error: Error) -> Self {
        ApiError(error)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = match &self.0 {
            Error::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
            Error::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
            Error::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            Error::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            Error::Unauthorized(failure) => (StatusCode::UNAUTHORIZED, failure.code()),
            Error::RateLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            Error::QuotaExceeded(_) => (StatusCode::PAYMENT_REQUIRED, "quota_exceeded"),
            Error::Upstream(_) => (StatusCode::BAD_GATEWAY, "upstream_failed"),
            Error::Database(error) => {
                tracing::error!(%error, "database error");
                (StatusCode::SERVICE_UNAVAILABLE, "database_unavailable")
            }
        };
        let message = match &self.0 {
            // Never echo driver details to clients.
            Error::Database(_) => "the database is unavailable; try again".to_string(),
            other => other.to_string(),
        };
        let mut response = (
            status,
            Json(json!({ "error": { "code": code, "message": message } })),
        )
            .into_response();
        if let Error::RateLimited { retry_after, .. } = &self.0 {
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from(retry_after.as_secs()),
            );
        }
        if let Error::Unauthorized(failure) = &self.0 {
            // RFC 6750 §3: no error attribute when the request carried no credentials.
            let challenge = match failure {
                crate::error::AuthFailure::Missing => r#"Bearer realm="polydev""#.to_string(),
                other => format!(
                    r#"Bearer realm="polydev", error="invalid_token", error_description="{}""#,
                    other.message().replace('`', "")
                ),
            };
            if let Ok(value) = HeaderValue::from_str(&challenge) {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, value);
            }
        }
        response
    }
}

/// Malformed or oversized JSON bodies get the same JSON error shape as everything else.
impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        let message = rejection.body_text();
        ApiError(if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Error::TooLarge(message)
        } else {
            Error::Invalid(message)
        })
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        ApiError(Error::Invalid(rejection.body_text()))
    }
}

pub async fn not_found() -> ApiError {
    ApiError(Error::NotFound("route"))
}
