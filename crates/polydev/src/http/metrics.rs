//! `GET /metrics`: the Prometheus exposition of every series in `crate::telemetry`
//! (docs/operations.md, "Metrics"), open or behind `serve --metrics-token`.

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, header};
use axum::response::IntoResponse;
use axum::routing::get;
use subtle::ConstantTimeEq;

use super::ApiError;
use crate::app::AppState;
use crate::error::{AuthFailure, Error};
use crate::telemetry;

pub fn routes() -> Router<AppState> {
    Router::new().route("/metrics", get(metrics))
}

/// The exposition format's content type (text format 0.0.4).
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

async fn metrics(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<impl IntoResponse, ApiError> {
    if let Some(expected) = &state.metrics_token {
        check_token(&headers, expected)?;
    }
    sample(&state).await;
    Ok(([(header::CONTENT_TYPE, CONTENT_TYPE)], telemetry::render()))
}

/// `Authorization: Bearer <token>` equal to `expected`, compared in constant time.
fn check_token(headers: &HeaderMap, expected: &str) -> Result<(), Error> {
    let given = headers
        .get(header::AUTHORIZATION)
        .ok_or(Error::Unauthorized(AuthFailure::Missing))?
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or(Error::Unauthorized(AuthFailure::Unknown))?;
    // Equal lengths first (that reveals only the length), then every byte.
    let equal =
        given.len() == expected.len() && bool::from(given.as_bytes().ct_eq(expected.as_bytes()));
    if equal {
        Ok(())
    } else {
        Err(Error::Unauthorized(AuthFailure::Unknown))
    }
}

/// The gauges read at scrape time: connection pools, runtime containers.
async fn sample(state: &AppState) {
    for (name, pool) in [("durable", &state.pool), ("relaxed", &state.relaxed_pool)] {
        telemetry::db_pool(
            name,
            pool.size(),
            pool.num_idle(),
            pool.options().get_max_connections(),
        );
    }
    if let Some(runtime) = &state.runtime {
        match runtime.counts_by_state().await {
            Ok(counts) => {
                for (provider, state, count) in counts {
                    telemetry::runtime_containers(provider, state, count);
                }
            }
            // The page still answers: a scrape must not fail with the database.
            Err(error) => tracing::warn!(%error, "runtime containers not sampled"),
        }
    }
}
