//! The catalogue's `cli` models in the user's runtime container (issue 11, docs/cli-backends.md,
//! "In runtime containers"): a real server, the local driver (bubblewrap) running the real
//! agent, a fake `claude` mounted in the sandbox that checks its credential file and prints
//! Claude Code's `result` JSON. The credential reaches the container only as a grant sealed to
//! the container's key; the answer comes back sealed to an ephemeral key of the call.

use std::collections::BTreeMap;
use std::path::Path;

use polydev::perspectives::Catalogue;
use polydev::perspectives::catalogue::DEFAULT_CATALOGUE;
use polydev::runtime::Bind;
use polydev_agent::proto::{GRANT_NAMESPACE, Grant};
use polydev_zk::Context;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::runtime_jobs::{LogBuffer, Stack, User, dump};

/// Where the fake CLIs are mounted inside the sandboxes.
const CLI_DIR: &str = "/opt/polydev/cli";

/// A fake Claude Code: with `$HOME/.claude/.credentials.json` holding `credential` and a prompt
/// on stdin, Claude Code's `result` object with `answer` and its usage; without, its "not
/// logged in" report.
fn fake_claude(dir: &Path, credential: &str, answer: &str) {
    use std::os::unix::fs::PermissionsExt;
    let script = format!(
        r#"#!/bin/sh
prompt=$(cat)
if [ "$(cat "$HOME/.claude/.credentials.json" 2>/dev/null)" != '{credential}' ]; then
  echo '{{"type":"result","subtype":"success","is_error":true,"result":"Invalid API key · Please run /login"}}'
  exit 1
fi
case "$prompt" in
  *"take your time"*) sleep 120 ;;
  *"Tabs or spaces?"*) heard=yes ;;
  *) heard=no ;;
esac
printf '{{"type":"result","subtype":"success","is_error":false,"result":"{answer} (heard: %s)","usage":{{"input_tokens":100,"cache_read_input_tokens":23,"output_tokens":45}},"total_cost_usd":0.01}}\n' "$heard"
"#
    );
    let path = dir.join("claude");
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// The shipped catalogue, its `claude-code` provider running the fake.
fn catalogue() -> Catalogue {
    let shipped = "[providers.claude-code]\nkind = \"cli\"\ncli = \"claude\"\n";
    assert!(DEFAULT_CATALOGUE.contains(shipped));
    let text = DEFAULT_CATALOGUE.replace(
        shipped,
        &format!("{shipped}program = \"{CLI_DIR}/claude\"\n"),
    );
    Catalogue::parse(&text).unwrap()
}

async fn start(dir: &Path) -> Stack {
    let binds = vec![Bind {
        host: dir.to_path_buf(),
        inside: CLI_DIR.into(),
    }];
    Stack::start_full(
        "anthropic",
        3,
        move |config| config.binds = binds,
        None,
        catalogue(),
    )
    .await
}

/// `user`'s Claude credential sealed to the container (as the account page or `polydev` does
/// after opening it from `cli_credentials`).
fn sealed_grant(user: &User, container: Uuid, public_key: &str, credential: &str) -> String {
    let grant = Grant {
        cli: "claude".into(),
        files: BTreeMap::from([(".claude/.credentials.json".into(), credential.into())]),
    };
    let (user_id, row) = (user.id.to_string(), container.to_string());
    polydev_zk::seal_to(
        public_key,
        &Context {
            namespace: GRANT_NAMESPACE,
            user_id: &user_id,
            row_id: &row,
        },
        &serde_json::to_vec(&grant).unwrap(),
    )
    .unwrap()
}

async fn put_grant(stack: &Stack, user: &User, container: Uuid, sealed: &str) -> reqwest::Response {
    stack
        .send(
            Method::PUT,
            &format!("/v1/runtime/containers/{container}/grant"),
            &user.token,
            &json!({"cli": "claude", "sealed": sealed}),
        )
        .await
}

