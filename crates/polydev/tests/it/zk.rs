//! Zero-knowledge on the server: key material, the chat API's rules, and the client-driven
//! migration of plaintext, interrupted at every step and resumed.

use std::collections::BTreeMap;
use std::ops::ControlFlow;

use polydev::accounts::{self, Plan};
use polydev::client::zk::{Step, ZkClient};
use polydev_zk::{Context, KdfParams, Keyring};
use reqwest::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::common::TestDb;
use crate::http_api::{TestServer, user_with_token};

pub const PASSWORD: &str = "a long enough master password";

/// A client whose pins live in a directory of its own (not the user's config).
pub fn zk_client(base: &str, token: &str) -> ZkClient {
    ZkClient::new(base, token).with_config_dir(pin_dir())
}

/// A fresh directory for pins, under the target directory.
pub fn pin_dir() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("zk-pins")
        .join(crate::common::random_hex(8))
}

/// The text of a sealed chat message (a record, or the older bare text).
pub fn message_text(keyring: &Keyring, ctx: &Context<'_>, envelope: &str) -> String {
    keyring
        .open_record(ctx, envelope)
        .unwrap()
        .text()
        .unwrap()
        .to_string()
}

/// A user with plaintext history in both legacy chat systems.
pub async fn seed_history(db: &TestDb, user_id: Uuid, per_system: usize) {
    let chat: Uuid = sqlx::query_scalar(
        "INSERT INTO chat_sessions (user_id, title) VALUES ($1, 'old chat') RETURNING id",
    )
    .bind(user_id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let session: Uuid = sqlx::query_scalar(
        "INSERT INTO sessions (user_id, name) VALUES ($1, 'old session') RETURNING id",
    )
    .bind(user_id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO chat_messages (session_id, role, content)
         SELECT $1, 'user', 'chat message ' || i || ' ünïcödé ✓ ' || repeat('x', i % 50) FROM generate_series(1, $2) i",
    )
    .bind(chat)
    .bind(per_system as i32)
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO messages (session_id, role, content)
         SELECT $1, 'assistant', E'session message ' || i || E'\\nline two' FROM generate_series(1, $2) i",
    )
    .bind(session)
    .bind(per_system as i32)
    .execute(&db.pool)
    .await
    .unwrap();
}

/// id, content, encrypted_content_v2, migrated_to_zk
type MessageRow = (Uuid, Option<String>, Option<String>, Option<bool>);

/// id → plaintext for every message of the user, decrypting migrated ones.
async fn history(db: &TestDb, user_id: Uuid, keyring: Option<&Keyring>) -> BTreeMap<Uuid, String> {
    let rows: Vec<MessageRow> = sqlx::query_as(
        "SELECT m.id, m.content, m.encrypted_content_v2, m.migrated_to_zk FROM chat_messages m
           JOIN chat_sessions s ON s.id = m.session_id WHERE s.user_id = $1
         UNION ALL
         SELECT m.id, m.content, m.encrypted_content_v2, m.migrated_to_zk FROM messages m
           JOIN sessions s ON s.id = m.session_id WHERE s.user_id = $1",
    )
    .bind(user_id)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let user = user_id.to_string();
    rows.into_iter()
        .map(|(id, content, envelope, migrated)| {
            let text = if migrated == Some(true) {
                let row = id.to_string();
                let ctx = Context {
                    namespace: "chat.message",
                    user_id: &user,
                    row_id: &row,
                };
                message_text(
                    keyring.expect("a keyring"),
                    &ctx,
                    envelope.as_deref().unwrap(),
                )
            } else {
                content.unwrap()
            };
            (id, text)
        })
        .collect()
}

