//! The unlocked account: master password and recovery key wrap one account key; the account key
//! wraps a fresh data key per item. Builds and reads the envelopes; the keys themselves and what
//! each may do are in `crate::keys`.

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::envelope::{self, Context, Kind, MAX_PLAINTEXT, Parsed, VERSION};
use crate::keys::{AccountKey, DataKey, PasswordKey, RecoveryKey};
use crate::{Error, KdfParams, pad};

const SALT: usize = 16;

/// What the server stores for a user: two envelopes of the same account key, one under the
/// password, one under the recovery key, and optionally an encrypted password hint. All are
/// opaque to the server; the password envelope carries its KDF parameters and salt in its
/// authenticated header. The one definition for the server, the CLI and the browser.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyMaterial {
    pub password_wrapped: String,
    pub recovery_wrapped: String,
    /// An item envelope (namespace `user.password_hint`, row = the user id), if the user set one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_hint: Option<String>,
}

/// An unlocked account: holds the account key in memory (wiped on drop).
pub struct Keyring {
    user_id: String,
    account_key: AccountKey,
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
    account_key: &AccountKey,
    password: &str,
    user_id: &str,
    params: KdfParams,
) -> Result<String, Error> {
    if password.is_empty() {
        return Err(Error::InvalidInput("password (empty)"));
    }
    let salt: [u8; SALT] = envelope::random()?;
    let kek = PasswordKey::derive(&params, password, &salt)?.into_key_encryption_key();
    let mut h = vec![VERSION, Kind::PasswordWrappedKey as u8];
    for v in [params.memory_kib, params.iterations, params.parallelism] {
        h.extend_from_slice(&v.to_be_bytes());
    }
    h.push(SALT as u8);
    h.extend_from_slice(&salt);
    text_field(&mut h, user_id)?;
    h.extend_from_slice(kek.check());
    let sealed = kek.wrap_account_key(&h, account_key)?;
    Ok(envelope::encode(&[h, sealed].concat()))
}

fn wrap_with_recovery(
    account_key: &AccountKey,
    recovery: &RecoveryKey,
    user_id: &str,
) -> Result<String, Error> {
    let kek = recovery.key_encryption_key();
    let mut h = vec![VERSION, Kind::RecoveryWrappedKey as u8];
    text_field(&mut h, user_id)?;
    h.extend_from_slice(kek.check());
    let sealed = kek.wrap_account_key(&h, account_key)?;
    Ok(envelope::encode(&[h, sealed].concat()))
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
        let account_key = AccountKey::generate()?;
        let recovery = RecoveryKey::generate()?;
        let material = KeyMaterial {
            password_wrapped: wrap_with_password(&account_key, password, user_id, params)?,
            recovery_wrapped: wrap_with_recovery(&account_key, &recovery, user_id)?,
            password_hint: None,
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
        let kek = PasswordKey::derive(&params, password, salt)?.into_key_encryption_key();
        Ok(Keyring {
            user_id: user_id.to_string(),
            account_key: kek.unwrap_account_key(&parsed)?,
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
        Ok(Keyring {
            user_id: user_id.to_string(),
            account_key: recovery.key_encryption_key().unwrap_account_key(&parsed)?,
        })
    }

    /// A new password re-wraps the account key; no data is re-encrypted. The password hint is
    /// dropped: it was a hint for the old password (the caller may add one for the new).
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
            password_hint: None,
        })
    }

    /// A new recovery key (the old one stops working once the new material is stored).
    pub fn replace_recovery_key(
        &self,
        material: &KeyMaterial,
    ) -> Result<(KeyMaterial, RecoveryKey), Error> {
        let recovery = RecoveryKey::generate()?;
        Ok((
            KeyMaterial {
                recovery_wrapped: wrap_with_recovery(&self.account_key, &recovery, &self.user_id)?,
                ..material.clone()
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
        let data_key = DataKey::generate()?;
        let wrapped_dek = self.account_key.wrap_data_key(&header, &data_key)?;
        let padded = Zeroizing::new(pad::pad(plaintext));
        let sealed = data_key.seal_item(&header, &padded)?;
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
        let data_key = self
            .account_key
            .unwrap_data_key(parsed.header_bytes, wrapped)?;
        let padded = data_key.open_item(parsed.header_bytes, parsed.sealed)?;
        Ok(pad::unpad(&padded)?.to_vec())
    }
}