/// A stack with a fake `claude`, and alice holding an anthropic container granted its
/// credential: the stack, alice, the container, its public key and the credential.
async fn granted(dir: &Path) -> (Stack, User, Uuid, String, String) {
    let credential = format!("CRED-{}", crate::common::random_hex(8));
    fake_claude(dir, &credential, "unused");
    let stack = start(dir).await;
    let alice = stack.user("alice@example.com").await;
    let (container, public_key) = stack.claim(&alice, "anthropic").await;
    let granted = put_grant(
        &stack,
        &alice,
        container,
        &sealed_grant(&alice, container, &public_key, &credential),
    )
    .await;
    assert_eq!(granted.status(), StatusCode::OK);
    (stack, alice, container, public_key, credential)
}

async fn ask(stack: &Stack, user: &User, body: Value) -> (StatusCode, Value) {
    let response = stack
        .send(Method::POST, "/v1/perspectives", &user.token, &body)
        .await;
    let status = response.status();
    (status, response.json().await.unwrap())
}

/// (messages, premium, normal, eco) used, open reservations, usage rows.
async fn charged(stack: &Stack, user: &User) -> ((i32, i32, i32, i32), i64, i64) {
    let used = sqlx::query_as(
        "SELECT messages_used, premium_perspectives_used, normal_perspectives_used, eco_perspectives_used
           FROM user_perspective_quotas WHERE user_id = $1",
    )
    .bind(user.id)
    .fetch_optional(&stack.db.pool)
    .await
    .unwrap()
    .unwrap_or((0, 0, 0, 0));
    let reserved: i64 =
        sqlx::query_scalar("SELECT count(*) FROM quota_reservations WHERE user_id = $1")
            .bind(user.id)
            .fetch_one(&stack.db.pool)
            .await
            .unwrap();
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM perspective_usage WHERE user_id = $1")
        .bind(user.id)
        .fetch_one(&stack.db.pool)
        .await
        .unwrap();
    (used, reserved, rows)
}

