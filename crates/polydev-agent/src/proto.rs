//! The agent ↔ server protocol (JSON over HTTP), shared by the agent and the server. Every
//! agent call carries `Authorization: Bearer <container id>.<bootstrap secret>`.
//!
//! | call | body → answer |
//! |---|---|
//! | `POST /v1/runtime/agent/register` | [`Register`] → [`Registered`] |
//! | `GET /v1/runtime/agent/next` | long poll → 200 [`Assignment`], or 204 (ask again) |
//! | `POST /v1/runtime/agent/jobs/{id}/output` | [`OutputBatch`] → [`OutputAck`] |
//! | `POST /v1/runtime/agent/jobs/{id}/finish` | [`Finish`] → 204 |

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Sealed boxes' namespaces (row ids: the job id for the command, `<job id>/<seq>` for output).
pub const COMMAND_NAMESPACE: &str = "job.command";
pub const STDOUT_NAMESPACE: &str = "job.stdout";
pub const STDERR_NAMESPACE: &str = "job.stderr";
/// A credential grant's namespace (row id: the container id): a [`Grant`] sealed to the
/// container's key by a client that holds the user's keys (docs/cli-backends.md).
pub const GRANT_NAMESPACE: &str = "runtime.grant";
/// The largest sealed grant the server stores.
pub const MAX_SEALED_GRANT: usize = 48 * 1024;

/// Plaintext bytes per sealed output chunk: 4 bytes of length framing make it fill its padding
/// bucket (8 KiB) exactly.
pub const CHUNK_BYTES: usize = 8 * 1024 - 4;
/// Chunks per output POST (keeps a batch under the server's 64 KiB body limit).
pub const CHUNKS_PER_BATCH: usize = 4;

/// The row id of output chunk `seq` of a job (one sequence over both streams).
pub fn output_row(job_id: &str, seq: u64) -> String {
    format!("{job_id}/{seq}")
}

/// The marker sealed as a stream's last chunk when its output went over the limit.
pub fn truncation_marker(limit: u64) -> String {
    format!("\n[polydev: output truncated after {limit} bytes]\n")
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Register {
    /// The agent's X25519 public key (base64url).
    pub public_key: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Registered {
    pub container_id: String,
}

/// Limits a job runs under.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Limits {
    pub wall_clock_ms: u64,
    /// Plaintext bytes per stream; beyond it output is dropped and a marker sealed.
    pub max_output_bytes: u64,
}

/// A job for the agent: its command sealed to the agent's key, and the user's public key to
/// seal the output to (unless the sealed command names its own output key).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Assignment {
    pub job_id: String,
    pub user_id: String,
    pub user_public_key: String,
    pub encrypted_command: String,
    pub limits: Limits,
    /// The user's proxy (`http://host:port`) where the container's own egress cannot name it
    /// (Nomad); `None`: keep the container's `HTTP(S)_PROXY`.
    #[serde(default)]
    pub proxy: Option<String>,
    /// The container's credential grant, if its user made one: a sealed box of a [`Grant`] to
    /// the agent's key (namespace [`GRANT_NAMESPACE`], row = the container id). Its files are
    /// written for a job whose program is the granted CLI only.
    #[serde(default)]
    pub grant: Option<String>,
}

/// The plaintext inside a sealed grant: one CLI's credential files (`Debug` shows the paths
/// only).
#[derive(Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Grant {
    /// The CLI's executable name (`claude`, `codex`, `gemini`): a job gets the files only when
    /// its program (the first word of its command, its file name) is this, its arguments are
    /// exactly [`granted_args`], and it brings no environment and no files of its own.
    pub cli: String,
    /// Files written (mode 0600) in the job's home directory, by relative path
    /// (`.claude/.credentials.json`).
    pub files: BTreeMap<String, String>,
}

/// Where each CLI keeps its credential, relative to its home: the file a grant carries (the
/// login session's agent seals the same file's content).
pub fn credential_file(cli: &str) -> Option<&'static str> {
    match cli {
        "claude" => Some(".claude/.credentials.json"),
        "codex" => Some(".codex/auth.json"),
        "gemini" => Some(".gemini/oauth_creds.json"),
        _ => None,
    }
}

/// The arguments polydev runs each CLI with (headless, JSON output, the prompt on stdin, no
/// tools that write), and the only ones a job that gets a grant's files may pass: a server that
/// chooses other arguments (enabling tools, settings, hooks) gets a run without the credential.
pub fn granted_args(cli: &str) -> Option<&'static [&'static str]> {
    match cli {
        // `-p` without a prompt argument reads the prompt from stdin.
        "claude" => Some(&["-p", "--output-format", "json"]),
        // `-`: the prompt is read from stdin; read-only sandbox; any directory.
        "codex" => Some(&[
            "exec",
            "--json",
            "--skip-git-repo-check",
            "--sandbox",
            "read-only",
            "-",
        ]),
        // Headless because stdin is not a terminal; stdin is the prompt.
        "gemini" => Some(&["--output-format", "json"]),
        _ => None,
    }
}

impl std::fmt::Debug for Grant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grant")
            .field("cli", &self.cli)
            .field("files", &self.files.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// The plaintext inside a sealed command.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct JobCommand {
    /// Program and arguments.
    pub command: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Files written (mode 0600) under the job's private directory on the sandbox's tmpfs
    /// before it starts, by relative path: the CLI credentials it needs.
    #[serde(default)]
    pub files: BTreeMap<String, String>,
    #[serde(default)]
    pub stdin: Option<String>,
    /// The X25519 public key (base64url) the output is sealed to instead of the assignment's
    /// `user_public_key`: a client pins its own key here, and the server's perspectives calls
    /// put an ephemeral key of that one call (docs/cli-backends.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_public_key: Option<String>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    pub fn namespace(self) -> &'static str {
        match self {
            Stream::Stdout => STDOUT_NAMESPACE,
            Stream::Stderr => STDERR_NAMESPACE,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct OutputChunk {
    pub seq: u64,
    pub stream: Stream,
    /// A sealed box to the user's key (namespace of the stream, row `<job id>/<seq>`).
    pub sealed: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct OutputBatch {
    pub chunks: Vec<OutputChunk>,
    /// Set once a stream went over the limit.
    #[serde(default)]
    pub truncated: bool,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct OutputAck {
    /// The user cancelled the job: kill it.
    pub cancelled: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Finish {
    /// The exit code, 128 + signal if killed; `None` if it never ran.
    pub exit_code: Option<i32>,
    pub duration_ms: u64,
    #[serde(default)]
    pub truncated: bool,
    /// Why it failed, in the agent's own fixed words (never the job's command or output).
    #[serde(default)]
    pub error: Option<String>,
}
