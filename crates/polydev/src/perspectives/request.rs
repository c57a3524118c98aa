//! The arguments of `get_perspectives` (MCP tool and `POST /v1/perspectives`), their limits and
//! validation, and the choice of models.

use std::collections::HashSet;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::catalogue::{ModelSpec, Tier};
use super::{Gateway, PerspectiveSettings};
use crate::error::{Error, Result};
use crate::quota::QuotaState;

/// Input limits (docs/api.md).
pub mod limits {
    pub const MAX_PROMPT_CHARS: usize = 100_000;
    pub const MAX_MODELS: usize = 10;
    pub const DEFAULT_PERSPECTIVES: u32 = 2;
    pub const MAX_PERSPECTIVES: u32 = 10;
    pub const DEFAULT_MAX_TOKENS: u32 = 1024;
    pub const MAX_TOKENS: u32 = 32_768;
    pub const DEFAULT_DEADLINE_MS: u64 = 120_000;
    pub const MIN_DEADLINE_MS: u64 = 100;
    pub const MAX_DEADLINE_MS: u64 = 600_000;
    pub const MAX_PROVIDERS: usize = 20;
    pub const MAX_IDEMPOTENCY_KEY: usize = 200;
}
use limits::*;

/// Ask several models the same question in parallel.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PerspectivesRequest {
    /// The question or task, in full (1 to 100,000 characters).
    pub prompt: String,
    /// Model ids from the catalogue (`list_available_models`). Omit to let polydev choose.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub models: Option<Vec<String>>,
    /// How many models to ask when polydev chooses (1 to 10; default: your setting, else 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_perspectives: Option<u32>,
    /// Sampling temperature, 0 to 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    /// Most tokens each model may write (1 to 32768; default 1024).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// Providers never to use (e.g. "openai").
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude_providers: Vec<String>,
    /// Providers to choose from, in order of preference, when polydev chooses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub request_providers: Vec<String>,
    /// Return after this many milliseconds with what has finished (100 to 600000; default 120000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
    /// Retrying with the same key within 24 hours returns the first result and charges nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

impl PerspectivesRequest {
    /// A request for `prompt` to the given models, every other argument at its default.
    pub fn to_models(prompt: &str, models: &[&str]) -> Self {
        PerspectivesRequest {
            prompt: prompt.to_string(),
            models: Some(models.iter().map(|m| m.to_string()).collect()),
            ..Default::default()
        }
    }

    pub fn validate(&self, gateway: &Gateway) -> Result<()> {
        let chars = self.prompt.chars().count();
        if self.prompt.trim().is_empty() {
            return Err(Error::Invalid("`prompt` must not be empty".into()));
        }
        if chars > MAX_PROMPT_CHARS {
            return Err(Error::TooLarge(format!(
                "`prompt` is {chars} characters; the limit is {MAX_PROMPT_CHARS}"
            )));
        }
        if let Some(models) = &self.models {
            if models.is_empty() || models.len() > MAX_MODELS {
                return Err(Error::Invalid(format!(
                    "`models` must name 1 to {MAX_MODELS} models"
                )));
            }
            let unknown: Vec<&str> = models
                .iter()
                .filter(|m| gateway.catalogue().model(m).is_none())
                .map(String::as_str)
                .collect();
            if !unknown.is_empty() {
                return Err(Error::Invalid(format!(
                    "unknown model(s): {}; see list_available_models",
                    unknown.join(", ")
                )));
            }
        }
        if let Some(n) = self.max_perspectives
            && !(1..=MAX_PERSPECTIVES).contains(&n)
        {
            return Err(Error::Invalid(format!(
                "`max_perspectives` must be 1 to {MAX_PERSPECTIVES}"
            )));
        }
        if let Some(t) = self.temperature
            && !(0.0..=2.0).contains(&t)
        {
            return Err(Error::Invalid(
                "`temperature` must be between 0 and 2".into(),
            ));
        }
        if let Some(n) = self.max_tokens
            && !(1..=MAX_TOKENS).contains(&n)
        {
            return Err(Error::Invalid(format!(
                "`max_tokens` must be 1 to {MAX_TOKENS}"
            )));
        }
        if let Some(ms) = self.deadline_ms
            && !(MIN_DEADLINE_MS..=MAX_DEADLINE_MS).contains(&ms)
        {
            return Err(Error::Invalid(format!(
                "`deadline_ms` must be {MIN_DEADLINE_MS} to {MAX_DEADLINE_MS}"
            )));
        }
        for list in [&self.exclude_providers, &self.request_providers] {
            if list.len() > MAX_PROVIDERS {
                return Err(Error::Invalid(format!(
                    "at most {MAX_PROVIDERS} providers per list"
                )));
            }
            if let Some(unknown) = list
                .iter()
                .find(|p| !gateway.catalogue().providers.contains_key(*p))
            {
                return Err(Error::Invalid(format!("unknown provider `{unknown}`")));
            }
        }
        if let Some(key) = &self.idempotency_key {
            let ok = !key.is_empty()
                && key.len() <= MAX_IDEMPOTENCY_KEY
                && key
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
            if !ok {
                return Err(Error::Invalid(format!(
                    "`idempotency_key` must be 1 to {MAX_IDEMPOTENCY_KEY} characters of A-Z a-z 0-9 - _ . :"
                )));
            }
        }
        Ok(())
    }

