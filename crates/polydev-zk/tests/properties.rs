//! Properties of the key hierarchy and envelopes: round trips; any flipped bit fails; the wrong
//! namespace, user or row fails; arbitrary input never panics; errors are told apart.

use std::sync::OnceLock;

use polydev_zk::{Context, Error, KdfParams, Keyring, inspect};
use proptest::prelude::*;

const USER: &str = "0b6f6c3e-2f7b-4d55-9a43-0c3b8e4f7a10";

/// One account for every case (Argon2id at the minimum parameters keeps the suite fast).
fn account() -> &'static (Keyring, polydev_zk::KeyMaterial, String) {
    static ACCOUNT: OnceLock<(Keyring, polydev_zk::KeyMaterial, String)> = OnceLock::new();
    ACCOUNT.get_or_init(|| {
        let (keyring, material, recovery) =
            Keyring::setup("hunter2 but longer", USER, KdfParams::MINIMUM).unwrap();
        (keyring, material, recovery.display())
    })
}

fn ctx(row: &str) -> Context<'_> {
    Context {
        namespace: "chat.message",
        user_id: USER,
        row_id: row,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]

    #[test]
    fn round_trip(data in proptest::collection::vec(any::<u8>(), 0..5000), row in "[a-z0-9-]{1,40}") {
        let (keyring, _, _) = account();
        let sealed = keyring.seal(&ctx(&row), &data).unwrap();
        prop_assert_eq!(keyring.open(&ctx(&row), &sealed).unwrap(), data);
        let header = inspect(&sealed).unwrap();
        prop_assert_eq!(header.namespace.as_deref(), Some("chat.message"));
        prop_assert_eq!(header.user_id.as_str(), USER);
    }

    #[test]
    fn any_flipped_bit_fails(data in proptest::collection::vec(any::<u8>(), 1..300), bit in any::<prop::sample::Index>()) {
        let (keyring, _, _) = account();
        let sealed = keyring.seal(&ctx("r1"), &data).unwrap();
        let mut bytes = base64_body(&sealed);
        let at = bit.index(bytes.len() * 8);
        bytes[at / 8] ^= 1 << (at % 8);
        let tampered = rebuild(&bytes);
        prop_assert!(keyring.open(&ctx("r1"), &tampered).is_err());
    }

    #[test]
    fn arbitrary_input_never_panics(text in ".{0,400}", bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let (keyring, material, _) = account();
        let _ = inspect(&text);
        let _ = keyring.open(&ctx("r"), &text);
        let as_envelope = rebuild(&bytes);
        let _ = inspect(&as_envelope);
        let _ = keyring.open(&ctx("r"), &as_envelope);
        let mut bad = material.clone();
        bad.password_wrapped = as_envelope.clone();
        bad.recovery_wrapped = as_envelope;
        prop_assert!(Keyring::unlock(&bad, "x", USER).is_err());
        prop_assert!(Keyring::unlock_with_recovery(&bad, &"0".repeat(64), USER).is_err());
    }
}

fn base64_body(envelope: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(envelope.strip_prefix("pdz.").unwrap())
        .unwrap()
}

