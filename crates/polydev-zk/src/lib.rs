//! Polydev's zero-knowledge crypto core: the key hierarchy and the envelope format
//! (docs/crypto.md). No I/O, no async, no unsafe. The same code runs natively (server, CLI) and
//! in the browser (the `wasm` feature's wasm-bindgen API): there is no second implementation.
//!
//! ```text
//! master password ──Argon2id(salt, params)──▶ PasswordKey ──HKDF──▶ KeyEncryptionKey, check value
//! RecoveryKey (256 random bits) ─────────────────────────────HKDF──▶ KeyEncryptionKey, check value
//! KeyEncryptionKey ──wrap──▶ AccountKey (random, 256 bits; held by an unlocked Keyring)
//! AccountKey ──wrap──▶ DataKey (fresh per item) ──XChaCha20-Poly1305──▶ item
//! ```
//! Each key is its own type with only its role's operations (`keys`), so a key-encryption key
//! cannot seal an item, nor the account key be sealed under a data key: it does not compile.
#![forbid(unsafe_code)]

mod envelope;
mod error;
#[doc(hidden)]
pub mod kat;
mod kdf;
mod keyring;
mod keys;
mod pad;
mod record;
#[cfg(feature = "wasm")]
mod wasm;
#[cfg(feature = "wasm")]
mod wasm_x25519;
mod x25519;

pub use envelope::{Context, Header, Kind, MAX_PLAINTEXT, inspect};
pub use error::Error;
pub use kdf::KdfParams;
pub use keyring::{KeyMaterial, Keyring};
pub use keys::{AuthProof, ProofKind, RecoveryKey};
pub use record::{Opened, Record, RecordKind};
pub use x25519::{
    SealedHeader, USER_KEY_NAMESPACE, X25519KeyPair, decode_public_key, encode_public_key,
    inspect_sealed, kat_rfc7748, seal_to,
};
