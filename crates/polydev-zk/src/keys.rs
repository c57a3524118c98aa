//! One type per key of the hierarchy (docs/crypto.md), each with only the operations its role
//! allows: a [`KeyEncryptionKey`] wraps and unwraps the account key and nothing else, the
//! [`AccountKey`] wraps and unwraps data keys, a [`DataKey`] seals and opens one item. The bytes
//! never leave this module, so code elsewhere cannot, say, seal an item under a key-encryption
//! key: there is no such method. Every key is wiped on drop, is not `Clone`, and its `Debug`
//! prints `[redacted]`.
//!
//! The AEAD purpose labels (`account-key`, `data-key`, `item`) are fixed here by the key's type,
//! so they cannot be mixed up by a caller either.
//!
//! An [`AuthProof`] is not a key: it is what the client shows the server to prove it knows the
//! master password (or the recovery key), derived from the same secret with its own HKDF label,
//! so it reveals nothing about the keys (Bitwarden's "master password hash").

use hkdf::Hkdf;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use crate::envelope::{self, CHECK, ItemAad, KEY, NONCE, Parsed, TAG};
use crate::{Error, KdfParams};

/// 32 secret bytes: wiped on drop, never cloned, never printed.
struct Secret(Zeroizing<[u8; KEY]>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

impl Secret {
    fn random() -> Result<Secret, Error> {
        Ok(Secret(Zeroizing::new(envelope::random()?)))
    }

    /// A key that was just decrypted (its buffer is wiped when dropped).
    fn from_opened(opened: Zeroizing<Vec<u8>>) -> Result<Secret, Error> {
        if opened.len() != KEY {
            return Err(Error::Tampered);
        }
        let mut key = Zeroizing::new([0u8; KEY]);
        key.copy_from_slice(&opened);
        Ok(Secret(key))
    }

    fn seal(&self, header: &[u8], purpose: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, Error> {
        envelope::seal(&self.0, header, purpose, plaintext)
    }

    fn open(
        &self,
        header: &[u8],
        purpose: &[u8],
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, Error> {
        envelope::open(&self.0, header, purpose, sealed).map(Zeroizing::new)
    }
}

/// Argon2id of the master password and the envelope's salt (the "root"). Its uses: derive the
/// password's [`KeyEncryptionKey`] and the password's [`AuthProof`].
#[derive(Debug)]
pub(crate) struct PasswordKey(Secret);

impl PasswordKey {
    /// Checks `params` against the floors first ([`KdfParams::check`]).
    pub(crate) fn derive(
        params: &KdfParams,
        password: &str,
        salt: &[u8],
    ) -> Result<PasswordKey, Error> {
        Ok(PasswordKey(Secret(
            params.derive(password.as_bytes(), salt)?,
        )))
    }

    /// The key-encryption key and the proof of the password (distinct HKDF labels).
    pub(crate) fn into_keys(self) -> (KeyEncryptionKey, AuthProof) {
        (
            KeyEncryptionKey::expand(&self.0, "password", Error::WrongPassword),
            AuthProof::expand(&self.0, ProofKind::Password),
        )
    }
}

/// Which secret an [`AuthProof`] proves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProofKind {
    Password,
    Recovery,
}

impl ProofKind {
    fn label(self) -> &'static str {
        match self {
            ProofKind::Password => "password",
            ProofKind::Recovery => "recovery",
        }
    }
}

/// Proof of knowing the master password (or the recovery key), for the server: HKDF-SHA256 of
/// the same root as the key-encryption key with its own label (`polydev-zk v1 password auth`,
/// `polydev-zk v1 recovery auth`). The server keeps only a salted hash of it and asks for it
/// before changes that need the owner (a new password, a new recovery key, a key rotation,
/// clearing plaintext, handing credentials over). Knowing it opens nothing: it is one HKDF
/// output, the keys are others. It changes whenever the password envelope's salt does.
pub struct AuthProof {
    kind: ProofKind,
    bytes: Zeroizing<[u8; KEY]>,
}

impl std::fmt::Debug for AuthProof {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AuthProof({:?}, [redacted])", self.kind)
    }
}

impl AuthProof {
    fn expand(root: &Secret, kind: ProofKind) -> AuthProof {
        let mut bytes = Zeroizing::new([0u8; KEY]);
        Hkdf::<Sha256>::new(None, root.0.as_ref())
            .expand(
                format!("polydev-zk v1 {} auth", kind.label()).as_bytes(),
                bytes.as_mut(),
            )
            .expect("32 bytes is a valid HKDF length");
        AuthProof { kind, bytes }
    }

