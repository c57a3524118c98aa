//! The arguments of `get_perspectives` (MCP tool and `POST /v1/perspectives`), their limits and
//! validation, and the choice of models.

use std::collections::{BTreeMap, HashSet};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::catalogue::{ModelSpec, ProviderKind, Tier};
use super::provider::{ChatMessage, Role, Tools};
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
    /// Earlier turns given with a prompt (`history`), per model.
    pub const MAX_HISTORY_TURNS: usize = 200;
    /// Characters of a whole conversation: a `history` and its prompt, or the messages of
    /// `POST /v1/chat/completions`.
    pub const MAX_CONVERSATION_CHARS: usize = 400_000;
    pub const MAX_MESSAGES: usize = 1000;
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
    /// Earlier turns of a conversation, per model id: each model is sent its own earlier
    /// questions and answers, then `prompt` as the next user turn. A model without an entry
    /// starts afresh.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub history: BTreeMap<String, Vec<Turn>>,
    /// A whole conversation in the OpenAI shape, with tools (`POST /v1/chat/completions`),
    /// sent as it is instead of `prompt` and `history`. Not an argument of the tool.
    #[serde(skip)]
    #[schemars(skip)]
    pub conversation: Option<Conversation>,
}

/// One earlier turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Turn {
    pub role: TurnRole,
    pub content: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum TurnRole {
    User,
    Assistant,
}

/// The messages (system, user, assistant with tool calls, tool results) and tools of one
/// OpenAI-format call, for one model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Conversation {
    pub messages: Vec<ChatMessage>,
    pub tools: Option<Tools>,
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
        match &self.conversation {
            Some(conversation) => self.validate_conversation(gateway, conversation)?,
            None => self.validate_prompt(gateway)?,
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

    fn validate_prompt(&self, gateway: &Gateway) -> Result<()> {
        let chars = self.prompt.chars().count();
        if self.prompt.trim().is_empty() {
            return Err(Error::Invalid("`prompt` must not be empty".into()));
        }
        if chars > MAX_PROMPT_CHARS {
            return Err(Error::TooLarge(format!(
                "`prompt` is {chars} characters; the limit is {MAX_PROMPT_CHARS}"
            )));
        }
        for (model, turns) in &self.history {
            if gateway.catalogue().model(model).is_none() {
                return Err(Error::Invalid(format!(
                    "`history` names an unknown model `{model}`"
                )));
            }
            if turns.len() > MAX_HISTORY_TURNS {
                return Err(Error::Invalid(format!(
                    "`history` of `{model}` has {} turns; the limit is {MAX_HISTORY_TURNS}",
                    turns.len()
                )));
            }
            let total = chars
                + turns
                    .iter()
                    .map(|t| t.content.chars().count())
                    .sum::<usize>();
            if total > MAX_CONVERSATION_CHARS {
                return Err(Error::TooLarge(format!(
                    "the conversation with `{model}` is {total} characters; the limit is {MAX_CONVERSATION_CHARS}"
                )));
            }
        }
        Ok(())
    }

    fn validate_conversation(&self, gateway: &Gateway, conversation: &Conversation) -> Result<()> {
        let messages = &conversation.messages;
        if messages.is_empty() || messages.len() > MAX_MESSAGES {
            return Err(Error::Invalid(format!(
                "`messages` must hold 1 to {MAX_MESSAGES} messages"
            )));
        }
        let total: usize = messages.iter().map(ChatMessage::chars).sum();
        if total > MAX_CONVERSATION_CHARS {
            return Err(Error::TooLarge(format!(
                "the messages are {total} characters; the limit is {MAX_CONVERSATION_CHARS}"
            )));
        }
        if !messages
            .iter()
            .any(|m| matches!(m.role, Role::User | Role::Tool))
        {
            return Err(Error::Invalid(
                "`messages` must hold a user or tool message".into(),
            ));
        }
        let uses_tools =
            conversation.tools.is_some() || messages.iter().any(ChatMessage::uses_tools);
        if uses_tools {
            for id in self.models.iter().flatten() {
                let Some(model) = gateway.catalogue().model(id) else {
                    continue;
                };
                let kind = gateway
                    .catalogue()
                    .providers
                    .get(&model.provider)
                    .map(|p| p.kind);
                if !matches!(
                    kind,
                    Some(ProviderKind::Openai | ProviderKind::OpenaiCompatible)
                ) {
                    return Err(Error::Invalid(format!(
                        "model `{id}` (provider `{}`) does not take tools or tool messages through polydev: only OpenAI-format providers do",
                        model.provider
                    )));
                }
            }
        }
        Ok(())
    }

    /// What `model` is sent: the conversation as it came, or the model's own history and the
    /// prompt.
    pub fn messages_for(&self, model: &str) -> (Vec<ChatMessage>, Option<Tools>) {
        if let Some(conversation) = &self.conversation {
            return (conversation.messages.clone(), conversation.tools.clone());
        }
        let earlier = self.history.get(model).into_iter().flatten().map(|turn| {
            let role = match turn.role {
                TurnRole::User => Role::User,
                TurnRole::Assistant => Role::Assistant,
            };
            ChatMessage::text(role, &turn.content)
        });
        let messages = earlier
            .chain(std::iter::once(ChatMessage::text(Role::User, &self.prompt)))
            .collect();
        (messages, None)
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
        unavailable: &HashSet<String>,
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
                && !unavailable.contains(&m.provider)
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
