//! Perspectives: the model catalogue, provider adapters, and `get_perspectives` itself (choice of
//! models, parallel fan-out with quotas, deadline and cancellation, usage records).

pub mod catalogue;
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
pub use fanout::get_perspectives;
pub use request::{PerspectivesRequest, limits};
pub use result::{
    ModelError, ModelResult, PerspectivesResult, Progress, ProgressSink, Status, Totals,
};
pub use settings::{PerspectiveSettings, get_settings, put_settings};
pub use usage::{MonthUsage, UsageReport, month_usage, usage_report};
pub use usage_daily::{DailyModelUsage, daily_usage};

use provider::{HttpProvider, Provider};

/// The catalogue with a live provider for each of its provider entries.
pub struct Gateway {
    catalogue: Catalogue,
    providers: HashMap<String, Arc<dyn Provider>>,
    configured: HashMap<String, bool>,
}

impl Gateway {
    pub fn new(catalogue: Catalogue) -> Gateway {
        let client = crate::net::http_client();
        let mut providers: HashMap<String, Arc<dyn Provider>> = HashMap::new();
        let mut configured = HashMap::new();
        for (name, spec) in &catalogue.providers {
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
        }
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
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ModelInfo {
    #[serde(flatten)]
    pub model: ModelSpec,
    /// False when the provider has no API key configured.
    pub available: bool,
}