#[tokio::test]
async fn an_interrupted_migration_resumes_and_loses_nothing() {
    let db = TestDb::migrated().await;
    let (user_id, token) = user_with_token(&db, "zk@example.com", Plan::Pro).await;
    seed_history(&db, user_id, 130).await;
    let before = history(&db, user_id, None).await;
    assert_eq!(before.len(), 260);

    let server = TestServer::start(&db).await;
    let client = zk_client(&server.base, &token);
    let (keyring, _recovery) = client.enable(PASSWORD, KdfParams::MINIMUM).await.unwrap();

    // Interrupt after every kind of step, several times, then let it finish.
    let mut envelopes_seen: BTreeMap<Uuid, String> = BTreeMap::new();
    for stop_at in [
        Step::Written,
        Step::Cleared,
        Step::Written,
        Step::Written,
        Step::Cleared,
    ] {
        client
            .migrate(
                &keyring,
                40,
                |_| {},
                |step| {
                    if step == stop_at {
                        ControlFlow::Break(())
                    } else {
                        ControlFlow::Continue(())
                    }
                },
            )
            .await
            .unwrap();
        // Nothing is encrypted twice: an envelope, once written, never changes.
        let written: Vec<(Uuid, String)> = sqlx::query_as(
            "SELECT id, encrypted_content_v2 FROM chat_messages WHERE encrypted_content_v2 IS NOT NULL
             UNION ALL SELECT id, encrypted_content_v2 FROM messages WHERE encrypted_content_v2 IS NOT NULL",
        )
        .fetch_all(&db.pool)
        .await
        .unwrap();
        for (id, envelope) in written {
            let first = envelopes_seen.entry(id).or_insert_with(|| envelope.clone());
            assert_eq!(first, &envelope, "row {id} was encrypted twice");
        }
        assert_eq!(
            history(&db, user_id, Some(&keyring)).await,
            before,
            "nothing lost mid-way"
        );
    }
    let report = client
        .migrate(&keyring, 40, |_| {}, |_| ControlFlow::Continue(()))
        .await
        .unwrap();
    assert_eq!(report.reset, 0);
    let status = client.migration_status().await.unwrap();
    assert_eq!(
        (status.plaintext, status.unverified, status.done),
        (0, 0, 260)
    );

    // Count and content checksum: every message is there and reads back exactly.
    let after = history(&db, user_id, Some(&keyring)).await;
    assert_eq!(after, before);
    let plaintext_left: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM chat_messages WHERE content IS NOT NULL)
              + (SELECT count(*) FROM messages WHERE content IS NOT NULL)",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        plaintext_left, 0,
        "the database holds no plaintext for this user"
    );
}

#[tokio::test]
async fn a_row_changed_during_migration_is_not_overwritten_nor_sealed_after_enable() {
    let db = TestDb::migrated().await;
    let (user_id, token) = user_with_token(&db, "cas@example.com", Plan::Pro).await;
    seed_history(&db, user_id, 3).await;
    let server = TestServer::start(&db).await;
    let client = zk_client(&server.base, &token);
    let (keyring, _) = client.enable(PASSWORD, KdfParams::MINIMUM).await.unwrap();

    // Read a batch as the client would, then an old-style writer edits one row.
    let batch: Value = server
        .get("/v1/zk/migration/plaintext?limit=10", Some(&token))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let first = &batch["messages"][0];
    let id: Uuid = first["id"].as_str().unwrap().parse().unwrap();
    let table = if first["system"] == "chat" {
        "chat_messages"
    } else {
        "messages"
    };
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE {table} SET content = 'edited meanwhile' WHERE id = $1"
    )))
    .bind(id)
    .execute(&db.pool)
    .await
    .unwrap();
    let user = user_id.to_string();
    let row = id.to_string();
    let stale = keyring
        .seal(
            &Context {
                namespace: "chat.message",
                user_id: &user,
                row_id: &row,
            },
            first["content"].as_str().unwrap().as_bytes(),
        )
        .unwrap();
    let write = json!([{ "system": first["system"], "id": id, "content_sha256": first["content_sha256"], "encrypted_content": stale }]);
    let response: Value = server
        .with_token(
            server
                .client
                .post(format!("{}/v1/zk/migration/encrypted", server.base)),
            Some(&token),
        )
        .json(&write)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        response["written"],
        json!([]),
        "the compare-and-swap refused the stale write"
    );

    // The edit came after zero-knowledge was turned on: the manifest recorded the row as it
    // was, so the migration reports the edited row and never seals it as the user's.
    let report = client
        .migrate(&keyring, 10, |_| {}, |_| ControlFlow::Continue(()))
        .await
        .unwrap();
    assert_eq!(report.not_in_manifest, vec![id]);
    assert_eq!(report.encrypted, 5, "the other rows are sealed");
    let after = history(&db, user_id, Some(&keyring)).await;
    assert_eq!(after[&id], "edited meanwhile");
    let migrated: Option<bool> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT migrated_to_zk FROM {table} WHERE id = $1"
    )))
    .bind(id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(migrated, Some(false), "left in plaintext, not sealed");
}