async fn jobs_of(stack: &Stack, container: Uuid) -> Vec<(Uuid, String)> {
    sqlx::query_as("SELECT user_id, status FROM job_executions WHERE container_id = $1")
        .bind(container)
        .fetch_all(&stack.db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn runtime_cli_model_answers_from_the_users_granted_container_and_leaves_no_plaintext() {
    let (log, _guard) = LogBuffer::capture();

    let dir = tempfile::tempdir().unwrap();
    let sentinel = crate::common::random_hex(8);
    let credential = format!("{{\"claudeAiOauth\":{{\"accessToken\":\"CRED-{sentinel}\"}}}}");
    let answer = format!("ANSWER-{sentinel}");
    fake_claude(dir.path(), &credential, &answer);
    let stack = start(dir.path()).await;
    let alice = stack.user("alice@example.com").await;
    let bob = stack.user("bob@example.com").await;
    let (container, public_key) = stack.claim(&alice, "anthropic").await;
    let (bobs_container, _) = stack.claim(&bob, "anthropic").await;
    let body = json!({"prompt": "Tabs or spaces?", "models": ["claude-code"]});

    // Not connected yet: a clear error, nothing reserved or charged.
    let (status, error) = ask(&stack, &alice, body.clone()).await;
    assert_eq!(status, StatusCode::NOT_IMPLEMENTED, "{error}");
    assert_eq!(error["error"]["code"], "no_provider_configured", "{error}");
    let message = error["error"]["message"].as_str().unwrap();
    assert!(message.contains("cli_not_connected"), "{message}");
    assert!(message.contains("/grant"), "{message}");
    assert_eq!(charged(&stack, &alice).await, ((0, 0, 0, 0), 0, 0));

    // Grants are checked: another user's container is not found; a box for another row, or
    // for the wrong CLI, is refused; nothing is stored.
    let foreign = put_grant(
        &stack,
        &bob,
        container,
        &sealed_grant(&bob, container, &public_key, &credential),
    )
    .await;
    assert_eq!(foreign.status(), StatusCode::NOT_FOUND);
    let wrong_row = put_grant(
        &stack,
        &alice,
        container,
        &sealed_grant(&alice, bobs_container, &public_key, &credential),
    )
    .await;
    assert_eq!(wrong_row.status(), StatusCode::BAD_REQUEST);
    let wrong_cli = stack
        .send(
            Method::PUT,
            &format!("/v1/runtime/containers/{container}/grant"),
            &alice.token,
            &json!({"cli": "codex", "sealed": sealed_grant(&alice, container, &public_key, &credential)}),
        )
        .await;
    assert_eq!(wrong_cli.status(), StatusCode::BAD_REQUEST);
    let too_large = put_grant(&stack, &alice, container, &"x".repeat(64 * 1024 - 200)).await;
    assert!(
        matches!(too_large.status(), StatusCode::PAYLOAD_TOO_LARGE),
        "{}",
        too_large.status()
    );
    let (status, _) = ask(&stack, &alice, body.clone()).await;
    assert_eq!(status, StatusCode::NOT_IMPLEMENTED, "still not connected");

    // Granted, as a client does it: the credential the login session stored (sealed to
    // alice's runtime key), fetched, opened with her key, re-sealed to the container.
    let session = Uuid::new_v4();
    let (user_id, row) = (alice.id.to_string(), session.to_string());
    let login_ctx = Context {
        namespace: "login.credential",
        user_id: &user_id,
        row_id: &row,
    };
    let stored =
        polydev_zk::seal_to(&alice.keys.public_key(), &login_ctx, credential.as_bytes()).unwrap();
    sqlx::query(
        "INSERT INTO cli_credentials
             (credential_id, user_id, provider, encrypted_data_v2, migrated_to_zk, kind)
         VALUES ($1, $2, 'anthropic', $3, true, 'cli')",
    )
    .bind(session)
    .bind(alice.id)
    .bind(&stored)
    .execute(&stack.db.pool)
    .await
    .unwrap();
    // An older sign-in of the same provider: the newest credential is the one granted.
    let stale_session = Uuid::new_v4().to_string();
    let stale = polydev_zk::seal_to(
        &alice.keys.public_key(),
        &Context {
            row_id: &stale_session,
            ..login_ctx
        },
        b"STALE",
    )
    .unwrap();
    sqlx::query(
        "INSERT INTO cli_credentials
             (credential_id, user_id, provider, encrypted_data_v2, migrated_to_zk, kind, updated_at)
         VALUES ($1::uuid, $2, 'anthropic', $3, true, 'cli', now() - interval '1 day')",
    )
    .bind(&stale_session)
    .bind(alice.id)
    .bind(&stale)
    .execute(&stack.db.pool)
    .await
    .unwrap();
    // `polydev zk connect claude` does the rest: opens it here with alice's keys, seals it
    // again to the container she holds, uploads the grant.
    let granted = polydev::client::zk::ZkClient::new(&stack.base, &alice.token)
        .connect_cli(&alice.keyring, "claude")
        .await
        .unwrap();
    assert_eq!(granted.cli, "claude");
    assert_eq!(granted.container_id, container);

    // The CLI's answer (the fake checks its credential file), the tokens it reported, a usage
    // row and the counters.
    let (status, result) = ask(&stack, &alice, body.clone()).await;
    assert_eq!(status, StatusCode::OK, "{result}");
    let answer_of = &result["perspectives"][0];
    assert_eq!(answer_of["model"], "claude-code", "{result}");
    assert_eq!(answer_of["provider"], "claude-code");
    assert_eq!(answer_of["status"], "ok", "{result}");
    assert_eq!(answer_of["text"], format!("{answer} (heard: yes)"));
    assert_eq!(answer_of["input_tokens"], 123, "input + cache read");
    assert_eq!(answer_of["output_tokens"], 45);
    assert_eq!(
        charged(&stack, &alice).await,
        ((1, 1, 0, 0), 0, 1),
        "a message and a premium perspective, one usage row"
    );
    let (input, output): (i32, i32) = sqlx::query_as(
        "SELECT input_tokens, output_tokens FROM perspective_usage WHERE user_id = $1",
    )
    .bind(alice.id)
    .fetch_one(&stack.db.pool)
    .await
    .unwrap();
    assert_eq!((input, output), (123, 45));

    // It ran as a job of alice's container, sealed to a key nobody keeps.
    let jobs = jobs_of(&stack, container).await;
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0], (alice.id, "succeeded".to_string()));
    let output_key: Option<String> =
        sqlx::query_scalar("SELECT output_public_key FROM job_executions WHERE container_id = $1")
            .bind(container)
            .fetch_one(&stack.db.pool)
            .await
            .unwrap();
    assert!(output_key.is_some_and(|k| k != alice.keys.public_key()));

    // list_available_models (MCP) shows it available to alice, not to bob.
    let available = |token: String| {
        let base = stack.base.clone();
        async move {
            let out = crate::mcp::sdk_client_env(
                &["http", &base, &token, "{}"],
                &[("TOOL", "list_available_models")],
            )
            .await;
            let models = out["structured"]["models"].as_array().cloned();
            let models = models.unwrap_or_else(|| panic!("no model list: {out}"));
            let of = |id: &str| {
                models
                    .iter()
                    .find(|m| m["id"] == id)
                    .map(|m| m["available"] == true)
                    .unwrap_or_else(|| panic!("{id} is listed: {out}"))
            };
            (of("claude-code"), of("codex-cli"))
        }
    };
    assert_eq!(available(alice.token.clone()).await, (true, false));
    assert_eq!(available(bob.token.clone()).await, (false, false));

    // polydev's own choice picks it for alice too (she has it connected).
    let (status, chosen) = ask(&stack, &alice, json!({"prompt": "Tabs or spaces?"})).await;
    assert_eq!(status, StatusCode::OK, "{chosen}");
    assert!(
        chosen["perspectives"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["model"] == "claude-code" && p["status"] == "ok"),
        "{chosen}"
    );

    // Bob has no grant: his calls never use alice's container, and charge nothing.
    let (status, error) = ask(&stack, &bob, body.clone()).await;
    assert_eq!(status, StatusCode::NOT_IMPLEMENTED, "{error}");
    assert_eq!(charged(&stack, &bob).await, ((0, 0, 0, 0), 0, 0));
    assert!(jobs_of(&stack, bobs_container).await.is_empty());
    assert!(
        jobs_of(&stack, container)
            .await
            .iter()
            .all(|(user, _)| *user == alice.id)
    );

    // Neither the credential nor the answer is in any table or the server's log.
    let dump = dump(&stack.db.pool).await;
    assert!(
        dump.contains(&container.to_string()),
        "the dump covers the container"
    );
    assert!(
        !dump.contains(&format!("CRED-{sentinel}")),
        "no credential in the database"
    );
    assert!(!dump.contains(&answer), "no answer in the database");
    let log = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
    assert!(log.contains("/grant"), "the log covers the requests");
    assert!(!log.contains(&sentinel), "the log holds neither");

    // The grant can be taken back: not connected again.
    let removed = stack
        .client
        .delete(format!(
            "{}/v1/runtime/containers/{container}/grant",
            stack.base
        ))
        .bearer_auth(&alice.token)
        .send()
        .await
        .unwrap();
    assert_eq!(removed.status(), StatusCode::NO_CONTENT);
    let (status, _) = ask(&stack, &alice, body).await;
    assert_eq!(status, StatusCode::NOT_IMPLEMENTED);
}

