//! Perspectives: the model catalogue, provider adapters, and `get_perspectives` itself (choice of
//! models, parallel fan-out with quotas, deadline and cancellation, usage records).

pub mod catalogue;
pub mod cli;
mod fanout;
mod idempotency;
pub mod provider;
mod request;
mod result;
mod settings;
mod usage;
mod usage_daily;

use std::collections::HashMap;
use std::sync::Arc;

pub use catalogue::{Catalogue, Cost, ModelSpec, Tier};
pub use fanout::{CALL_MARGIN, get_perspectives, get_perspectives_counting};
pub use idempotency::sweep as sweep_idempotency;
pub use request::{Conversation, PerspectivesRequest, Turn, TurnRole, limits};
pub use result::{
    ModelError, ModelResult, PerspectivesResult, Progress, ProgressSink, Status, Totals,
};
pub use settings::{PerspectiveSettings, get_settings, put_settings};
pub use usage::{MonthUsage, UsageReport, month_usage, usage_report};
pub use usage_daily::{DailyModelUsage, daily_usage};

use crate::error;
use provider::{HttpProvider, Provider};

/// The catalogue with a live provider for each of its provider entries.
pub struct Gateway {
    catalogue: Catalogue,
    providers: HashMap<String, Arc<dyn Provider>>,
    configured: HashMap<String, bool>,
    /// The HMAC key of idempotency request hashes: the operator's, else loaded (or created)
    /// from the database on first use.
    idempotency_secret: tokio::sync::OnceCell<idempotency::Secret>,
    idempotency_wait: std::time::Duration,
    /// Runs the `cli` providers (`None`: they are not configured).
    runtime: Option<crate::runtime::Runtime>,
}

impl Gateway {
    pub fn new(catalogue: Catalogue) -> Gateway {
        let client = crate::net::http_client();
        let mut providers: HashMap<String, Arc<dyn Provider>> = HashMap::new();
        let mut configured = HashMap::new();
        for (name, spec) in &catalogue.providers {
            if spec.kind == catalogue::ProviderKind::Cli {
                // Runs in users' containers: only with a runtime (`with_runtime`).
                configured.insert(name.clone(), false);
                continue;
            }
            let provider = HttpProvider::from_spec(name, spec, client.clone());
            configured.insert(name.clone(), provider.is_configured());
            if !provider.is_configured() {
                tracing::info!(provider = %name, "provider not configured (no API key): its models are not chosen by default");
            }
            providers.insert(name.clone(), Arc::new(provider));
        }
        Gateway {
            catalogue,
            providers,
            configured,
            idempotency_secret: Default::default(),
            idempotency_wait: idempotency::DEFAULT_WAIT,
            runtime: None,
        }
    }

    /// A gateway over given providers (tests use fakes and mocks).
    pub fn with_providers(
        catalogue: Catalogue,
        providers: HashMap<String, Arc<dyn Provider>>,
    ) -> Gateway {
        let configured = providers.keys().map(|name| (name.clone(), true)).collect();
        Gateway {
            catalogue,
            providers,
            configured,
            idempotency_secret: Default::default(),
            idempotency_wait: idempotency::DEFAULT_WAIT,
            runtime: None,
        }
    }

    /// Runs the catalogue's `cli` providers in the users' runtime containers (docs/cli-backends.md).
    pub fn with_runtime(mut self, runtime: Option<crate::runtime::Runtime>) -> Gateway {
        let Some(runtime) = runtime else { return self };
        for (name, spec) in &self.catalogue.providers {
            let Some(kind) = spec.cli.as_deref().and_then(cli::CliKind::parse) else {
                continue;
            };
            if spec.kind != catalogue::ProviderKind::Cli {
                continue;
            }
            let provider =
                cli::container::ContainerCli::new(kind, spec.program.as_deref(), runtime.clone());
            self.providers.insert(name.clone(), Arc::new(provider));
            self.configured.insert(name.clone(), true);
        }
        self.runtime = Some(runtime);
        self
    }

