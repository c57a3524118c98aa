//! The envelope: a versioned, self-describing container whose authenticated header binds the
//! ciphertext to its place (namespace, user, row). Text form: `pdz.` + base64url (no padding).
//!
//! ```text
//! byte 0   version (1: XChaCha20-Poly1305, HKDF-SHA256, Argon2id; implied, never a field)
//! byte 1   kind (1 item, 2 password-wrapped key, 3 recovery-wrapped key)
//! kind 1   ns_len ns  uid_len uid  row_len row | dek_nonce[24] wrapped_dek[48] | nonce[24] ct+tag
//! kind 2   m_kib[4] t[4] p[4] salt_len salt uid_len uid check[16] | nonce[24] ct+tag
//! kind 3   uid_len uid check[16] | nonce[24] ct+tag
//! ```
//! The header is everything before the first nonce; it is the associated data of every AEAD
//! inside (with a domain label), so changing any byte of it makes opening fail.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

use crate::Error;

pub const VERSION: u8 = 1;
const PREFIX: &str = "pdz.";
const LABEL: &[u8] = b"polydev-zk";
pub(crate) const NONCE: usize = 24;
pub(crate) const TAG: usize = 16;
pub(crate) const KEY: usize = 32;
pub(crate) const CHECK: usize = 16;
/// The largest plaintext an item may hold.
pub const MAX_PLAINTEXT: usize = 16 * 1024 * 1024;
const MAX_NAMESPACE: usize = 64;
const MAX_ID: usize = 128;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Item = 1,
    PasswordWrappedKey = 2,
    RecoveryWrappedKey = 3,
}

/// Where an item belongs. All three are bound into the envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Context<'a> {
    /// What the item is, e.g. `chat.message`, `credential.provider`, `job.command`.
    pub namespace: &'a str,
    pub user_id: &'a str,
    /// The row (or other stable identifier) the item is stored under.
    pub row_id: &'a str,
}

impl Context<'_> {
    fn validate(&self) -> Result<(), Error> {
        let ns_ok = !self.namespace.is_empty()
            && self.namespace.len() <= MAX_NAMESPACE
            && self
                .namespace
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
        if !ns_ok {
            return Err(Error::InvalidInput("namespace (1-64 of a-z 0-9 . _ -)"));
        }
        if self.user_id.is_empty() || self.user_id.len() > MAX_ID {
            return Err(Error::InvalidInput("user id"));
        }
        if self.row_id.is_empty() || self.row_id.len() > MAX_ID {
            return Err(Error::InvalidInput("row id"));
        }
        Ok(())
    }
}

/// What anyone (the server included) can read from an envelope without a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u8,
    pub kind: Kind,
    pub namespace: Option<String>,
    pub user_id: String,
    pub row_id: Option<String>,
    /// Password envelopes: the Argon2id parameters and the salt (hex).
    pub kdf: Option<crate::KdfParams>,
    pub salt_hex: Option<String>,
    /// Bytes of ciphertext (the padded length plus the tag for items).
    pub ciphertext_len: usize,
}

/// Reads an envelope's header without decrypting: lets the server check that a write is an
/// envelope for the right namespace and user, within size limits. Never panics.
pub fn inspect(text: &str) -> Result<Header, Error> {
    let bytes = decode(text)?;
    Ok(Parsed::parse(&bytes)?.header)
}

pub(crate) fn encode(bytes: &[u8]) -> String {
    format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes))
}

pub(crate) fn decode(text: &str) -> Result<Vec<u8>, Error> {
    let body = text
        .strip_prefix(PREFIX)
        .ok_or(Error::Malformed("missing pdz. prefix"))?;
    if body.len() > (MAX_PLAINTEXT + 64 * 1024) / 3 * 4 {
        return Err(Error::TooLarge(MAX_PLAINTEXT));
    }
    URL_SAFE_NO_PAD
        .decode(body)
        .map_err(|_| Error::Malformed("not base64url"))
}

pub(crate) fn random<const N: usize>() -> Result<[u8; N], Error> {
    let mut out = [0u8; N];
    getrandom::fill(&mut out).map_err(|_| Error::Random)?;
    Ok(out)
}

