//! What a sealed chat item holds since the record format: not only its text but where it
//! belongs — its kind, its session, for a message its role and creation time — so a server that
//! moves a message to another session, flips its role or reorders it is caught when the client
//! compares the opened record with the row it came in. The envelope format is unchanged: the
//! record is the envelope's plaintext.
//!
//! Encoding: `\0pdr1\n` followed by the record as JSON (fields in a fixed order). Envelopes of
//! the older format hold the bare UTF-8 text; no stored text starts with a NUL byte (PostgreSQL
//! text cannot hold one), so the two never mix up. [`Opened::Bare`] is such an older envelope:
//! its text is authentic, its place is not bound.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::Error;

const MAGIC: &[u8] = b"\0pdr1\n";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordKind {
    /// A chat message (`chat_messages`, `messages`).
    Message,
    /// A session's texts (`chat_sessions.title`; `sessions.name`, `description`,
    /// `system_prompt`).
    Session,
}

/// One sealed chat item and its place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    pub kind: RecordKind,
    /// The session the item belongs to (a session's own id for [`RecordKind::Session`]).
    pub session: String,
    /// Messages: `user`, `assistant` or `system`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// Messages: the creation time stored in the row, microseconds since the Unix epoch (UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at_us: Option<i64>,
    /// Messages: the text. Sessions: the title (`chat_sessions.title`, `sessions.name`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// Sessions of the `sessions` system: `description`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Sessions of the `sessions` system: `system_prompt`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_prompt: Option<String>,
}

impl Record {
    pub fn message(session: &str, role: &str, created_at_us: i64, text: &str) -> Record {
        Record {
            kind: RecordKind::Message,
            session: session.to_string(),
            role: Some(role.to_string()),
            created_at_us: Some(created_at_us),
            text: Some(text.to_string()),
            description: None,
            system_prompt: None,
        }
    }

    pub fn session(
        session: &str,
        title: Option<&str>,
        description: Option<&str>,
        system_prompt: Option<&str>,
    ) -> Record {
        Record {
            kind: RecordKind::Session,
            session: session.to_string(),
            role: None,
            created_at_us: None,
            text: title.map(str::to_string),
            description: description.map(str::to_string),
            system_prompt: system_prompt.map(str::to_string),
        }
    }

    /// The bytes that are sealed.
    pub fn encode(&self) -> Vec<u8> {
        let json = serde_json::to_vec(self).expect("a record serializes");
        [MAGIC, &json].concat()
    }

    /// SHA-256 (hex) of [`Record::encode`]: what the migration manifest lists.
    pub fn hash(&self) -> String {
        hex::encode(Sha256::digest(self.encode()))
    }
}

/// An opened chat item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opened {
    /// The record format: text and place.
    Record(Record),
    /// The older format: the text alone, its place not bound.
    Bare(String),
}

impl Opened {
    pub fn decode(bytes: &[u8]) -> Result<Opened, Error> {
        match bytes.strip_prefix(MAGIC) {
            Some(json) => serde_json::from_slice(json)
                .map(Opened::Record)
                .map_err(|_| Error::Malformed("record")),
            None => String::from_utf8(bytes.to_vec())
                .map(Opened::Bare)
                .map_err(|_| Error::Malformed("the plaintext is not UTF-8 text")),
        }
    }

    /// The text (a message's; a session's title).
    pub fn text(&self) -> Option<&str> {
        match self {
            Opened::Record(record) => record.text.as_deref(),
            Opened::Bare(text) => Some(text),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_and_bare_text_are_told_apart() {
        let record = Record::message("s1", "user", 1_700_000_000_123_456, "hello\0?");
        let encoded = record.encode();
        assert_eq!(
            Opened::decode(&encoded).unwrap(),
            Opened::Record(record.clone())
        );
        assert_eq!(
            Opened::decode(b"{\"kind\":\"message\"}").unwrap(),
            Opened::Bare("{\"kind\":\"message\"}".into())
        );
        assert!(Opened::decode(b"\0pdr1\n{\"kind\":\"nope\"}").is_err());
        assert_eq!(record.hash().len(), 64);
        assert_ne!(
            record.hash(),
            Record::message("s2", "user", 1_700_000_000_123_456, "hello\0?").hash()
        );
    }
}
