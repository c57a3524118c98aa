//! The `Authenticated` extractor: every authenticated route takes `Authorization: Bearer pd_...`.

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;

use super::{ApiError, AppState};
use crate::accounts::{self, Caller};

pub struct Authenticated(pub Caller);

impl FromRequestParts<AppState> for Authenticated {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let header = parts
            .headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let caller = accounts::authenticate(&state.pool, header).await?;
        accounts::check_rate_limit(
            &state.relaxed_pool,
            caller.token_id,
            caller.rate_limit_tier.as_deref(),
        )
        .await?;
        state.last_used.touch(&state.relaxed_pool, caller.token_id);
        tracing::Span::current().record("user", tracing::field::display(caller.user_id));
        Ok(Authenticated(caller))
    }
}
