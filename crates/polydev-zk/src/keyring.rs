//! The key hierarchy: master password and recovery key wrap one account key; the account key
//! wraps a fresh data key per item.

use hkdf::Hkdf;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, Zeroizing};

use crate::envelope::{self, CHECK, Context, KEY, Kind, MAX_PLAINTEXT, Parsed, VERSION};
use crate::{Error, KdfParams, pad};

const SALT: usize = 16;

/// What the server stores for a user: two envelopes of the same account key, one under the
/// password, one under the recovery key. Both are opaque to the server; the password envelope
/// carries its KDF parameters and salt in its authenticated header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyMaterial {
    pub password_wrapped: String,
    pub recovery_wrapped: String,
}

/// The recovery key, shown to the user once: 64 hex digits in 8 groups.
pub struct RecoveryKey(Zeroizing<[u8; KEY]>);

impl std::fmt::Debug for RecoveryKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RecoveryKey([redacted])")
    }
}

impl RecoveryKey {
    pub fn display(&self) -> String {
        hex::encode(self.0.as_ref())
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
        Ok(RecoveryKey(key))
    }
}

/// An unlocked account: holds the account key in memory (zeroed on drop).
pub struct Keyring {
    user_id: String,
    account_key: Zeroizing<[u8; KEY]>,
}

/// HKDF-SHA256 expansions of a root secret: a key-encryption key and a check value.
fn expand(root: &[u8], purpose: &str) -> (Zeroizing<[u8; KEY]>, [u8; CHECK]) {
    let hk = Hkdf::<Sha256>::new(None, root);
    let mut kek = Zeroizing::new([0u8; KEY]);
    let mut check = [0u8; CHECK];
    hk.expand(
        format!("polydev-zk v1 {purpose} kek").as_bytes(),
        kek.as_mut(),
    )
    .expect("32 bytes is a valid HKDF length");
    hk.expand(
        format!("polydev-zk v1 {purpose} check").as_bytes(),
        &mut check,
    )
    .expect("16 bytes is a valid HKDF length");
    (kek, check)
}

fn text_field(h: &mut Vec<u8>, s: &str) -> Result<(), Error> {
    if s.is_empty() || s.len() > 128 {
        return Err(Error::InvalidInput("user id"));
    }
    h.push(s.len() as u8);
    h.extend_from_slice(s.as_bytes());
    Ok(())
}

fn wrap_with_password(
    account_key: &[u8; KEY],
    password: &str,
    user_id: &str,
    params: KdfParams,
) -> Result<String, Error> {
    if password.is_empty() {
        return Err(Error::InvalidInput("password (empty)"));
    }
    let salt: [u8; SALT] = envelope::random()?;
    let root = params.derive(password.as_bytes(), &salt)?;
    let (kek, check) = expand(root.as_ref(), "password");
    let mut h = vec![VERSION, Kind::PasswordWrappedKey as u8];
    for v in [params.memory_kib, params.iterations, params.parallelism] {
        h.extend_from_slice(&v.to_be_bytes());
    }
    h.push(SALT as u8);
    h.extend_from_slice(&salt);
    text_field(&mut h, user_id)?;
    h.extend_from_slice(&check);
    let sealed = envelope::seal(&kek, &h, b"account-key", account_key)?;
    Ok(envelope::encode(&[h, sealed].concat()))
}

fn wrap_with_recovery(
    account_key: &[u8; KEY],
    recovery: &RecoveryKey,
    user_id: &str,
) -> Result<String, Error> {
    let (kek, check) = expand(recovery.0.as_ref(), "recovery");
    let mut h = vec![VERSION, Kind::RecoveryWrappedKey as u8];
    text_field(&mut h, user_id)?;
    h.extend_from_slice(&check);
    let sealed = envelope::seal(&kek, &h, b"account-key", account_key)?;
    Ok(envelope::encode(&[h, sealed].concat()))
}

fn unwrap_account_key(
    parsed: &Parsed<'_>,
    kek: &[u8; KEY],
    check: &[u8; CHECK],
    wrong: Error,
) -> Result<Zeroizing<[u8; KEY]>, Error> {
    let stored = parsed.check.ok_or(Error::Malformed("no check value"))?;
    if !bool::from(stored.ct_eq(check)) {
        return Err(wrong);
    }
    let mut key = envelope::open(kek, parsed.header_bytes, b"account-key", parsed.sealed)?;
    let out: [u8; KEY] = key.as_slice().try_into().map_err(|_| Error::Tampered)?;
    key.zeroize();
    Ok(Zeroizing::new(out))
}

fn parse_kind<'a>(bytes: &'a [u8], kind: Kind, user_id: &str) -> Result<Parsed<'a>, Error> {
    let parsed = Parsed::parse(bytes)?;
    if parsed.header.kind != kind {
        return Err(Error::Malformed("wrong kind of envelope"));
    }
    if parsed.header.user_id != user_id {
        return Err(Error::WrongContext("user"));
    }
    Ok(parsed)
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("user_id", &self.user_id)
            .finish_non_exhaustive()
    }
}

impl Keyring {
    /// Turns zero-knowledge on: a random account key, wrapped by the password (Argon2id with
    /// `params`) and by a new recovery key, which the caller must show the user once.
    pub fn setup(
        password: &str,
        user_id: &str,
        params: KdfParams,
    ) -> Result<(Keyring, KeyMaterial, RecoveryKey), Error> {
        let account_key = Zeroizing::new(envelope::random::<KEY>()?);
        let recovery = RecoveryKey(Zeroizing::new(envelope::random::<KEY>()?));
        let material = KeyMaterial {
            password_wrapped: wrap_with_password(&account_key, password, user_id, params)?,
            recovery_wrapped: wrap_with_recovery(&account_key, &recovery, user_id)?,
        };
        let keyring = Keyring {
            user_id: user_id.to_string(),
            account_key,
        };
        Ok((keyring, material, recovery))
    }

