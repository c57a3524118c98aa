//! X25519 key pairs and sealed boxes: encryption to a public key, for the runtime's sealed jobs
//! (docs/runtime.md). A user's browser or CLI seals a job's command to a container agent's
//! public key; the agent seals the job's output to the user's public key. Neither the server
//! nor a database dump can open either.
//!
//! A user's key pair: the public key is stored in the clear; the private key is an item
//! envelope (namespace [`USER_KEY_NAMESPACE`], row = the user id) under the account key, made
//! and opened by the [`Keyring`] like any other item.
//!
//! Sealed box, text form `pdzs.` + base64url (no padding):
//!
//! ```text
//! byte 0   version (1)
//! byte 1   kind (4: sealed box)
//!          ns_len ns  uid_len uid  row_len row  recipient_pk[32]  ephemeral_pk[32]   (the header)
//!          nonce[24] ciphertext+tag
//! key   = HKDF-SHA256(ikm = X25519(ephemeral_sk, recipient_pk),
//!                     info = "polydev-zk v1 sealed-box" || header)
//! AEAD  = XChaCha20-Poly1305, associated data "polydev-zk" || header || "sealed-box",
//!         plaintext padded to its length bucket
//! ```
//! A fresh ephemeral key per box: every box has its own key. The header binds the box to its
//! place (namespace, user, row) and to its recipient; opening checks all three.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hkdf::Hkdf;
use sha2::Sha256;
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use crate::envelope::{self, Context, KEY, MAX_PLAINTEXT, NONCE, TAG, VERSION};
use crate::{Error, Keyring, pad};

/// Namespace of the item envelope that holds a user's X25519 private key.
pub const USER_KEY_NAMESPACE: &str = "runtime.x25519";
const PREFIX: &str = "pdzs.";
const KIND_SEALED_BOX: u8 = 4;
const PURPOSE: &[u8] = b"sealed-box";

/// An X25519 key pair. The private half is wiped on drop and never printed.
pub struct X25519KeyPair {
    secret: StaticSecret,
    public: PublicKey,
}

impl std::fmt::Debug for X25519KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("X25519KeyPair")
            .field("public", &self.public_key())
            .finish_non_exhaustive()
    }
}

/// A public key's text form: 32 bytes, base64url without padding.
pub fn encode_public_key(key: &[u8; 32]) -> String {
    URL_SAFE_NO_PAD.encode(key)
}

pub fn decode_public_key(text: &str) -> Result<[u8; 32], Error> {
    let bytes = URL_SAFE_NO_PAD
        .decode(text.trim())
        .map_err(|_| Error::InvalidInput("public key (base64url)"))?;
    bytes
        .try_into()
        .map_err(|_| Error::InvalidInput("public key (32 bytes)"))
}

impl X25519KeyPair {
    pub fn generate() -> Result<X25519KeyPair, Error> {
        let bytes = Zeroizing::new(envelope::random::<KEY>()?);
        Ok(Self::from_secret_bytes(*bytes))
    }

    fn from_secret_bytes(bytes: [u8; KEY]) -> X25519KeyPair {
        let secret = StaticSecret::from(bytes);
        let public = PublicKey::from(&secret);
        X25519KeyPair { secret, public }
    }

    /// The private key from its text form ([`X25519KeyPair::export_secret`]).
    pub fn from_secret(text: &str) -> Result<X25519KeyPair, Error> {
        let bytes = Zeroizing::new(
            URL_SAFE_NO_PAD
                .decode(text.trim())
                .map_err(|_| Error::InvalidInput("private key"))?,
        );
        let array: [u8; KEY] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| Error::InvalidInput("private key (32 bytes)"))?;
        Ok(Self::from_secret_bytes(array))
    }

    /// The private key as text, for a caller that seals it itself (the browser seals it with
    /// its keyring: `keyring.seal("runtime.x25519", user, user, secret)`).
    pub fn export_secret(&self) -> Zeroizing<String> {
        Zeroizing::new(URL_SAFE_NO_PAD.encode(self.secret.to_bytes()))
    }

    pub fn public_key(&self) -> String {
        encode_public_key(self.public.as_bytes())
    }

    /// The private key sealed under the account key (an item envelope, namespace
    /// [`USER_KEY_NAMESPACE`], row = the user id): what the server stores.
    pub fn wrap(&self, keyring: &Keyring) -> Result<String, Error> {
        let user = keyring.user_id();
        let ctx = Context {
            namespace: USER_KEY_NAMESPACE,
            user_id: user,
            row_id: user,
        };
        keyring.seal(&ctx, self.export_secret().as_bytes())
    }

    /// Opens a wrapped private key (checking it is this user's).
    pub fn unwrap(keyring: &Keyring, wrapped: &str) -> Result<X25519KeyPair, Error> {
        let user = keyring.user_id();
        let ctx = Context {
            namespace: USER_KEY_NAMESPACE,
            user_id: user,
            row_id: user,
        };
        let text = Zeroizing::new(keyring.open(&ctx, wrapped)?);
        let text = std::str::from_utf8(&text).map_err(|_| Error::Tampered)?;
        X25519KeyPair::from_secret(text)
    }

    /// Opens a box sealed to this key for `ctx`.
    pub fn open(&self, ctx: &Context<'_>, sealed: &str) -> Result<Vec<u8>, Error> {
        let bytes = decode(sealed)?;
        let parsed = Parsed::parse(&bytes)?;
        if parsed.header.namespace != ctx.namespace {
            return Err(Error::WrongContext("namespace"));
        }
        if parsed.header.user_id != ctx.user_id {
            return Err(Error::WrongContext("user"));
        }
        if parsed.header.row_id != ctx.row_id {
            return Err(Error::WrongContext("row"));
        }
        if parsed.header.recipient != *self.public.as_bytes() {
            return Err(Error::WrongContext("recipient"));
        }
        let shared = self
            .secret
            .diffie_hellman(&PublicKey::from(parsed.header.ephemeral));
        if !shared.was_contributory() {
            return Err(Error::Tampered);
        }
        let key = box_key(shared.as_bytes(), parsed.header_bytes);
        let padded = Zeroizing::new(envelope::open(
            &key,
            parsed.header_bytes,
            PURPOSE,
            parsed.sealed,
        )?);
        Ok(pad::unpad(&padded)?.to_vec())
    }
}

