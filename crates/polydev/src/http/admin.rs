//! The admin console: `/v1/admin/…` (JSON) and the page at `/admin` (docs/admin.md).
//!
//! **Who may call.** An admin is a user whose `profiles.is_admin` is true and whose account is
//! active. Admin routes take only a signed-in **web session** (cookie + CSRF on changes): a
//! `pd_` token, even an `account` token of an admin, gets `403 admin_session_required`. Tokens
//! are long-lived and sit in config files (the first thing a thief takes); admin power needs an
//! interactive sign-in, and operators on the server host have `polydev admin`. Every other
//! signed-in user gets `403 admin_required`; no credentials, `401`.

use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde_json::{Value, json};
use uuid::Uuid;

use super::{ApiError, ApiJson, ApiPath, ApiQuery, Authenticated};
use crate::accounts::Via;
use crate::admin::{self, Actor};
use crate::api::{
    AdminAuditQuery, AdminGrant, AdminSetAdmin, AdminSetPlan, AdminSetRateTier, AdminSetStatus,
    AdminUsageQuery, AdminUserQuery,
};
use crate::app::AppState;
use crate::error::Error;

/// Every admin route (method, path as routed). `tests/it/admin.rs` calls each one as nobody,
/// as a non-admin, with an admin's token and as an admin, and checks that this list is exactly
/// the `/v1/admin` routes of this file and of docs/api.md.
pub const ADMIN_ROUTES: &[(&str, &str)] = &[
    ("GET", "/v1/admin/users"),
    ("GET", "/v1/admin/users/{id}"),
    ("PUT", "/v1/admin/users/{id}/plan"),
    ("POST", "/v1/admin/users/{id}/quota/grant"),
    ("POST", "/v1/admin/users/{id}/quota/reset"),
    ("PUT", "/v1/admin/users/{id}/status"),
    ("PUT", "/v1/admin/users/{id}/admin"),
    ("POST", "/v1/admin/users/{id}/revoke"),
    ("GET", "/v1/admin/plans"),
    ("PUT", "/v1/admin/plans/{tier}"),
    ("GET", "/v1/admin/rate-tiers"),
    ("PUT", "/v1/admin/rate-tiers/{tier}"),
    ("GET", "/v1/admin/catalogue"),
    ("GET", "/v1/admin/usage"),
    ("GET", "/v1/admin/usage.csv"),
    ("GET", "/v1/admin/audit"),
];

/// How far back the catalogue's provider health looks.
const HEALTH_WINDOW_MINUTES: i32 = 15;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/admin/users", get(users))
        .route("/v1/admin/users/{id}", get(user))
        .route("/v1/admin/users/{id}/plan", put(set_plan))
        .route("/v1/admin/users/{id}/quota/grant", post(grant))
        .route("/v1/admin/users/{id}/quota/reset", post(reset))
        .route("/v1/admin/users/{id}/status", put(set_status))
        .route("/v1/admin/users/{id}/admin", put(set_admin))
        .route("/v1/admin/users/{id}/revoke", post(revoke))
        .route("/v1/admin/plans", get(plans))
        .route("/v1/admin/plans/{tier}", put(update_plan))
        .route("/v1/admin/rate-tiers", get(rate_tiers))
        .route("/v1/admin/rate-tiers/{tier}", put(set_rate_tier))
        .route("/v1/admin/catalogue", get(catalogue))
        .route("/v1/admin/usage", get(usage))
        .route("/v1/admin/usage.csv", get(usage_csv))
        .route("/v1/admin/audit", get(audit))
        .route(
            "/admin",
            get(|| async { page("text/html; charset=utf-8", HTML) }),
        )
        .route(
            "/admin.js",
            get(|| async { page("text/javascript; charset=utf-8", JS) }),
        )
        .route(
            "/admin.css",
            get(|| async { page("text/css; charset=utf-8", CSS) }),
        )
}

const HTML: &[u8] = include_bytes!("../../../../web/admin.html");
const JS: &[u8] = include_bytes!("../../../../web/admin.js");
const CSS: &[u8] = include_bytes!("../../../../web/admin.css");

fn page(content_type: &'static str, body: &'static [u8]) -> Response {
    super::web::file(content_type, body)
}

/// An active admin, signed in on the web.
pub struct AdminCaller(pub Uuid);

impl FromRequestParts<AppState> for AdminCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let Authenticated(caller) = Authenticated::from_request_parts(parts, state).await?;
        if caller.via != Via::WebSession {
            return Err(ApiError(Error::Forbidden {
                code: "admin_session_required",
                message: "admin routes need a signed-in web session, not an API token (or use `polydev admin` on the server host)".into(),
            }));
        }
        if !admin::is_admin(&state.pool, caller.user_id).await? {
            return Err(ApiError(admin::not_admin()));
        }
        Ok(AdminCaller(caller.user_id))
    }
}

impl AdminCaller {
    fn actor(&self) -> Actor {
        Actor::Admin(self.0)
    }
}

async fn users(
    State(state): State<AppState>,
    _admin: AdminCaller,
    ApiQuery(query): ApiQuery<AdminUserQuery>,
) -> Result<Json<Value>, ApiError> {
    let users = admin::list_users(
        &state.pool,
        query.q.as_deref(),
        query.limit.unwrap_or(50),
        query.offset.unwrap_or(0),
    )
    .await?;
    Ok(Json(json!({ "users": users })))
}

