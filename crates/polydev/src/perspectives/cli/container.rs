//! The catalogue's `cli` providers: a CLI run in the caller's runtime container with the
//! caller's own subscription, through a credential grant (docs/cli-backends.md, "In runtime
//! containers"). The prompt goes in on stdin of a job the server seals to the container with an
//! ephemeral output key; the answer and the token usage are read from the CLI's output by the
//! same adapters as on a developer's machine.

use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

use polydev_agent::proto::JobCommand;
use uuid::Uuid;

use super::{CliBackend, CliKind, process};
use crate::perspectives::provider::{
    BoxFuture, ChatMessage, Completion, CompletionRequest, DeltaSink, ErrorClass, Provider,
    ProviderError, Role,
};
use crate::runtime::{GrantedRun, Runtime};

/// How long a call without a deadline may run.
const NO_DEADLINE: Duration = Duration::from_secs(10 * 60);

/// A `cli` provider of the catalogue.
pub struct ContainerCli {
    kind: CliKind,
    /// The executable inside the container.
    program: String,
    runtime: Runtime,
}

impl ContainerCli {
    pub fn new(kind: CliKind, program: Option<&str>, runtime: Runtime) -> ContainerCli {
        ContainerCli {
            kind,
            program: program.unwrap_or(kind.command()).to_string(),
            runtime,
        }
    }

    /// What a caller without a granted container is told.
    pub fn not_connected(kind: CliKind) -> String {
        let provider = crate::runtime::grants::provider_of_cli(kind.command()).unwrap_or("?");
        format!(
            "cli_not_connected: `{}` runs {} in your runtime container with your own subscription, and you have none connected: \
             sign the CLI in (POST /v1/login/sessions), claim a `{provider}` container (POST /v1/runtime/containers) \
             and grant it your credential (PUT /v1/runtime/containers/{{id}}/grant) from the account page or `polydev` (docs/cli-backends.md)",
            kind.model_id(),
            cli_name(kind)
        )
    }

    async fn run(
        &self,
        user_id: Uuid,
        request: &CompletionRequest,
    ) -> Result<Completion, ProviderError> {
        let name = self.kind.command();
        let deadline = request
            .deadline
            .unwrap_or_else(|| Instant::now() + NO_DEADLINE);
        let mut command = vec![self.program.clone()];
        command.extend(
            self.kind
                .args()
                .into_iter()
                .map(|a: OsString| a.to_string_lossy().into_owned()),
        );
        let job = JobCommand {
            command,
            stdin: Some(prompt_of(&request.messages)),
            ..JobCommand::default()
        };
        let run = self
            .runtime
            .run_granted(user_id, name, job, deadline)
            .await
            .map_err(|error| {
                tracing::error!(%error, cli = name, "a CLI job in a runtime container failed");
                ProviderError::new(ErrorClass::Internal, "the runtime could not run the CLI")
            })?;
        let output = match run {
            GrantedRun::NotConnected => {
                return Err(ProviderError::new(
                    ErrorClass::NotConfigured,
                    Self::not_connected(self.kind),
                ));
            }
            GrantedRun::TimedOut => {
                return Err(ProviderError::new(
                    ErrorClass::Timeout,
                    format!("`{name}` in your runtime container gave no answer in time"),
                ));
            }
            GrantedRun::Finished(output) => output,
        };
        if output.exit_code.is_none() {
            // It never ran (or was killed without a status): the agent's fixed words.
            let reason = output
                .failure_reason
                .unwrap_or_else(|| "the job did not run".into());
            return Err(ProviderError::new(
                ErrorClass::Upstream,
                format!("`{name}` in your runtime container: {reason}"),
            ));
        }
        let code = output.exit_code.unwrap_or(255);
        let backend = CliBackend {
            kind: self.kind,
            program: self.program.clone().into(),
            version: String::new(),
        };
        backend.read(&process::Output {
            status: std::process::ExitStatus::from_raw((code & 0xff) << 8),
            stdout: output.stdout.to_vec(),
            stderr: output.stderr.to_vec(),
        })
    }
}

fn cli_name(kind: CliKind) -> &'static str {
    match kind {
        CliKind::Claude => "Claude Code",
        CliKind::Codex => "Codex CLI",
        CliKind::Gemini => "Gemini CLI",
    }
}

/// One prompt for the CLI: the user's message alone, or the conversation as labelled turns.
fn prompt_of(messages: &[ChatMessage]) -> String {
    if let [only] = messages
        && only.role == Role::User
    {
        return only.content.clone().unwrap_or_default();
    }
    messages
        .iter()
        .filter_map(|m| {
            let label = match m.role {
                Role::System => "System",
                Role::User => "User",
                Role::Assistant => "Assistant",
                Role::Tool => "Tool",
            };
            m.content.as_deref().map(|c| format!("{label}: {c}"))
        })
        .collect::<Vec<_>>()
        .join("\n\n")
}

impl Provider for ContainerCli {
    fn complete<'a>(
        &'a self,
        _request: &'a CompletionRequest,
        _deltas: Option<DeltaSink<'a>>,
    ) -> BoxFuture<'a, Result<Completion, ProviderError>> {
        Box::pin(async move {
            Err(ProviderError::new(
                ErrorClass::NotConfigured,
                "a CLI in a runtime container is asked for one user (get_perspectives)",
            ))
        })
    }

    fn complete_for<'a>(
        &'a self,
        user_id: Uuid,
        request: &'a CompletionRequest,
        _deltas: Option<DeltaSink<'a>>,
    ) -> BoxFuture<'a, Result<Completion, ProviderError>> {
        Box::pin(self.run(user_id, request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_conversation_becomes_one_labelled_prompt() {
        let one = [ChatMessage::text(Role::User, "hi")];
        assert_eq!(prompt_of(&one), "hi");
        let many = [
            ChatMessage::text(Role::System, "be brief"),
            ChatMessage::text(Role::User, "hi"),
        ];
        assert_eq!(prompt_of(&many), "System: be brief\n\nUser: hi");
    }
}