fn box_key(shared: &[u8; 32], header: &[u8]) -> Zeroizing<[u8; KEY]> {
    let mut key = Zeroizing::new([0u8; KEY]);
    Hkdf::<Sha256>::new(None, shared)
        .expand_multi_info(&[b"polydev-zk v1 sealed-box", header], key.as_mut())
        .expect("32 bytes is a valid HKDF length");
    key
}

fn check_context(ctx: &Context<'_>) -> Result<(), Error> {
    let ns_ok = !ctx.namespace.is_empty()
        && ctx.namespace.len() <= 64
        && ctx
            .namespace
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    if !ns_ok {
        return Err(Error::InvalidInput("namespace (1-64 of a-z 0-9 . _ -)"));
    }
    for (value, what) in [(ctx.user_id, "user id"), (ctx.row_id, "row id")] {
        if value.is_empty() || value.len() > 128 {
            return Err(Error::InvalidInput(what));
        }
    }
    Ok(())
}

/// Seals `plaintext` for `ctx` to the holder of `recipient` (a public key's text form).
pub fn seal_to(recipient: &str, ctx: &Context<'_>, plaintext: &[u8]) -> Result<String, Error> {
    if plaintext.len() > MAX_PLAINTEXT {
        return Err(Error::TooLarge(MAX_PLAINTEXT));
    }
    check_context(ctx)?;
    let recipient = decode_public_key(recipient)?;
    let ephemeral = X25519KeyPair::generate()?;
    let shared = ephemeral.secret.diffie_hellman(&PublicKey::from(recipient));
    if !shared.was_contributory() {
        return Err(Error::InvalidInput("public key (a low-order point)"));
    }
    let mut header = vec![VERSION, KIND_SEALED_BOX];
    for part in [ctx.namespace, ctx.user_id, ctx.row_id] {
        header.push(part.len() as u8);
        header.extend_from_slice(part.as_bytes());
    }
    header.extend_from_slice(&recipient);
    header.extend_from_slice(ephemeral.public.as_bytes());
    let key = box_key(shared.as_bytes(), &header);
    let padded = Zeroizing::new(pad::pad(plaintext));
    let sealed = envelope::seal(&key, &header, PURPOSE, &padded)?;
    Ok(format!(
        "{PREFIX}{}",
        URL_SAFE_NO_PAD.encode([header, sealed].concat())
    ))
}

/// What anyone can read from a sealed box without the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedHeader {
    pub namespace: String,
    pub user_id: String,
    pub row_id: String,
    pub recipient: [u8; 32],
    pub ephemeral: [u8; 32],
    /// Bytes of ciphertext (padded plaintext + tag).
    pub ciphertext_len: usize,
}

impl SealedHeader {
    pub fn recipient_key(&self) -> String {
        encode_public_key(&self.recipient)
    }
}

/// Reads a sealed box's header without opening it: lets the server check that a job is sealed
/// for the right place and recipient. Never panics.
pub fn inspect_sealed(text: &str) -> Result<SealedHeader, Error> {
    let bytes = decode(text)?;
    Ok(Parsed::parse(&bytes)?.header)
}

fn decode(text: &str) -> Result<Vec<u8>, Error> {
    let body = text
        .strip_prefix(PREFIX)
        .ok_or(Error::Malformed("missing pdzs. prefix"))?;
    if body.len() > (MAX_PLAINTEXT + 64 * 1024) / 3 * 4 {
        return Err(Error::TooLarge(MAX_PLAINTEXT));
    }
    URL_SAFE_NO_PAD
        .decode(body)
        .map_err(|_| Error::Malformed("not base64url"))
}

struct Parsed<'a> {
    header: SealedHeader,
    header_bytes: &'a [u8],
    sealed: &'a [u8],
}