    /// Unlocks with the master password. The KDF parameters come from the authenticated
    /// envelope and must meet [`KdfParams::MINIMUM`].
    pub fn unlock(material: &KeyMaterial, password: &str, user_id: &str) -> Result<Keyring, Error> {
        let bytes = envelope::decode(&material.password_wrapped)?;
        let parsed = parse_kind(&bytes, Kind::PasswordWrappedKey, user_id)?;
        let (params, salt) = parsed.kdf.ok_or(Error::Malformed("no KDF parameters"))?;
        let root = params.derive(password.as_bytes(), salt)?;
        let (kek, check) = expand(root.as_ref(), "password");
        let account_key = unwrap_account_key(&parsed, &kek, &check, Error::WrongPassword)?;
        Ok(Keyring {
            user_id: user_id.to_string(),
            account_key,
        })
    }

    /// Unlocks with the recovery key (after a forgotten password).
    pub fn unlock_with_recovery(
        material: &KeyMaterial,
        recovery_key: &str,
        user_id: &str,
    ) -> Result<Keyring, Error> {
        let recovery = RecoveryKey::parse(recovery_key)?;
        let bytes = envelope::decode(&material.recovery_wrapped)?;
        let parsed = parse_kind(&bytes, Kind::RecoveryWrappedKey, user_id)?;
        let (kek, check) = expand(recovery.0.as_ref(), "recovery");
        let account_key = unwrap_account_key(&parsed, &kek, &check, Error::WrongRecoveryKey)?;
        Ok(Keyring {
            user_id: user_id.to_string(),
            account_key,
        })
    }

    /// A new password re-wraps the account key; no data is re-encrypted.
    pub fn change_password(
        &self,
        material: &KeyMaterial,
        new_password: &str,
        params: KdfParams,
    ) -> Result<KeyMaterial, Error> {
        Ok(KeyMaterial {
            password_wrapped: wrap_with_password(
                &self.account_key,
                new_password,
                &self.user_id,
                params,
            )?,
            recovery_wrapped: material.recovery_wrapped.clone(),
        })
    }

    /// A new recovery key (the old one stops working once the new material is stored).
    pub fn replace_recovery_key(
        &self,
        material: &KeyMaterial,
    ) -> Result<(KeyMaterial, RecoveryKey), Error> {
        let recovery = RecoveryKey(Zeroizing::new(envelope::random::<KEY>()?));
        Ok((
            KeyMaterial {
                password_wrapped: material.password_wrapped.clone(),
                recovery_wrapped: wrap_with_recovery(&self.account_key, &recovery, &self.user_id)?,
            },
            recovery,
        ))
    }

    pub fn user_id(&self) -> &str {
        &self.user_id
    }

    /// Encrypts `plaintext` for `ctx` under a fresh data key, padded to its length bucket.
    pub fn seal(&self, ctx: &Context<'_>, plaintext: &[u8]) -> Result<String, Error> {
        if plaintext.len() > MAX_PLAINTEXT {
            return Err(Error::TooLarge(MAX_PLAINTEXT));
        }
        if ctx.user_id != self.user_id {
            return Err(Error::WrongContext("user"));
        }
        let header = envelope::item_header(ctx)?;
        let dek = Zeroizing::new(envelope::random::<KEY>()?);
        let wrapped_dek = envelope::seal(&self.account_key, &header, b"data-key", dek.as_ref())?;
        let padded = Zeroizing::new(pad::pad(plaintext));
        let sealed = envelope::seal(&dek, &header, b"item", &padded)?;
        Ok(envelope::encode(&[header, wrapped_dek, sealed].concat()))
    }

    /// Decrypts an item, checking it belongs to `ctx`.
    pub fn open(&self, ctx: &Context<'_>, text: &str) -> Result<Vec<u8>, Error> {
        let bytes = envelope::decode(text)?;
        let parsed = Parsed::parse(&bytes)?;
        let h = &parsed.header;
        if h.kind != Kind::Item {
            return Err(Error::Malformed("not an item envelope"));
        }
        if h.namespace.as_deref() != Some(ctx.namespace) {
            return Err(Error::WrongContext("namespace"));
        }
        if h.user_id != ctx.user_id || ctx.user_id != self.user_id {
            return Err(Error::WrongContext("user"));
        }
        if h.row_id.as_deref() != Some(ctx.row_id) {
            return Err(Error::WrongContext("row"));
        }
        let wrapped = parsed.wrapped_dek.ok_or(Error::Malformed("no data key"))?;
        let mut dek_bytes =
            envelope::open(&self.account_key, parsed.header_bytes, b"data-key", wrapped)?;
        let dek: Zeroizing<[u8; KEY]> = Zeroizing::new(
            dek_bytes
                .as_slice()
                .try_into()
                .map_err(|_| Error::Tampered)?,
        );
        dek_bytes.zeroize();
        let padded = Zeroizing::new(envelope::open(
            &dek,
            parsed.header_bytes,
            b"item",
            parsed.sealed,
        )?);
        Ok(pad::unpad(&padded)?.to_vec())
    }
}
