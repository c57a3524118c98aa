//! Zero-knowledge against a leaked API token and a server that lies (docs/crypto.md, threat
//! model). The real client (`ZkClient`, and the `polydev zk` binary where it matters) talks to
//! the real test server through `LyingProxy`, which rewrites chosen answers.

use std::ops::ControlFlow;
use std::path::PathBuf;

use polydev::accounts::Plan;
use polydev::client::zk::ZkClient;
use polydev::client::zk::history::Trust;
use polydev_zk::{Context, KdfParams, KeyMaterial, Keyring};
use reqwest::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::common::TestDb;
use crate::http_api::{TestServer, user_with_token};
use crate::lying_proxy::LyingProxy;
use crate::zk::{PASSWORD, message_text, pin_dir, seed_history};

struct Setup {
    db: TestDb,
    user_id: Uuid,
    token: String,
    server: TestServer,
    proxy: LyingProxy,
    config: PathBuf,
}

impl Setup {
    async fn new(email: &str, history: usize) -> Setup {
        let db = TestDb::migrated().await;
        let (user_id, token) = user_with_token(&db, email, Plan::Pro).await;
        if history > 0 {
            seed_history(&db, user_id, history).await;
        }
        let server = TestServer::start(&db).await;
        let proxy = LyingProxy::start(&server.base).await;
        Setup {
            db,
            user_id,
            token,
            server,
            proxy,
            config: pin_dir(),
        }
    }

    /// The CLI's client, through the lying proxy, pinning in this setup's config directory.
    fn client(&self) -> ZkClient {
        ZkClient::new(&self.proxy.base, &self.token).with_config_dir(&self.config)
    }

    /// A raw request with the (leaked) API token only, to the real server.
    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.server.with_token(
            self.server
                .client
                .request(method, format!("{}{path}", self.server.base)),
            Some(&self.token),
        )
    }

    async fn material(&self) -> (KeyMaterial, i64) {
        let status: Value = self
            .request(reqwest::Method::GET, "/v1/zk")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        (
            serde_json::from_value(status["material"].clone()).unwrap(),
            status["version"].as_i64().unwrap(),
        )
    }

    /// `polydev zk <args>` through the proxy, with this setup's config directory.
    async fn cli(&self, args: &[&str], password: &str) -> std::process::Output {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_polydev"))
            .arg("zk")
            .args(args)
            .env("POLYDEV_CONFIG_DIR", &self.config)
            .env("POLYDEV_SERVER_URL", &self.proxy.base)
            .env("POLYDEV_USER_TOKEN", &self.token)
            .env("POLYDEV_MASTER_PASSWORD", password)
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .unwrap()
    }
}

async fn error_code(response: reqwest::Response) -> (StatusCode, String) {
    let status = response.status();
    let body: Value = response.json().await.unwrap();
    (
        status,
        body["error"]["code"].as_str().unwrap_or("").to_string(),
    )
}

fn user_ctx<'a>(namespace: &'a str, user: &'a str, row: &'a str) -> Context<'a> {
    Context {
        namespace,
        user_id: user,
        row_id: row,
    }
}