    pub fn max_tokens(&self) -> u32 {
        self.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS)
    }

    pub fn deadline_ms(&self) -> u64 {
        self.deadline_ms.unwrap_or(DEFAULT_DEADLINE_MS)
    }

    /// The models to ask: the requested ones; else the user's preferred ones; else the catalogue
    /// by tier (premium, normal, eco), one model per provider first. Excluded providers are
    /// skipped everywhere; when polydev chooses, so are providers without a key and tiers with
    /// no quota left.
    pub fn choose<'g>(
        &self,
        gateway: &'g Gateway,
        settings: &PerspectiveSettings,
        quota: Option<&QuotaState>,
    ) -> Vec<&'g ModelSpec> {
        let catalogue = gateway.catalogue();
        let excluded = |m: &ModelSpec| self.exclude_providers.contains(&m.provider);
        if let Some(ids) = &self.models {
            let mut seen = HashSet::new();
            return ids
                .iter()
                .filter(|id| seen.insert(id.as_str()))
                .filter_map(|id| catalogue.model(id))
                .filter(|m| !excluded(m))
                .collect();
        }
        let wanted = self
            .max_perspectives
            .or(settings.max_perspectives.map(|n| n.max(1) as u32))
            .unwrap_or(DEFAULT_PERSPECTIVES) as usize;
        let has_quota = |tier: Tier| {
            let Some(q) = quota else { return true };
            let usage = match tier {
                Tier::Premium => &q.premium,
                Tier::Normal => &q.normal,
                Tier::Eco => &q.eco,
            };
            usage.remaining.is_none_or(|r| r > 0)
        };
        let usable = |m: &&ModelSpec| {
            !excluded(m)
                && gateway.is_configured(&m.provider)
                && has_quota(m.tier)
                && (self.request_providers.is_empty()
                    || self.request_providers.contains(&m.provider))
        };
        let provider_rank = |m: &ModelSpec| {
            self.request_providers
                .iter()
                .position(|p| *p == m.provider)
                .unwrap_or(usize::MAX)
        };
        let mut chosen: Vec<&ModelSpec> = settings
            .preferred_models
            .iter()
            .filter_map(|id| catalogue.model(id))
            .filter(usable)
            .take(wanted)
            .collect();
        let mut candidates: Vec<&ModelSpec> = catalogue.models.iter().filter(usable).collect();
        // Stable sort: tier, then requested-provider order, then file order.
        candidates.sort_by_key(|m| (m.tier, provider_rank(m)));
        // First pass: distinct providers (different vendors are the point); second: fill up.
        for distinct in [true, false] {
            for m in &candidates {
                if chosen.len() >= wanted {
                    break;
                }
                let new_provider = !chosen.iter().any(|c| c.provider == m.provider);
                if !chosen.iter().any(|c| c.id == m.id) && (new_provider || !distinct) {
                    chosen.push(m);
                }
            }
        }
        chosen
    }
}