async fn user(
    State(state): State<AppState>,
    _admin: AdminCaller,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<admin::UserDetail>, ApiError> {
    Ok(Json(admin::user_detail(&state.pool, id).await?))
}

async fn set_plan(
    State(state): State<AppState>,
    admin: AdminCaller,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(body): ApiJson<AdminSetPlan>,
) -> Result<Json<admin::AdminUser>, ApiError> {
    let changed = admin::set_plan(&state.pool, &admin.actor(), id, &body.plan).await?;
    // Every replica hears of it from the database; this one need not wait for that.
    state.token_cache.evict_user(id);
    Ok(Json(changed))
}

async fn grant(
    State(state): State<AppState>,
    admin: AdminCaller,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(body): ApiJson<AdminGrant>,
) -> Result<Json<admin::UserDetail>, ApiError> {
    Ok(Json(
        admin::grant_quota(&state.pool, &admin.actor(), id, &body.limit, body.amount).await?,
    ))
}

async fn reset(
    State(state): State<AppState>,
    admin: AdminCaller,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<admin::UserDetail>, ApiError> {
    Ok(Json(
        admin::reset_quota(&state.pool, &admin.actor(), id).await?,
    ))
}

async fn set_status(
    State(state): State<AppState>,
    admin: AdminCaller,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(body): ApiJson<AdminSetStatus>,
) -> Result<Json<admin::AdminUser>, ApiError> {
    let changed = admin::set_status(&state.pool, &admin.actor(), id, body.status).await?;
    // Every replica hears of it from the database; this one need not wait for that.
    state.token_cache.evict_user(id);
    Ok(Json(changed))
}

async fn set_admin(
    State(state): State<AppState>,
    admin: AdminCaller,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(body): ApiJson<AdminSetAdmin>,
) -> Result<Json<admin::AdminUser>, ApiError> {
    Ok(Json(
        admin::set_admin(&state.pool, &admin.actor(), id, body.admin).await?,
    ))
}

async fn revoke(
    State(state): State<AppState>,
    admin: AdminCaller,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<admin::Revoked>, ApiError> {
    let changed = admin::revoke_access(&state.pool, &admin.actor(), id).await?;
    // Every replica hears of it from the database; this one need not wait for that.
    state.token_cache.evict_user(id);
    Ok(Json(changed))
}

async fn plans(
    State(state): State<AppState>,
    _admin: AdminCaller,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(
        json!({ "plans": admin::list_plans(&state.pool).await? }),
    ))
}

async fn update_plan(
    State(state): State<AppState>,
    admin: AdminCaller,
    ApiPath(tier): ApiPath<String>,
    ApiJson(body): ApiJson<admin::PlanLimits>,
) -> Result<Json<admin::PlanTier>, ApiError> {
    Ok(Json(
        admin::update_plan(&state.pool, &admin.actor(), &tier, &body).await?,
    ))
}

async fn rate_tiers(
    State(state): State<AppState>,
    _admin: AdminCaller,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(
        json!({ "rate_tiers": admin::list_rate_tiers(&state.pool).await? }),
    ))
}

async fn set_rate_tier(
    State(state): State<AppState>,
    admin: AdminCaller,
    ApiPath(tier): ApiPath<String>,
    ApiJson(body): ApiJson<AdminSetRateTier>,
) -> Result<Json<admin::RateTier>, ApiError> {
    Ok(Json(
        admin::set_rate_tier(
            &state.pool,
            &admin.actor(),
            &tier,
            body.requests_per_minute,
            body.expected,
        )
        .await?,
    ))
}

/// The catalogue with, per provider, whether it has an API key here and how its calls of the
/// last 15 minutes went: `healthy` is configured and (no calls, or fewer than half failed).
async fn catalogue(
    State(state): State<AppState>,
    _admin: AdminCaller,
) -> Result<Json<Value>, ApiError> {
    let health = admin::provider_health(&state.pool, HEALTH_WINDOW_MINUTES).await?;
    let models = state.gateway.models();
    let mut names: Vec<&str> = models.iter().map(|m| m.model.provider.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    let providers: Vec<Value> = names
        .iter()
        .map(|name| {
            let configured = state.gateway.is_configured(name);
            let (calls, errors) = health
                .iter()
                .find(|h| h.provider == *name)
                .map_or((0, 0), |h| (h.calls, h.errors));
            json!({
                "provider": name,
                "configured": configured,
                "calls": calls,
                "errors": errors,
                "healthy": configured && (calls == 0 || errors * 2 < calls),
            })
        })
        .collect();
    Ok(Json(json!({
        "window_minutes": HEALTH_WINDOW_MINUTES,
        "providers": providers,
        "models": models,
    })))
}

async fn usage(
    State(state): State<AppState>,
    _admin: AdminCaller,
    ApiQuery(query): ApiQuery<AdminUsageQuery>,
) -> Result<Json<Value>, ApiError> {
    let days = query.days.unwrap_or(30);
    let rows = admin::usage(&state.pool, days).await?;
    Ok(Json(json!({ "days": days, "rows": rows })))
}

async fn usage_csv(
    State(state): State<AppState>,
    _admin: AdminCaller,
    ApiQuery(query): ApiQuery<AdminUsageQuery>,
) -> Result<Response, ApiError> {
    let days = query.days.unwrap_or(30);
    let rows = admin::usage(&state.pool, days).await?;
    let mut response = admin::usage_csv(&rows).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/csv; charset=utf-8"),
    );
    headers.insert(
        header::CONTENT_DISPOSITION,
        HeaderValue::from_static("attachment; filename=\"polydev-usage.csv\""),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

async fn audit(
    State(state): State<AppState>,
    _admin: AdminCaller,
    ApiQuery(query): ApiQuery<AdminAuditQuery>,
) -> Result<Json<Value>, ApiError> {
    let entries = admin::list_audit(
        &state.pool,
        query.limit.unwrap_or(100),
        query.before,
        query.target.as_deref(),
    )
    .await?;
    Ok(Json(json!({ "entries": entries })))
}