/// Item 1. A leaked API token alone cannot change the password or recovery key, rotate the key,
/// clear plaintext, have credentials handed over or write the manifest: 403 with a code saying
/// why (no proof, wrong proof), and nothing changes.
#[tokio::test]
async fn zk_changes_without_the_proof_are_refused_and_change_nothing() {
    let s = Setup::new("leaked@example.com", 3).await;
    let client = s.client();
    let (keyring, _) = client.enable(PASSWORD, KdfParams::MINIMUM).await.unwrap();
    // Half-way through a migration: sealed rows whose plaintext is still there.
    client
        .migrate(
            &keyring,
            2,
            |_| {},
            |step| {
                if step == polydev::client::zk::Step::Written {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            },
        )
        .await
        .unwrap();
    let unverified: Value = s
        .request(reqwest::Method::GET, "/v1/zk/migration/unverified")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let items: Vec<Value> = unverified["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| json!({ "system": m["system"], "id": m["id"] }))
        .collect();
    assert!(!items.is_empty());
    let (before, version) = s.material().await;
    let snapshot = || async {
        sqlx::query_as::<
            _,
            (
                Option<String>,
                Option<String>,
                Option<String>,
                Option<String>,
                Option<i64>,
                i64,
                i64,
            ),
        >(
            "SELECT zk_password_wrapped_key, zk_recovery_wrapped_key, zk_password_proof_hash,
                    zk_rotation_wrapped_key, zk_material_version,
                    (SELECT count(*) FROM chat_messages WHERE content IS NOT NULL)
                      + (SELECT count(*) FROM messages WHERE content IS NOT NULL),
                    (SELECT count(*) FROM zk_manifest_chunks)
               FROM users WHERE user_id = $1",
        )
        .bind(s.user_id)
        .fetch_one(&s.db.pool)
        .await
        .unwrap()
    };
    let unchanged = snapshot().await;

    // What an attacker with the token can make: material under a password of their own.
    let user = s.user_id.to_string();
    let (theirs, their_material, their_recovery) =
        Keyring::setup("the attacker's password", &user, KdfParams::MINIMUM).unwrap();
    let sealed_chunk = theirs
        .seal(&user_ctx("zk.manifest", &user, "7"), b"{}")
        .unwrap();
    let wrong = "ab".repeat(32);
    let attempts: Vec<(reqwest::Method, &str, Value)> = vec![
        (
            reqwest::Method::PUT,
            "/v1/zk/password",
            json!({ "previous": before.password_wrapped, "material": { "password_wrapped": their_material.password_wrapped, "recovery_wrapped": before.recovery_wrapped }, "password_proof": theirs.proof().to_hex() }),
        ),
        (
            reqwest::Method::PUT,
            "/v1/zk/recovery",
            json!({ "previous": before.recovery_wrapped, "material": { "password_wrapped": before.password_wrapped, "recovery_wrapped": their_material.recovery_wrapped }, "recovery_proof": their_recovery.proof().to_hex() }),
        ),
        (
            reqwest::Method::POST,
            "/v1/zk/rotation",
            json!({ "wrapped_key": their_material.password_wrapped }),
        ),
        (
            reqwest::Method::POST,
            "/v1/zk/rotation/commit",
            json!({ "previous": before.password_wrapped, "material": their_material, "password_proof": theirs.proof().to_hex(), "recovery_proof": their_recovery.proof().to_hex() }),
        ),
        (
            reqwest::Method::POST,
            "/v1/zk/migration/clear",
            json!(items),
        ),
        (
            reqwest::Method::POST,
            "/v1/zk/migration/sessions/clear",
            json!([]),
        ),
        (
            reqwest::Method::POST,
            "/v1/zk/credentials/hand-over",
            json!(null),
        ),
        (
            reqwest::Method::POST,
            "/v1/zk/manifest",
            json!([{ "chunk": 7, "envelope": sealed_chunk }]),
        ),
    ];
    for (method, path, body) in attempts {
        let bare = s
            .request(method.clone(), path)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(
            error_code(bare).await,
            (StatusCode::FORBIDDEN, "zk_proof_required".into()),
            "{path} without a proof"
        );
        let guessed = s
            .request(method.clone(), path)
            .header("polydev-zk-proof", &wrong)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(
            error_code(guessed).await,
            (StatusCode::FORBIDDEN, "zk_proof_wrong".into()),
            "{path} with a wrong proof"
        );
        // The proof of another password (the attacker's own) is as wrong as any.
        let other = s
            .request(method, path)
            .header("polydev-zk-proof", theirs.proof().to_hex())
            .header("polydev-zk-recovery-proof", their_recovery.proof().to_hex())
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(
            error_code(other).await,
            (StatusCode::FORBIDDEN, "zk_proof_wrong".into()),
            "{path} with another password's proof"
        );
        assert_eq!(snapshot().await, unchanged, "{path} changed something");
    }
    assert_eq!(s.material().await, (before, version));
    // The server keeps a salted hash, not the proof.
    let stored: String =
        sqlx::query_scalar("SELECT zk_password_proof_hash FROM users WHERE user_id = $1")
            .bind(s.user_id)
            .fetch_one(&s.db.pool)
            .await
            .unwrap();
    assert_ne!(stored, keyring.proof().to_hex());

    // The owner's client, with the proof, finishes the migration and can change the password.
    client
        .migrate(&keyring, 10, |_| {}, |_| ControlFlow::Continue(()))
        .await
        .unwrap();
    client
        .set_password(
            polydev::client::zk::Unlock::Password(PASSWORD),
            "a new password, proven",
        )
        .await
        .unwrap();
    assert!(client.unlock("a new password, proven").await.is_ok());
}

/// Item 1. An account turned on before proofs existed has none stored: changes are refused
/// (`zk_proof_not_registered`) until its client unlocks, which registers the proof.
#[tokio::test]
async fn zk_an_account_without_a_stored_proof_registers_it_on_next_unlock() {
    let s = Setup::new("legacy-proof@example.com", 2).await;
    let client = s.client();
    let (keyring, _) = client.enable(PASSWORD, KdfParams::MINIMUM).await.unwrap();
    sqlx::query(
        "UPDATE users SET zk_proof_salt = NULL, zk_password_proof_hash = NULL,
                zk_recovery_proof_hash = NULL WHERE user_id = $1",
    )
    .bind(s.user_id)
    .execute(&s.db.pool)
    .await
    .unwrap();
    let refused = s
        .request(reqwest::Method::POST, "/v1/zk/migration/clear")
        .header("polydev-zk-proof", keyring.proof().to_hex())
        .json(&json!([]))
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_code(refused).await,
        (StatusCode::FORBIDDEN, "zk_proof_not_registered".into())
    );
    let status: Value = s
        .request(reqwest::Method::GET, "/v1/zk")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        status["proofs"],
        json!({ "password": false, "recovery": false })
    );

    let unlocked = client.unlock(PASSWORD).await.unwrap();
    let status: Value = s
        .request(reqwest::Method::GET, "/v1/zk")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["proofs"]["password"], true);
    let report = client
        .migrate(&unlocked, 10, |_| {}, |_| ControlFlow::Continue(()))
        .await
        .unwrap();
    assert_eq!(report.verified_and_cleared, 4);
    // Once registered, another "first" proof changes nothing.
    let again = s
        .request(reqwest::Method::POST, "/v1/zk/proof")
        .json(&json!({ "password_proof": "cd".repeat(32) }))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), StatusCode::OK);
    let refused = s
        .request(reqwest::Method::POST, "/v1/zk/migration/clear")
        .header("polydev-zk-proof", "cd".repeat(32))
        .json(&json!([]))
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_code(refused).await,
        (StatusCode::FORBIDDEN, "zk_proof_wrong".into())
    );
}

