//! Per-user defaults for `get_perspectives` (`user_perspective_settings`).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use uuid::Uuid;

use super::Gateway;
use super::request::limits::{MAX_MODELS, MAX_PERSPECTIVES};
use crate::error::{Error, Result};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PerspectiveSettings {
    /// Models to ask, in order, when a call names none.
    #[serde(default)]
    pub preferred_models: Vec<String>,
    /// How many models to ask when a call does not say (1 to 10).
    #[serde(default)]
    pub max_perspectives: Option<i32>,
}

pub async fn get_settings(pool: &PgPool, user_id: Uuid) -> Result<PerspectiveSettings> {
    Ok(sqlx::query_as!(
        PerspectiveSettings,
        "SELECT preferred_models, max_perspectives FROM user_perspective_settings WHERE user_id = $1",
        user_id
    )
    .fetch_optional(pool)
    .await?
    .unwrap_or_default())
}

pub async fn put_settings(
    pool: &PgPool,
    gateway: &Gateway,
    user_id: Uuid,
    settings: &PerspectiveSettings,
) -> Result<PerspectiveSettings> {
    if settings.preferred_models.len() > MAX_MODELS {
        return Err(Error::Invalid(format!(
            "at most {MAX_MODELS} preferred models"
        )));
    }
    if let Some(unknown) = settings
        .preferred_models
        .iter()
        .find(|m| gateway.catalogue().model(m).is_none())
    {
        return Err(Error::Invalid(format!("unknown model `{unknown}`")));
    }
    if let Some(n) = settings.max_perspectives
        && !(1..=MAX_PERSPECTIVES as i32).contains(&n)
    {
        return Err(Error::Invalid(format!(
            "`max_perspectives` must be 1 to {MAX_PERSPECTIVES}"
        )));
    }
    Ok(sqlx::query_as!(
        PerspectiveSettings,
        "INSERT INTO user_perspective_settings (user_id, preferred_models, max_perspectives)
         VALUES ($1, $2, $3)
         ON CONFLICT (user_id) DO UPDATE
            SET preferred_models = EXCLUDED.preferred_models,
                max_perspectives = EXCLUDED.max_perspectives, updated_at = now()
         RETURNING preferred_models, max_perspectives",
        user_id,
        &settings.preferred_models,
        settings.max_perspectives
    )
    .fetch_one(pool)
    .await?)
}