#[tokio::test]
async fn with_zero_knowledge_on_plaintext_writes_are_refused_and_envelopes_checked() {
    let db = TestDb::migrated().await;
    let (user_id, token) = user_with_token(&db, "rules@example.com", Plan::Pro).await;
    let (_, other_token) = user_with_token(&db, "other@example.com", Plan::Pro).await;
    let server = TestServer::start(&db).await;
    let post = |path: String, token: &str, body: Value| {
        server
            .with_token(
                server.client.post(format!("{}{path}", server.base)),
                Some(token),
            )
            .json(&body)
            .send()
    };
    let session: Value = post("/v1/chat/sessions".into(), &token, json!({ "title": "t" }))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let messages = format!(
        "/v1/chat/sessions/{}/messages",
        session["id"].as_str().unwrap()
    );

    // Before zero-knowledge: plaintext is fine, and reads return it.
    let plain = post(
        messages.clone(),
        &token,
        json!({ "role": "user", "content": "hello" }),
    )
    .await
    .unwrap();
    assert_eq!(plain.status(), StatusCode::CREATED);
    // Another user cannot see or write the session.
    let theirs = post(
        messages.clone(),
        &other_token,
        json!({ "role": "user", "content": "x" }),
    )
    .await
    .unwrap();
    assert_eq!(theirs.status(), StatusCode::NOT_FOUND);

    let client = zk_client(&server.base, &token);
    let (keyring, _) = client.enable(PASSWORD, KdfParams::MINIMUM).await.unwrap();
    let again = client
        .enable(PASSWORD, KdfParams::MINIMUM)
        .await
        .unwrap_err()
        .to_string();
    assert!(again.contains("already enabled"), "{again}");

    let refused = post(
        messages.clone(),
        &token,
        json!({ "role": "user", "content": "plaintext" }),
    )
    .await
    .unwrap();
    assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
    let body: Value = refused.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("never plaintext"),
        "{body}"
    );

    let user = user_id.to_string();
    let id = Uuid::new_v4();
    let seal = |ns: &str, row: &str| {
        keyring
            .seal(
                &Context {
                    namespace: ns,
                    user_id: &user,
                    row_id: row,
                },
                b"encrypted hello",
            )
            .unwrap()
    };
    let id_text = id.to_string();
    for (body, why) in [
        (
            json!({ "id": id, "role": "user", "encrypted_content": "pdz.bm90IGFuIGVudmVsb3Bl" }),
            "not a valid envelope",
        ),
        (
            json!({ "id": id, "role": "user", "encrypted_content": seal("credential.provider", &id_text) }),
            "namespace",
        ),
        (
            json!({ "id": id, "role": "user", "encrypted_content": seal("chat.message", "another-row") }),
            "another row",
        ),
        (
            json!({ "role": "user", "encrypted_content": seal("chat.message", &id_text) }),
            "`id` is required",
        ),
    ] {
        let response = post(messages.clone(), &token, body).await.unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{why}");
        let body: Value = response.json().await.unwrap();
        assert!(
            body["error"]["message"].as_str().unwrap().contains(why),
            "{why}: {body}"
        );
    }
    let ok = post(
        messages.clone(),
        &token,
        json!({ "id": id, "role": "user", "encrypted_content": seal("chat.message", &id_text) }),
    )
    .await
    .unwrap();
    assert_eq!(ok.status(), StatusCode::CREATED);

    // Reads follow the rule: migrated → the envelope, else the plaintext.
    let listed: Vec<Value> = server
        .get(&messages, Some(&token))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0]["content"], "hello");
    let envelope = listed[1]["encrypted_content"].as_str().unwrap();
    assert!(listed[1]["content"].is_null());
    let ctx = Context {
        namespace: "chat.message",
        user_id: &user,
        row_id: &id_text,
    };
    assert_eq!(keyring.open(&ctx, envelope).unwrap(), b"encrypted hello");
    assert_eq!(
        accounts::find_user(&db.pool, user_id)
            .await
            .unwrap()
            .email
            .as_deref(),
        Some("rules@example.com")
    );
}