/// Item 2. After this machine saw zero-knowledge on, a server that says it is off is refused —
/// by the client and by the `polydev zk` binary — with a message that the server changed the
/// account's keys, not a wrong password; enabling again is refused too.
#[tokio::test]
async fn zk_the_cli_refuses_a_server_that_turns_zero_knowledge_off() {
    let s = Setup::new("flip@example.com", 2).await;
    let client = s.client();
    client.enable(PASSWORD, KdfParams::MINIMUM).await.unwrap();
    let status = s.cli(&["status"], PASSWORD).await;
    assert!(status.status.success());
    assert!(String::from_utf8_lossy(&status.stdout).contains("zero-knowledge: on"));

    s.proxy.lie(|path, body| {
        if path == "/v1/zk" {
            body["enabled"] = json!(false);
            body.as_object_mut().unwrap().remove("material");
        }
    });
    for error in [
        client.status().await.unwrap_err().to_string(),
        client.unlock(PASSWORD).await.unwrap_err().to_string(),
        client
            .enable(PASSWORD, KdfParams::MINIMUM)
            .await
            .unwrap_err()
            .to_string(),
        client.history(None).await.unwrap_err().to_string(),
    ] {
        assert!(
            error.contains("the server changed this account's keys"),
            "{error}"
        );
        assert!(error.contains("says zero-knowledge is off"), "{error}");
        assert!(!error.contains("wrong master password"), "{error}");
    }
    for args in [&["status"][..], &["migrate"], &["history"]] {
        let out = s.cli(args, PASSWORD).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(
            stderr.contains("the server changed this account's keys"),
            "{args:?}: {stderr}"
        );
        assert!(!stderr.contains("wrong master password"), "{stderr}");
    }
    // The honest server is accepted again.
    s.proxy.honest();
    assert!(client.status().await.unwrap().enabled);
}

/// Item 2. A server that serves older key material (a lower version, or the same version with
/// other material) is refused before the password is used; newer material that does not open
/// says the keys may have been changed, not only "wrong master password".
#[tokio::test]
async fn zk_the_cli_refuses_older_or_other_key_material() {
    let s = Setup::new("rollback@example.com", 0).await;
    let client = s.client();
    client.enable(PASSWORD, KdfParams::MINIMUM).await.unwrap();
    let (old, old_version) = s.material().await;
    client
        .set_password(
            polydev::client::zk::Unlock::Password(PASSWORD),
            "the second password",
        )
        .await
        .unwrap();
    let (_, version) = s.material().await;
    assert_eq!(version, old_version + 1);
    client.unlock("the second password").await.unwrap();

    let serve = |material: KeyMaterial, version: i64| {
        move |path: &str, body: &mut Value| {
            if path == "/v1/zk" {
                body["material"] = serde_json::to_value(&material).unwrap();
                body["version"] = json!(version);
            }
        }
    };
    // The old material under its old version: an older copy (with the old password it would open).
    s.proxy.lie(serve(old.clone(), old_version));
    let error = client.unlock(PASSWORD).await.unwrap_err().to_string();
    assert!(
        error.contains("the server changed this account's keys"),
        "{error}"
    );
    assert!(error.contains("an older copy"), "{error}");
    // The old material passed off as the current version.
    s.proxy.lie(serve(old.clone(), version));
    let error = client.unlock(PASSWORD).await.unwrap_err().to_string();
    assert!(
        error.contains("the server changed this account's keys"),
        "{error}"
    );
    assert!(error.contains("other key material"), "{error}");
    let out = s.cli(&["status"], PASSWORD).await;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("the server changed this account's keys")
    );
    // The server's own material under a newer version: the user's password cannot open it.
    let user = s.user_id.to_string();
    let (_, forged, _) = Keyring::setup("server-chosen", &user, KdfParams::MINIMUM).unwrap();
    s.proxy.lie(serve(forged, version + 1));
    let error = client
        .unlock("the second password")
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("the server changed this account's keys"),
        "{error}"
    );
    s.proxy.honest();
    assert!(client.unlock("the second password").await.is_ok());
}

/// Item 2. Weaker Argon2id parameters than this machine saw are refused, even at a newer
/// version (where a password change would legitimately bring new material).
#[tokio::test]
async fn zk_the_cli_refuses_weaker_kdf_parameters() {
    let s = Setup::new("kdf@example.com", 0).await;
    let client = s.client();
    let strong = KdfParams {
        memory_kib: 32 * 1024,
        iterations: 3,
        parallelism: 1,
    };
    client.enable(PASSWORD, strong).await.unwrap();
    let (current, version) = s.material().await;
    let user = s.user_id.to_string();
    // Material re-wrapped under the same password at the floor: opens, but weaker.
    let keyring = Keyring::unlock(&current, PASSWORD, &user).unwrap();
    let (weaker, _) = keyring
        .change_password(&current, PASSWORD, KdfParams::MINIMUM)
        .unwrap();
    s.proxy.lie(move |path, body| {
        if path == "/v1/zk" {
            body["material"] = serde_json::to_value(&weaker).unwrap();
            body["version"] = json!(version + 1);
        }
    });
    let error = client.unlock(PASSWORD).await.unwrap_err().to_string();
    assert!(
        error.contains("the server changed this account's keys"),
        "{error}"
    );
    assert!(error.contains("key derivation parameters"), "{error}");
}

