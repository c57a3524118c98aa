//! The CLIs on the developer's own machine, for `polydev mcp`: which ones to use
//! (`--local-clis`), which are installed (detected once, in the background, when the bridge
//! starts), which turned out not to be signed in (left out for the rest of the session), and
//! how their answers join the server's result (docs/cli-backends.md).

use std::collections::HashSet;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::OnceCell;
use uuid::Uuid;

use crate::api::ErrorResponse;
use crate::perspectives::cli::{self, CliBackend, CliKind};
use crate::perspectives::provider::ErrorClass;
use crate::perspectives::{ModelResult, PerspectivesResult, Status, Totals};

/// Which local CLIs `get_perspectives` asks besides the server's models.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalClis {
    /// None.
    Off,
    /// Every one that is installed.
    Auto,
    /// These, when installed.
    Only(Vec<CliKind>),
}

impl FromStr for LocalClis {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, String> {
        match value.trim().to_ascii_lowercase().as_str() {
            "" | "auto" | "all" | "on" => Ok(LocalClis::Auto),
            "off" | "none" | "0" | "false" => Ok(LocalClis::Off),
            list => {
                let mut kinds = Vec::new();
                for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                    let kind = CliKind::parse(name).ok_or_else(|| {
                        format!("unknown CLI `{name}`: use auto, off, or a list of claude, codex, gemini")
                    })?;
                    if !kinds.contains(&kind) {
                        kinds.push(kind);
                    }
                }
                Ok(LocalClis::Only(kinds))
            }
        }
    }
}

impl LocalClis {
    fn kinds(&self) -> Vec<CliKind> {
        match self {
            LocalClis::Off => Vec::new(),
            LocalClis::Auto => CliKind::ALL.to_vec(),
            LocalClis::Only(kinds) => kinds.clone(),
        }
    }
}

/// The local CLIs of one `polydev mcp` process.
#[derive(Clone)]
pub struct LocalBackends {
    inner: Arc<Inner>,
}

struct Inner {
    choice: LocalClis,
    path: Option<std::ffi::OsString>,
    detected: OnceCell<Vec<CliBackend>>,
    /// CLIs that answered "not signed in": not asked again in this session.
    signed_out: Mutex<HashSet<CliKind>>,
}

impl LocalBackends {
    /// The chosen CLIs, looked up on this process's `PATH`.
    pub fn new(choice: LocalClis) -> LocalBackends {
        LocalBackends {
            inner: Arc::new(Inner {
                choice,
                path: std::env::var_os("PATH"),
                detected: OnceCell::new(),
                signed_out: Mutex::new(HashSet::new()),
            }),
        }
    }

    /// Starts detection in the background, so the first call does not wait for it.
    pub fn detect_in_background(&self) {
        if self.inner.choice == LocalClis::Off {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            this.detected().await;
        });
    }

    async fn detected(&self) -> &[CliBackend] {
        self.inner
            .detected
            .get_or_init(|| async {
                let kinds = self.inner.choice.kinds();
                let found = futures_util::future::join_all(
                    kinds
                        .iter()
                        .map(|kind| cli::detect(*kind, self.inner.path.as_deref())),
                )
                .await;
                let found: Vec<CliBackend> = found.into_iter().flatten().collect();
                for backend in &found {
                    eprintln!(
                        "polydev mcp: local CLI `{}` ({}) found at {}: get_perspectives asks it too (--local-clis off to stop)",
                        backend.kind.command(),
                        backend.version,
                        backend.program.display()
                    );
                }
                if let LocalClis::Only(kinds) = &self.inner.choice {
                    for kind in kinds.iter().filter(|k| !found.iter().any(|b| b.kind == **k)) {
                        eprintln!(
                            "polydev mcp: local CLI `{}` was asked for but is not on PATH (or `{} --version` failed)",
                            kind.command(),
                            kind.command()
                        );
                    }
                }
                found
            })
            .await
    }

    /// The CLIs to ask now: installed, and not known to be signed out.
    pub async fn available(&self) -> Vec<CliBackend> {
        if self.inner.choice == LocalClis::Off {
            return Vec::new();
        }
        let detected = self.detected().await.to_vec();
        let signed_out = self.inner.signed_out.lock().expect("lock").clone();
        detected
            .into_iter()
            .filter(|b| !signed_out.contains(&b.kind))
            .collect()
    }

    /// Asks `backend`; a "not signed in" answer takes it out of later calls.
    pub async fn ask(&self, backend: &CliBackend, prompt: &str, timeout: Duration) -> ModelResult {
        let result = cli::ask(backend, prompt, timeout).await;
        if result
            .error
            .as_ref()
            .is_some_and(|e| e.class == ErrorClass::Auth)
            && self
                .inner
                .signed_out
                .lock()
                .expect("lock")
                .insert(backend.kind)
        {
            eprintln!(
                "polydev mcp: local CLI `{}` is not signed in; it is left out until polydev mcp restarts",
                backend.kind.command()
            );
        }
        result
    }
}