#[tokio::test]
async fn key_material_is_checked_and_replaced_only_with_compare_and_swap() {
    let db = TestDb::migrated().await;
    let (user_id, token) = user_with_token(&db, "keys@example.com", Plan::Pro).await;
    let (other_id, _) = user_with_token(&db, "else@example.com", Plan::Pro).await;
    let server = TestServer::start(&db).await;
    let put = |path: &str, proof: &str, body: Value| {
        server
            .with_token(
                server.client.put(format!("{}{path}", server.base)),
                Some(&token),
            )
            .header("polydev-zk-proof", proof)
            .json(&body)
            .send()
    };
    let post = |path: &str, body: Value| {
        server
            .with_token(
                server.client.post(format!("{}{path}", server.base)),
                Some(&token),
            )
            .json(&body)
            .send()
    };
    // Material bound to another user, or with weak KDF parameters, is refused.
    let (foreign_keyring, foreign, foreign_recovery) =
        Keyring::setup(PASSWORD, &other_id.to_string(), KdfParams::MINIMUM).unwrap();
    let response = post(
        "/v1/zk/enable",
        json!({ "material": foreign, "password_proof": foreign_keyring.proof().to_hex(), "recovery_proof": foreign_recovery.proof().to_hex() }),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);

    let (keyring, material, recovery) =
        Keyring::setup(PASSWORD, &user_id.to_string(), KdfParams::MINIMUM).unwrap();
    // Without the proofs, the material alone (what older clients sent) is refused.
    assert_eq!(
        post("/v1/zk/enable", json!(material))
            .await
            .unwrap()
            .status(),
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        post(
            "/v1/zk/enable",
            json!({ "material": material, "password_proof": keyring.proof().to_hex(), "recovery_proof": recovery.proof().to_hex() })
        )
        .await
        .unwrap()
        .status(),
        StatusCode::NO_CONTENT
    );
    let salt: Option<String> =
        sqlx::query_scalar("SELECT key_derivation_salt FROM users WHERE user_id = $1")
            .bind(user_id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        salt.unwrap().len(),
        32,
        "the salt is recorded as the seed describes"
    );

    let proof = keyring.proof().to_hex();
    let (changed, new_proof) = keyring
        .change_password(&material, "a brand new password!", KdfParams::MINIMUM)
        .unwrap();
    let stale = put(
        "/v1/zk/password",
        &proof,
        json!({ "previous": "pdz.stale", "material": changed, "password_proof": new_proof.to_hex() }),
    )
    .await
    .unwrap();
    assert_eq!(stale.status(), StatusCode::CONFLICT);
    let ok = put(
        "/v1/zk/password",
        &proof,
        json!({ "previous": material.password_wrapped, "material": changed, "password_proof": new_proof.to_hex() }),
    )
    .await
    .unwrap();
    assert_eq!(ok.status(), StatusCode::NO_CONTENT);

    let client = zk_client(&server.base, &token);
    assert!(
        client
            .unlock(PASSWORD)
            .await
            .unwrap_err()
            .to_string()
            .contains("wrong master password")
    );
    assert!(client.unlock("a brand new password!").await.is_ok());

    // The old password's proof no longer counts; the new one does.
    let (replaced, new_recovery) = keyring.replace_recovery_key(&changed).unwrap();
    let body = json!({ "previous": changed.recovery_wrapped, "material": replaced, "recovery_proof": new_recovery.proof().to_hex() });
    let old_proof = put("/v1/zk/recovery", &proof, body.clone()).await.unwrap();
    assert_eq!(old_proof.status(), StatusCode::FORBIDDEN);
    let ok = put("/v1/zk/recovery", &new_proof.to_hex(), body)
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::NO_CONTENT);
    let status: Value = server
        .get("/v1/zk", Some(&token))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["version"], 3, "enable, password, recovery key");
    let stored: polydev_zk::KeyMaterial =
        serde_json::from_value(status["material"].clone()).unwrap();
    assert!(
        Keyring::unlock_with_recovery(&stored, &new_recovery.display(), &user_id.to_string())
            .is_ok()
    );
}

/// Encrypts as the legacy production code did: AES-256-GCM under scrypt(N=2^14, r=8, p=1) of
/// the server master secret and a salt; returns `(ciphertext, tag)`. Written here, apart from
/// the server's decryption, so the two check each other.
fn legacy_seal(master: &[u8], salt: &[u8], iv: [u8; 12], plaintext: &[u8]) -> (Vec<u8>, Vec<u8>) {
    use aes_gcm::aead::{Aead, KeyInit};
    let params = scrypt::Params::new(14, 8, 1).unwrap();
    let mut key = [0u8; 32];
    scrypt::scrypt(master, salt, &params, &mut key).unwrap();
    let cipher = aes_gcm::Aes256Gcm::new((&key).into());
    let mut sealed = cipher
        .encrypt(&aes_gcm::Nonce::from(iv), plaintext)
        .unwrap();
    let tag = sealed.split_off(sealed.len() - 16);
    (sealed, tag)
}

