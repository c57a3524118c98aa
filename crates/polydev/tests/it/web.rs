//! The zero-knowledge web page in a real browser (Debian's Chromium driven by playwright-core):
//! sign in (e-mail and password) → plaintext history → master password → migration → reload →
//! unlock → the history reads correctly, and the database holds no plaintext for the user; then
//! the page against a server that lies (`LyingProxy`): pins, quarantine, bound records,
//! unreadable envelopes, credentials, a stuck migration, lock and idle lock, rotation.

use std::path::PathBuf;

use polydev::accounts::Plan;
use polydev::client::zk::{Unlock, ZkClient};
use polydev_zk::{KdfParams, KeyMaterial, Keyring};
use serde_json::{Value, json};
use tokio::process::Command;
use uuid::Uuid;

use crate::common::TestDb;
use crate::http_api::{TestServer, user_with_token};
use crate::lying_proxy::LyingProxy;
use crate::zk::{PASSWORD, pin_dir, seed_history};

fn web_tests() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/web");
    assert!(
        dir.join("node_modules/playwright-core").exists(),
        "playwright-core is not installed: run `npm ci` in tests/web"
    );
    dir
}

#[tokio::test]
async fn the_page_sets_a_password_migrates_and_reads_history_in_the_browser() {
    let db = TestDb::migrated().await;
    // The page signs in with e-mail and password (a session cookie), not a pasted token.
    let account = ("browser@example.com", "the account password 1");
    let user_id = crate::accounts_web::verified_user(&db, account.0, account.1).await;
    let token = format!("{}:{}", account.0, account.1);
    seed_history(&db, user_id, 12).await;
    let expected: Vec<String> = sqlx::query_scalar(
        "SELECT m.content FROM chat_messages m JOIN chat_sessions s ON s.id = m.session_id WHERE s.user_id = $1
         UNION ALL SELECT m.content FROM messages m JOIN sessions s ON s.id = m.session_id WHERE s.user_id = $1",
    )
    .bind(user_id)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let server = TestServer::start(&db).await;
    let password = "Correct Horse Battery Staple 42";
    let out = Command::new("node")
        .arg("zk-page.mjs")
        .args([
            &server.base,
            &token,
            password,
            &serde_json::to_string(&expected).unwrap(),
        ])
        .current_dir(web_tests())
        .output()
        .await
        .expect("run node");
    assert!(
        out.status.success(),
        "browser test failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));

    assert_eq!(result["pageErrors"], serde_json::json!([]), "{result}");
    assert!(
        result["weakHint"].as_str().unwrap().contains("weak"),
        "{result}"
    );
    assert!(
        result["strongHint"].as_str().unwrap().contains("strong"),
        "{result}"
    );
    let recovery = result["recoveryKey"].as_str().unwrap();
    assert_eq!(
        recovery.len(),
        64 + 7,
        "8 groups of 8 hex digits: {recovery}"
    );
    assert!(
        result["statusAfter"].as_str().unwrap().contains("24 of 24"),
        "{result}"
    );
    assert!(
        result["wrongPasswordError"]
            .as_str()
            .unwrap()
            .contains("wrong master password"),
        "{result}"
    );
    assert_eq!(
        result["allShown"], true,
        "every message reads correctly after reload and unlock: {result}"
    );
    assert_eq!(result["locks"], 24, "{result}");

    let plaintext: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM chat_messages m JOIN chat_sessions s ON s.id = m.session_id
                  WHERE s.user_id = $1 AND (m.content IS NOT NULL OR NOT m.migrated_to_zk))
              + (SELECT count(*) FROM messages m JOIN sessions s ON s.id = m.session_id
                  WHERE s.user_id = $1 AND (m.content IS NOT NULL OR NOT m.migrated_to_zk))",
    )
    .bind(user_id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        plaintext, 0,
        "the database holds no plaintext for this user"
    );
    let leaked: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM chat_messages m WHERE m::text LIKE '%chat message%')
             OR EXISTS (SELECT 1 FROM messages m WHERE m::text LIKE '%session message%')",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(!leaked);
    // Session titles were sealed too (bound to their session), and their plaintext cleared.
    let titles: (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM chat_sessions WHERE user_id = $1 AND title IS NULL AND encrypted_meta_v2 IS NOT NULL),
                (SELECT count(*) FROM sessions WHERE user_id = $1 AND name IS NULL AND encrypted_meta_v2 IS NOT NULL)",
    )
    .bind(user_id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(titles, (1, 1));
}

