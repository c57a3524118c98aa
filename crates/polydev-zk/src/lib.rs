//! Polydev's zero-knowledge crypto core: the key hierarchy and the envelope format
//! (docs/crypto.md). No I/O, no async, no unsafe. The same code runs natively (server, CLI) and
//! in the browser (the `wasm` feature's wasm-bindgen API): there is no second implementation.
//!
//! ```text
//! master password ──Argon2id(salt, params)──▶ root ──HKDF──▶ key-encryption key (wraps keys only)
//!                                                      └─HKDF──▶ check value (tells a wrong password)
//! recovery key (256 random bits) ──HKDF──▶ recovery key-encryption key
//! KEK / recovery KEK ──wrap──▶ account key (random, 256 bits)
//! account key ──wrap──▶ data key (fresh per item) ──XChaCha20-Poly1305──▶ item
//! ```
#![forbid(unsafe_code)]

mod envelope;
mod error;
#[doc(hidden)]
pub mod kat;
mod kdf;
mod keyring;
mod pad;
#[cfg(feature = "wasm")]
mod wasm;

pub use envelope::{Context, Header, Kind, MAX_PLAINTEXT, inspect};
pub use error::Error;
pub use kdf::KdfParams;
pub use keyring::{KeyMaterial, Keyring, RecoveryKey};
