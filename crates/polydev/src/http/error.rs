//! `ApiError`: how a domain error becomes an HTTP response (`{"error": {"code", "message"}}`,
//! the [`ErrorResponse`](crate::api::ErrorResponse) every client reads).

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::api::ErrorResponse;
use crate::error::{AuthFailure, Error, OAuthCode};

#[derive(Debug)]
pub struct ApiError(pub Error);

impl From<Error> for ApiError {
    fn from(error: Error) -> Self {
        ApiError(error)
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(error: sqlx::Error) -> Self {
        ApiError(error.into())
    }
}

/// The status of each error variant (docs/architecture.md lists them).
pub fn status(error: &Error) -> StatusCode {
    match error {
        Error::Invalid(_) => StatusCode::BAD_REQUEST,
        Error::OAuth { code, .. } => match code {
            OAuthCode::InvalidClient | OAuthCode::InvalidToken => StatusCode::UNAUTHORIZED,
            _ => StatusCode::BAD_REQUEST,
        },
        Error::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
        Error::NotFound(_) => StatusCode::NOT_FOUND,
        Error::Conflict(_) => StatusCode::CONFLICT,
        Error::Unauthorized(_) => StatusCode::UNAUTHORIZED,
        Error::InsufficientScope { .. } | Error::OriginNotAllowed(_) | Error::Forbidden { .. } => {
            StatusCode::FORBIDDEN
        }
        Error::AuthRateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
        Error::ZkProof(_) => StatusCode::FORBIDDEN,
        Error::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
        Error::QuotaExceeded(_) => StatusCode::PAYMENT_REQUIRED,
        // Like `not_configured`: what is missing is configuration, not payment (402) and not a
        // passing condition (503, which clients retry); see docs/api.md.
        Error::NoProviderConfigured(_) => StatusCode::NOT_IMPLEMENTED,
        Error::InProgress { .. } => StatusCode::CONFLICT,
        Error::NotConfigured(_) => StatusCode::NOT_IMPLEMENTED,
        Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        Error::Unavailable(_) | Error::RuntimeUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        Error::Proxy { .. } => StatusCode::SERVICE_UNAVAILABLE,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let error = self.0;
        error.log();
        let mut response = (status(&error), Json(ErrorResponse::from(&error))).into_response();
        let headers = response.headers_mut();
        match &error {
            Error::RateLimited { retry_after, .. }
            | Error::AuthRateLimited { retry_after }
            | Error::InProgress { retry_after } => {
                headers.insert(
                    header::RETRY_AFTER,
                    HeaderValue::from(retry_after.as_secs()),
                );
            }
            // Sign-in and web-session failures are not bearer-token challenges.
            Error::Unauthorized(AuthFailure::BadCredentials | AuthFailure::SessionInvalid) => {}
            Error::Unauthorized(failure) => {
                // RFC 6750 §3: no error attribute when the request carried no credentials.
                let challenge = match failure {
                    AuthFailure::Missing => r#"Bearer realm="polydev""#.to_string(),
                    other => format!(
                        r#"Bearer realm="polydev", error="invalid_token", error_description="{}""#,
                        other.message().replace('`', "")
                    ),
                };
                if let Ok(value) = HeaderValue::from_str(&challenge) {
                    headers.insert(header::WWW_AUTHENTICATE, value);
                }
            }
            Error::InsufficientScope { required, .. } => {
                // RFC 6750 §3.1: the scope the resource needs.
                let challenge = format!(
                    r#"Bearer realm="polydev", error="insufficient_scope", scope="{required}""#
                );
                if let Ok(value) = HeaderValue::from_str(&challenge) {
                    headers.insert(header::WWW_AUTHENTICATE, value);
                }
            }
            _ => {}
        }
        response
    }
}

pub async fn not_found() -> ApiError {
    ApiError(Error::NotFound("route"))
}
