//! The migration manifest: when zero-knowledge is turned on, the client lists the plaintext rows
//! it sees (messages and session texts: ids and the SHA-256 of the record it will seal), seals
//! the list under the account key in chunks (`zk.manifest`, row = the chunk number; each chunk
//! says how many there are) and stores it. The migration seals only rows the manifest lists with
//! the same hash; a row injected or changed later is reported, never sealed into a genuine
//! envelope. History shows plaintext only if the manifest lists it.

use std::collections::HashMap;

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use polydev_zk::{Context as ZkContext, Keyring, Record, RecordKind};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::ZkClient;
use crate::api::{ManifestStored, MessageBatch};
use crate::chat::System;
use crate::chat::migration::{Plaintext, PlaintextSession};
use crate::zk::{MANIFEST, ManifestChunk};

/// Entries per chunk (about 110 bytes each as JSON).
const PER_CHUNK: usize = 4000;

/// One listed row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub system: System,
    pub kind: RecordKind,
    pub id: Uuid,
    /// `Record::hash` of the record the migration will seal for this row.
    pub hash: String,
}

/// A chunk's plaintext.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Chunk {
    v: u8,
    chunk: u64,
    total: u64,
    entries: Vec<Entry>,
}

/// The manifest, opened.
#[derive(Debug, Clone, Default)]
pub struct Manifest {
    entries: HashMap<(System, RecordKind, Uuid), String>,
    pub chunks: u64,
    /// SHA-256 over the entries in order: what the pin remembers.
    pub digest: String,
}

impl Manifest {
    fn new(list: Vec<Entry>, chunks: u64) -> Manifest {
        let mut hash = Sha256::new();
        for e in &list {
            hash.update(
                serde_json::to_vec(e)
                    .expect("an entry serializes")
                    .as_slice(),
            );
            hash.update(b"\n");
        }
        Manifest {
            entries: list
                .into_iter()
                .map(|e| ((e.system, e.kind, e.id), e.hash))
                .collect(),
            chunks,
            digest: hex::encode(hash.finalize()),
        }
    }