/// XChaCha20-Poly1305 with `aad` = label || header || purpose.
pub(crate) fn seal(
    key: &[u8; KEY],
    header: &[u8],
    purpose: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>, Error> {
    let nonce: [u8; NONCE] = random()?;
    let aad = [LABEL, header, purpose].concat();
    let cipher = XChaCha20Poly1305::new(key.into());
    let ct = cipher
        .encrypt(
            &XNonce::from(nonce),
            Payload {
                msg: plaintext,
                aad: &aad,
            },
        )
        .map_err(|_| Error::InvalidInput("plaintext"))?;
    Ok([&nonce[..], &ct].concat())
}

pub(crate) fn open(
    key: &[u8; KEY],
    header: &[u8],
    purpose: &[u8],
    sealed: &[u8],
) -> Result<Vec<u8>, Error> {
    let (nonce, ct) = sealed
        .split_first_chunk::<NONCE>()
        .ok_or(Error::Malformed("truncated"))?;
    let aad = [LABEL, header, purpose].concat();
    XChaCha20Poly1305::new(key.into())
        .decrypt(&XNonce::from(*nonce), Payload { msg: ct, aad: &aad })
        .map_err(|_| Error::Tampered)
}

/// Builds the header bytes of an item envelope.
pub(crate) fn item_header(ctx: &Context<'_>) -> Result<Vec<u8>, Error> {
    ctx.validate()?;
    let mut h = vec![VERSION, Kind::Item as u8];
    for part in [ctx.namespace, ctx.user_id, ctx.row_id] {
        h.push(part.len() as u8);
        h.extend_from_slice(part.as_bytes());
    }
    Ok(h)
}

/// An envelope split into its parts (borrowing the decoded bytes).
pub(crate) struct Parsed<'a> {
    pub header: Header,
    pub header_bytes: &'a [u8],
    /// kind 2: (params, salt); others: none.
    pub kdf: Option<(crate::KdfParams, &'a [u8])>,
    pub check: Option<&'a [u8]>,
    /// kind 1: nonce || wrapped data key.
    pub wrapped_dek: Option<&'a [u8]>,
    /// nonce || ciphertext || tag.
    pub sealed: &'a [u8],
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Error> {
        let end = self.at.checked_add(n).ok_or(Error::Malformed("length"))?;
        let out = self
            .bytes
            .get(self.at..end)
            .ok_or(Error::Malformed("truncated"))?;
        self.at = end;
        Ok(out)
    }
    fn u8(&mut self) -> Result<u8, Error> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, Error> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn text(&mut self, max: usize) -> Result<&'a str, Error> {
        let len = self.u8()? as usize;
        if len == 0 || len > max {
            return Err(Error::Malformed("field length"));
        }
        std::str::from_utf8(self.take(len)?).map_err(|_| Error::Malformed("not UTF-8"))
    }
}

impl<'a> Parsed<'a> {
    pub(crate) fn parse(bytes: &'a [u8]) -> Result<Parsed<'a>, Error> {
        let mut r = Reader { bytes, at: 0 };
        let version = r.u8()?;
        if version != VERSION {
            return Err(Error::UnsupportedVersion(version));
        }
        let kind = match r.u8()? {
            1 => Kind::Item,
            2 => Kind::PasswordWrappedKey,
            3 => Kind::RecoveryWrappedKey,
            _ => return Err(Error::Malformed("unknown kind")),
        };
        let (mut namespace, mut row_id, mut kdf, mut check) = (None, None, None, None);
        let user_id;
        match kind {
            Kind::Item => {
                namespace = Some(r.text(MAX_NAMESPACE)?.to_string());
                user_id = r.text(MAX_ID)?.to_string();
                row_id = Some(r.text(MAX_ID)?.to_string());
            }
            Kind::PasswordWrappedKey => {
                let params = crate::KdfParams {
                    memory_kib: r.u32()?,
                    iterations: r.u32()?,
                    parallelism: r.u32()?,
                };
                let salt_len = r.u8()? as usize;
                if !(16..=64).contains(&salt_len) {
                    return Err(Error::Malformed("salt length"));
                }
                let salt = r.take(salt_len)?;
                user_id = r.text(MAX_ID)?.to_string();
                check = Some(r.take(CHECK)?);
                kdf = Some((params, salt));
            }
            Kind::RecoveryWrappedKey => {
                user_id = r.text(MAX_ID)?.to_string();
                check = Some(r.take(CHECK)?);
            }
        }
        let header_bytes = &bytes[..r.at];
        let wrapped_dek = match kind {
            Kind::Item => Some(r.take(NONCE + KEY + TAG)?),
            _ => None,
        };
        let sealed = &bytes[r.at..];
        if sealed.len() < NONCE + TAG {
            return Err(Error::Malformed("truncated"));
        }
        Ok(Parsed {
            header: Header {
                version,
                kind,
                namespace,
                user_id,
                row_id,
                kdf: kdf.map(|(params, _)| params),
                salt_hex: kdf.map(|(_, salt)| hex::encode(salt)),
                ciphertext_len: sealed.len() - NONCE,
            },
            header_bytes,
            kdf,
            check,
            wrapped_dek,
            sealed,
        })
    }
}