/// Items 3 and 4. Plaintext that appears after zero-knowledge was turned on — written into the
/// database, or made up in an answer — is never shown as the user's (quarantined apart, by the
/// client and the `polydev zk history` binary) and never sealed by the migration, which reports
/// it. Pre-existing history is shown as not yet encrypted, then sealed.
#[tokio::test]
async fn zk_plaintext_injected_after_enable_is_quarantined_and_never_sealed() {
    let s = Setup::new("inject@example.com", 3).await;
    let client = s.client();
    let (keyring, _) = client.enable(PASSWORD, KdfParams::MINIMUM).await.unwrap();
    // The server writes a message of its own into the user's chat, as plaintext.
    let chat: Uuid = sqlx::query_scalar("SELECT id FROM chat_sessions WHERE user_id = $1")
        .bind(s.user_id)
        .fetch_one(&s.db.pool)
        .await
        .unwrap();
    let injected: Uuid = sqlx::query_scalar(
        "INSERT INTO chat_messages (session_id, role, content)
         VALUES ($1, 'user', 'injected: transfer everything') RETURNING id",
    )
    .bind(chat)
    .fetch_one(&s.db.pool)
    .await
    .unwrap();
    // And a lying answer adds one that is not even stored.
    let made_up = Uuid::new_v4();
    s.proxy.lie(move |path, body| {
        if path.ends_with("/messages") && path.contains(&chat.to_string()) {
            body.as_array_mut().unwrap().push(json!({
                "id": made_up, "role": "assistant", "content": "made up: you agreed",
                "encrypted_content": null, "created_at": "2024-01-01T00:00:00Z"
            }));
        }
    });

    let history = client.history(Some(&keyring)).await.unwrap();
    let shown: Vec<&str> = history.messages().map(|m| m.text.as_str()).collect();
    assert_eq!(shown.len(), 6, "{shown:?}");
    assert!(
        history
            .messages()
            .all(|m| m.trust == Trust::NotYetEncrypted)
    );
    assert!(
        !shown
            .iter()
            .any(|t| t.contains("injected") || t.contains("made up"))
    );
    let mut quarantined: Vec<Uuid> = history.quarantined.iter().map(|q| q.id).collect();
    quarantined.sort();
    let mut expected = vec![injected, made_up];
    expected.sort();
    assert_eq!(quarantined, expected);
    assert!(
        history.quarantined[0]
            .reason
            .contains("not in the manifest")
    );

    let out = s.cli(&["history"], PASSWORD).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let (mine, apart) = stdout
        .split_once("QUARANTINED")
        .expect("a quarantine section");
    assert!(mine.contains("chat message 1"), "{stdout}");
    assert!(
        !mine.contains("injected") && !mine.contains("made up"),
        "{stdout}"
    );
    assert!(apart.contains("injected: transfer everything"), "{stdout}");
    assert!(apart.contains("made up: you agreed"), "{stdout}");

    let report = client
        .migrate(&keyring, 10, |_| {}, |_| ControlFlow::Continue(()))
        .await
        .unwrap();
    assert_eq!(report.not_in_manifest, vec![injected]);
    assert_eq!(report.encrypted, 6);
    let (content, migrated): (Option<String>, Option<bool>) =
        sqlx::query_as("SELECT content, migrated_to_zk FROM chat_messages WHERE id = $1")
            .bind(injected)
            .fetch_one(&s.db.pool)
            .await
            .unwrap();
    assert_eq!(
        (content.as_deref(), migrated),
        (Some("injected: transfer everything"), Some(false)),
        "reported, left in plaintext, never sealed"
    );
    let history = client.history(Some(&keyring)).await.unwrap();
    assert_eq!(history.messages().count(), 6);
    assert!(history.messages().all(|m| m.trust == Trust::Sealed));
    assert_eq!(history.quarantined.len(), 2);
    // The CLI's migration says so.
    let out = s.cli(&["migrate"], PASSWORD).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains(&injected.to_string()));
}

/// Item 4. A server that drops the manifest to have a fresh one (with its injected rows)
/// recorded is refused: this machine remembers there was one.
#[tokio::test]
async fn zk_a_dropped_manifest_is_refused_not_rebuilt() {
    let s = Setup::new("manifest@example.com", 2).await;
    let client = s.client();
    let (keyring, _) = client.enable(PASSWORD, KdfParams::MINIMUM).await.unwrap();
    s.proxy.lie(|path, body| {
        if path == "/v1/zk/manifest" {
            *body = json!([]);
        }
    });
    let error = client
        .migrate(&keyring, 10, |_| {}, |_| ControlFlow::Continue(()))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("manifest this machine recorded is gone"),
        "{error}"
    );
    let chunks: i64 = sqlx::query_scalar("SELECT count(*) FROM zk_manifest_chunks")
        .fetch_one(&s.db.pool)
        .await
        .unwrap();
    assert_eq!(chunks, 1, "no second manifest was recorded");
}