#[tokio::test]
async fn runtime_cli_grant_files_go_to_the_granted_cli_only() {
    // A job of another program in a granted container does not get the credential files.
    let dir = tempfile::tempdir().unwrap();
    let (stack, alice, container, public_key, _) = granted(dir.path()).await;
    let job = polydev_agent::proto::JobCommand {
        command: vec![
            "/bin/sh".into(),
            "-c".into(),
            "cat \"$HOME/.claude/.credentials.json\" || echo no-credential".into(),
        ],
        ..Default::default()
    };
    let (id, response) = stack.submit(&alice, container, &public_key, &job).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let (stdout, _, _) = stack.follow(&alice, id).await;
    assert_eq!(stdout, "no-credential\n");

    // The granted CLI itself: with polydev's arguments and nothing else it gets the file (the
    // fake answers); with other arguments, its own environment or files, it runs without it
    // (the fake reports "not logged in").
    let claude = |extra_args: &[&str]| {
        let mut command: Vec<String> = [format!("{CLI_DIR}/claude"), "-p".into()].into();
        command.extend(["--output-format", "json"].map(String::from));
        command.extend(extra_args.iter().map(|a| a.to_string()));
        polydev_agent::proto::JobCommand {
            command,
            stdin: Some("Tabs or spaces?".into()),
            ..Default::default()
        }
    };
    let with_env = {
        let mut job = claude(&[]);
        job.env
            .insert("NODE_OPTIONS".into(), "--require ./x.js".into());
        job
    };
    let with_files = {
        let mut job = claude(&[]);
        job.files.insert("x.js".into(), "1".into());
        job
    };
    for (job, gets_it) in [
        (claude(&[]), true),
        (claude(&["--allowedTools", "Bash"]), false),
        (with_env, false),
        (with_files, false),
    ] {
        let (id, response) = stack.submit(&alice, container, &public_key, &job).await;
        assert_eq!(response.status(), StatusCode::CREATED);
        let (stdout, _, _) = stack.follow(&alice, id).await;
        assert_eq!(
            stdout.contains("(heard: yes)"),
            gets_it,
            "{:?}: {stdout}",
            job.command
        );
        assert_eq!(stdout.contains("Please run /login"), !gets_it, "{stdout}");
    }

    // Released: the container is destroyed and its grant with it.
    let released = stack
        .client
        .delete(format!("{}/v1/runtime/containers/{container}", stack.base))
        .bearer_auth(&alice.token)
        .send()
        .await
        .unwrap();
    assert_eq!(released.status(), StatusCode::OK);
    let (status, grant): (String, Option<String>) =
        sqlx::query_as("SELECT status, credential_grant FROM runtime_containers WHERE id = $1")
            .bind(container)
            .fetch_one(&stack.db.pool)
            .await
            .unwrap();
    assert_eq!((status.as_str(), grant), ("destroyed", None));
}