    /// Whether the manifest lists this row with this record.
    pub fn lists(&self, system: System, id: Uuid, record: &Record) -> bool {
        self.entries
            .get(&(system, record.kind, id))
            .is_some_and(|hash| *hash == record.hash())
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Microseconds since the Unix epoch, as records bind them.
pub fn micros(at: Option<DateTime<Utc>>) -> Option<i64> {
    at.map(|t| t.timestamp_micros())
}

/// The record the migration seals for a plaintext message.
pub fn message_record(
    session_id: Uuid,
    role: Option<&str>,
    created_at: Option<DateTime<Utc>>,
    text: &str,
) -> Record {
    Record {
        kind: RecordKind::Message,
        session: session_id.to_string(),
        role: role.map(str::to_string),
        created_at_us: micros(created_at),
        text: Some(text.to_string()),
        description: None,
        system_prompt: None,
    }
}

/// The record the migration seals for a session's texts.
pub fn session_record(
    id: Uuid,
    title: Option<&str>,
    description: Option<&str>,
    system_prompt: Option<&str>,
) -> Record {
    Record::session(&id.to_string(), title, description, system_prompt)
}

impl ZkClient {
    /// Every plaintext message and session text, as the migration would seal them.
    async fn inventory(&self) -> anyhow::Result<Vec<Entry>> {
        let mut entries = Vec::new();
        for system in [System::Chat, System::Sessions] {
            let name = system_name(system);
            let mut after: Option<Uuid> = None;
            loop {
                let path = page("/v1/zk/migration/plaintext", name, after);
                let batch: MessageBatch<Plaintext> = self.api.get(&path).await?;
                let Some(last) = batch.messages.last() else {
                    break;
                };
                after = Some(last.id);
                entries.extend(batch.messages.iter().map(|row| {
                    Entry {
                        system,
                        kind: RecordKind::Message,
                        id: row.id,
                        hash: message_record(
                            row.session_id,
                            row.role.as_deref(),
                            row.created_at,
                            &row.content,
                        )
                        .hash(),
                    }
                }));
            }
            let mut after: Option<Uuid> = None;
            loop {
                let path = page("/v1/zk/migration/sessions", name, after);
                let batch: MessageBatch<PlaintextSession> = self.api.get(&path).await?;
                let Some(last) = batch.messages.last() else {
                    break;
                };
                after = Some(last.id);
                entries.extend(batch.messages.iter().map(|row| {
                    Entry {
                        system,
                        kind: RecordKind::Session,
                        id: row.id,
                        hash: session_record(
                            row.id,
                            row.title.as_deref(),
                            row.description.as_deref(),
                            row.system_prompt.as_deref(),
                        )
                        .hash(),
                    }
                }));
            }
        }
        Ok(entries)
    }

    /// Lists what is in plaintext now, seals the list and stores it (write-once chunks).
    pub(super) async fn record_manifest(&self, keyring: &Keyring) -> anyhow::Result<Manifest> {
        let entries = self.inventory().await?;
        let pieces: Vec<&[Entry]> = if entries.is_empty() {
            vec![&[]]
        } else {
            entries.chunks(PER_CHUNK).collect()
        };
        let total = pieces.len() as u64;
        let user_id = keyring.user_id().to_string();
        let mut sealed = Vec::with_capacity(pieces.len());
        for (i, piece) in pieces.iter().enumerate() {
            let body = serde_json::to_vec(&Chunk {
                v: 1,
                chunk: i as u64,
                total,
                entries: piece.to_vec(),
            })?;
            let row = i.to_string();
            let ctx = ZkContext {
                namespace: MANIFEST,
                user_id: &user_id,
                row_id: &row,
            };
            sealed.push(ManifestChunk {
                chunk: i as i64,
                envelope: keyring.seal(&ctx, &body)?,
            });
        }
        for batch in sealed.chunks(8) {
            let _: ManifestStored = self.post_proved("/v1/zk/manifest", batch, keyring).await?;
        }
        Ok(Manifest::new(entries, total))
    }

    /// The stored manifest, opened and checked (every chunk present, each bound to its number
    /// and agreeing on the count); `None` if there is none.
    pub(super) async fn load_manifest(
        &self,
        keyring: &Keyring,
    ) -> anyhow::Result<Option<Manifest>> {
        let chunks: Vec<ManifestChunk> = self.api.get("/v1/zk/manifest").await?;
        if chunks.is_empty() {
            return Ok(None);
        }
        let user_id = keyring.user_id().to_string();
        let mut entries = Vec::new();
        let mut total = None;
        for (i, stored) in chunks.iter().enumerate() {
            let row = stored.chunk.to_string();
            let ctx = ZkContext {
                namespace: MANIFEST,
                user_id: &user_id,
                row_id: &row,
            };
            let opened = keyring
                .open(&ctx, &stored.envelope)
                .with_context(|| format!("manifest chunk {} does not open", stored.chunk))?;
            let chunk: Chunk =
                serde_json::from_slice(&opened).context("a manifest chunk is malformed")?;
            if chunk.chunk != i as u64 || stored.chunk != i as i64 {
                bail!("the server serves the manifest with chunk {i} missing or out of place");
            }
            if *total.get_or_insert(chunk.total) != chunk.total {
                bail!("the manifest's chunks disagree on their number");
            }
            entries.extend(chunk.entries);
        }
        let total = total.unwrap_or(0);
        if total != chunks.len() as u64 {
            bail!(
                "the server serves {} of the manifest's {total} chunks",
                chunks.len()
            );
        }
        Ok(Some(Manifest::new(entries, total)))
    }
}

pub(super) fn system_name(system: System) -> &'static str {
    match system {
        System::Chat => "chat",
        System::Sessions => "sessions",
    }
}

/// `path?system=…&after=…&limit=500`
pub(super) fn page(path: &str, system: &str, after: Option<Uuid>) -> String {
    match after {
        Some(after) => format!("{path}?system={system}&after={after}&limit=500"),
        None => format!("{path}?system={system}&limit=500"),
    }
}