fn rebuild(bytes: &[u8]) -> String {
    use base64::Engine;
    format!(
        "pdz.{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

#[test]
fn an_envelope_moved_to_another_row_namespace_or_user_is_refused() {
    let (keyring, _, _) = account();
    let sealed = keyring.seal(&ctx("row-a"), b"secret").unwrap();
    assert_eq!(
        keyring.open(&ctx("row-b"), &sealed),
        Err(Error::WrongContext("row"))
    );
    let other_ns = Context {
        namespace: "credential.provider",
        ..ctx("row-a")
    };
    assert_eq!(
        keyring.open(&other_ns, &sealed),
        Err(Error::WrongContext("namespace"))
    );
    let other_user = Context {
        user_id: "someone-else",
        ..ctx("row-a")
    };
    assert_eq!(
        keyring.open(&other_user, &sealed),
        Err(Error::WrongContext("user"))
    );
    // Rewriting the header to claim another row is caught by the AEAD.
    let mut bytes = base64_body(&sealed);
    let pos = bytes.windows(5).position(|w| w == b"row-a").unwrap();
    bytes[pos + 4] = b'b';
    assert_eq!(
        keyring.open(&ctx("row-b"), &rebuild(&bytes)),
        Err(Error::Tampered)
    );
}

#[test]
fn password_change_rewraps_one_key_and_old_data_still_opens() {
    let (keyring, material, _) =
        Keyring::setup("first password", USER, KdfParams::MINIMUM).unwrap();
    let sealed = keyring.seal(&ctx("r"), b"kept").unwrap();
    let (changed, proof) = keyring
        .change_password(&material, "second password", KdfParams::MINIMUM)
        .unwrap();
    assert_eq!(changed.recovery_wrapped, material.recovery_wrapped);
    assert_eq!(
        Keyring::unlock(&changed, "first password", USER).err(),
        Some(Error::WrongPassword)
    );
    let unlocked = Keyring::unlock(&changed, "second password", USER).unwrap();
    assert_eq!(unlocked.open(&ctx("r"), &sealed).unwrap(), b"kept");
    assert_eq!(
        unlocked.proof().to_hex(),
        proof.to_hex(),
        "the new password's proof"
    );
    assert_ne!(
        Keyring::unlock(&material, "first password", USER)
            .unwrap()
            .proof()
            .to_hex(),
        proof.to_hex()
    );
}

#[test]
fn the_recovery_key_unlocks_and_can_be_replaced() {
    let (keyring, material, recovery) = account();
    let sealed = keyring.seal(&ctx("r"), b"recoverable").unwrap();
    let spaced = recovery.to_uppercase().replace('-', " ");
    let recovered = Keyring::unlock_with_recovery(material, &spaced, USER).unwrap();
    assert_eq!(recovered.open(&ctx("r"), &sealed).unwrap(), b"recoverable");
    assert_eq!(
        Keyring::unlock_with_recovery(material, &"ab".repeat(32), USER).err(),
        Some(Error::WrongRecoveryKey)
    );
    assert_eq!(
        Keyring::unlock_with_recovery(material, "not a key", USER).err(),
        Some(Error::InvalidRecoveryKey)
    );
    let (replaced, new_recovery) = keyring.replace_recovery_key(material).unwrap();
    assert_eq!(
        Keyring::unlock_with_recovery(&replaced, recovery, USER).err(),
        Some(Error::WrongRecoveryKey)
    );
    assert!(Keyring::unlock_with_recovery(&replaced, &new_recovery.display(), USER).is_ok());
}

#[test]
fn tampered_key_material_is_told_apart_from_a_wrong_password() {
    let (_, material, _) = account();
    let mut bytes = base64_body(&material.password_wrapped);
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    let tampered = polydev_zk::KeyMaterial {
        password_wrapped: rebuild(&bytes),
        ..material.clone()
    };
    assert_eq!(
        Keyring::unlock(&tampered, "hunter2 but longer", USER).err(),
        Some(Error::Tampered)
    );
    assert_eq!(
        Keyring::unlock(material, "hunter3 but longer", USER).err(),
        Some(Error::WrongPassword)
    );
}

#[test]
fn stored_kdf_parameters_below_the_floor_are_refused() {
    let (_, material, _) = account();
    let mut bytes = base64_body(&material.password_wrapped);
    // m_kib is bytes 2..6 of the header: lower it to 1 MiB.
    bytes[2..6].copy_from_slice(&1024u32.to_be_bytes());
    let weakened = polydev_zk::KeyMaterial {
        password_wrapped: rebuild(&bytes),
        ..material.clone()
    };
    assert!(matches!(
        Keyring::unlock(&weakened, "hunter2 but longer", USER),
        Err(Error::WeakKdfParams { .. })
    ));
    assert!(matches!(
        Keyring::setup(
            "x",
            USER,
            KdfParams {
                memory_kib: 8,
                iterations: 1,
                parallelism: 1
            }
        ),
        Err(Error::WeakKdfParams { .. })
    ));
}

/// The ceiling a browser can bear (256 MiB, 10 passes): above it, stored parameters are refused
/// before any derivation, so a server cannot make the page's worker run out of memory or hang.
#[test]
fn stored_kdf_parameters_above_the_browser_ceiling_are_refused() {
    let (_, material, _) = account();
    for (range, value) in [(2..6, 256 * 1024 + 1), (6..10, 11u32)] {
        let mut bytes = base64_body(&material.password_wrapped);
        bytes[range].copy_from_slice(&value.to_be_bytes());
        let heavier = polydev_zk::KeyMaterial {
            password_wrapped: rebuild(&bytes),
            ..material.clone()
        };
        assert!(matches!(
            Keyring::unlock(&heavier, "hunter2 but longer", USER),
            Err(Error::WeakKdfParams { .. })
        ));
    }
    let at_ceiling = KdfParams {
        memory_kib: KdfParams::MAX_MEMORY_KIB,
        iterations: KdfParams::MAX_ITERATIONS,
        parallelism: 1,
    };
    assert!(at_ceiling.check().is_ok());
}

#[test]
fn ciphertext_length_reveals_only_the_bucket() {
    let (keyring, _, _) = account();
    let a = keyring.seal(&ctx("r"), &[1u8; 100]).unwrap();
    let b = keyring.seal(&ctx("r"), &[1u8; 120]).unwrap();
    assert_eq!(a.len(), b.len());
    assert_eq!(inspect(&a).unwrap().ciphertext_len, 128 + 16);
}

#[test]
fn the_hint_survives_a_new_recovery_key_but_not_a_new_password() {
    let (keyring, material, _) = account();
    let hint_ctx = Context {
        namespace: "user.password_hint",
        user_id: USER,
        row_id: USER,
    };
    let with_hint = polydev_zk::KeyMaterial {
        password_hint: Some(keyring.seal(&hint_ctx, b"the horse").unwrap()),
        ..material.clone()
    };
    let (replaced, _) = keyring.replace_recovery_key(&with_hint).unwrap();
    assert_eq!(replaced.password_hint, with_hint.password_hint);
    assert_eq!(replaced.password_wrapped, with_hint.password_wrapped);
    // The hint was for the old password.
    let (changed, _) = keyring
        .change_password(&with_hint, "a new password", KdfParams::MINIMUM)
        .unwrap();
    assert_eq!(changed.password_hint, None);
    // Without a hint the JSON has the two envelopes only, as stored before the hint was shared.
    let json = serde_json::to_value(material).unwrap();
    assert_eq!(json.as_object().unwrap().len(), 2);
    let back: polydev_zk::KeyMaterial = serde_json::from_value(json).unwrap();
    assert_eq!(&back, material);
}