#[tokio::test]
async fn runtime_cli_model_past_the_deadline_is_a_timeout_its_job_cancelled_and_nothing_charged() {
    let dir = tempfile::tempdir().unwrap();
    let (stack, alice, container, _, _) = granted(dir.path()).await;

    let (status, result) = ask(
        &stack,
        &alice,
        json!({"prompt": "take your time", "models": ["claude-code"], "deadline_ms": 3000}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{result}");
    assert_eq!(result["perspectives"][0]["status"], "timeout", "{result}");
    assert_eq!(
        charged(&stack, &alice).await,
        ((0, 0, 0, 0), 0, 0),
        "the unit and the message given back"
    );
    // The job was cancelled and the agent killed the CLI: the container takes jobs again. The
    // agent learns of the cancel on its next report, so under load this takes a while: the long
    // bound (a guard against a hang, not a timing assertion).
    let pool = stack.db.pool.clone();
    let settled = crate::runtime_jobs::eventually_long(|| {
        let pool = pool.clone();
        async move {
            let job: (String, Option<i32>) = sqlx::query_as(
                "SELECT status, exit_code FROM job_executions WHERE container_id = $1",
            )
            .bind(container)
            .fetch_one(&pool)
            .await
            .unwrap();
            let state: String =
                sqlx::query_scalar("SELECT status FROM runtime_containers WHERE id = $1")
                    .bind(container)
                    .fetch_one(&pool)
                    .await
                    .unwrap();
            job.0 == "cancelled" && job.1.is_some() && state == "assigned"
        }
    })
    .await;
    let state: (String, Option<i32>, Option<String>) = sqlx::query_as(
        "SELECT status, exit_code, failure_reason FROM job_executions WHERE container_id = $1",
    )
    .bind(container)
    .fetch_one(&stack.db.pool)
    .await
    .unwrap();
    assert!(
        settled,
        "the job cancelled, the CLI killed, the container free: {state:?}"
    );
}