    pub fn kind(&self) -> ProofKind {
        self.kind
    }

    /// 64 hex digits, as sent to the server.
    pub fn to_hex(&self) -> String {
        hex::encode(self.bytes.as_ref())
    }
}

/// The recovery key, shown to the user once: 64 hex digits in 8 groups. Its one use is to
/// derive the recovery [`KeyEncryptionKey`]. Like every key, it cannot be copied:
///
/// ```compile_fail
/// fn copy(key: &polydev_zk::RecoveryKey) -> polydev_zk::RecoveryKey {
///     Clone::clone(key)
/// }
/// ```
#[derive(Debug)]
pub struct RecoveryKey(Secret);

impl RecoveryKey {
    pub(crate) fn generate() -> Result<RecoveryKey, Error> {
        Secret::random().map(RecoveryKey)
    }

    pub fn display(&self) -> String {
        hex::encode(self.0.0.as_ref())
            .as_bytes()
            .chunks(8)
            .map(|c| std::str::from_utf8(c).expect("hex is ASCII"))
            .collect::<Vec<_>>()
            .join("-")
    }

    pub fn parse(text: &str) -> Result<RecoveryKey, Error> {
        let digits: Zeroizing<String> = Zeroizing::new(
            text.chars()
                .filter(|c| !c.is_whitespace() && *c != '-')
                .collect::<String>()
                .to_ascii_lowercase(),
        );
        let mut key = Zeroizing::new([0u8; KEY]);
        hex::decode_to_slice(digits.as_bytes(), key.as_mut())
            .map_err(|_| Error::InvalidRecoveryKey)?;
        Ok(RecoveryKey(Secret(key)))
    }

    pub(crate) fn key_encryption_key(&self) -> KeyEncryptionKey {
        KeyEncryptionKey::expand(&self.0, "recovery", Error::WrongRecoveryKey)
    }

    /// The proof of this recovery key, for the server (see [`AuthProof`]).
    pub fn proof(&self) -> AuthProof {
        AuthProof::expand(&self.0, ProofKind::Recovery)
    }
}

/// Derived from the password or the recovery key; wraps and unwraps the account key only.
/// Carries the check value stored next to the wrapped key, which tells a wrong password or
/// recovery key (`wrong`) apart from a tampered envelope.
pub(crate) struct KeyEncryptionKey {
    key: Secret,
    check: [u8; CHECK],
    wrong: Error,
}

impl std::fmt::Debug for KeyEncryptionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyEncryptionKey([redacted])")
    }
}

impl KeyEncryptionKey {
    /// HKDF-SHA256 expansions of a root secret: the key and the check value.
    fn expand(root: &Secret, purpose: &str, wrong: Error) -> KeyEncryptionKey {
        let hk = Hkdf::<Sha256>::new(None, root.0.as_ref());
        let mut key = Zeroizing::new([0u8; KEY]);
        let mut check = [0u8; CHECK];
        hk.expand(
            format!("polydev-zk v1 {purpose} kek").as_bytes(),
            key.as_mut(),
        )
        .expect("32 bytes is a valid HKDF length");
        hk.expand(
            format!("polydev-zk v1 {purpose} check").as_bytes(),
            &mut check,
        )
        .expect("16 bytes is a valid HKDF length");
        KeyEncryptionKey {
            key: Secret(key),
            check,
            wrong,
        }
    }

    /// Goes in the envelope's header, in the clear.
    pub(crate) fn check(&self) -> &[u8; CHECK] {
        &self.check
    }

    pub(crate) fn wrap_account_key(
        &self,
        header: &[u8],
        account_key: &AccountKey,
    ) -> Result<Vec<u8>, Error> {
        self.key
            .seal(header, b"account-key", account_key.0.0.as_ref())
    }

    /// The check value is compared first, in constant time: a mismatch is a wrong password or
    /// recovery key, a match followed by a failed AEAD is tampering.
    pub(crate) fn unwrap_account_key(&self, parsed: &Parsed<'_>) -> Result<AccountKey, Error> {
        let stored = parsed.check.ok_or(Error::Malformed("no check value"))?;
        if !bool::from(stored.ct_eq(&self.check)) {
            return Err(self.wrong.clone());
        }
        let opened = self
            .key
            .open(parsed.header_bytes, b"account-key", parsed.sealed)?;
        Secret::from_opened(opened).map(AccountKey)
    }
}

