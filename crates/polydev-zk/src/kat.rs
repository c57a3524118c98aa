//! Known-answer tests of the primitives as this crate uses them, compiled into every build so
//! the native tests and the WASM build (tests/wasm) check the very same code.

use argon2::{Algorithm, Argon2, AssociatedData, ParamsBuilder, Version};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hkdf::Hkdf;
use sha2::Sha256;

fn hex_array<const N: usize>(text: &str) -> [u8; N] {
    let mut out = [0u8; N];
    hex::decode_to_slice(text, &mut out).expect("valid KAT hex");
    out
}

/// RFC 9106 §5.3: Argon2id v1.3, m = 32 KiB, t = 3, p = 4, with secret and associated data.
pub fn argon2id_rfc9106() -> bool {
    let params = ParamsBuilder::new()
        .m_cost(32)
        .t_cost(3)
        .p_cost(4)
        .data(AssociatedData::new(&[4u8; 12]).expect("12 bytes of AD"))
        .output_len(32)
        .build()
        .expect("valid parameters");
    let argon = Argon2::new_with_secret(&[3u8; 8], Algorithm::Argon2id, Version::V0x13, params)
        .expect("valid secret");
    let mut out = [0u8; 32];
    argon
        .hash_password_into(&[1u8; 32], &[2u8; 16], &mut out)
        .is_ok()
        && out
            == hex_array::<32>("0d640df58d78766c08c037a34a8b53c9d01ef0452d75b65eb52520e96b01e659")
}

/// draft-irtf-cfrg-xchacha-03 §A.3.1: XChaCha20-Poly1305.
pub fn xchacha20poly1305_draft() -> bool {
    let plaintext = b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future, sunscreen would be it.";
    let aad = hex_array::<12>("50515253c0c1c2c3c4c5c6c7");
    let key = hex_array::<32>("808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f");
    let nonce = hex_array::<24>("404142434445464748494a4b4c4d4e4f5051525354555657");
    let expected = hex_array::<130>(concat!(
        "bd6d179d3e83d43b9576579493c0e939572a1700252bfaccbed2902c21396cbb731c7f1b0b4aa6440bf3a82f4eda7e39ae64c6708c54c216cb96b72e1213b4522f8c9ba40db5d945b11b69b982c1bb9e3f3fac2bc369488f76b2383565d3fff921f9664c97637da9768812f615c68b13b52e",
        "c0875924c1c7987947deafd8780acf49"
    ));
    let cipher = XChaCha20Poly1305::new(&key.into());
    let sealed = cipher.encrypt(
        &XNonce::from(nonce),
        Payload {
            msg: plaintext,
            aad: &aad,
        },
    );
    let opened = cipher.decrypt(
        &XNonce::from(nonce),
        Payload {
            msg: &expected,
            aad: &aad,
        },
    );
    sealed.is_ok_and(|ct| ct == expected) && opened.is_ok_and(|pt| pt == plaintext)
}

/// Wycheproof `xchacha20_poly1305_test.json` (tcId 1 is the draft's A.3.1 above): (key, iv, aad,
/// msg, ct, tag). Each must encrypt to its ciphertext, and fail to open with a flipped tag bit.
const WYCHEPROOF: [(&str, &str, &str, &str, &str, &str); 4] = [
    (
        "ab1562faea9f47af3ae1c3d6d030e3af230255dff3df583ced6fbbcbf9d606a9",
        "6a5e0c4617e07091b605a4de2c02dde117de2ebd53b23497",
        "",
        "",
        "",
        "e2697ea6877aba39d9555a00e14db041",
    ),
    (
        "303ccb2e1567c3d9f629a5c632dbc62a9a82c525674f67988b31bd1dee990538",
        "05188738844ab90a8b11beef38eaec3e100d8f4f85ae7a41",
        "",
        "62",
        "45",
        "d15734f984d749fa3f0550a70c43dddf",
    ),
    (
        "b720aea3df85fb3fb00583eddbebc5c545bcdcb7f6f2a94c1087950e16d68278",
        "1436f36466fce5db337a73ec18e269e6e985d91035128183",
        "9d53316bd2aa3e3d",
        "4799c4",
        "d41c02",
        "8faa889d7f189cd9473e19200ef03920",
    ),
    (
        "924aafdb5b8a206b3e49aefe8944918cdcc8ccb5bb4b8c4ee81b847aa6fa52a0",
        "829cb09e40c2cc5f7648adc177e56ef53a58bfa16a859338",
        "a67a57310055b193",
        "68576b935acaab8b33ab62e3",
        "2345bfc502f9c62d64ad87f9",
        "6736f095a28b887238f80dc562eaa25c",
    ),
];

pub fn xchacha20poly1305_wycheproof() -> bool {
    WYCHEPROOF.iter().all(|&(key, iv, aad, msg, ct, tag)| {
        let cipher = XChaCha20Poly1305::new(&hex_array::<32>(key).into());
        let nonce = XNonce::from(hex_array::<24>(iv));
        let (aad, msg) = (
            hex::decode(aad).expect("hex"),
            hex::decode(msg).expect("hex"),
        );
        let mut expected = hex::decode(format!("{ct}{tag}")).expect("hex");
        let sealed_ok = cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: &msg,
                    aad: &aad,
                },
            )
            .is_ok_and(|sealed| sealed == expected);
        let last = expected.len() - 1;
        expected[last] ^= 1;
        sealed_ok
            && cipher
                .decrypt(
                    &nonce,
                    Payload {
                        msg: &expected,
                        aad: &aad,
                    },
                )
                .is_err()
    })
}

/// RFC 5869 test case 1: HKDF-SHA256.
pub fn hkdf_sha256_rfc5869() -> bool {
    let salt = hex_array::<13>("000102030405060708090a0b0c");
    let info = hex_array::<10>("f0f1f2f3f4f5f6f7f8f9");
    let mut okm = [0u8; 42];
    Hkdf::<Sha256>::new(Some(&salt), &[0x0bu8; 22])
        .expand(&info, &mut okm)
        .is_ok()
        && okm
            == hex_array::<42>(
                "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865",
            )
}

/// The names of the failing KATs (empty when all pass).
pub fn failures() -> Vec<&'static str> {
    [
        ("argon2id_rfc9106", argon2id_rfc9106 as fn() -> bool),
        ("xchacha20poly1305_draft", xchacha20poly1305_draft),
        ("xchacha20poly1305_wycheproof", xchacha20poly1305_wycheproof),
        ("hkdf_sha256_rfc5869", hkdf_sha256_rfc5869),
    ]
    .into_iter()
    .filter(|(_, check)| !check())
    .map(|(name, _)| name)
    .collect()
}