// ---- The page against a server that lies (docs/crypto.md, threat model) ----------------------
//
// `tests/web/zk-lies.mjs` drives one step of the page per run, in a browser profile of this
// test's own, so what the page pinned in localStorage carries over from one step to the next;
// between steps the test changes what `LyingProxy` (in front of the real server) lies about.

/// The account password of the Browser tests' users (the page signs in with a session).
const ACCOUNT_PASSWORD: &str = "the account password 2";

struct Browser {
    db: TestDb,
    user_id: Uuid,
    /// An `account` API token of the user, for the test's own API calls.
    token: String,
    /// `email:password`, for the page's sign-in.
    account: String,
    server: TestServer,
    proxy: LyingProxy,
    profile: PathBuf,
    shots: PathBuf,
}

impl Browser {
    async fn new(email: &str, history: usize) -> Browser {
        let db = TestDb::migrated().await;
        let (user_id, token) = user_with_token(&db, email, Plan::Pro).await;
        if history > 0 {
            seed_history(&db, user_id, history).await;
        }
        let server = TestServer::start(&db).await;
        Browser::with_server(email, db, user_id, token, server).await
    }

    /// Screenshots of every step go to `target/tmp/web-screenshots/<email>/`.
    async fn with_server(
        email: &str,
        db: TestDb,
        user_id: Uuid,
        token: String,
        server: TestServer,
    ) -> Browser {
        let hash = polydev::accounts::hash_password(ACCOUNT_PASSWORD)
            .await
            .unwrap();
        sqlx::query(
            "INSERT INTO account_passwords (user_id, password_hash, email_verified_at) VALUES ($1, $2, now())",
        )
        .bind(user_id)
        .bind(hash)
        .execute(&db.pool)
        .await
        .unwrap();
        let proxy = LyingProxy::start(&server.base).await;
        let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join("web-screenshots")
            .join(email);
        std::fs::create_dir_all(&shots).unwrap();
        Browser {
            db,
            user_id,
            token,
            account: format!("{email}:{ACCOUNT_PASSWORD}"),
            server,
            proxy,
            profile: pin_dir(),
            shots,
        }
    }