/// What the server answered a forwarded `get_perspectives`.
pub enum ServerAnswer {
    Result(PerspectivesResult),
    Error(ErrorResponse),
}

/// The server's answer with the local CLIs' results added: their answers after the server's,
/// totals over both. When the server had no provider for the call and a CLI answered, the
/// CLIs' answers are the result. `Err`: the server's error stands.
pub fn merge(
    server: ServerAnswer,
    local: Vec<ModelResult>,
    elapsed_ms: u64,
) -> Result<PerspectivesResult, ErrorResponse> {
    let (request_id, mut perspectives, cost_usd, replayed) = match server {
        ServerAnswer::Result(result) => (
            result.request_id,
            result.perspectives,
            result.totals.cost_usd,
            result.replayed,
        ),
        ServerAnswer::Error(error)
            if error.error.code == "no_provider_configured"
                && local.iter().any(|p| p.status == Status::Ok) =>
        {
            (Uuid::new_v4(), Vec::new(), "0".to_string(), false)
        }
        ServerAnswer::Error(error) => return Err(error),
    };
    perspectives.extend(local);
    let succeeded = perspectives
        .iter()
        .filter(|p| p.status == Status::Ok)
        .count();
    let sum = |of: fn(&ModelResult) -> Option<u32>| -> u64 {
        perspectives.iter().filter_map(of).map(u64::from).sum()
    };
    let totals = Totals {
        models: perspectives.len(),
        succeeded,
        failed: perspectives.len() - succeeded,
        input_tokens: sum(|p| p.input_tokens),
        output_tokens: sum(|p| p.output_tokens),
        cost_usd,
        elapsed_ms,
    };
    Ok(PerspectivesResult {
        request_id,
        perspectives,
        totals,
        replayed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::perspectives::provider::{Completion, ProviderError};

    fn answer(kind: CliKind) -> ModelResult {
        cli::model_result(
            kind,
            Ok(Completion {
                text: "local".into(),
                input_tokens: 5,
                output_tokens: 7,
                finish_reason: None,
                tool_calls: None,
            }),
            3,
        )
    }

    fn no_provider() -> ServerAnswer {
        ServerAnswer::Error(ErrorResponse::from(
            &crate::error::Error::NoProviderConfigured("none".into()),
        ))
    }

    #[test]
    fn the_choice_reads_auto_off_and_lists() {
        assert_eq!("auto".parse(), Ok(LocalClis::Auto));
        assert_eq!("off".parse(), Ok(LocalClis::Off));
        assert_eq!(
            "codex, claude-code,codex".parse(),
            Ok(LocalClis::Only(vec![CliKind::Codex, CliKind::Claude]))
        );
        assert!("cursor".parse::<LocalClis>().is_err());
    }

    #[test]
    fn local_answers_rescue_a_server_without_providers_only() {
        let merged = merge(no_provider(), vec![answer(CliKind::Claude)], 9).unwrap();
        assert_eq!(merged.totals.succeeded, 1);
        assert_eq!(merged.totals.cost_usd, "0");
        assert_eq!(
            (merged.totals.input_tokens, merged.totals.output_tokens),
            (5, 7)
        );

        let failed = cli::model_result(
            CliKind::Codex,
            Err(ProviderError::new(ErrorClass::Auth, "not signed in")),
            1,
        );
        let error = merge(no_provider(), vec![failed], 9).unwrap_err();
        assert_eq!(error.error.code, "no_provider_configured");

        let quota = ServerAnswer::Error(ErrorResponse::from(&crate::error::Error::QuotaExceeded(
            "used up".into(),
        )));
        let error = merge(quota, vec![answer(CliKind::Gemini)], 9).unwrap_err();
        assert_eq!(error.error.code, "quota_exceeded");
    }
}