/// Item 5. A sealed message is bound to its session, role, creation time and kind: moved to
/// another session, with its role flipped or reordered, it is quarantined with the reason; a
/// session title moved to another session too. Older (bare-text) envelopes are shown flagged.
#[tokio::test]
async fn zk_a_moved_reordered_or_role_flipped_message_is_flagged() {
    let s = Setup::new("moved@example.com", 0).await;
    let client = s.client();
    let (keyring, _) = client.enable(PASSWORD, KdfParams::MINIMUM).await.unwrap();
    let a = client.create_session(&keyring, "session A").await.unwrap();
    let b = client.create_session(&keyring, "session B").await.unwrap();
    let a1 = client
        .add_message(&keyring, a, "user", "A: question")
        .await
        .unwrap();
    let a2 = client
        .add_message(&keyring, a, "assistant", "A: answer")
        .await
        .unwrap();
    let b1 = client
        .add_message(&keyring, b, "user", "B: hello")
        .await
        .unwrap();
    let honest = client.history(Some(&keyring)).await.unwrap();
    assert!(honest.quarantined.is_empty(), "{:?}", honest.quarantined);
    let titles: Vec<_> = honest
        .sessions
        .iter()
        .map(|s| s.title.clone().unwrap())
        .collect();
    assert!(titles.contains(&"session A".to_string()) && titles.contains(&"session B".to_string()));
    assert!(honest.messages().all(|m| m.trust == Trust::Sealed));

    // Answers of session A: A's question is served in B; A's answer flipped to the user's;
    // B's message re-dated before A's.
    let (sa, sb) = (a.to_string(), b.to_string());
    s.proxy.lie(move |path, body| {
        let messages = |id: &str| path == format!("/v1/chat/sessions/{id}/messages");
        if messages(&sa) {
            let list = body.as_array_mut().unwrap();
            list.retain(|m| m["id"] != json!(a1));
            for m in list.iter_mut() {
                if m["id"] == json!(a2) {
                    m["role"] = json!("user");
                }
            }
        }
        if messages(&sb) {
            let list = body.as_array_mut().unwrap();
            for m in list.iter_mut() {
                m["created_at"] = json!("2020-01-01T00:00:00Z");
            }
        }
        if path == "/v1/chat/sessions" {
            // A's sealed title served as B's.
            let list = body.as_array_mut().unwrap();
            let a_meta =
                list.iter().find(|x| x["id"] == json!(sa)).unwrap()["encrypted_meta"].clone();
            for x in list.iter_mut() {
                if x["id"] == json!(sb) {
                    x["encrypted_meta"] = a_meta.clone();
                }
            }
        }
    });
    // The real server also moves A's question into B.
    sqlx::query("UPDATE chat_messages SET session_id = $1 WHERE id = $2")
        .bind(b)
        .bind(a1)
        .execute(&s.db.pool)
        .await
        .unwrap();
    let history = client.history(Some(&keyring)).await.unwrap();
    assert_eq!(history.messages().count(), 0, "nothing unverified is shown");
    let reason = |id: Uuid| {
        history
            .quarantined
            .iter()
            .find(|q| q.id == id)
            .map(|q| q.reason.clone())
            .unwrap_or_default()
    };
    assert!(reason(a1).contains("moved"), "{}", reason(a1));
    assert!(reason(a2).contains("role changed"), "{}", reason(a2));
    assert!(reason(b1).contains("reordered"), "{}", reason(b1));
    let title = history
        .quarantined
        .iter()
        .find(|q| q.what == "session title")
        .unwrap();
    assert_eq!(title.id, b);
    let b_view = history.sessions.iter().find(|v| v.id == b).unwrap();
    assert_eq!(b_view.title, None, "A's title is not shown as B's");

    // An envelope of the older format (bare text) is shown, flagged as not bound.
    s.proxy.honest();
    sqlx::query("UPDATE chat_messages SET session_id = $1 WHERE id = $2")
        .bind(a)
        .bind(a1)
        .execute(&s.db.pool)
        .await
        .unwrap();
    let old_id = Uuid::new_v4();
    let user = s.user_id.to_string();
    let row = old_id.to_string();
    let bare = keyring
        .seal(
            &user_ctx("chat.message", &user, &row),
            b"from an older client",
        )
        .unwrap();
    let added = s
        .request(
            reqwest::Method::POST,
            &format!("/v1/chat/sessions/{a}/messages"),
        )
        .json(&json!({ "id": old_id, "role": "user", "encrypted_content": bare }))
        .send()
        .await
        .unwrap();
    assert_eq!(added.status(), StatusCode::CREATED);
    let history = client.history(Some(&keyring)).await.unwrap();
    assert!(history.quarantined.is_empty(), "{:?}", history.quarantined);
    let old = history.messages().find(|m| m.id == old_id).unwrap();
    assert_eq!(
        (old.text.as_str(), old.trust),
        ("from an older client", Trust::OlderFormat)
    );
    let out = s.cli(&["history"], PASSWORD).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("from an older client  [older format, not bound"),
        "{stdout}"
    );
}

