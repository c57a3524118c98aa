//! Known-answer tests for the primitives as used, and frozen envelopes every future version
//! must still open. The same vectors run in the WASM build (tests/wasm/vectors.mjs).

use polydev_zk::{Context, Error, KdfParams, KeyMaterial, Keyring};

/// RFC 9106 Argon2id, XChaCha20-Poly1305 (the draft's A.3.1 and Wycheproof cases) and RFC 5869
/// HKDF-SHA256, as used.
#[test]
fn primitives_match_their_published_vectors() {
    assert!(polydev_zk::kat::argon2id_rfc9106(), "Argon2id RFC 9106");
    assert!(
        polydev_zk::kat::xchacha20poly1305_draft(),
        "XChaCha20-Poly1305 A.3.1"
    );
    assert!(
        polydev_zk::kat::hkdf_sha256_rfc5869(),
        "HKDF-SHA256 RFC 5869"
    );
    assert!(polydev_zk::kat::failures().is_empty());
}

const USER: &str = "7d3c1a3e-2f7b-4d55-9a43-0c3b8e4f7a10";
const PASSWORD: &str = "correct horse battery staple";

/// Frozen v1 material (m=19 MiB, t=2) and item: produced once by `print_frozen_vectors`, never
/// regenerated. Future versions must keep opening them.
const FROZEN_MATERIAL: &str = include_str!("vectors/material-v1.json");
const FROZEN_ITEM: &str = include_str!("vectors/item-v1.txt");
const FROZEN_RECOVERY: &str = include_str!("vectors/recovery-v1.txt");
const FROZEN_PLAINTEXT: &str = "frozen vector: Ünïcödé ✓, and a newline\n";

fn frozen_ctx() -> Context<'static> {
    Context {
        namespace: "chat.message",
        user_id: USER,
        row_id: "88888888-8888-4888-8888-888888888881",
    }
}

#[test]
fn frozen_v1_envelopes_still_open() {
    let material: KeyMaterial = serde_json::from_str(FROZEN_MATERIAL).unwrap();
    let keyring = Keyring::unlock(&material, PASSWORD, USER).unwrap();
    assert_eq!(
        keyring.open(&frozen_ctx(), FROZEN_ITEM.trim()).unwrap(),
        FROZEN_PLAINTEXT.as_bytes()
    );
    let by_recovery =
        Keyring::unlock_with_recovery(&material, FROZEN_RECOVERY.trim(), USER).unwrap();
    assert_eq!(
        by_recovery.open(&frozen_ctx(), FROZEN_ITEM.trim()).unwrap(),
        FROZEN_PLAINTEXT.as_bytes()
    );
    assert_eq!(
        Keyring::unlock(&material, "wrong", USER).err(),
        Some(Error::WrongPassword)
    );
}

/// The proofs of the frozen material's password and recovery key (HKDF labels `polydev-zk v1
/// password auth` / `recovery auth`), frozen like the envelopes: a server stores their hashes,
/// so they must never change for the same password and salt.
#[test]
fn frozen_v1_proofs_do_not_change() {
    let material: KeyMaterial = serde_json::from_str(FROZEN_MATERIAL).unwrap();
    let by_password = Keyring::unlock(&material, PASSWORD, USER).unwrap();
    let by_recovery =
        Keyring::unlock_with_recovery(&material, FROZEN_RECOVERY.trim(), USER).unwrap();
    let frozen: serde_json::Value =
        serde_json::from_str(include_str!("vectors/proofs-v1.json")).unwrap();
    assert_eq!(by_password.proof().to_hex(), frozen["password"]);
    assert_eq!(by_recovery.proof().to_hex(), frozen["recovery"]);
    assert_eq!(
        polydev_zk::RecoveryKey::parse(FROZEN_RECOVERY.trim())
            .unwrap()
            .proof()
            .to_hex(),
        frozen["recovery"]
    );
    assert_eq!(material.fingerprint(), frozen["fingerprint"]);
    assert_ne!(frozen["password"], frozen["recovery"]);
}

/// Run with `cargo test -p polydev-zk --test vectors -- --ignored --nocapture` to print a new
/// set (only when adding a new version; v1 files stay as they are).
#[test]
#[ignore]
fn print_frozen_vectors() {
    let (keyring, material, recovery) = Keyring::setup(PASSWORD, USER, KdfParams::MINIMUM).unwrap();
    println!("{}", serde_json::to_string(&material).unwrap());
    println!(
        "{}",
        keyring
            .seal(&frozen_ctx(), FROZEN_PLAINTEXT.as_bytes())
            .unwrap()
    );
    println!("{}", recovery.display());
}