    /// One step of the page (see zk-lies.mjs) with `password`, through the proxy.
    async fn step(&self, step: &str, password: &str) -> Value {
        let out = Command::new("node")
            .arg("zk-lies.mjs")
            .args([&self.proxy.base, &self.account, password])
            .arg(&self.profile)
            .arg(step)
            .env("SCREENSHOT_DIR", &self.shots)
            .current_dir(web_tests())
            .output()
            .await
            .expect("run node");
        assert!(
            out.status.success(),
            "browser step {step} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let result: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
        assert_eq!(result["pageErrors"], json!([]), "{result}");
        result
    }

    /// The CLI's client, straight to the real server, pinning in a directory of its own.
    fn cli(&self) -> ZkClient {
        ZkClient::new(&self.server.base, &self.token).with_config_dir(pin_dir())
    }

    async fn material(&self) -> (KeyMaterial, i64) {
        let status: Value = self
            .server
            .with_token(
                self.server
                    .client
                    .get(format!("{}/v1/zk", self.server.base)),
                Some(&self.token),
            )
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
}

/// The page said the server changed the keys, and did not ask for the password.
fn refused(result: &Value, why: &str) {
    let message = result["keysChanged"].as_str().unwrap_or_default();
    assert!(
        message.contains("The server changed this account's keys"),
        "{result}"
    );
    assert!(message.contains(why), "{why}: {result}");
    assert!(!message.contains("wrong master password"), "{result}");
    assert!(
        !result["error"]
            .as_str()
            .unwrap()
            .contains("wrong master password"),
        "{result}"
    );
    assert_eq!(result["passwordAsked"], false, "{result}");
    assert_eq!(result["shown"], json!([]), "{result}");
}

fn texts(result: &Value) -> Vec<String> {
    result["shown"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["text"].as_str().unwrap().to_string())
        .collect()
}

fn quarantined(result: &Value, id: Uuid) -> String {
    result["quarantined"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["id"] == json!(id))
        .map(|q| q["reason"].as_str().unwrap().to_string())
        .unwrap_or_default()
}

/// B1 and B6. Once the page has seen zero-knowledge on it pins the key material in localStorage
/// and refuses a server that says "off", serves older material, other material at the same
/// version, or weaker KDF parameters — as "the server changed this account's keys", without
/// asking for the password. Also: Argon2 runs in a Web Worker with a visible "deriving key"
/// state, and the recovery key leaves the DOM once the user says it is stored.
#[tokio::test]
async fn the_page_pins_the_keys_and_refuses_a_server_that_changes_them() {
    let b = Browser::new("page-pins@example.com", 2).await;
    let enabled = b.step("enable", PASSWORD).await;
    assert!(
        enabled["workers"]
            .as_array()
            .unwrap()
            .contains(&json!("/worker.js")),
        "the keyring runs in a Web Worker: {enabled}"
    );
    let deriving = enabled["deriving"].as_array().unwrap();
    assert!(
        deriving.iter().any(|d| d["text"]
            .as_str()
            .unwrap()
            .starts_with("Deriving key")
            && d["busy"] == "true"),
        "a visible deriving state: {enabled}"
    );
    assert_eq!(enabled["focused"], "recovery-key", "{enabled}");
    assert_eq!(enabled["recoveryKey"].as_str().unwrap().len(), 64 + 7);
    assert_eq!(
        enabled["recoveryKeyInDom"], false,
        "the recovery key leaves the DOM once confirmed: {enabled}"
    );
    let honest = b.step("unlock", PASSWORD).await;
    assert!(
        honest["sections"]
            .as_array()
            .unwrap()
            .contains(&json!("history")),
        "{honest}"
    );
    assert_eq!(texts(&honest).len(), 4, "{honest}");

    // "Off".
    b.proxy.lie(|path, body| {
        if path == "/v1/zk" {
            body["enabled"] = json!(false);
            body.as_object_mut().unwrap().remove("material");
        }
    });
    refused(
        &b.step("unlock", PASSWORD).await,
        "says zero-knowledge is off",
    );
    b.proxy.honest();

    // A password change elsewhere (a newer version) is accepted, and pinned once it opens.
    let (old, old_version) = b.material().await;
    b.cli()
        .set_password(Unlock::Password(PASSWORD), "the second password")
        .await
        .unwrap();
    let (current, version) = b.material().await;
    assert_eq!(version, old_version + 1);
    let newer = b.step("unlock", "the second password").await;
    assert!(
        newer["sections"]
            .as_array()
            .unwrap()
            .contains(&json!("history")),
        "{newer}"
    );

    let serve = |material: KeyMaterial, version: i64| {
        move |path: &str, body: &mut Value| {
            if path == "/v1/zk" {
                body["material"] = serde_json::to_value(&material).unwrap();
                body["version"] = json!(version);
            }
        }
    };
    // Rolled back: the old material under its old version (it would open with the old password).
    b.proxy.lie(serve(old.clone(), old_version));
    refused(&b.step("unlock", PASSWORD).await, "an older copy");
    // The old material passed off as the current version.
    b.proxy.lie(serve(old, version));
    refused(&b.step("unlock", PASSWORD).await, "other key material");
    // Weaker KDF parameters, even at a newer version.
    let user = b.user_id.to_string();
    let keyring = Keyring::unlock(&current, "the second password", &user).unwrap();
    let (weaker, _) = keyring
        .change_password(&current, "the second password", KdfParams::MINIMUM)
        .unwrap();
    b.proxy.lie(serve(weaker, version + 1));
    refused(
        &b.step("unlock", "the second password").await,
        "key derivation parameters",
    );
    b.proxy.honest();
    let again = b.step("unlock", "the second password").await;
    assert!(
        again["sections"]
            .as_array()
            .unwrap()
            .contains(&json!("history")),
        "{again}"
    );
}

/// B2, B4 and B6. Plaintext injected after zero-knowledge was turned on (stored by the server or
/// made up in an answer) is shown quarantined, apart, never as the user's history; sealed
/// records served moved to another session, with the role flipped or re-dated are quarantined
/// with the reason; a bare-text envelope is flagged "older format, not bound"; an envelope that
/// does not open is shown unreadable in its place while the rest of the history renders; titles
/// open locally.
#[tokio::test]
async fn the_page_quarantines_injected_plaintext_and_flags_moved_or_broken_records() {
    let b = Browser::new("page-lies@example.com", 3).await;
    b.step("enable", PASSWORD).await;
    let cli = b.cli();
    let keyring = cli.unlock(PASSWORD).await.unwrap();
    let a = cli.create_session(&keyring, "session A").await.unwrap();
    let s_b = cli.create_session(&keyring, "session B").await.unwrap();
    let a1 = cli
        .add_message(&keyring, a, "user", "A: question")
        .await
        .unwrap();
    let a2 = cli
        .add_message(&keyring, a, "assistant", "A: answer")
        .await
        .unwrap();
    let a3 = cli
        .add_message(&keyring, a, "user", "A: follow-up")
        .await
        .unwrap();
    let b1 = cli
        .add_message(&keyring, s_b, "user", "B: hello")
        .await
        .unwrap();
    let b2 = cli
        .add_message(&keyring, s_b, "assistant", "B: broken")
        .await
        .unwrap();
    // An older client's bare-text envelope.
    let bare_id = Uuid::new_v4();
    let user = b.user_id.to_string();
    let row = bare_id.to_string();
    let bare = keyring
        .seal(
            &polydev_zk::Context {
                namespace: "chat.message",
                user_id: &user,
                row_id: &row,
            },
            b"from an older client",
        )
        .unwrap();
    let added = b
        .server
        .with_token(
            b.server
                .client
                .post(format!("{}/v1/chat/sessions/{s_b}/messages", b.server.base)),
            Some(&b.token),
        )
        .json(&json!({ "id": bare_id, "role": "user", "encrypted_content": bare }))
        .send()
        .await
        .unwrap();
    assert_eq!(added.status(), reqwest::StatusCode::CREATED);
    // Plaintext the server writes into the user's old chat after zero-knowledge was on.
    let chat: Uuid = sqlx::query_scalar(
        "SELECT id FROM chat_sessions WHERE user_id = $1 AND title = 'old chat'",
    )
    .bind(b.user_id)
    .fetch_one(&b.db.pool)
    .await
    .unwrap();
    let injected: Uuid = sqlx::query_scalar(
        "INSERT INTO chat_messages (session_id, role, content)
         VALUES ($1, 'user', 'injected: transfer everything') RETURNING id",
    )
    .bind(chat)
    .fetch_one(&b.db.pool)
    .await
    .unwrap();
    // The real server moves A's question into B.
    sqlx::query("UPDATE chat_messages SET session_id = $1 WHERE id = $2")
        .bind(s_b)
        .bind(a1)
        .execute(&b.db.pool)
        .await
        .unwrap();
    let made_up = Uuid::new_v4();
    let (sa, sb) = (a.to_string(), s_b.to_string());
    b.proxy.lie(move |path, body| {
        let messages = |id: &str| path == format!("/v1/chat/sessions/{id}/messages");
        if path == format!("/v1/chat/sessions/{chat}/messages") {
            body.as_array_mut().unwrap().push(json!({
                "id": made_up, "role": "assistant", "content": "made up: you agreed",
                "encrypted_content": null, "created_at": "2024-01-01T00:00:00Z"
            }));
        }
        if messages(&sa) {
            for m in body.as_array_mut().unwrap() {
                if m["id"] == json!(a2) {
                    m["role"] = json!("user");
                }
            }
        }
        if messages(&sb) {
            for m in body.as_array_mut().unwrap() {
                if m["id"] == json!(b1) {
                    m["created_at"] = json!("2020-01-01T00:00:00Z");
                }
                if m["id"] == json!(b2) {
                    // A garbled envelope: one character of its ciphertext changed.
                    let mut text = m["encrypted_content"].as_str().unwrap().to_string();
                    let at = text.len() - 10;
                    let c = if &text[at..at + 1] == "A" { "B" } else { "A" };
                    text.replace_range(at..at + 1, c);
                    m["encrypted_content"] = json!(text);
                }
            }
        }
    });

    let result = b.step("unlock", PASSWORD).await;
    let shown = texts(&result);
    for mine in [
        "chat message 1",
        "session message 1",
        "A: follow-up",
        "from an older client",
    ] {
        assert!(
            shown.iter().any(|t| t.starts_with(mine)),
            "{mine}: {result}"
        );
    }
    for theirs in [
        "injected",
        "made up",
        "A: question",
        "A: answer",
        "B: hello",
        "B: broken",
    ] {
        assert!(
            !shown.iter().any(|t| t.contains(theirs)),
            "{theirs}: {result}"
        );
    }
    assert_eq!(result["quarantineVisible"], true, "{result}");
    assert!(
        quarantined(&result, injected).contains("not in the manifest"),
        "{result}"
    );
    assert!(
        quarantined(&result, made_up).contains("not in the manifest"),
        "{result}"
    );
    assert!(quarantined(&result, a1).contains("moved"), "{result}");
    assert!(
        quarantined(&result, a2).contains("role changed"),
        "{result}"
    );
    assert!(quarantined(&result, b1).contains("reordered"), "{result}");
    assert_eq!(quarantined(&result, a3), "", "left where it was: {result}");
    let unreadable = result["unreadable"].as_array().unwrap();
    assert_eq!(unreadable.len(), 1, "{result}");
    assert_eq!(unreadable[0]["id"], json!(b2), "{result}");
    let older = result["shown"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["text"] == "from an older client")
        .unwrap();
    assert_eq!(older["badge"], "older format, not bound", "{result}");
    let titles = result["titles"].as_array().unwrap();
    assert!(
        titles.contains(&json!("session A")) && titles.contains(&json!("session B")),
        "{result}"
    );
}

/// B6. The page moves legacy credentials (the hand-over with the proof, walking past unreadable
/// rows with `next`), and its migration stops with an error, instead of looping, when the server
/// keeps serving rows to verify that neither clear nor reset.
#[tokio::test]
async fn the_page_moves_credentials_and_stops_a_migration_without_progress() {
    const MASTER: &[u8] = b"the page's legacy secret";
    let db = TestDb::migrated().await;
    let (user_id, token) = user_with_token(&db, "page-creds@example.com", Plan::Pro).await;
    seed_history(&db, user_id, 2).await;
    crate::zk::insert_legacy(&db, user_id, MASTER, 3).await;
    sqlx::query(
        "INSERT INTO provider_credentials (user_id, provider, encrypted_credentials, encryption_iv, encryption_salt, encryption_tag)
         VALUES ($1, 'short-iv', '\\x00', '\\x0000', '\\x00', '\\x00000000000000000000000000000000')",
    )
    .bind(user_id)
    .execute(&db.pool)
    .await
    .unwrap();
    let server = crate::zk::legacy_server(&db, MASTER).await;
    let b = Browser::with_server("page-creds@example.com", db, user_id, token, server).await;
    b.step("enable", PASSWORD).await;
    let moved = b.step("credentials", PASSWORD).await;
    assert_eq!(moved["error"], "", "{moved}");
    let status = moved["credentialsStatus"].as_str().unwrap();
    assert!(status.starts_with("3 credentials moved"), "{moved}");
    assert!(status.contains("3 verified"), "{moved}");
    let unreadable = moved["credentialsUnreadable"].as_array().unwrap();
    assert_eq!(unreadable.len(), 1, "{moved}");
    assert!(
        unreadable[0].as_str().unwrap().contains("IV is 2 bytes"),
        "{moved}"
    );
    let envelopes: Vec<(String, String)> = sqlx::query_as(
        "SELECT credential_id::text, encrypted_credentials_v2 FROM provider_credentials
          WHERE user_id = $1 AND encrypted_credentials IS NULL AND migrated_to_zk",
    )
    .bind(b.user_id)
    .fetch_all(&b.db.pool)
    .await
    .unwrap();
    assert_eq!(envelopes.len(), 3);
    let keyring = b.cli().unlock(PASSWORD).await.unwrap();
    let user = b.user_id.to_string();
    let mut secrets: Vec<String> = envelopes
        .iter()
        .map(|(id, envelope)| {
            let ctx = polydev_zk::Context {
                namespace: "credential.provider",
                user_id: &user,
                row_id: id,
            };
            String::from_utf8(keyring.open(&ctx, envelope).unwrap()).unwrap()
        })
        .collect();
    secrets.sort();
    assert_eq!(secrets, ["secret 0", "secret 1", "secret 2"]);

    // A server that keeps serving a row to verify that can be neither cleared nor reset.
    b.proxy.lie(|path, body| {
        if path.starts_with("/v1/zk/migration/unverified") {
            body["messages"].as_array_mut().unwrap().push(json!({
                "system": "chat", "id": Uuid::new_v4(), "session_id": Uuid::new_v4(), "role": "user",
                "content": "stuck", "encrypted_content": "pdz.AQE", "created_at": "2024-01-01T00:00:00Z"
            }));
        }
    });
    let stuck = b.step("migrate", PASSWORD).await;
    assert!(
        stuck["error"]
            .as_str()
            .unwrap()
            .contains("makes no progress"),
        "{stuck}"
    );
    // Honest again, the migration finishes.
    b.proxy.honest();
    let done = b.step("migrate", PASSWORD).await;
    assert!(
        done["migrationStatus"].as_str().unwrap().contains("4 of 4"),
        "{done}"
    );
}

/// B6. The lock button and the idle lock drop the keys (the worker goes) and what was shown; the
/// page asks for the password again. The idle time is shortened through localStorage.
#[tokio::test]
async fn the_page_locks_on_request_and_when_idle() {
    let b = Browser::new("page-lock@example.com", 1).await;
    b.step("enable", PASSWORD).await;
    let locked = b.step("lock", PASSWORD).await;
    assert_eq!(locked["before"]["lockVisible"], true, "{locked}");
    assert!(!texts(&locked["before"]).is_empty(), "{locked}");
    assert_eq!(locked["workerGone"], true, "{locked}");
    assert_eq!(locked["sections"], json!(["unlock"]), "{locked}");
    assert_eq!(locked["shown"], json!([]), "{locked}");
    assert_eq!(locked["focused"], "password", "{locked}");
    let idle = b.step("idle-lock", PASSWORD).await;
    assert!(idle["maxShown"].as_i64().unwrap() > 0, "{idle}");
    assert_eq!(idle["workerGone"], true, "{idle}");
    assert_eq!(idle["sections"], json!(["unlock"]), "{idle}");
    assert_eq!(idle["shown"], json!([]), "{idle}");
}

/// B5. The page rotates the account key (the protocol of `polydev zk rotate`): everything is
/// re-sealed, a new recovery key is shown once, the pin follows the new material, and the old
/// material's key opens nothing any more.
#[tokio::test]
async fn the_page_rotates_the_account_key() {
    let b = Browser::new("page-rotate@example.com", 2).await;
    b.step("enable", PASSWORD).await;
    b.step("migrate", PASSWORD).await;
    let (old, version) = b.material().await;
    let rotated = b.step("rotate", PASSWORD).await;
    assert_eq!(rotated["error"], "", "{rotated}");
    assert!(
        rotated["rotationStatus"]
            .as_str()
            .unwrap()
            .starts_with("Rotated:"),
        "{rotated}"
    );
    assert_eq!(rotated["recoveryKey"].as_str().unwrap().len(), 64 + 7);
    let (new, new_version) = b.material().await;
    assert!(new_version > version);
    assert_ne!(new.password_wrapped, old.password_wrapped);
    let rotating: bool = sqlx::query_scalar(
        "SELECT zk_rotation_wrapped_key IS NOT NULL FROM users WHERE user_id = $1",
    )
    .bind(b.user_id)
    .fetch_one(&b.db.pool)
    .await
    .unwrap();
    assert!(!rotating);
    let user = b.user_id.to_string();
    let old_key = Keyring::unlock(&old, PASSWORD, &user).unwrap();
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT m.id::text, m.encrypted_content_v2 FROM chat_messages m JOIN chat_sessions s ON s.id = m.session_id WHERE s.user_id = $1",
    )
    .bind(b.user_id)
    .fetch_all(&b.db.pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), 2);
    for (id, envelope) in &rows {
        let ctx = polydev_zk::Context {
            namespace: "chat.message",
            user_id: &user,
            row_id: id,
        };
        assert!(
            old_key.open(&ctx, envelope).is_err(),
            "re-sealed under the new key"
        );
    }
    // The page pinned the new material: it unlocks and reads the history.
    let after = b.step("unlock", PASSWORD).await;
    assert_eq!(texts(&after).len(), 4, "{after}");
    assert_eq!(after["keysChanged"], Value::Null, "{after}");
}