/// Item 5. Once zero-knowledge is on, session titles are sealed: a plaintext title is refused,
/// an envelope must be bound to the session id the client chose; the migration seals existing
/// titles (and the legacy name, description and system prompt) and clears their plaintext.
#[tokio::test]
async fn zk_session_titles_are_sealed_and_bound_to_their_session() {
    let s = Setup::new("titles@example.com", 2).await;
    sqlx::query(
        "UPDATE sessions SET description = 'a description', system_prompt = 'be terse' WHERE user_id = $1",
    )
    .bind(s.user_id)
    .execute(&s.db.pool)
    .await
    .unwrap();
    let client = s.client();
    let (keyring, _) = client.enable(PASSWORD, KdfParams::MINIMUM).await.unwrap();
    let post = |body: Value| {
        s.request(reqwest::Method::POST, "/v1/chat/sessions")
            .json(&body)
            .send()
    };
    let refused = post(json!({ "title": "plaintext title" })).await.unwrap();
    assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
    let user = s.user_id.to_string();
    let id = Uuid::new_v4();
    let row = id.to_string();
    let record = polydev_zk::Record::session(&row, Some("sealed title"), None, None);
    let sealed = keyring
        .seal_record(&user_ctx("chat.session", &user, &row), &record)
        .unwrap();
    let elsewhere = keyring
        .seal_record(&user_ctx("chat.session", &user, "another-session"), &record)
        .unwrap();
    assert_eq!(
        post(json!({ "id": id, "encrypted_meta": elsewhere }))
            .await
            .unwrap()
            .status(),
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        post(json!({ "encrypted_meta": sealed }))
            .await
            .unwrap()
            .status(),
        StatusCode::BAD_REQUEST,
        "the id is required"
    );
    assert_eq!(
        post(json!({ "id": id, "encrypted_meta": sealed }))
            .await
            .unwrap()
            .status(),
        StatusCode::CREATED
    );
    assert_eq!(
        post(json!({ "id": id, "encrypted_meta": sealed }))
            .await
            .unwrap()
            .status(),
        StatusCode::OK,
        "a retried create"
    );
    let report = client
        .migrate(&keyring, 10, |_| {}, |_| ControlFlow::Continue(()))
        .await
        .unwrap();
    assert_eq!(
        (
            report.sessions_encrypted,
            report.sessions_verified_and_cleared
        ),
        (2, 2)
    );
    let left: (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM chat_sessions WHERE user_id = $1 AND title IS NOT NULL),
                (SELECT count(*) FROM sessions WHERE user_id = $1
                  AND (name IS NOT NULL OR description IS NOT NULL OR system_prompt IS NOT NULL))",
    )
    .bind(s.user_id)
    .fetch_one(&s.db.pool)
    .await
    .unwrap();
    assert_eq!(
        left,
        (0, 0),
        "no plaintext title, name, description or prompt left"
    );
    let (legacy_id, envelope): (Uuid, String) =
        sqlx::query_as("SELECT id, encrypted_meta_v2 FROM sessions WHERE user_id = $1")
            .bind(s.user_id)
            .fetch_one(&s.db.pool)
            .await
            .unwrap();
    let legacy_row = legacy_id.to_string();
    let opened = keyring
        .open_record(&user_ctx("chat.session", &user, &legacy_row), &envelope)
        .unwrap();
    assert_eq!(
        opened,
        polydev_zk::Opened::Record(polydev_zk::Record::session(
            &legacy_row,
            Some("old session"),
            Some("a description"),
            Some("be terse")
        ))
    );
    let history = client.history(Some(&keyring)).await.unwrap();
    let mut titles: Vec<String> = history
        .sessions
        .iter()
        .filter_map(|v| v.title.clone())
        .collect();
    titles.sort();
    assert_eq!(titles, ["old chat", "old session", "sealed title"]);
    assert!(
        history
            .sessions
            .iter()
            .all(|v| v.title_trust == Some(Trust::Sealed))
    );
}

