//! Known-answer tests for the primitives as used, and frozen envelopes every future version
//! must still open. The same vectors run in the WASM build (tests/wasm/vectors.mjs).

use polydev_zk::{Context, Error, KdfParams, KeyMaterial, Keyring};

/// RFC 9106 §5.3: Argon2id, version 0x13.
#[test]
fn argon2id_rfc9106() {
    use argon2::{Algorithm, Argon2, AssociatedData, ParamsBuilder, Version};
    let params = ParamsBuilder::new()
        .m_cost(32)
        .t_cost(3)
        .p_cost(4)
        .data(AssociatedData::new(&[4u8; 12]).unwrap())
        .output_len(32)
        .build()
        .unwrap();
    let argon =
        Argon2::new_with_secret(&[3u8; 8], Algorithm::Argon2id, Version::V0x13, params).unwrap();
    let mut out = [0u8; 32];
    argon
        .hash_password_into(&[1u8; 32], &[2u8; 16], &mut out)
        .unwrap();
    assert_eq!(
        hex::encode(out),
        "0d640df58d78766c08c037a34a8b53c9d01ef0452d75b65eb52520e96b01e659"
    );
}

/// draft-irtf-cfrg-xchacha-03 §A.3.1: XChaCha20-Poly1305 AEAD.
#[test]
fn xchacha20poly1305_draft_vector() {
    use chacha20poly1305::aead::{Aead, KeyInit, Payload};
    use chacha20poly1305::{XChaCha20Poly1305, XNonce};
    let plaintext = b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future, sunscreen would be it.";
    let aad = hex::decode("50515253c0c1c2c3c4c5c6c7").unwrap();
    let key: [u8; 32] =
        hex::decode("808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f")
            .unwrap()
            .try_into()
            .unwrap();
    let nonce: [u8; 24] = hex::decode("404142434445464748494a4b4c4d4e4f5051525354555657")
        .unwrap()
        .try_into()
        .unwrap();
    let ct = XChaCha20Poly1305::new(&key.into())
        .encrypt(
            &XNonce::from(nonce),
            Payload {
                msg: plaintext,
                aad: &aad,
            },
        )
        .unwrap();
    assert_eq!(
        hex::encode(ct),
        concat!(
            "bd6d179d3e83d43b9576579493c0e939572a1700252bfaccbed2902c21396cbb731c7f1b0b4aa6440bf3a82f4eda7e39ae64c6708c54c216cb96b72e1213b4522f8c9ba40db5d945b11b69b982c1bb9e3f3fac2bc369488f76b2383565d3fff921f9664c97637da9768812f615c68b13b52e",
            "c0875924c1c7987947deafd8780acf49"
        )
    );
}

/// RFC 5869 test case 1: HKDF-SHA256.
#[test]
fn hkdf_sha256_rfc5869() {
    let ikm = [0x0bu8; 22];
    let salt = hex::decode("000102030405060708090a0b0c").unwrap();
    let info = hex::decode("f0f1f2f3f4f5f6f7f8f9").unwrap();
    let mut okm = [0u8; 42];
    hkdf::Hkdf::<sha2::Sha256>::new(Some(&salt), &ikm)
        .expand(&info, &mut okm)
        .unwrap();
    assert_eq!(
        hex::encode(okm),
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    );
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