/// Legacy credentials (AES-256-GCM under a server key from scrypt) move to client-side keys:
/// handed over once, sealed by the client, stored, verified, and the legacy ciphertext cleared.
#[tokio::test]
async fn legacy_credentials_move_to_client_side_keys() {
    use polydev::vault::LegacySecret;
    let db = TestDb::migrated().await;
    let (user_id, token) = user_with_token(&db, "vault@example.com", Plan::Pro).await;
    let (other_id, _) = user_with_token(&db, "vault-other@example.com", Plan::Pro).await;
    const MASTER: &[u8] = b"the old server master secret";
    let secret = LegacySecret::new(MASTER);

    // As the legacy code stored them.
    let provider_secret = br#"{"access_token":"sk-live-123","refresh_token":"rt-456"}"#;
    let salt = [7u8; 16];
    let iv = [1u8; 12];
    let (ct, tag) = legacy_seal(MASTER, &salt, iv, provider_secret);
    let provider_id: Uuid = sqlx::query_scalar(
        "INSERT INTO provider_credentials (user_id, provider, encrypted_credentials, encryption_iv, encryption_salt, encryption_tag)
         VALUES ($1, 'openai', $2, $3, $4, $5) RETURNING credential_id",
    )
    .bind(user_id)
    .bind(&ct)
    .bind(&iv[..])
    .bind(&salt[..])
    .bind(&tag)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let cli_id = Uuid::new_v4();
    let cli_secret = b"claude-code oauth token: abc.def.ghi";
    let (ct, tag) = legacy_seal(MASTER, cli_id.to_string().as_bytes(), [2u8; 12], cli_secret);
    sqlx::query(
        "INSERT INTO cli_credentials (credential_id, user_id, provider, encrypted_data, encryption_iv, encryption_auth_tag)
         VALUES ($1, $2, 'anthropic', $3, $4, $5)",
    )
    .bind(cli_id)
    .bind(user_id)
    .bind(hex::encode(&ct))
    .bind(hex::encode([2u8; 12]))
    .bind(hex::encode(&tag))
    .execute(&db.pool)
    .await
    .unwrap();
    // Another user's credential is never handed over.
    let (ct, tag) = legacy_seal(MASTER, &salt, iv, b"not yours");
    sqlx::query(
        "INSERT INTO provider_credentials (user_id, provider, encrypted_credentials, encryption_iv, encryption_salt, encryption_tag)
         VALUES ($1, 'google', $2, $3, $4, $5)",
    )
    .bind(other_id)
    .bind(&ct)
    .bind(&iv[..])
    .bind(&salt[..])
    .bind(&tag)
    .execute(&db.pool)
    .await
    .unwrap();

    let catalogue = polydev::perspectives::Catalogue::load(None).unwrap();
    let state = polydev::app::AppState::new(
        db.pool.clone(),
        polydev::perspectives::Gateway::new(catalogue),
    )
    .with_legacy_secret(Some(secret));
    let server = TestServer::start_state(state).await;
    let client = zk_client(&server.base, &token);
    let (keyring, _) = client.enable(PASSWORD, KdfParams::MINIMUM).await.unwrap();
    // A CLI signed in through a login session: its credential is a sealed box to the user's
    // runtime key, listed beside the envelopes; the move leaves it alone.
    let login_id = Uuid::new_v4();
    let (user, row) = (user_id.to_string(), login_id.to_string());
    let login_sealed = polydev_zk::seal_to(
        &polydev_zk::X25519KeyPair::generate().unwrap().public_key(),
        &Context {
            namespace: "login.credential",
            user_id: &user,
            row_id: &row,
        },
        b"a login session's credential file",
    )
    .unwrap();
    sqlx::query(
        "INSERT INTO cli_credentials (credential_id, user_id, provider, encrypted_data_v2, migrated_to_zk, kind)
         VALUES ($1, $2, 'google', $3, true, 'cli')",
    )
    .bind(login_id)
    .bind(user_id)
    .bind(&login_sealed)
    .execute(&db.pool)
    .await
    .unwrap();
    let report = client.migrate_credentials(&keyring).await.unwrap();
    assert_eq!((report.moved, report.verified_and_cleared), (2, 2));
    // Running again finds nothing left to move.
    let again = client.migrate_credentials(&keyring).await.unwrap();
    assert_eq!(again.moved, 0);

    let user = user_id.to_string();
    let (envelope, legacy): (String, Option<Vec<u8>>) = sqlx::query_as(
        "SELECT encrypted_credentials_v2, encrypted_credentials FROM provider_credentials WHERE credential_id = $1",
    )
    .bind(provider_id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(legacy.is_none(), "the server-decryptable copy is gone");
    let row = provider_id.to_string();
    let ctx = Context {
        namespace: "credential.provider",
        user_id: &user,
        row_id: &row,
    };
    assert_eq!(keyring.open(&ctx, &envelope).unwrap(), provider_secret);
    let (envelope, legacy): (String, Option<String>) = sqlx::query_as(
        "SELECT encrypted_data_v2, encrypted_data FROM cli_credentials WHERE credential_id = $1",
    )
    .bind(cli_id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(legacy.is_none());
    let row = cli_id.to_string();
    let ctx = Context {
        namespace: "credential.cli",
        user_id: &user,
        row_id: &row,
    };
    assert_eq!(keyring.open(&ctx, &envelope).unwrap(), cli_secret);
    let untouched: bool = sqlx::query_scalar(
        "SELECT encrypted_credentials IS NOT NULL AND NOT coalesce(migrated_to_zk, false)
           FROM provider_credentials WHERE user_id = $1",
    )
    .bind(other_id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(untouched, "another user's credential is left alone");
}

#[tokio::test]
async fn without_the_legacy_secret_the_server_says_so() {
    let db = TestDb::migrated().await;
    let (user_id, token) = user_with_token(&db, "nosecret@example.com", Plan::Pro).await;
    sqlx::query(
        "INSERT INTO provider_credentials (user_id, provider, encrypted_credentials, encryption_iv, encryption_salt, encryption_tag)
         VALUES ($1, 'openai', '\\x00', '\\x000000000000000000000000', '\\x00', '\\x00000000000000000000000000000000')",
    )
    .bind(user_id)
    .execute(&db.pool)
    .await
    .unwrap();
    let server = TestServer::start(&db).await;
    let client = zk_client(&server.base, &token);
    let (keyring, _) = client.enable(PASSWORD, KdfParams::MINIMUM).await.unwrap();
    let err = client
        .migrate_credentials(&keyring)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("POLYDEV_LEGACY_CREDENTIAL_SECRET"), "{err}");
}

/// A server with the legacy secret for `db`, and a client of `token`.
pub async fn legacy_server(db: &TestDb, master: &[u8]) -> TestServer {
    let catalogue = polydev::perspectives::Catalogue::load(None).unwrap();
    let state = polydev::app::AppState::new(
        db.pool.clone(),
        polydev::perspectives::Gateway::new(catalogue),
    )
    .with_legacy_secret(Some(polydev::vault::LegacySecret::new(master)));
    TestServer::start_state(state).await
}

/// Inserts `count` well-formed legacy provider credentials of `user_id`.
pub async fn insert_legacy(db: &TestDb, user_id: Uuid, master: &[u8], count: usize) {
    for i in 0..count {
        let salt = [i as u8; 16];
        let (ct, tag) = legacy_seal(master, &salt, [3u8; 12], format!("secret {i}").as_bytes());
        sqlx::query(
            "INSERT INTO provider_credentials (user_id, provider, encrypted_credentials, encryption_iv, encryption_salt, encryption_tag)
             VALUES ($1, 'openai', $2, $3, $4, $5)",
        )
        .bind(user_id)
        .bind(&ct)
        .bind(&[3u8; 12][..])
        .bind(&salt[..])
        .bind(&tag)
        .execute(&db.pool)
        .await
        .unwrap();
    }
}

/// Malformed legacy rows (a short IV, a missing tag, another secret, bad hex) are skipped and
/// reported one by one; every good row still moves, also those after the bad ones.
#[tokio::test]
async fn malformed_legacy_credentials_are_reported_and_do_not_block_the_others() {
    const MASTER: &[u8] = b"the server secret";
    let db = TestDb::migrated().await;
    let (user_id, token) = user_with_token(&db, "malformed@example.com", Plan::Pro).await;
    insert_legacy(&db, user_id, MASTER, 3).await;
    let (ct, tag) = legacy_seal(b"another secret", &[9u8; 16], [3u8; 12], b"x");
    sqlx::query(
        "INSERT INTO provider_credentials (user_id, provider, encrypted_credentials, encryption_iv, encryption_salt, encryption_tag)
         VALUES ($1, 'a', '\\x00', '\\x0000', '\\x00', '\\x00000000000000000000000000000000'),
                ($1, 'b', '\\x00', '\\x000000000000000000000000', '\\x00', NULL),
                ($1, 'c', $2, '\\x030303030303030303030303', '\\x09090909090909090909090909090909', $3)",
    )
    .bind(user_id)
    .bind(&ct)
    .bind(&tag)
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO cli_credentials (user_id, provider, encrypted_data, encryption_iv, encryption_auth_tag)
         VALUES ($1, 'd', 'zz', '00', '00')",
    )
    .bind(user_id)
    .execute(&db.pool)
    .await
    .unwrap();
    let server = legacy_server(&db, MASTER).await;
    let client = ZkClient::new(&server.base, &token);
    let (keyring, _) = client.enable(PASSWORD, KdfParams::MINIMUM).await.unwrap();
    let report = client.migrate_credentials(&keyring).await.unwrap();
    assert_eq!((report.moved, report.verified_and_cleared), (3, 3));
    let mut reasons: Vec<&str> = report
        .unreadable
        .iter()
        .map(|u| u.reason.as_str())
        .collect();
    reasons.sort();
    assert_eq!(
        reasons,
        [
            "it does not decrypt with the server secret",
            "its IV is 2 bytes, not 12",
            "its ciphertext is not hex",
            "its salt, IV or tag is missing",
        ]
    );
    // Small batches walk past the bad rows too.
    let again = client.migrate_credentials(&keyring).await.unwrap();
    assert_eq!((again.moved, again.unreadable.len()), (0, 4));
}

/// Decryption (scrypt, tens of milliseconds a row) runs off the async workers: on a
/// single-threaded runtime, health checks are answered while a hand-over is still decrypting.
#[tokio::test(flavor = "current_thread")]
async fn a_hand_over_does_not_hold_up_other_requests() {
    const MASTER: &[u8] = b"the server secret";
    let db = TestDb::migrated().await;
    let (user_id, token) = user_with_token(&db, "busy@example.com", Plan::Pro).await;
    let server = legacy_server(&db, MASTER).await;
    let client = ZkClient::new(&server.base, &token);
    let (keyring, _) = client.enable(PASSWORD, KdfParams::MINIMUM).await.unwrap();
    insert_legacy(&db, user_id, MASTER, 60).await;
    let hand_over = tokio::spawn({
        let request = server
            .client
            .post(format!(
                "{}/v1/zk/credentials/hand-over?limit=60",
                server.base
            ))
            .header("Polydev-Zk-Proof", keyring.proof().to_hex())
            .bearer_auth(&token);
        async move { request.send().await.unwrap().status() }
    });
    // Let the hand-over reach its decryption loop before asking for health.
    while sqlx::query_scalar::<_, i64>(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND state = 'idle'
           AND query LIKE 'SELECT credential_id, provider, encryption_salt%'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap()
        == 0
        && !hand_over.is_finished()
    {
        tokio::task::yield_now().await;
    }
    for _ in 0..3 {
        let health = server.get("/healthz", None).send().await.unwrap();
        assert_eq!(health.status(), StatusCode::OK);
    }
    assert!(
        !hand_over.is_finished(),
        "health checks were answered while the hand-over was still decrypting"
    );
    assert_eq!(hand_over.await.unwrap(), StatusCode::OK);
}

/// `polydev zk migrate` killed with SIGKILL mid-run, then run again: nothing lost, all encrypted.
#[tokio::test]
async fn the_cli_killed_mid_migration_resumes_and_loses_nothing() {
    let db = TestDb::migrated().await;
    let (user_id, token) = user_with_token(&db, "kill@example.com", Plan::Pro).await;
    seed_history(&db, user_id, 1000).await;
    let before = history(&db, user_id, None).await;
    let server = TestServer::start(&db).await;
    let client = zk_client(&server.base, &token);
    let (keyring, _) = client.enable(PASSWORD, KdfParams::MINIMUM).await.unwrap();
    let config = pin_dir();
    let migrate = || {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_polydev"));
        cmd.args(["zk", "migrate", "--batch", "100"])
            .env("POLYDEV_CONFIG_DIR", &config)
            .env("POLYDEV_SERVER_URL", &server.base)
            .env("POLYDEV_USER_TOKEN", &token)
            .env("POLYDEV_MASTER_PASSWORD", PASSWORD)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        cmd
    };
    let migrated = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT (SELECT count(*) FROM chat_messages WHERE migrated_to_zk) + (SELECT count(*) FROM messages WHERE migrated_to_zk)",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap()
    };
    let mut child = migrate().spawn().unwrap();
    assert!(
        crate::common::eventually(|| async { migrated().await >= 30 }).await,
        "the migration started"
    );
    child.start_kill().unwrap();
    let status = child.wait().await.unwrap();
    assert!(!status.success(), "killed");
    let midway = client.migration_status().await.unwrap();
    assert!(
        midway.plaintext + midway.unverified > 0,
        "killed before the end: {midway:?}"
    );
    assert_eq!(
        history(&db, user_id, Some(&keyring)).await,
        before,
        "nothing lost at the kill"
    );

    let out = migrate().output().await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let done = client.migration_status().await.unwrap();
    assert_eq!((done.plaintext, done.unverified, done.done), (0, 0, 2000));
    assert_eq!(history(&db, user_id, Some(&keyring)).await, before);
}

/// A forgotten password: the recovery key opens the account and sets a new password; data
/// sealed before still opens; a new recovery key retires the old one.
#[tokio::test]
async fn the_recovery_key_resets_a_forgotten_password() {
    use polydev::client::zk::Unlock;
    let db = TestDb::migrated().await;
    let (user_id, token) = user_with_token(&db, "forgot@example.com", Plan::Pro).await;
    let server = TestServer::start(&db).await;
    let client = zk_client(&server.base, &token);
    let (keyring, recovery) = client.enable(PASSWORD, KdfParams::MINIMUM).await.unwrap();
    let user = user_id.to_string();
    let ctx = Context {
        namespace: "chat.message",
        user_id: &user,
        row_id: "r1",
    };
    let sealed = keyring.seal(&ctx, b"kept across resets").unwrap();

    let wrong = client
        .set_password(Unlock::RecoveryKey(&"00".repeat(32)), "whatever new")
        .await;
    assert!(
        wrong
            .unwrap_err()
            .to_string()
            .contains("wrong recovery key")
    );
    client
        .set_password(
            Unlock::RecoveryKey(&recovery.display()),
            "a brand new password",
        )
        .await
        .unwrap();
    assert!(
        client
            .unlock(PASSWORD)
            .await
            .unwrap_err()
            .to_string()
            .contains("wrong master password")
    );
    let reopened = client.unlock("a brand new password").await.unwrap();
    assert_eq!(reopened.open(&ctx, &sealed).unwrap(), b"kept across resets");

    let replacement = client
        .new_recovery_key("a brand new password")
        .await
        .unwrap();
    let old = client
        .set_password(
            Unlock::RecoveryKey(&recovery.display()),
            "x".repeat(12).as_str(),
        )
        .await;
    assert!(
        old.unwrap_err().to_string().contains("wrong recovery key"),
        "the old recovery key is retired"
    );
    client
        .set_password(
            Unlock::RecoveryKey(&replacement.display()),
            "third password!!",
        )
        .await
        .unwrap();
    assert_eq!(
        client
            .unlock("third password!!")
            .await
            .unwrap()
            .open(&ctx, &sealed)
            .unwrap(),
        b"kept across resets"
    );
}

/// The migration verifies what the server stored without reading it back (the write answers the
/// SHA-256 of each stored envelope): a row the database stores other bytes for than were sealed
/// is never cleared — it is reset, its plaintext kept — while every other row completes.
#[tokio::test]
async fn a_migration_never_clears_a_row_stored_otherwise_than_sealed() {
    let db = TestDb::migrated().await;
    let (user_id, token) = user_with_token(&db, "stored@example.com", Plan::Pro).await;
    seed_history(&db, user_id, 30).await;
    let before = history(&db, user_id, None).await;
    let victim: Uuid = sqlx::query_scalar("SELECT id FROM chat_messages ORDER BY id LIMIT 1")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    // A database (or a server bug) that stores something else than what was written, for one row.
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE FUNCTION mangle() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           IF NEW.id = '{victim}' AND NEW.encrypted_content_v2 IS NOT NULL THEN
             NEW.encrypted_content_v2 := NEW.encrypted_content_v2 || 'A';
           END IF;
           RETURN NEW;
         END $$;
         CREATE TRIGGER mangle BEFORE UPDATE ON chat_messages FOR EACH ROW EXECUTE FUNCTION mangle();"
    )))
    .execute(&db.pool)
    .await
    .unwrap();

    let server = TestServer::start(&db).await;
    let client = zk_client(&server.base, &token);
    let (keyring, _) = client.enable(PASSWORD, KdfParams::MINIMUM).await.unwrap();
    let report = client
        .migrate(&keyring, 7, |_| {}, |_| ControlFlow::Continue(()))
        .await
        .unwrap();
    assert!(
        report.reset >= 1,
        "the mismatched row was reset: {report:?}"
    );
    assert_eq!(report.verified_and_cleared, 59);
    let (content, migrated): (Option<String>, Option<bool>) =
        sqlx::query_as("SELECT content, migrated_to_zk FROM chat_messages WHERE id = $1")
            .bind(victim)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        content.as_deref(),
        Some(before[&victim].as_str()),
        "its plaintext is kept"
    );
    assert_ne!(migrated, Some(true), "and it is back in the queue");
    let status = client.migration_status().await.unwrap();
    assert_eq!(
        (status.plaintext, status.unverified, status.done),
        (1, 0, 59)
    );
    // Every other row reads back exactly.
    let after = history(&db, user_id, Some(&keyring)).await;
    assert_eq!(after, before);
}