/// Item 6. `rotate` (here with a new password) re-seals every item — messages, titles,
/// credentials, manifest, hint — under a new account key and swaps the material: the old
/// password with an old backup of the material opens nothing written afterwards, nor anything
/// re-sealed; the new password opens everything.
#[tokio::test]
async fn zk_a_password_change_with_rotation_leaves_an_old_backup_useless() {
    let s = Setup::new("rotate@example.com", 5).await;
    let client = s.client();
    let (keyring, old_recovery) = client.enable(PASSWORD, KdfParams::MINIMUM).await.unwrap();
    client
        .migrate(&keyring, 4, |_| {}, |_| ControlFlow::Continue(()))
        .await
        .unwrap();
    let user = s.user_id.to_string();
    // A credential already moved to client-side keys.
    let credential: Uuid = sqlx::query_scalar(
        "INSERT INTO provider_credentials (user_id, provider, migrated_to_zk) VALUES ($1, 'openai', true)
         RETURNING credential_id",
    )
    .bind(s.user_id)
    .fetch_one(&s.db.pool)
    .await
    .unwrap();
    let cred_row = credential.to_string();
    sqlx::query(
        "UPDATE provider_credentials SET encrypted_credentials_v2 = $2 WHERE credential_id = $1",
    )
    .bind(credential)
    .bind(
        keyring
            .seal(
                &user_ctx("credential.provider", &user, &cred_row),
                b"sk-secret",
            )
            .unwrap(),
    )
    .execute(&s.db.pool)
    .await
    .unwrap();
    let session = client
        .create_session(&keyring, "before rotation")
        .await
        .unwrap();
    client
        .add_message(&keyring, session, "user", "written before")
        .await
        .unwrap();
    // The backup an attacker (or an old disk) keeps.
    let (backup, _) = s.material().await;

    let mut last = None;
    let report = client
        .rotate(
            PASSWORD,
            Some("the rotated password"),
            KdfParams::MINIMUM,
            |p| last = Some(p),
        )
        .await
        .unwrap();
    assert!(!report.resumed);
    assert!(report.unreadable.is_empty(), "{:?}", report.unreadable);
    let last = last.unwrap();
    assert_eq!(last.done, last.total);
    // 10 messages + 1, 2 titles + 1, 1 manifest chunk, 1 credential.
    assert_eq!(report.resealed, 16);

    let new = client.unlock("the rotated password").await.unwrap();
    assert!(client.unlock(PASSWORD).await.is_err());
    let after = client
        .add_message(&new, session, "user", "written after")
        .await
        .unwrap();
    let old_keyring = Keyring::unlock(&backup, PASSWORD, &user).expect("the backup still opens");
    let envelopes: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT 'chat.message', m.id::text, m.encrypted_content_v2 FROM chat_messages m JOIN chat_sessions s ON s.id = m.session_id
          WHERE s.user_id = $1 AND m.encrypted_content_v2 IS NOT NULL
         UNION ALL SELECT 'chat.message', m.id::text, m.encrypted_content_v2 FROM messages m JOIN sessions s ON s.id = m.session_id
          WHERE s.user_id = $1 AND m.encrypted_content_v2 IS NOT NULL
         UNION ALL SELECT 'chat.session', id::text, encrypted_meta_v2 FROM chat_sessions WHERE user_id = $1 AND encrypted_meta_v2 IS NOT NULL
         UNION ALL SELECT 'chat.session', id::text, encrypted_meta_v2 FROM sessions WHERE user_id = $1 AND encrypted_meta_v2 IS NOT NULL
         UNION ALL SELECT 'credential.provider', credential_id::text, encrypted_credentials_v2 FROM provider_credentials WHERE user_id = $1
         UNION ALL SELECT 'zk.manifest', chunk::text, envelope FROM zk_manifest_chunks WHERE user_id = $1",
    )
    .bind(s.user_id)
    .fetch_all(&s.db.pool)
    .await
    .unwrap();
    assert_eq!(envelopes.len(), 17);
    for (namespace, row, envelope) in &envelopes {
        let ctx = user_ctx(namespace, &user, row);
        assert!(
            old_keyring.open(&ctx, envelope).is_err(),
            "the old key opens {namespace} {row}"
        );
        assert!(new.open(&ctx, envelope).is_ok(), "{namespace} {row}");
    }
    assert!(
        envelopes
            .iter()
            .any(|(_, row, _)| *row == after.to_string())
    );
    // The old recovery key opens nothing on the server any more.
    assert!(
        client
            .set_password(
                polydev::client::zk::Unlock::RecoveryKey(&old_recovery.display()),
                "whatever new"
            )
            .await
            .is_err()
    );
    let history = client.history(Some(&new)).await.unwrap();
    assert!(history.quarantined.is_empty(), "{:?}", history.quarantined);
    let texts: Vec<&str> = history.messages().map(|m| m.text.as_str()).collect();
    assert_eq!(texts.len(), 12);
    assert!(texts.contains(&"written after") && texts.contains(&"written before"));
    let ctx = user_ctx("credential.provider", &user, &cred_row);
    let (stored,): (String,) = sqlx::query_as(
        "SELECT encrypted_credentials_v2 FROM provider_credentials WHERE credential_id = $1",
    )
    .bind(credential)
    .fetch_one(&s.db.pool)
    .await
    .unwrap();
    assert_eq!(new.open(&ctx, &stored).unwrap(), b"sk-secret");
    // The new recovery key works.
    assert!(
        Keyring::unlock_with_recovery(&s.material().await.0, &report.recovery_key.display(), &user)
            .is_ok()
    );
}

