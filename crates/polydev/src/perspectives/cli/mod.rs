//! CLI backends: the provider CLIs a developer already pays for (Claude Code, Codex CLI, Gemini
//! CLI) asked like any model. [`detect`] finds a CLI on `PATH` and reads its `--version`;
//! [`CliBackend::complete`] runs it headless with the prompt on stdin, under a timeout, in its own
//! process group (killed whole on timeout or when the call is dropped), and reads the answer and
//! the token usage from the CLI's JSON output. Output formats, and the CLI versions they come
//! from, are in docs/cli-backends.md; each adapter (`claude`, `codex`, `gemini`) keeps its
//! shapes as serde types and ignores what it does not name.
//!
//! Used by `polydev mcp` on the developer's machine (mcp/local.rs), and by the catalogue's `cli`
//! providers in the user's runtime container ([`container`]). The module does no I/O but
//! running the CLI, and the parsers take plain text, so the server side can use them too.

mod claude;
mod codex;
pub mod container;
mod gemini;
mod process;

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::provider::{Completion, ErrorClass, ProviderError, redact::redact};
use super::result::{ModelError, ModelResult, Status};

/// The `provider` of a CLI's answer in a result.
pub const PROVIDER: &str = "cli";
/// The `tier` of a CLI's answer: it is paid by the user's own subscription, not a polydev quota.
pub const TIER: &str = "subscription";
/// How long `--version` may take (the CLIs are Node programs; a cold start takes a moment).
const VERSION_TIMEOUT: Duration = Duration::from_secs(10);

/// The CLIs polydev can ask.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CliKind {
    Claude,
    Codex,
    Gemini,
}

impl CliKind {
    pub const ALL: [CliKind; 3] = [CliKind::Claude, CliKind::Codex, CliKind::Gemini];

    /// The executable looked up on `PATH`.
    pub fn command(self) -> &'static str {
        match self {
            CliKind::Claude => "claude",
            CliKind::Codex => "codex",
            CliKind::Gemini => "gemini",
        }
    }

    /// The `model` of its answers in a result.
    pub fn model_id(self) -> &'static str {
        match self {
            CliKind::Claude => "claude-code",
            CliKind::Codex => "codex-cli",
            CliKind::Gemini => "gemini-cli",
        }
    }

    /// Either name: the command (`claude`) or the model id (`claude-code`).
    pub fn parse(name: &str) -> Option<CliKind> {
        let name = name.trim();
        CliKind::ALL.into_iter().find(|k| {
            k.command().eq_ignore_ascii_case(name) || k.model_id().eq_ignore_ascii_case(name)
        })
    }

    /// What to do when the CLI is not signed in.
    fn login_hint(self) -> &'static str {
        match self {
            CliKind::Claude => "run `claude` and sign in with /login (or set ANTHROPIC_API_KEY)",
            CliKind::Codex => "run `codex login` (or set OPENAI_API_KEY)",
            CliKind::Gemini => "run `gemini` and choose a sign-in method (or set GEMINI_API_KEY)",
        }
    }

    /// Headless, JSON output, the prompt from stdin (an argument could not hold the longest
    /// prompts: Linux caps one argument at 128 KiB), no tools that write. The same list the
    /// runtime agent requires before it gives a job the user's granted credential.
    fn args(self) -> Vec<OsString> {
        polydev_agent::proto::granted_args(self.command())
            .expect("every CLI has its arguments")
            .iter()
            .map(OsString::from)
            .collect()
    }

    fn parse_output(self, stdout: &str) -> Parsed {
        match self {
            CliKind::Claude => claude::parse(stdout),
            CliKind::Codex => codex::parse(stdout),
            CliKind::Gemini => gemini::parse(stdout),
        }
    }

    /// A class the exit code alone tells (Gemini CLI's documented headless exit codes).
    fn class_of_exit(self, code: Option<i32>) -> Option<ErrorClass> {
        match (self, code) {
            (CliKind::Gemini, Some(41)) => Some(ErrorClass::Auth),
            (CliKind::Gemini, Some(42)) => Some(ErrorClass::BadRequest),
            _ => None,
        }
    }
}