impl<'a> Parsed<'a> {
    fn parse(bytes: &'a [u8]) -> Result<Parsed<'a>, Error> {
        let mut at = 0usize;
        let mut take = |n: usize| -> Result<&'a [u8], Error> {
            let end = at.checked_add(n).ok_or(Error::Malformed("length"))?;
            let out = bytes.get(at..end).ok_or(Error::Malformed("truncated"))?;
            at = end;
            Ok(out)
        };
        let version = take(1)?[0];
        if version != VERSION {
            return Err(Error::UnsupportedVersion(version));
        }
        if take(1)?[0] != KIND_SEALED_BOX {
            return Err(Error::Malformed("not a sealed box"));
        }
        let mut text = |max: usize| -> Result<String, Error> {
            let len = take(1)?[0] as usize;
            if len == 0 || len > max {
                return Err(Error::Malformed("field length"));
            }
            std::str::from_utf8(take(len)?)
                .map(str::to_string)
                .map_err(|_| Error::Malformed("not UTF-8"))
        };
        let namespace = text(64)?;
        let user_id = text(128)?;
        let row_id = text(128)?;
        let recipient: [u8; 32] = take(32)?.try_into().expect("32 bytes");
        let ephemeral: [u8; 32] = take(32)?.try_into().expect("32 bytes");
        let header_bytes = &bytes[..at];
        let sealed = &bytes[at..];
        if sealed.len() < NONCE + TAG {
            return Err(Error::Malformed("truncated"));
        }
        Ok(Parsed {
            header: SealedHeader {
                namespace,
                user_id,
                row_id,
                recipient,
                ephemeral,
                ciphertext_len: sealed.len() - NONCE,
            },
            header_bytes,
            sealed,
        })
    }
}

/// RFC 7748 §6.1: X25519 of Alice's and Bob's keys gives the published shared secret (and
/// their published public keys).
pub fn kat_rfc7748() -> bool {
    let hex32 = |s: &str| -> [u8; 32] {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).expect("valid KAT hex");
        out
    };
    let alice = StaticSecret::from(hex32(
        "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a",
    ));
    let bob = StaticSecret::from(hex32(
        "5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb",
    ));
    let alice_public = PublicKey::from(&alice);
    let bob_public = PublicKey::from(&bob);
    let shared = hex32("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742");
    alice_public.as_bytes()
        == &hex32("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
        && bob_public.as_bytes()
            == &hex32("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
        && alice.diffie_hellman(&bob_public).as_bytes() == &shared
        && bob.diffie_hellman(&alice_public).as_bytes() == &shared
}

#[cfg(test)]
mod tests {
    use super::*;

    const CTX: Context<'static> = Context {
        namespace: "job.command",
        user_id: "u1",
        row_id: "j1",
    };

    #[test]
    fn rfc7748_vectors() {
        assert!(kat_rfc7748());
    }

    #[test]
    fn seal_open_and_every_binding() {
        let agent = X25519KeyPair::generate().unwrap();
        let sealed = seal_to(&agent.public_key(), &CTX, b"echo hi").unwrap();
        assert_eq!(agent.open(&CTX, &sealed).unwrap(), b"echo hi");
        let header = inspect_sealed(&sealed).unwrap();
        assert_eq!(
            (
                header.namespace.as_str(),
                header.user_id.as_str(),
                header.row_id.as_str()
            ),
            ("job.command", "u1", "j1")
        );
        assert_eq!(header.recipient_key(), agent.public_key());
        for (ctx, what) in [
            (
                Context {
                    namespace: "job.stdout",
                    ..CTX
                },
                "namespace",
            ),
            (
                Context {
                    user_id: "u2",
                    ..CTX
                },
                "user",
            ),
            (
                Context {
                    row_id: "j2",
                    ..CTX
                },
                "row",
            ),
        ] {
            assert_eq!(agent.open(&ctx, &sealed), Err(Error::WrongContext(what)));
        }
        let other = X25519KeyPair::generate().unwrap();
        assert_eq!(
            other.open(&CTX, &sealed),
            Err(Error::WrongContext("recipient"))
        );
        // Flip one ciphertext byte: tampered.
        let mut bytes = decode(&sealed).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        let flipped = format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(&bytes));
        assert_eq!(agent.open(&CTX, &flipped), Err(Error::Tampered));
        // A low-order (all-zero) public key is refused.
        assert!(seal_to(&encode_public_key(&[0; 32]), &CTX, b"x").is_err());
        assert!(!format!("{agent:?}").contains(&*agent.export_secret()));
    }

    #[test]
    fn lengths_are_hidden_to_their_bucket() {
        let agent = X25519KeyPair::generate().unwrap();
        let a = inspect_sealed(&seal_to(&agent.public_key(), &CTX, b"a").unwrap()).unwrap();
        let b = inspect_sealed(&seal_to(&agent.public_key(), &CTX, &[b'b'; 50]).unwrap()).unwrap();
        assert_eq!(a.ciphertext_len, b.ciphertext_len);
    }
}