/// Item 6. A rotation interrupted half-way (the server fails a re-seal batch) leaves the data
/// readable, refuses new envelopes meanwhile, and `polydev zk rotate` resumes it to the end;
/// the password hint is re-sealed.
#[tokio::test]
async fn zk_an_interrupted_rotation_resumes_with_the_cli() {
    let s = Setup::new("resume@example.com", 150).await;
    let client = s.client();
    let (keyring, _) = client.enable(PASSWORD, KdfParams::MINIMUM).await.unwrap();
    client
        .migrate(&keyring, 100, |_| {}, |_| ControlFlow::Continue(()))
        .await
        .unwrap();
    let user = s.user_id.to_string();
    // A password hint (set by an earlier client); this client pins it as it is now.
    let hint_ctx = user_ctx("user.password_hint", &user, &user);
    let hint = keyring.seal(&hint_ctx, b"the usual one").unwrap();
    sqlx::query("UPDATE users SET encrypted_master_key_hint = $2 WHERE user_id = $1")
        .bind(s.user_id)
        .bind(&hint)
        .execute(&s.db.pool)
        .await
        .unwrap();
    // The hint changed the material without a new version: this machine forgets its pin (as
    // `polydev zk forget-pin` does) and pins the material as it is now.
    assert!(client.pins().forget(&s.proxy.base, &user).unwrap());
    let before = history_texts(&client, &client.unlock(PASSWORD).await.unwrap()).await;
    assert_eq!(before.len(), 300);

    // A re-seal batch fails (the fifth: after the manifest, the two titles and 100 of the 150
    // chat messages): the run stops with a rotation in progress.
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = calls.clone();
    s.proxy.fail(move |method, path| {
        method == reqwest::Method::POST
            && path == "/v1/zk/rotation/items"
            && counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 4
    });
    let error = client
        .rotate(PASSWORD, None, KdfParams::MINIMUM, |_| {})
        .await
        .unwrap_err();
    assert!(
        error.to_string().contains("the lying proxy failed"),
        "{error}"
    );
    s.proxy.honest();
    let status = client.status().await.unwrap();
    assert!(status.rotation.is_some());
    // Half re-sealed, all readable: each item opens with one key or the other.
    let old_key = client.unlock(PASSWORD).await.unwrap();
    let pending =
        Keyring::unlock_password_envelope(status.rotation.as_deref().unwrap(), PASSWORD, &user)
            .unwrap();
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT m.id::text, m.encrypted_content_v2 FROM messages m JOIN sessions s ON s.id = m.session_id WHERE s.user_id = $1
         UNION ALL SELECT m.id::text, m.encrypted_content_v2 FROM chat_messages m JOIN chat_sessions s ON s.id = m.session_id WHERE s.user_id = $1",
    )
    .bind(s.user_id)
    .fetch_all(&s.db.pool)
    .await
    .unwrap();
    let under_new = rows
        .iter()
        .filter(|(row, envelope)| {
            let ctx = user_ctx("chat.message", &user, row);
            match pending.open(&ctx, envelope) {
                Ok(_) => true,
                Err(_) => {
                    old_key.open(&ctx, envelope).unwrap();
                    false
                }
            }
        })
        .count();
    assert!(
        under_new > 0 && under_new < rows.len(),
        "{under_new} of {}",
        rows.len()
    );
    // Meanwhile no new envelope is accepted (it could be sealed under the old key).
    let session: Uuid = sqlx::query_scalar("SELECT id FROM chat_sessions WHERE user_id = $1")
        .bind(s.user_id)
        .fetch_one(&s.db.pool)
        .await
        .unwrap();
    let refused = client
        .add_message(&old_key, session, "user", "during the rotation")
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains("key rotation is in progress"), "{refused}");

    let out = s.cli(&["rotate"], PASSWORD).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("Account key rotated (resumed)"), "{stderr}");
    let recovery = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(recovery.len(), 64 + 7, "the new recovery key: {recovery}");

    let client = ZkClient::new(&s.proxy.base, &s.token).with_config_dir(pin_dir());
    let new = client.unlock(PASSWORD).await.unwrap();
    assert_eq!(history_texts(&client, &new).await, before);
    let status = client.status().await.unwrap();
    assert!(status.rotation.is_none());
    let material = status.material.unwrap();
    assert_eq!(
        new.open(&hint_ctx, material.password_hint.as_deref().unwrap())
            .unwrap(),
        b"the usual one"
    );
    assert!(
        old_key
            .open(&hint_ctx, material.password_hint.as_deref().unwrap())
            .is_err()
    );
    assert!(Keyring::unlock_with_recovery(&material, &recovery, &user).is_ok());
    // And writing works again, under the new key.
    client
        .add_message(&new, session, "user", "after the rotation")
        .await
        .unwrap();
}

async fn history_texts(client: &ZkClient, keyring: &Keyring) -> Vec<String> {
    let history = client.history(Some(keyring)).await.unwrap();
    assert!(history.quarantined.is_empty(), "{:?}", history.quarantined);
    let mut texts: Vec<String> = history.messages().map(|m| m.text.clone()).collect();
    texts.sort();
    texts
}

/// The database dump row of the threat model: what a dump holds for a user with zero-knowledge
/// on and the migration done — no plaintext message or title, no key, no proof (only its salted
/// hash).
#[tokio::test]
async fn zk_a_database_dump_holds_no_plaintext_key_or_proof() {
    let s = Setup::new("dump@example.com", 4).await;
    let client = s.client();
    let (keyring, recovery) = client.enable(PASSWORD, KdfParams::MINIMUM).await.unwrap();
    client
        .migrate(&keyring, 10, |_| {}, |_| ControlFlow::Continue(()))
        .await
        .unwrap();
    let dump: String = sqlx::query_scalar(
        "SELECT string_agg(t::text, E'\\n') FROM (
            SELECT u::text AS t FROM users u WHERE user_id = $1
            UNION ALL SELECT c::text FROM chat_sessions c WHERE user_id = $1
            UNION ALL SELECT x::text FROM sessions x WHERE user_id = $1
            UNION ALL SELECT m::text FROM chat_messages m
            UNION ALL SELECT m::text FROM messages m
            UNION ALL SELECT z::text FROM zk_manifest_chunks z) rows",
    )
    .bind(s.user_id)
    .fetch_one(&s.db.pool)
    .await
    .unwrap();
    for secret in [
        "chat message",
        "session message",
        "old chat",
        "old session",
        PASSWORD,
        &keyring.proof().to_hex(),
        &recovery.proof().to_hex(),
        &recovery.display(),
        &recovery.display().replace('-', ""),
    ] {
        assert!(!dump.contains(secret), "the dump holds {secret:?}");
    }
    // Sanity: the dump does hold the envelopes.
    let user = s.user_id.to_string();
    let (id, envelope): (Uuid, String) =
        sqlx::query_as("SELECT m.id, m.encrypted_content_v2 FROM chat_messages m LIMIT 1")
            .fetch_one(&s.db.pool)
            .await
            .unwrap();
    assert!(dump.contains(&envelope));
    let row = id.to_string();
    assert!(
        message_text(&keyring, &user_ctx("chat.message", &user, &row), &envelope)
            .starts_with("chat message")
    );
}