/// What a CLI printed, read by its adapter.
#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    Answer(Completion),
    /// A well-formed error report: the CLI's own message.
    Failed(String),
    /// Not the CLI's format: why.
    Unreadable(String),
}

/// An installed CLI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CliBackend {
    pub kind: CliKind,
    pub program: PathBuf,
    /// The first line of `--version`.
    pub version: String,
}

/// Finds `kind` on `path` (a `PATH` value) and asks its version; `None` when it is not there
/// or does not answer `--version`.
pub async fn detect(kind: CliKind, path: Option<&std::ffi::OsStr>) -> Option<CliBackend> {
    let program = find_on_path(kind.command(), path?)?;
    let output = process::run(
        &program,
        &[OsString::from("--version")],
        b"",
        VERSION_TIMEOUT,
    )
    .await
    .ok()?;
    if !output.status.success() {
        tracing::debug!(cli = kind.command(), status = ?output.status, "`--version` failed: not used");
        return None;
    }
    let version = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("unknown")
        .chars()
        .take(100)
        .collect();
    Some(CliBackend {
        kind,
        program,
        version,
    })
}

fn find_on_path(command: &str, path: &std::ffi::OsStr) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::env::split_paths(path)
        .filter(|dir| dir.is_absolute())
        .map(|dir| dir.join(command))
        .find(|candidate| {
            std::fs::metadata(candidate)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

impl CliBackend {
    /// Asks the CLI `prompt`; at `timeout` (or when the future is dropped) its whole process
    /// group is killed.
    pub async fn complete(
        &self,
        prompt: &str,
        timeout: Duration,
    ) -> Result<Completion, ProviderError> {
        let name = self.kind.command();
        let output = process::run(&self.program, &self.kind.args(), prompt.as_bytes(), timeout)
            .await
            .map_err(|error| match error {
                process::RunError::Timeout => ProviderError::new(
                    ErrorClass::Timeout,
                    format!("`{name}` gave no answer within {} ms", timeout.as_millis()),
                ),
                process::RunError::Spawn(e) => ProviderError::new(
                    ErrorClass::Connection,
                    format!("`{name}` could not be started: {e}"),
                ),
                process::RunError::TooLarge => ProviderError::new(
                    ErrorClass::Malformed,
                    format!("`{name}` printed more than {} bytes", process::MAX_STDOUT),
                ),
            })?;
        self.read(&output)
    }

    fn read(&self, output: &process::Output) -> Result<Completion, ProviderError> {
        let name = self.kind.command();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        let code = output.status.code();
        let failed = |message: &str| {
            let class = self
                .kind
                .class_of_exit(code)
                .or_else(|| classify(message))
                .unwrap_or(ErrorClass::Upstream);
            ProviderError::new(class, self.describe(class, message))
        };
        match self.kind.parse_output(&stdout) {
            Parsed::Answer(completion) => Ok(completion),
            Parsed::Failed(message) => Err(failed(&message)),
            // Some CLIs (Gemini) print their JSON error report on stderr.
            Parsed::Unreadable(_) if !output.status.success() => {
                match self.kind.parse_output(&stderr) {
                    Parsed::Failed(message) => Err(failed(&message)),
                    _ => {
                        let said = last_lines(&stderr).or_else(|| last_lines(&stdout));
                        let status = match code {
                            Some(code) => format!("status {code}"),
                            None => "a signal".to_string(),
                        };
                        let message = match said {
                            Some(said) => format!("exited with {status}: {said}"),
                            None => format!("exited with {status} and printed nothing"),
                        };
                        Err(failed(&message))
                    }
                }
            }
            Parsed::Unreadable(why) => Err(ProviderError::new(
                ErrorClass::Malformed,
                format!(
                    "`{name}` printed output polydev cannot read ({why}); polydev reads the formats of docs/cli-backends.md"
                ),
            )),
        }
    }

    /// The user-facing message of a failure: the CLI's words (masked, cut short), and what to
    /// do when it is not signed in.
    fn describe(&self, class: ErrorClass, said: &str) -> String {
        let name = self.kind.command();
        let said = redact(said);
        match class {
            ErrorClass::Auth => format!(
                "`{name}` is not signed in on this machine: {}. It said: {said}",
                self.kind.login_hint()
            ),
            ErrorClass::RateLimited => {
                format!("`{name}`: the subscription's usage limit or rate limit is reached: {said}")
            }
            _ => format!("`{name}`: {said}"),
        }
    }
}

/// The class a CLI's error text names: not signed in, rate or usage limit; else unknown.
/// Status codes count as whole words only (a token count such as 24012 is not a 401).
fn classify(text: &str) -> Option<ErrorClass> {
    let text = text.to_lowercase();
    let has_code = |code: &str| {
        text.split(|c: char| !c.is_ascii_alphanumeric())
            .any(|word| word == code)
    };
    const AUTH: &[&str] = &[
        "not logged in",
        "/login",
        "log in",
        "login required",
        "sign in",
        "invalid api key",
        "api key not valid",
        "unauthorized",
        "unauthenticated",
        "authentication",
        "credentials",
    ];
    const LIMIT: &[&str] = &[
        "rate limit",
        "rate_limit",
        "usage limit",
        "limit reached",
        "too many requests",
        "quota",
        "resource_exhausted",
    ];
    if has_code("401") || AUTH.iter().any(|w| text.contains(w)) {
        Some(ErrorClass::Auth)
    } else if has_code("429") || LIMIT.iter().any(|w| text.contains(w)) {
        Some(ErrorClass::RateLimited)
    } else {
        None
    }
}

/// The last non-empty lines of a stream (what a failing program says last is its reason).
fn last_lines(text: &str) -> Option<String> {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let tail = &lines[lines.len().saturating_sub(3)..];
    (!tail.is_empty()).then(|| tail.join(" "))
}

/// A CLI's answer (or failure) in the shape of any model's result: tier `subscription`, cost 0
/// (the user's subscription pays).
pub fn model_result(
    kind: CliKind,
    outcome: Result<Completion, ProviderError>,
    latency_ms: u64,
) -> ModelResult {
    let base = ModelResult {
        model: kind.model_id().to_string(),
        provider: PROVIDER.to_string(),
        tier: TIER.to_string(),
        status: Status::Ok,
        text: None,
        text_withheld: false,
        latency_ms,
        input_tokens: None,
        output_tokens: None,
        cost_usd: None,
        error: None,
        finish_reason: None,
        tool_calls: None,
    };
    match outcome {
        Ok(completion) => ModelResult {
            finish_reason: completion.finish_reason,
            text: Some(completion.text),
            input_tokens: Some(completion.input_tokens),
            output_tokens: Some(completion.output_tokens),
            cost_usd: Some("0".to_string()),
            ..base
        },
        Err(error) => ModelResult {
            status: if error.class == ErrorClass::Timeout {
                Status::Timeout
            } else {
                Status::Error
            },
            error: Some(ModelError {
                class: error.class,
                message: error.message,
            }),
            ..base
        },
    }
}

/// Asks `backend` and returns its result, timed.
pub async fn ask(backend: &CliBackend, prompt: &str, timeout: Duration) -> ModelResult {
    let started = Instant::now();
    let outcome = backend.complete(prompt, timeout).await;
    model_result(backend.kind, outcome, started.elapsed().as_millis() as u64)
}

/// Saturating `u64` → `u32` for token counts.
fn tokens(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// For tests of the reading: the program's path is irrelevant.
    fn backend(kind: CliKind) -> CliBackend {
        CliBackend {
            kind,
            program: PathBuf::from("/nonexistent"),
            version: "test".into(),
        }
    }

    fn output(code: i32, stdout: &str, stderr: &str) -> process::Output {
        use std::os::unix::process::ExitStatusExt;
        process::Output {
            status: std::process::ExitStatus::from_raw(code << 8),
            stdout: stdout.as_bytes().to_vec(),
            stderr: stderr.as_bytes().to_vec(),
        }
    }

    #[test]
    fn names_parse_either_way() {
        assert_eq!(CliKind::parse("claude"), Some(CliKind::Claude));
        assert_eq!(CliKind::parse("Codex-CLI"), Some(CliKind::Codex));
        assert_eq!(CliKind::parse(" gemini "), Some(CliKind::Gemini));
        assert_eq!(CliKind::parse("cursor"), None);
    }

    #[test]
    fn failures_are_classified_from_what_the_cli_says() {
        let claude = backend(CliKind::Claude);
        let error = claude
            .read(&output(1, "", "Invalid API key · Please run /login\n"))
            .unwrap_err();
        assert_eq!(error.class, ErrorClass::Auth);
        assert!(
            error.message.contains("claude` is not signed in"),
            "{}",
            error.message
        );

        let codex = backend(CliKind::Codex);
        let error = codex
            .read(&output(1, "", "error: 429 Too Many Requests\n"))
            .unwrap_err();
        assert_eq!(error.class, ErrorClass::RateLimited);

        let error = codex.read(&output(2, "", "")).unwrap_err();
        assert_eq!(error.class, ErrorClass::Upstream);
        assert!(
            error.message.contains("exited with status 2"),
            "{}",
            error.message
        );

        let error = codex.read(&output(0, "hello, not json\n", "")).unwrap_err();
        assert_eq!(error.class, ErrorClass::Malformed);

        // Gemini's exit code 41 is its authentication error, whatever the text.
        let gemini = backend(CliKind::Gemini);
        let error = gemini
            .read(&output(
                41,
                "",
                r#"{"error":{"type":"Error","message":"Please set an Auth method","code":41}}"#,
            ))
            .unwrap_err();
        assert_eq!(error.class, ErrorClass::Auth);
    }

    #[test]
    fn status_codes_count_only_as_whole_words() {
        assert_eq!(
            classify("unexpected status 401 Unauthorized"),
            Some(ErrorClass::Auth)
        );
        assert_eq!(
            classify("Rate limit reached: Limit 30000, Used 24012"),
            Some(ErrorClass::RateLimited)
        );
        assert_eq!(classify("HTTP 429"), Some(ErrorClass::RateLimited));
        assert_eq!(classify("wrote 14015 bytes, then crashed"), None);
    }

    #[test]
    fn secrets_in_a_cli_message_are_masked() {
        let claude = backend(CliKind::Claude);
        let error = claude
            .read(&output(
                1,
                "",
                "request failed for key sk-ant-api03-AbCdEf123456789xyz",
            ))
            .unwrap_err();
        assert!(!error.message.contains("AbCdEf123"), "{}", error.message);
    }

    #[test]
    fn results_have_the_shape_of_any_model() {
        let ok = model_result(
            CliKind::Gemini,
            Ok(Completion {
                text: "yes".into(),
                tool_calls: None,
                input_tokens: 3,
                output_tokens: 4,
                finish_reason: None,
            }),
            12,
        );
        assert_eq!(
            (
                ok.model.as_str(),
                ok.provider.as_str(),
                ok.tier.as_str(),
                ok.status
            ),
            ("gemini-cli", "cli", "subscription", Status::Ok)
        );
        assert_eq!(ok.cost_usd.as_deref(), Some("0"));
        let timeout = model_result(
            CliKind::Codex,
            Err(ProviderError::new(ErrorClass::Timeout, "slow")),
            5,
        );
        assert_eq!(timeout.status, Status::Timeout);
    }
}
