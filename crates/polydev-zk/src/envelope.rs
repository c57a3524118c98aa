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
use chacha20poly1305::aead::{Aead, AeadInOut, KeyInit, Payload};
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

/// `pdz.` + base64url (no padding) of `bytes`, encoded once into a buffer of its final size.
pub(crate) fn encode(bytes: &[u8]) -> String {
    let len = base64::encoded_len(bytes.len(), false).expect("an envelope's length fits");
    let mut text = String::with_capacity(PREFIX.len() + len);
    text.push_str(PREFIX);
    URL_SAFE_NO_PAD.encode_string(bytes, &mut text);
    text
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

/// The longest associated data of an item: label, the longest item header, the longest purpose.
const MAX_ITEM_AAD: usize = LABEL.len() + 2 + 3 + MAX_NAMESPACE + 2 * MAX_ID + 16;

/// The associated data of the AEADs inside one item envelope, built once per envelope on the
/// stack: `label || header`, to which each AEAD appends its purpose.
pub(crate) struct ItemAad {
    bytes: [u8; MAX_ITEM_AAD],
    /// `label || header`.
    base: usize,
}

impl ItemAad {
    pub(crate) fn new(header: &[u8]) -> ItemAad {
        let mut bytes = [0u8; MAX_ITEM_AAD];
        let base = LABEL.len() + header.len();
        bytes[..LABEL.len()].copy_from_slice(LABEL);
        bytes[LABEL.len()..base].copy_from_slice(header);
        ItemAad { bytes, base }
    }

    /// `label || header || purpose`.
    pub(crate) fn with(&mut self, purpose: &[u8]) -> &[u8] {
        let end = self.base + purpose.len();
        self.bytes[self.base..end].copy_from_slice(purpose);
        &self.bytes[..end]
    }
}

/// XChaCha20-Poly1305 of `input` into `output` (the same length), returning the tag: the same
/// bytes as [`seal`] without the nonce in front, written where the caller wants them.
pub(crate) fn seal_into(
    key: &[u8; KEY],
    nonce: &[u8; NONCE],
    aad: &[u8],
    input: &[u8],
    output: &mut [u8],
) -> Result<[u8; TAG], Error> {
    let buffer = chacha20poly1305::aead::inout::InOutBuf::new(input, output)
        .map_err(|_| Error::InvalidInput("plaintext"))?;
    XChaCha20Poly1305::new(key.into())
        .encrypt_inout_detached(&XNonce::from(*nonce), aad, buffer)
        .map(Into::into)
        .map_err(|_| Error::InvalidInput("plaintext"))
}

/// XChaCha20-Poly1305 in place: `buffer` holds the plaintext and is left holding the
/// ciphertext; returns the tag.
pub(crate) fn seal_in_place(
    key: &[u8; KEY],
    nonce: &[u8; NONCE],
    aad: &[u8],
    buffer: &mut [u8],
) -> Result<[u8; TAG], Error> {
    XChaCha20Poly1305::new(key.into())
        .encrypt_inout_detached(&XNonce::from(*nonce), aad, buffer.into())
        .map(Into::into)
        .map_err(|_| Error::InvalidInput("plaintext"))
}

/// Opens `nonce || ciphertext || tag` in place: on success the ciphertext part of `sealed` holds
/// the plaintext; on failure nothing is decrypted (the tag is checked first).
pub(crate) fn open_in_place(key: &[u8; KEY], aad: &[u8], sealed: &mut [u8]) -> Result<(), Error> {
    let (nonce, rest) = sealed
        .split_first_chunk_mut::<NONCE>()
        .ok_or(Error::Malformed("truncated"))?;
    let (ct, tag) = rest
        .split_last_chunk_mut::<TAG>()
        .ok_or(Error::Malformed("truncated"))?;
    XChaCha20Poly1305::new(key.into())
        .decrypt_inout_detached(&XNonce::from(*nonce), aad, ct.into(), &(*tag).into())
        .map_err(|_| Error::Tampered)
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
    open_with_aad(key, &[LABEL, header, purpose].concat(), sealed)
}

/// [`open`] given the whole associated data (`label || header || purpose`).
pub(crate) fn open_with_aad(key: &[u8; KEY], aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, Error> {
    let (nonce, ct) = sealed
        .split_first_chunk::<NONCE>()
        .ok_or(Error::Malformed("truncated"))?;
    XChaCha20Poly1305::new(key.into())
        .decrypt(&XNonce::from(*nonce), Payload { msg: ct, aad })
        .map_err(|_| Error::Tampered)
}

/// Builds the header bytes of an item envelope.
#[cfg(test)]
pub(crate) fn item_header(ctx: &Context<'_>) -> Result<Vec<u8>, Error> {
    let mut h = Vec::new();
    write_item_header(ctx, &mut h)?;
    Ok(h)
}

/// Appends the header bytes of an item envelope to `out`; returns their length.
pub(crate) fn write_item_header(ctx: &Context<'_>, out: &mut Vec<u8>) -> Result<usize, Error> {
    ctx.validate()?;
    let start = out.len();
    out.extend_from_slice(&[VERSION, Kind::Item as u8]);
    for part in [ctx.namespace, ctx.user_id, ctx.row_id] {
        out.push(part.len() as u8);
        out.extend_from_slice(part.as_bytes());
    }
    Ok(out.len() - start)
}

/// The length of an item envelope's header for `ctx` (validated by [`write_item_header`]).
pub(crate) fn item_header_len(ctx: &Context<'_>) -> usize {
    2 + 3 + ctx.namespace.len() + ctx.user_id.len() + ctx.row_id.len()
}

/// The parts of an item envelope that [`crate::Keyring::open`] needs, borrowed from the decoded
/// bytes (no allocation). The same checks and errors as [`Parsed::parse`].
pub(crate) struct ItemParts<'a> {
    pub namespace: &'a str,
    pub user_id: &'a str,
    pub row_id: &'a str,
    /// The header is `bytes[..header_len]`; then the wrapped data key, then the sealed item.
    pub header_len: usize,
}

/// The envelope's item parts, or `None` if it is of another kind (the caller parses it with
/// [`Parsed::parse`] for the same errors as ever).
pub(crate) fn item_parts(bytes: &[u8]) -> Result<Option<ItemParts<'_>>, Error> {
    let mut r = Reader { bytes, at: 0 };
    let version = r.u8()?;
    if version != VERSION {
        return Err(Error::UnsupportedVersion(version));
    }
    if r.u8()? != Kind::Item as u8 {
        return Ok(None);
    }
    let namespace = r.text(MAX_NAMESPACE)?;
    let user_id = r.text(MAX_ID)?;
    let row_id = r.text(MAX_ID)?;
    let header_len = r.at;
    r.take(NONCE + KEY + TAG)?;
    if bytes.len() - r.at < NONCE + TAG {
        return Err(Error::Malformed("truncated"));
    }
    Ok(Some(ItemParts {
        namespace,
        user_id,
        row_id,
        header_len,
    }))
}

/// An envelope split into its parts (borrowing the decoded bytes).
pub(crate) struct Parsed<'a> {
    pub header: Header,
    pub header_bytes: &'a [u8],
    /// kind 2: (params, salt); others: none.
    pub kdf: Option<(crate::KdfParams, &'a [u8])>,
    pub check: Option<&'a [u8]>,
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
        if kind == Kind::Item {
            // nonce || wrapped data key
            r.take(NONCE + KEY + TAG)?;
        }
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
            sealed,
        })
    }
}
