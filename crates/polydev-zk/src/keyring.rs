//! The unlocked account: master password and recovery key wrap one account key; the account key
//! wraps a fresh data key per item. Builds and reads the envelopes; the keys themselves and what
//! each may do are in `crate::keys`.

use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

use crate::envelope::{
    self, Context, ItemAad, KEY, Kind, MAX_PLAINTEXT, NONCE, Parsed, TAG, VERSION,
};
use crate::keys::{AccountKey, AuthProof, DataKey, PasswordKey, RecoveryKey};
use crate::{Error, KdfParams, Opened, Record, pad};

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

impl KeyMaterial {
    /// SHA-256 (hex) of the material: what a client pins to notice the server serving other
    /// or older material. Each field is length-prefixed, so no two materials share it.
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut hash = Sha256::new();
        hash.update(b"polydev-zk v1 key material");
        for field in [
            Some(&self.password_wrapped),
            Some(&self.recovery_wrapped),
            self.password_hint.as_ref(),
        ] {
            match field {
                Some(text) => {
                    hash.update([1]);
                    hash.update((text.len() as u64).to_be_bytes());
                    hash.update(text.as_bytes());
                }
                None => hash.update([0]),
            }
        }
        hex::encode(hash.finalize())
    }

    /// The Argon2id parameters in the password envelope's header (read without a key; they are
    /// authenticated when the envelope is opened).
    pub fn kdf_params(&self) -> Result<KdfParams, Error> {
        let bytes = envelope::decode(&self.password_wrapped)?;
        let parsed = Parsed::parse(&bytes)?;
        parsed
            .kdf
            .map(|(params, _)| params)
            .ok_or(Error::Malformed("no KDF parameters"))
    }
}

/// An unlocked account: holds the account key in memory (wiped on drop), and the proof of the
/// secret it was unlocked with (the password's or the recovery key's), for the server.
pub struct Keyring {
    user_id: String,
    account_key: AccountKey,
    proof: AuthProof,
}

fn text_field(h: &mut Vec<u8>, s: &str) -> Result<(), Error> {
    if s.is_empty() || s.len() > 128 {
        return Err(Error::InvalidInput("user id"));
    }
    h.push(s.len() as u8);
    h.extend_from_slice(s.as_bytes());
    Ok(())
}

