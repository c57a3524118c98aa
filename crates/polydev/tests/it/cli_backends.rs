//! CLI backends against fake `claude`, `codex` and `gemini` executables (shell scripts on a
//! temporary PATH) that print the real CLIs' output formats, their failures, and hang; then
//! `polydev mcp` with those CLIs beside a real `polydev serve`, driven by the official MCP SDK
//! client over stdio.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::process::{Child, Command};

use polydev::accounts::{Plan, Scope};
use polydev::perspectives::cli::{self, CliKind};
use polydev::perspectives::provider::ErrorClass;
use polydev_mock::MockUpstream;

use crate::common::{TestDb, eventually, mock_catalogue};
use crate::http_api::user_with_scoped_token;

/// Claude Code's `result` object (`claude -p --output-format json`).
pub const CLAUDE_OK: &str = r#"{"type":"result","subtype":"success","is_error":false,"duration_ms":812,"duration_api_ms":790,"num_turns":1,"result":"Claude Code says: spaces.","session_id":"7f9d3c2a-1b4e-4f6a-8c2d-3e5f7a9b1c0d","total_cost_usd":0.0123,"usage":{"input_tokens":14,"cache_creation_input_tokens":100,"cache_read_input_tokens":900,"output_tokens":6,"service_tier":"standard"},"modelUsage":{},"permission_denials":[],"uuid":"0b6c1f5e-2d3a-4e7b-9c8d-1a2b3c4d5e6f"}"#;
/// Codex CLI's JSON events (`codex exec --json`).
pub const CODEX_OK: &str = r#"{"type":"thread.started","thread_id":"019a2d7a-41c4-78b1-b7cc-a45d62a89cd5"}
{"type":"turn.started"}
{"type":"item.completed","item":{"id":"item_0","type":"reasoning","text":"**Short answer**"}}
{"type":"item.completed","item":{"id":"item_1","type":"agent_message","text":"Codex says: tabs."}}
{"type":"turn.completed","usage":{"input_tokens":2946,"cached_input_tokens":1024,"output_tokens":7}}"#;
/// Gemini CLI's JSON output (`gemini --output-format json`).
const GEMINI_OK: &str = r#"{"session_id":"c3a1e2f0","response":"Gemini says: both.","stats":{"models":{"gemini-2.5-pro":{"api":{"totalRequests":1,"totalErrors":0,"totalLatencyMs":900},"tokens":{"input":40,"prompt":40,"candidates":5,"total":120,"cached":0,"thoughts":75,"tool":0}}},"tools":{"totalCalls":0,"totalSuccess":0,"totalFail":0,"totalDurationMs":0,"totalDecisions":{"accept":0,"reject":0,"modify":0,"auto_accept":0},"byName":{}},"files":{"totalLinesAdded":0,"totalLinesRemoved":0}}}"#;

/// A directory of fake CLIs, to put first on PATH.
pub struct FakeClis {
    pub dir: tempfile::TempDir,
}