    /// The `cli` providers among `providers` the user cannot use now (no granted container).
    /// One query, and none when `providers` holds no `cli` provider.
    pub async fn cli_unavailable(
        &self,
        user_id: uuid::Uuid,
        providers: &[&str],
    ) -> error::Result<std::collections::HashSet<String>> {
        let clis: Vec<(&str, &str)> = providers
            .iter()
            .filter_map(|name| {
                let spec = self.catalogue.providers.get(*name)?;
                (spec.kind == catalogue::ProviderKind::Cli)
                    .then(|| (*name, spec.cli.as_deref().unwrap_or("")))
            })
            .collect();
        if clis.is_empty() {
            return Ok(Default::default());
        }
        let granted = match &self.runtime {
            Some(runtime) => runtime.granted_clis(user_id).await?,
            None => Vec::new(),
        };
        Ok(clis
            .into_iter()
            .filter(|(_, cli)| !granted.iter().any(|g| g == cli))
            .map(|(name, _)| name.to_string())
            .collect())
    }

    /// The CLI of a `cli` provider.
    pub fn cli_of(&self, provider: &str) -> Option<cli::CliKind> {
        let spec = self.catalogue.providers.get(provider)?;
        (spec.kind == catalogue::ProviderKind::Cli)
            .then(|| spec.cli.as_deref().and_then(cli::CliKind::parse))
            .flatten()
    }

    /// Hashes idempotent requests with the operator's secret (`--idempotency-secret`) instead
    /// of the one kept in the database.
    pub fn with_idempotency_secret(self, passphrase: &[u8]) -> Gateway {
        let secret =
            tokio::sync::OnceCell::new_with(Some(idempotency::Secret::from_passphrase(passphrase)));
        Gateway {
            idempotency_secret: secret,
            ..self
        }
    }

    /// How long a call waits for another call with the same idempotency key before it is told
    /// `in_progress` (default 5 s).
    pub fn with_idempotency_wait(self, wait: std::time::Duration) -> Gateway {
        Gateway {
            idempotency_wait: wait,
            ..self
        }
    }

    async fn idempotency_secret(&self, pool: &sqlx::PgPool) -> error::Result<&idempotency::Secret> {
        self.idempotency_secret
            .get_or_try_init(|| idempotency::Secret::load_or_create(pool))
            .await
    }

    fn idempotency_wait(&self) -> std::time::Duration {
        self.idempotency_wait
    }

    pub fn catalogue(&self) -> &Catalogue {
        &self.catalogue
    }

    pub fn is_configured(&self, provider: &str) -> bool {
        self.configured.get(provider).copied().unwrap_or(false)
    }

    fn provider(&self, name: &str) -> Option<&Arc<dyn Provider>> {
        self.providers.get(name)
    }

    /// The catalogue as `GET /v1/models` and `list_available_models` show it.
    pub fn models(&self) -> Vec<ModelInfo> {
        self.catalogue
            .models
            .iter()
            .map(|model| ModelInfo {
                model: model.clone(),
                available: self.is_configured(&model.provider),
            })
            .collect()
    }

    /// The catalogue as one user sees it (`list_available_models`): a `cli` model is available
    /// only when the user has a live container granted for its CLI.
    pub async fn models_for(&self, user_id: uuid::Uuid) -> Vec<ModelInfo> {
        let mut models = self.models();
        let providers: Vec<&str> = self
            .catalogue
            .providers
            .keys()
            .map(String::as_str)
            .collect();
        match self.cli_unavailable(user_id, &providers).await {
            Ok(off) => {
                for info in &mut models {
                    if off.contains(&info.model.provider) {
                        info.available = false;
                    }
                }
            }
            Err(error) => tracing::warn!(%error, "the user's granted CLIs could not be read"),
        }
        models
    }
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ModelInfo {
    #[serde(flatten)]
    pub model: ModelSpec,
    /// False when the provider has no API key configured.
    pub available: bool,
}