/// The password envelope and the proof of the password (which depends on its salt).
fn wrap_with_password(
    account_key: &AccountKey,
    password: &str,
    user_id: &str,
    params: KdfParams,
) -> Result<(String, AuthProof), Error> {
    if password.is_empty() {
        return Err(Error::InvalidInput("password (empty)"));
    }
    let salt: [u8; SALT] = envelope::random()?;
    let (kek, proof) = PasswordKey::derive(&params, password, &salt)?.into_keys();
    let mut h = vec![VERSION, Kind::PasswordWrappedKey as u8];
    for v in [params.memory_kib, params.iterations, params.parallelism] {
        h.extend_from_slice(&v.to_be_bytes());
    }
    h.push(SALT as u8);
    h.extend_from_slice(&salt);
    text_field(&mut h, user_id)?;
    h.extend_from_slice(kek.check());
    let sealed = kek.wrap_account_key(&h, account_key)?;
    Ok((envelope::encode(&[h, sealed].concat()), proof))
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
    /// `params`) and by a new recovery key, which the caller must show the user once. The
    /// keyring holds the password's proof; the recovery key gives its own
    /// ([`RecoveryKey::proof`]). A key rotation is a new setup (a new account key) under the
    /// same password.
    pub fn setup(
        password: &str,
        user_id: &str,
        params: KdfParams,
    ) -> Result<(Keyring, KeyMaterial, RecoveryKey), Error> {
        let account_key = AccountKey::generate()?;
        let recovery = RecoveryKey::generate()?;
        let (password_wrapped, proof) =
            wrap_with_password(&account_key, password, user_id, params)?;
        let material = KeyMaterial {
            password_wrapped,
            recovery_wrapped: wrap_with_recovery(&account_key, &recovery, user_id)?,
            password_hint: None,
        };
        let keyring = Keyring {
            user_id: user_id.to_string(),
            account_key,
            proof,
        };
        Ok((keyring, material, recovery))
    }

    /// Unlocks with the master password. The KDF parameters come from the authenticated
    /// envelope and must meet [`KdfParams::MINIMUM`].
    pub fn unlock(material: &KeyMaterial, password: &str, user_id: &str) -> Result<Keyring, Error> {
        Self::unlock_password_envelope(&material.password_wrapped, password, user_id)
    }

    /// Unlocks one password envelope (`KeyMaterial::password_wrapped`, or the new key of a key
    /// rotation in progress).
    pub fn unlock_password_envelope(
        password_wrapped: &str,
        password: &str,
        user_id: &str,
    ) -> Result<Keyring, Error> {
        let bytes = envelope::decode(password_wrapped)?;
        let parsed = parse_kind(&bytes, Kind::PasswordWrappedKey, user_id)?;
        let (params, salt) = parsed.kdf.ok_or(Error::Malformed("no KDF parameters"))?;
        let (kek, proof) = PasswordKey::derive(&params, password, salt)?.into_keys();
        Ok(Keyring {
            user_id: user_id.to_string(),
            account_key: kek.unwrap_account_key(&parsed)?,
            proof,
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
            proof: recovery.proof(),
        })
    }

    /// The proof of the secret this keyring was unlocked with (password or recovery key).
    pub fn proof(&self) -> &AuthProof {
        &self.proof
    }

    /// A new password re-wraps the account key; no data is re-encrypted. Returns the new
    /// material and the new password's proof. The password hint is dropped: it was a hint for
    /// the old password (the caller may add one for the new).
    pub fn change_password(
        &self,
        material: &KeyMaterial,
        new_password: &str,
        params: KdfParams,
    ) -> Result<(KeyMaterial, AuthProof), Error> {
        let (password_wrapped, proof) =
            wrap_with_password(&self.account_key, new_password, &self.user_id, params)?;
        Ok((
            KeyMaterial {
                password_wrapped,
                recovery_wrapped: material.recovery_wrapped.clone(),
                password_hint: None,
            },
            proof,
        ))
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
    ///
    /// One random draw gives the data key and both nonces; the envelope is built in one buffer
    /// of its final size (the padded plaintext is encrypted in place, so no plaintext copy is
    /// left behind) and encoded once. The bytes are those of the format in docs/crypto.md.
    pub fn seal(&self, ctx: &Context<'_>, plaintext: &[u8]) -> Result<String, Error> {
        let mut random = Zeroizing::new([0u8; KEY + 2 * NONCE]);
        getrandom::fill(random.as_mut()).map_err(|_| Error::Random)?;
        self.seal_with(ctx, plaintext, &random)
    }

    /// [`Keyring::seal`] with its randomness given: `data key || key nonce || item nonce`.
    fn seal_with(
        &self,
        ctx: &Context<'_>,
        plaintext: &[u8],
        random: &[u8; KEY + 2 * NONCE],
    ) -> Result<String, Error> {
        if plaintext.len() > MAX_PLAINTEXT {
            return Err(Error::TooLarge(MAX_PLAINTEXT));
        }
        if ctx.user_id != self.user_id {
            return Err(Error::WrongContext("user"));
        }
        let (key, nonces) = random.split_first_chunk::<KEY>().expect("sizes");
        let (key_nonce, item_nonce) = nonces.split_first_chunk::<NONCE>().expect("sizes");
        let item_nonce: &[u8; NONCE] = item_nonce.try_into().expect("sizes");
        let data_key = DataKey::from_random(key);

        // header | key nonce | wrapped data key | tag | item nonce | padded ciphertext | tag
        let header_len = envelope::item_header_len(ctx);
        let padded_len = pad::bucket(plaintext.len());
        let total = header_len + NONCE + KEY + TAG + NONCE + padded_len + TAG;
        let mut bytes = Vec::with_capacity(total);
        envelope::write_item_header(ctx, &mut bytes)?;
        let mut aad = ItemAad::new(&bytes);
        bytes.extend_from_slice(key_nonce);
        let mut wrapped = [0u8; KEY + TAG];
        self.account_key
            .wrap_data_key_into(&mut aad, key_nonce, &data_key, &mut wrapped)?;
        bytes.extend_from_slice(&wrapped);
        bytes.extend_from_slice(item_nonce);
        let start = bytes.len();
        pad::pad_into(&mut bytes, plaintext);
        match data_key.seal_item_in_place(&mut aad, item_nonce, &mut bytes[start..]) {
            Ok(tag) => bytes.extend_from_slice(&tag),
            Err(e) => {
                bytes.zeroize();
                return Err(e);
            }
        }
        debug_assert_eq!(bytes.len(), total);
        Ok(envelope::encode(&bytes))
    }

    /// Decrypts an item, checking it belongs to `ctx`.
    pub fn open(&self, ctx: &Context<'_>, text: &str) -> Result<Vec<u8>, Error> {
        let mut bytes = envelope::decode(text)?;
        let Some(parts) = envelope::item_parts(&bytes)? else {
            // Not an item: the full parser gives the error.
            Parsed::parse(&bytes)?;
            return Err(Error::Malformed("not an item envelope"));
        };
        if parts.namespace != ctx.namespace {
            return Err(Error::WrongContext("namespace"));
        }
        if parts.user_id != ctx.user_id || ctx.user_id != self.user_id {
            return Err(Error::WrongContext("user"));
        }
        if parts.row_id != ctx.row_id {
            return Err(Error::WrongContext("row"));
        }
        let header_len = parts.header_len;
        let (header, rest) = bytes.split_at_mut(header_len);
        let (wrapped, sealed) = rest.split_at_mut(NONCE + KEY + TAG);
        let mut aad = ItemAad::new(header);
        let data_key = self.account_key.unwrap_data_key_with(&mut aad, wrapped)?;
        data_key.open_item_in_place(&mut aad, sealed)?;
        // The padded plaintext is now in place of the ciphertext: move its data to the front
        // of the buffer and return that (the rest of the buffer, wiped, is capacity).
        let start = header_len + NONCE + KEY + TAG + NONCE;
        let end = bytes.len() - TAG;
        let len = match pad::unpad(&bytes[start..end]) {
            Ok(data) => data.len(),
            Err(e) => {
                bytes.zeroize();
                return Err(e);
            }
        };
        bytes.copy_within(start + 4..start + 4 + len, 0);
        // What is left of the plaintext and its length past the returned part (the padding is
        // zeros, the rest ciphertext and header).
        bytes[len..start + 4 + len].zeroize();
        bytes.truncate(len);
        Ok(bytes)
    }

    /// Seals a chat [`Record`] (text and place) for `ctx`.
    pub fn seal_record(&self, ctx: &Context<'_>, record: &Record) -> Result<String, Error> {
        self.seal(ctx, &Zeroizing::new(record.encode()))
    }

    /// Opens a chat item: a [`Record`], or the bare text of the older format. The caller
    /// compares the record with the row it came in.
    pub fn open_record(&self, ctx: &Context<'_>, text: &str) -> Result<Opened, Error> {
        Opened::decode(&Zeroizing::new(self.open(ctx, text)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use chacha20poly1305::aead::{Aead, KeyInit, Payload};
    use chacha20poly1305::{XChaCha20Poly1305, XNonce};

    /// The envelope as the format defines it, built the plain way (separate buffers, the AEAD's
    /// own allocating API, the `base64` crate): what `seal` produced before it was made fast.
    fn reference_seal(
        account_key: &[u8; KEY],
        ctx: &Context<'_>,
        plaintext: &[u8],
        random: &[u8; KEY + 2 * NONCE],
    ) -> String {
        let (data_key, nonces) = random.split_at(KEY);
        let (key_nonce, item_nonce) = nonces.split_at(NONCE);
        let header = envelope::item_header(ctx).unwrap();
        let aead = |key: &[u8], nonce: &[u8], purpose: &[u8], msg: &[u8]| {
            let aad = [b"polydev-zk".as_slice(), &header, purpose].concat();
            let ct = XChaCha20Poly1305::new_from_slice(key)
                .unwrap()
                .encrypt(
                    &XNonce::try_from(nonce).unwrap(),
                    Payload { msg, aad: &aad },
                )
                .unwrap();
            [nonce, &ct].concat()
        };
        let wrapped = aead(account_key, key_nonce, b"data-key", data_key);
        let sealed = aead(data_key, item_nonce, b"item", &pad::pad(plaintext));
        format!(
            "pdz.{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode([header, wrapped, sealed].concat())
        )
    }

    #[test]
    fn seal_builds_the_same_bytes_as_the_format_defines() {
        let (keyring, _, _) = Keyring::setup("pw", "user-1", KdfParams::MINIMUM).unwrap();
        let mut random = [0u8; KEY + 2 * NONCE];
        for (i, b) in random.iter_mut().enumerate() {
            *b = (i * 7 + 3) as u8;
        }
        let ctx = Context {
            namespace: "chat.message",
            user_id: "user-1",
            row_id: "88888888-8888-4888-8888-888888888881",
        };
        for len in [0, 1, 59, 60, 61, 1000, 1024, 5000, 70_000] {
            let plaintext: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let sealed = keyring.seal_with(&ctx, &plaintext, &random).unwrap();
            assert_eq!(
                sealed,
                reference_seal(keyring.account_key.bytes(), &ctx, &plaintext, &random),
                "length {len}"
            );
            assert_eq!(keyring.open(&ctx, &sealed).unwrap(), plaintext);
        }
        // Each seal draws anew: two seals of the same item differ everywhere but the header.
        let (a, b) = (
            keyring.seal(&ctx, b"x").unwrap(),
            keyring.seal(&ctx, b"x").unwrap(),
        );
        assert_ne!(a, b);
        assert_eq!(inspect_prefix(&a), inspect_prefix(&b));
    }

    fn inspect_prefix(envelope: &str) -> crate::Header {
        crate::inspect(envelope).unwrap()
    }
}