impl FakeClis {
    pub fn new() -> FakeClis {
        FakeClis {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `name` answers `--version` with `version`, saves its arguments and stdin (the prompt)
    /// next to itself, then runs `body` (a shell snippet).
    pub fn add(&self, name: &str, version: &str, body: &str) {
        let dir = self.path().display();
        let script = format!(
            "#!/bin/sh\n\
             if [ \"$1\" = \"--version\" ]; then echo '{version}'; exit 0; fi\n\
             echo \"$@\" > '{dir}/{name}.args'\n\
             cat > '{dir}/{name}.prompt'\n\
             {body}\n"
        );
        let file = self.path().join(name);
        std::fs::write(&file, script).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    /// `name` prints `output` on stdout and exits 0.
    pub fn answering(&self, name: &str, version: &str, output: &str) {
        self.add(name, version, &format!("cat <<'EOF'\n{output}\nEOF"));
    }

    pub fn read(&self, file: &str) -> String {
        std::fs::read_to_string(self.path().join(file)).unwrap_or_default()
    }

    /// A PATH with the fakes first (the shell and `cat` still found).
    pub fn path_var(&self) -> String {
        format!("{}:/usr/bin:/bin", self.path().display())
    }
}

async fn detect(fakes: &FakeClis, kind: CliKind) -> cli::CliBackend {
    let path = fakes.path_var();
    cli::detect(kind, Some(path.as_ref()))
        .await
        .unwrap_or_else(|| panic!("{kind:?} not detected"))
}

const LONG: Duration = Duration::from_secs(30);

#[tokio::test]
async fn the_three_adapters_read_answers_and_usage_from_the_real_formats() {
    let fakes = FakeClis::new();
    fakes.answering("claude", "2.1.332 (Claude Code)", CLAUDE_OK);
    fakes.answering("codex", "codex-cli 0.171.0", CODEX_OK);
    fakes.answering("gemini", "0.61.0", GEMINI_OK);
    // The prompt goes on stdin, whole, even past the 128 KiB a single argument may hold.
    let prompt = format!("Tabs or spaces? {}", "é".repeat(90_000));

    let claude = detect(&fakes, CliKind::Claude).await;
    assert_eq!(claude.version, "2.1.332 (Claude Code)");
    let answer = claude.complete(&prompt, LONG).await.unwrap();
    assert_eq!(answer.text, "Claude Code says: spaces.");
    assert_eq!((answer.input_tokens, answer.output_tokens), (1014, 6));
    assert_eq!(fakes.read("claude.args").trim(), "-p --output-format json");
    assert_eq!(fakes.read("claude.prompt"), prompt);

    let codex = detect(&fakes, CliKind::Codex).await;
    assert_eq!(codex.version, "codex-cli 0.171.0");
    let answer = codex.complete(&prompt, LONG).await.unwrap();
    assert_eq!(answer.text, "Codex says: tabs.");
    assert_eq!((answer.input_tokens, answer.output_tokens), (2946, 7));
    assert!(fakes.read("codex.args").starts_with("exec --json"));
    assert_eq!(fakes.read("codex.prompt"), prompt);

    let gemini = detect(&fakes, CliKind::Gemini).await;
    let answer = gemini.complete(&prompt, LONG).await.unwrap();
    assert_eq!(answer.text, "Gemini says: both.");
    assert_eq!((answer.input_tokens, answer.output_tokens), (40, 80));
    assert_eq!(fakes.read("gemini.args").trim(), "--output-format json");
}

#[tokio::test]
async fn a_cli_is_detected_only_on_path_and_when_it_answers_its_version() {
    let fakes = FakeClis::new();
    let path = fakes.path_var();
    assert!(
        cli::detect(CliKind::Claude, Some(path.as_ref()))
            .await
            .is_none()
    );
    // `--version` that fails: not used.
    std::fs::write(fakes.path().join("codex"), "#!/bin/sh\nexit 3\n").unwrap();
    assert!(
        cli::detect(CliKind::Codex, Some(path.as_ref()))
            .await
            .is_none()
    );
    // A file that is not executable is not a CLI.
    std::fs::write(fakes.path().join("gemini"), "#!/bin/sh\necho 1\n").unwrap();
    assert!(
        cli::detect(CliKind::Gemini, Some(path.as_ref()))
            .await
            .is_none()
    );
    assert!(cli::detect(CliKind::Gemini, None).await.is_none());
}

#[tokio::test]
async fn failures_become_clear_per_model_errors() {
    let fakes = FakeClis::new();
    // Claude Code signed out: its `result` object with `is_error`, exit 1.
    fakes.add(
        "claude",
        "2.1.332 (Claude Code)",
        r#"echo '{"type":"result","subtype":"success","is_error":true,"duration_ms":90,"num_turns":1,"result":"Invalid API key · Please run /login","session_id":"s","total_cost_usd":0,"usage":{"input_tokens":0,"output_tokens":0}}'; exit 1"#,
    );
    let error = detect(&fakes, CliKind::Claude)
        .await
        .complete("hi", LONG)
        .await
        .unwrap_err();
    assert_eq!(error.class, ErrorClass::Auth);
    assert!(error.message.contains("/login"), "{}", error.message);

    // Codex rate-limited: `turn.failed` in its events, exit 1.
    fakes.add(
        "codex",
        "codex-cli 0.171.0",
        r#"echo '{"type":"thread.started","thread_id":"t"}'; echo '{"type":"turn.started"}'; echo '{"type":"turn.failed","error":{"message":"You have hit your usage limit. Try again in 2 hours."}}'; exit 1"#,
    );
    let error = detect(&fakes, CliKind::Codex)
        .await
        .complete("hi", LONG)
        .await
        .unwrap_err();
    assert_eq!(error.class, ErrorClass::RateLimited);
    assert!(error.message.contains("usage limit"), "{}", error.message);

    // Gemini signed out: its error object on stderr, exit code 41.
    fakes.add(
        "gemini",
        "0.61.0",
        r#"echo '{"session_id":"s","error":{"type":"FatalAuthenticationError","message":"Please set an Auth method in your settings.json","code":41}}' >&2; exit 41"#,
    );
    let error = detect(&fakes, CliKind::Gemini)
        .await
        .complete("hi", LONG)
        .await
        .unwrap_err();
    assert_eq!(error.class, ErrorClass::Auth);
    assert!(error.message.contains("gemini"), "{}", error.message);

    // A crash: non-zero exit, the reason on stderr.
    fakes.add(
        "codex",
        "codex-cli 0.171.0",
        "echo 'thread main panicked' >&2; exit 101",
    );
    let error = detect(&fakes, CliKind::Codex)
        .await
        .complete("hi", LONG)
        .await
        .unwrap_err();
    assert_eq!(error.class, ErrorClass::Upstream);
    assert!(
        error.message.contains("status 101") && error.message.contains("panicked"),
        "{}",
        error.message
    );

    // Exit 0 with something that is not the format.
    fakes.add(
        "claude",
        "2.1.332 (Claude Code)",
        "echo 'Spaces, obviously.'",
    );
    let error = detect(&fakes, CliKind::Claude)
        .await
        .complete("hi", LONG)
        .await
        .unwrap_err();
    assert_eq!(error.class, ErrorClass::Malformed);
}

/// Whether process `pid` is gone (or a zombie waiting for its parent).
fn gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

/// A CLI that starts a helper (as the Node CLIs do), records its pid, and never answers.
fn hanging(fakes: &FakeClis, name: &str) -> PathBuf {
    let pidfile = fakes.path().join(format!("{name}.helper"));
    fakes.add(
        name,
        "1.0.0",
        &format!("sleep 600 &\necho $! > '{}'\nwait", pidfile.display()),
    );
    pidfile
}

async fn helper_pid(pidfile: &Path) -> i32 {
    assert!(
        eventually(|| async {
            std::fs::read_to_string(pidfile).is_ok_and(|s| !s.trim().is_empty())
        })
        .await
    );
    std::fs::read_to_string(pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn a_hanging_cli_times_out_and_its_whole_process_group_is_killed() {
    let fakes = FakeClis::new();
    let pidfile = hanging(&fakes, "gemini");
    let gemini = detect(&fakes, CliKind::Gemini).await;
    let error = gemini
        .complete("hi", Duration::from_millis(500))
        .await
        .unwrap_err();
    assert_eq!(error.class, ErrorClass::Timeout);
    let helper = helper_pid(&pidfile).await;
    assert!(
        eventually(|| async { gone(helper) }).await,
        "helper {helper} survived"
    );
}

#[tokio::test]
async fn a_cancelled_call_kills_the_cli() {
    let fakes = FakeClis::new();
    let pidfile = hanging(&fakes, "claude");
    let claude = detect(&fakes, CliKind::Claude).await;
    let call = tokio::spawn(async move { claude.complete("hi", LONG).await });
    let helper = helper_pid(&pidfile).await;
    assert!(!gone(helper));
    call.abort();
    assert!(
        eventually(|| async { gone(helper) }).await,
        "helper {helper} survived"
    );
}

// --- `polydev mcp` with local CLIs, beside a real `polydev serve` ---

const BIN: &str = env!("CARGO_BIN_EXE_polydev");

struct Server {
    _child: Child,
    base: String,
    _mock: MockUpstream,
    _dir: tempfile::TempDir,
}

/// `polydev serve` over the mock catalogue; `with_keys` false leaves every provider without
/// its key.
async fn serve(db: &TestDb, with_keys: bool) -> Server {
    let mock = MockUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models.toml");
    std::fs::write(&models, mock_catalogue(&mock.base_url())).unwrap();
    let mut command = Command::new(BIN);
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--models"])
        .arg(&models)
        .env("DATABASE_URL", db.url())
        .env_remove("POLYDEV_TEST_MOCK_KEY");
    if with_keys {
        command.env("POLYDEV_TEST_MOCK_KEY", "mock-key");
    }
    let (child, base) = crate::common::spawn_serve(&mut command).await;
    Server {
        _child: child,
        base,
        _mock: mock,
        _dir: dir,
    }
}

async fn bridge_call(
    server: &Server,
    token: &str,
    fakes: &FakeClis,
    local_clis: &str,
    args: &Value,
) -> Value {
    let path = fakes.path_var();
    crate::mcp::sdk_client_env(
        &["stdio", BIN, &server.base, token, &args.to_string()],
        &[
            (
                "PATH",
                &format!("{path}:{}", std::env::var("PATH").unwrap_or_default()),
            ),
            ("POLYDEV_LOCAL_CLIS", local_clis),
            ("LOG_LEVEL", "info"),
        ],
    )
    .await
}

fn models_of(out: &Value) -> Vec<String> {
    out["structured"]["perspectives"]
        .as_array()
        .unwrap_or_else(|| panic!("no result: {out}"))
        .iter()
        .map(|p| p["model"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn polydev_mcp_lists_the_local_clis_it_detected_with_the_servers_models() {
    let db = TestDb::migrated().await;
    let (_, token) = user_with_scoped_token(&db, "list@example.com", Plan::Pro, Scope::Mcp).await;
    let server = serve(&db, true).await;
    let fakes = FakeClis::new();
    fakes.answering("claude", "2.1.332 (Claude Code)", CLAUDE_OK);
    fakes.answering("codex", "codex-cli 0.171.0", CODEX_OK);
    let list = |local_clis: &'static str| {
        let path = format!(
            "{}:{}",
            fakes.path_var(),
            std::env::var("PATH").unwrap_or_default()
        );
        let (base, token) = (server.base.clone(), token.clone());
        async move {
            crate::mcp::sdk_client_env(
                &["stdio", BIN, &base, &token, "{}"],
                &[
                    ("PATH", &path),
                    ("POLYDEV_LOCAL_CLIS", local_clis),
                    ("TOOL", "list_available_models"),
                ],
            )
            .await
        }
    };
    let out = list("claude").await;
    assert_eq!(out["isError"], false, "{out}");
    let models = out["structured"]["models"].as_array().unwrap();
    let local: Vec<&Value> = models.iter().filter(|m| m["local"] == true).collect();
    assert_eq!(local.len(), 1, "only the chosen CLI: {out}");
    assert_eq!(local[0]["id"], "claude-code");
    assert_eq!(local[0]["provider"], "cli");
    assert_eq!(local[0]["tier"], "subscription");
    assert_eq!(local[0]["version"], "2.1.332 (Claude Code)");
    assert!(
        models.iter().any(|m| m["id"] == "gpt-premium"),
        "the server's too"
    );
    assert!(
        out["text"]
            .as_str()
            .unwrap()
            .contains("on this machine: `claude`")
    );

    // Off: the server's list alone.
    let out = list("off").await;
    let models = out["structured"]["models"].as_array().unwrap();
    assert!(models.iter().all(|m| m["local"].is_null()), "{out}");
}

#[tokio::test]
async fn polydev_mcp_adds_the_local_clis_answers_to_the_servers() {
    let db = TestDb::migrated().await;
    let (user, token) =
        user_with_scoped_token(&db, "local@example.com", Plan::Pro, Scope::Mcp).await;
    let server = serve(&db, true).await;
    let fakes = FakeClis::new();
    fakes.answering("claude", "2.1.332 (Claude Code)", CLAUDE_OK);
    fakes.answering("codex", "codex-cli 0.171.0", CODEX_OK);
    fakes.answering("gemini", "0.61.0", GEMINI_OK);
    let args = json!({ "prompt": "Tabs or spaces?", "models": ["gpt-premium", "claude-normal"] });

    // `claude,codex`: gemini is installed but not chosen.
    let out = bridge_call(&server, &token, &fakes, "claude,codex", &args).await;
    assert_eq!(out["isError"], false, "{out}");
    assert_eq!(
        models_of(&out),
        ["gpt-premium", "claude-normal", "claude-code", "codex-cli"]
    );
    let structured = &out["structured"];
    let claude = &structured["perspectives"][2];
    assert_eq!(claude["status"], "ok");
    assert_eq!(claude["provider"], "cli");
    assert_eq!(claude["tier"], "subscription");
    assert_eq!(claude["cost_usd"], "0");
    assert_eq!(claude["text"], "Claude Code says: spaces.");
    assert_eq!(claude["input_tokens"], 1014);
    assert_eq!(structured["totals"]["models"], 4);
    assert_eq!(structured["totals"]["succeeded"], 4);
    assert!(
        out["text"]
            .as_str()
            .unwrap()
            .contains("## codex-cli (cli, subscription)")
    );
    assert_eq!(fakes.read("claude.prompt").trim(), "Tabs or spaces?");
    assert_eq!(fakes.read("gemini.prompt"), "", "gemini was not asked");

    // Progress: the start, then one per model, server's and local alike, to a total of 4.
    let progress = out["progress"].as_array().unwrap();
    let messages: Vec<&str> = progress
        .iter()
        .filter_map(|p| p["message"].as_str())
        .collect();
    assert_eq!(messages.len(), 5, "{messages:?}");
    assert!(
        messages
            .iter()
            .any(|m| m.starts_with("claude-code (") && m.contains("spaces"))
    );
    assert!(messages.iter().any(|m| m.starts_with("codex-cli (")));
    let last = progress.last().unwrap();
    assert_eq!(
        (last["progress"].as_f64(), last["total"].as_f64()),
        (Some(4.0), Some(4.0))
    );
    let values: Vec<f64> = progress
        .iter()
        .map(|p| p["progress"].as_f64().unwrap())
        .collect();
    assert!(values.windows(2).all(|w| w[0] <= w[1]), "{values:?}");

    // Log notifications (`logging/setLevel info`): the server's models and the local CLIs'.
    let logged: Vec<&str> = out["logs"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|l| l["data"]["model"].as_str())
        .collect();
    for model in ["gpt-premium", "claude-normal", "claude-code", "codex-cli"] {
        assert!(logged.contains(&model), "{model} not logged: {logged:?}");
    }

    // The server charged its two models only.
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM perspective_usage WHERE user_id = $1")
        .bind(user)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(rows, 2);

    // `off`: the server's answers only.
    let out = bridge_call(&server, &token, &fakes, "off", &args).await;
    assert_eq!(models_of(&out), ["gpt-premium", "claude-normal"]);
}

#[tokio::test]
async fn with_no_provider_on_the_server_the_local_clis_answer_alone() {
    let db = TestDb::migrated().await;
    let (user, token) =
        user_with_scoped_token(&db, "nokeys@example.com", Plan::Pro, Scope::Mcp).await;
    let server = serve(&db, false).await;
    let fakes = FakeClis::new();
    fakes.answering("gemini", "0.61.0", GEMINI_OK);
    // Codex is installed but signed out: a clear per-model error, and it is not asked again.
    fakes.add(
        "codex",
        "codex-cli 0.171.0",
        r#"echo '{"type":"thread.started","thread_id":"t"}'; echo '{"type":"error","message":"Not logged in. Run codex login."}'; exit 1"#,
    );
    let args = json!({ "prompt": "Tabs or spaces?" });

    let out = bridge_call(&server, &token, &fakes, "auto", &args).await;
    assert_eq!(out["isError"], false, "{out}");
    assert_eq!(models_of(&out), ["codex-cli", "gemini-cli"]);
    let codex = &out["structured"]["perspectives"][0];
    assert_eq!(codex["status"], "error");
    assert_eq!(codex["error"]["class"], "auth");
    assert!(
        codex["error"]["message"]
            .as_str()
            .unwrap()
            .contains("codex login"),
        "{codex}"
    );
    assert_eq!(out["structured"]["totals"]["succeeded"], 1);
    assert_eq!(out["structured"]["totals"]["cost_usd"], "0");
    assert!(
        out["stderr"]
            .as_str()
            .unwrap()
            .contains("`codex` is not signed in"),
        "{out}"
    );

    // Without local CLIs the server's error stands, the same code as over REST.
    let out = bridge_call(&server, &token, &fakes, "off", &args).await;
    assert_eq!(out["isError"], true, "{out}");
    assert_eq!(
        out["structured"]["error"]["code"], "no_provider_configured",
        "{out}"
    );

    // A local CLI that fails does not turn the server's error into a result.
    let out = bridge_call(&server, &token, &fakes, "codex", &args).await;
    assert_eq!(
        out["structured"]["error"]["code"], "no_provider_configured",
        "{out}"
    );

    let held: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM quota_reservations WHERE user_id = $1)
              + (SELECT count(*) FROM perspective_usage WHERE user_id = $1)
              + (SELECT messages_used FROM user_perspective_quotas WHERE user_id = $1)",
    )
    .bind(user)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(held, 0, "nothing reserved or charged on the server");
}

#[tokio::test]
async fn a_local_cli_past_the_deadline_is_a_timeout_and_the_server_error_stops_the_clis() {
    let db = TestDb::migrated().await;
    let (_, token) =
        user_with_scoped_token(&db, "slowcli@example.com", Plan::Pro, Scope::Mcp).await;
    let server = serve(&db, true).await;
    let fakes = FakeClis::new();
    let pidfile = hanging(&fakes, "claude");

    let args =
        json!({ "prompt": "Tabs or spaces?", "models": ["gpt-premium"], "deadline_ms": 1500 });
    let out = bridge_call(&server, &token, &fakes, "claude", &args).await;
    assert_eq!(models_of(&out), ["gpt-premium", "claude-code"]);
    let claude = &out["structured"]["perspectives"][1];
    assert_eq!(claude["status"], "timeout", "{claude}");
    let helper = helper_pid(&pidfile).await;
    assert!(eventually(|| async { gone(helper) }).await);

    // Arguments the server refuses: its error at once, the CLI stopped.
    std::fs::remove_file(&pidfile).unwrap();
    let args = json!({ "prompt": "Tabs?", "models": ["no-such-model"] });
    let out = bridge_call(&server, &token, &fakes, "claude", &args).await;
    assert_eq!(
        out["structured"]["error"]["code"], "invalid_request",
        "{out}"
    );
    if let Ok(pid) = std::fs::read_to_string(&pidfile) {
        let helper: i32 = pid.trim().parse().unwrap();
        assert!(eventually(|| async { gone(helper) }).await);
    }
}