/// The account's key (random): wraps and unwraps the per-item data keys.
#[derive(Debug)]
pub(crate) struct AccountKey(Secret);

impl AccountKey {
    pub(crate) fn generate() -> Result<AccountKey, Error> {
        Secret::random().map(AccountKey)
    }

    /// The key's bytes, for the tests that rebuild an envelope the plain way.
    #[cfg(test)]
    pub(crate) fn bytes(&self) -> &[u8; KEY] {
        &self.0.0
    }

    /// Wraps a data key under the account key (purpose `data-key`) into `out`
    /// (`wrapped key || tag`, after the caller's nonce).
    pub(crate) fn wrap_data_key_into(
        &self,
        aad: &mut ItemAad,
        nonce: &[u8; NONCE],
        data_key: &DataKey,
        out: &mut [u8; KEY + TAG],
    ) -> Result<(), Error> {
        let (wrapped, tag) = out.split_at_mut(KEY);
        let t = envelope::seal_into(
            &self.0.0,
            nonce,
            aad.with(b"data-key"),
            data_key.0.0.as_ref(),
            wrapped,
        )?;
        tag.copy_from_slice(&t);
        Ok(())
    }

    /// Unwraps an item's data key (`nonce || wrapped key || tag`).
    pub(crate) fn unwrap_data_key_with(
        &self,
        aad: &mut ItemAad,
        wrapped: &[u8],
    ) -> Result<DataKey, Error> {
        let opened = envelope::open_with_aad(&self.0.0, aad.with(b"data-key"), wrapped)?;
        Secret::from_opened(Zeroizing::new(opened)).map(DataKey)
    }
}

/// A fresh key per item: seals and opens that item's (padded) plaintext.
#[derive(Debug)]
pub(crate) struct DataKey(Secret);

impl DataKey {
    /// A data key from fresh random bytes the caller drew (with the envelope's nonces, in one
    /// draw); the caller wipes its copy.
    pub(crate) fn from_random(bytes: &[u8; KEY]) -> DataKey {
        DataKey(Secret(Zeroizing::new(*bytes)))
    }

    /// Seals the padded plaintext in `buffer` in place (purpose `item`); returns the tag.
    pub(crate) fn seal_item_in_place(
        &self,
        aad: &mut ItemAad,
        nonce: &[u8; NONCE],
        buffer: &mut [u8],
    ) -> Result<[u8; TAG], Error> {
        envelope::seal_in_place(&self.0.0, nonce, aad.with(b"item"), buffer)
    }

    /// Opens `nonce || ciphertext || tag` in place (the padded plaintext replaces the
    /// ciphertext).
    pub(crate) fn open_item_in_place(
        &self,
        aad: &mut ItemAad,
        sealed: &mut [u8],
    ) -> Result<(), Error> {
        envelope::open_in_place(&self.0.0, aad.with(b"item"), sealed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_key_bytes() {
        let recovery = RecoveryKey::parse(&"ab".repeat(32)).unwrap();
        let account = AccountKey::generate().unwrap();
        let kek = recovery.key_encryption_key();
        for shown in [
            format!("{recovery:?}"),
            format!("{account:?}"),
            format!("{:?}", DataKey::from_random(&[7; KEY])),
            format!("{kek:?}"),
        ] {
            assert!(shown.ends_with("([redacted])"), "{shown}");
        }
        assert!(!format!("{recovery:?}").contains("abab"));
        assert!(!format!("{:?}", recovery.proof()).contains(&recovery.proof().to_hex()));
    }

    /// The proof is its own HKDF output: neither the key-encryption key nor the check value.
    #[test]
    fn the_proof_is_distinct_from_the_keys() {
        let recovery = RecoveryKey::parse(&"ab".repeat(32)).unwrap();
        let proof = recovery.proof();
        let kek = recovery.key_encryption_key();
        assert_eq!(proof.kind(), ProofKind::Recovery);
        assert_ne!(proof.to_hex(), hex::encode(kek.key.0.as_ref()));
        assert!(!proof.to_hex().contains(&hex::encode(kek.check())));
        assert_eq!(proof.to_hex(), recovery.proof().to_hex(), "deterministic");
    }
}
