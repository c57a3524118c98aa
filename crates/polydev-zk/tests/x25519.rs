//! X25519 vectors: RFC 7748, and a frozen sealed box every future version must still open. The
//! same run in the WASM build (tests/wasm/x25519.mjs).

use polydev_zk::{Context, KdfParams, Keyring, X25519KeyPair, seal_to};

/// Frozen: a recipient's private key and a box sealed to it (made once by
/// `print_frozen_sealed_box`, never regenerated).
const FROZEN_SECRET: &str = include_str!("vectors/x25519-secret-v1.txt");
const FROZEN_BOX: &str = include_str!("vectors/sealed-box-v1.txt");
const FROZEN_PLAINTEXT: &str = "frozen sealed box: echo Ünïcödé ✓\n";
const CTX: Context<'static> = Context {
    namespace: "job.command",
    user_id: "7d3c1a3e-2f7b-4d55-9a43-0c3b8e4f7a10",
    row_id: "88888888-8888-4888-8888-888888888882",
};

#[test]
fn rfc7748_x25519() {
    assert!(polydev_zk::kat_rfc7748());
}

#[test]
fn frozen_v1_sealed_box_still_opens() {
    let pair = X25519KeyPair::from_secret(FROZEN_SECRET.trim()).unwrap();
    assert_eq!(
        pair.open(&CTX, FROZEN_BOX.trim()).unwrap(),
        FROZEN_PLAINTEXT.as_bytes()
    );
}

#[test]
fn a_users_private_key_is_wrapped_by_the_account_key() {
    let user = CTX.user_id;
    let (keyring, _, _) = Keyring::setup("pw for x25519", user, KdfParams::MINIMUM).unwrap();
    let pair = X25519KeyPair::generate().unwrap();
    let wrapped = pair.wrap(&keyring).unwrap();
    let header = polydev_zk::inspect(&wrapped).unwrap();
    assert_eq!(
        header.namespace.as_deref(),
        Some(polydev_zk::USER_KEY_NAMESPACE)
    );
    assert_eq!(header.row_id.as_deref(), Some(user));
    assert!(!wrapped.contains(&*pair.export_secret()));
    let back = X25519KeyPair::unwrap(&keyring, &wrapped).unwrap();
    assert_eq!(back.public_key(), pair.public_key());
    let sealed = seal_to(&pair.public_key(), &CTX, b"output").unwrap();
    assert_eq!(back.open(&CTX, &sealed).unwrap(), b"output");
    // Another user's keyring cannot open it.
    let (other, _, _) = Keyring::setup("pw", "someone-else", KdfParams::MINIMUM).unwrap();
    assert!(X25519KeyPair::unwrap(&other, &wrapped).is_err());
}

#[test]
#[ignore]
fn print_frozen_sealed_box() {
    let pair = X25519KeyPair::generate().unwrap();
    println!("{}", &*pair.export_secret());
    println!(
        "{}",
        seal_to(&pair.public_key(), &CTX, FROZEN_PLAINTEXT.as_bytes()).unwrap()
    );
}
