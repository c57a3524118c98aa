//! The fast path of the message migration: several batches in flight, sealing on several
//! threads, and verification that does not read back what was just written.
//!
//! For each batch of plaintext messages (read in order with the `after` cursor, the next page
//! while the previous ones are being sealed and written):
//! 1. seal each listed row as a record and open the envelope again locally, comparing it with
//!    the record (a bad seal is never sent);
//! 2. `POST /v1/zk/migration/encrypted` (compare-and-swap, as ever); the answer lists, for each
//!    row written, the SHA-256 of the envelope as PostgreSQL stored it;
//! 3. the rows whose stored envelope is byte for byte the one sealed and opened in step 1 are
//!    verified: `POST /v1/zk/migration/clear` (with the proof); the others are reset (their
//!    plaintext kept) and come back in a later pass.
//!
//! The guarantees are those of the slow path: nothing is cleared before the envelope the server
//! holds was shown to open to the row's record; nothing is encrypted twice (the write needs
//! `NOT migrated_to_zk`); stopping anywhere (or a crash) leaves rows that are plaintext, or
//! sealed and unverified (the slow path verifies those by reading them back on the next run).

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use futures_util::stream::{self, FuturesUnordered, StreamExt, TryStreamExt};
use polydev_zk::{Context as ZkContext, Keyring};
use sha2::{Digest, Sha256};
use uuid::Uuid;
use zeroize::Zeroizing;

use super::manifest::{Manifest, message_record, page, system_name};
use super::{MigrationReport, Step, ZkClient, limited};
use crate::api::{Cleared, MessageBatch, Reset, Written};
use crate::chat::System;
use crate::chat::migration::{EncryptedWrite, Item, Plaintext, Status};
use crate::zk::CHAT_MESSAGE;

/// Batches in flight at once (reading, sealing and writing overlap; the clears run beside).
const IN_FLIGHT: usize = 3;

/// One batch sealed and written.
struct WrittenBatch {
    encrypted: u64,
    retried: u64,
    not_in_manifest: Vec<Uuid>,
    /// Stored as sealed: to clear.
    verified: Vec<Item>,
    /// Stored otherwise: to reset.
    mismatched: Vec<Item>,
}

/// One row sealed: what is sent, and the hash of the envelope to expect back.
pub(super) struct Sealed {
    pub(super) write: EncryptedWrite,
    envelope_sha256: String,
}

/// Seals `rows` (those the manifest lists) and checks each envelope opens to its record. On
/// several threads when the batch is large enough to be worth it.
pub(super) fn seal_rows(
    keyring: &Keyring,
    user_id: &str,
    manifest: &Manifest,
    rows: &[Plaintext],
) -> anyhow::Result<(Vec<Sealed>, Vec<Uuid>)> {
    let seal_one = |row: &Plaintext| -> anyhow::Result<Result<Sealed, Uuid>> {
        let system = row.system.context("row without its chat system")?;
        let record = message_record(
            row.session_id,
            row.role.as_deref(),
            row.created_at,
            &row.content,
        );
        if !manifest.lists(system, row.id, &record) {
            return Ok(Err(row.id));
        }
        let row_id = row.id.to_string();
        let ctx = ZkContext {
            namespace: CHAT_MESSAGE,
            user_id,
            row_id: &row_id,
        };
        let encoded = Zeroizing::new(record.encode());
        let envelope = keyring.seal(&ctx, &encoded)?;
        // Verify before anything leaves: the envelope opens to the very record.
        let opened = Zeroizing::new(keyring.open(&ctx, &envelope)?);
        anyhow::ensure!(
            *opened == *encoded,
            "an envelope did not open to what was sealed (row {})",
            row.id
        );
        Ok(Ok(Sealed {
            envelope_sha256: hex::encode(Sha256::digest(envelope.as_bytes())),
            write: EncryptedWrite {
                system,
                id: row.id,
                content_sha256: hex::encode(Sha256::digest(row.content.as_bytes())),
                encrypted_content: envelope,
            },
        }))
    };
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(rows.len().div_ceil(64))
        .max(1);
    let results: Vec<anyhow::Result<Result<Sealed, Uuid>>> = if threads == 1 {
        rows.iter().map(seal_one).collect()
    } else {
        let chunk = rows.len().div_ceil(threads);
        std::thread::scope(|scope| {
            let handles: Vec<_> = rows
                .chunks(chunk)
                .map(|part| scope.spawn(move || part.iter().map(seal_one).collect::<Vec<_>>()))
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().expect("a sealing thread panicked"))
                .collect()
        })
    };
    let (mut sealed, mut skipped) = (Vec::with_capacity(rows.len()), Vec::new());
    for result in results {
        match result? {
            Ok(s) => sealed.push(s),
            Err(id) => skipped.push(id),
        }
    }
    Ok((sealed, skipped))
}

impl ZkClient {
    /// Seals and writes one batch, and sorts what was written into verified and mismatched.
    async fn write_batch(
        &self,
        keyring: &Keyring,
        user_id: &str,
        manifest: &Manifest,
        rows: Vec<Plaintext>,
    ) -> anyhow::Result<WrittenBatch> {
        let (sealed, not_in_manifest) = seal_rows(keyring, user_id, manifest, &rows)?;
        let mut batch = WrittenBatch {
            encrypted: 0,
            retried: 0,
            not_in_manifest,
            verified: Vec::new(),
            mismatched: Vec::new(),
        };
        if sealed.is_empty() {
            return Ok(batch);
        }
        let writes: Vec<&EncryptedWrite> = sealed.iter().map(|s| &s.write).collect();
        let written: Written = self.api.post("/v1/zk/migration/encrypted", &writes).await?;
        batch.encrypted = written.written.len() as u64;
        batch.retried = (sealed.len() - written.written.len()) as u64;
        if written.envelope_sha256.len() != written.written.len() {
            // A server that does not say what it stored: the written rows stay unverified and
            // the slow path reads them back.
            return Ok(batch);
        }
        let expected: HashMap<Uuid, &Sealed> = sealed.iter().map(|s| (s.write.id, s)).collect();
        for (id, stored) in written.written.iter().zip(&written.envelope_sha256) {
            let Some(sent) = expected.get(id) else {
                anyhow::bail!("the server says it wrote row {id}, which was not sent");
            };
            let item = Item {
                system: sent.write.system,
                id: *id,
            };
            if *stored == sent.envelope_sha256 {
                batch.verified.push(item);
            } else {
                batch.mismatched.push(item);
            }
        }
        Ok(batch)
    }

    /// Clears the verified rows of a batch and resets the mismatched ones: (cleared, reset).
    async fn settle_batch(
        &self,
        keyring: &Keyring,
        verified: Vec<Item>,
        mismatched: Vec<Item>,
    ) -> anyhow::Result<(u64, u64)> {
        let mut cleared = 0;
        if !verified.is_empty() {
            let done: Cleared = self
                .post_proved("/v1/zk/migration/clear", &verified, keyring)
                .await?;
            cleared = done.cleared;
        }
        let mut reset = 0;
        if !mismatched.is_empty() {
            let done: Reset = self.api.post("/v1/zk/migration/reset", &mismatched).await?;
            reset = done.reset;
        }
        Ok((cleared, reset))
    }

    /// Moves every plaintext message the manifest lists (both chat systems), `IN_FLIGHT`
    /// batches at a time. `Break` if `stop` said so.
    pub(super) async fn migrate_messages_pipelined(
        &self,
        keyring: &Keyring,
        manifest: &Manifest,
        batch: usize,
        report: &mut MigrationReport,
        progress: &mut impl FnMut(&Status),
        stop: &mut impl FnMut(Step) -> ControlFlow<()>,
    ) -> anyhow::Result<ControlFlow<()>> {
        let user_id = keyring.user_id();
        // Counted here as the batches go (a count on the server reads every row).
        let mut status = self.migration_status().await?;
        // Once `stop` says so, no new page is read, and what is in flight is let finish (its
        // results counted, nothing more cleared): a request dropped half-way could leave the
        // server's transaction open until its connection is used again.
        let stopping = AtomicBool::new(false);
        let stopping = &stopping;
        // The pages, one after the other (each starts after the last id of the previous).
        let pages = stream::try_unfold(
            (vec![System::Chat, System::Sessions], None::<Uuid>),
            move |(mut systems, mut after)| async move {
                while let Some(&system) = systems.first() {
                    if stopping.load(Ordering::Relaxed) {
                        break;
                    }
                    let path = limited(
                        page("/v1/zk/migration/plaintext", system_name(system), after),
                        batch,
                    );
                    let rows: MessageBatch<Plaintext> = self.api.get(&path).await?;
                    match rows.messages.last().map(|row| row.id) {
                        // This system is done: on with the next.
                        None => {
                            systems.remove(0);
                            after = None;
                        }
                        Some(last) => return Ok(Some((rows.messages, (systems, Some(last))))),
                    }
                }
                Ok::<_, anyhow::Error>(None)
            },
        );
        let written = pages
            .map_ok(|rows| self.write_batch(keyring, user_id, manifest, rows))
            .try_buffered(IN_FLIGHT);
        futures_util::pin_mut!(written);
        let mut settling = FuturesUnordered::new();
        let mut writes_done = false;
        let mut stopped = false;
        let mut first_error = None;
        loop {
            tokio::select! {
                next = written.next(), if !writes_done => match next {
                    None => writes_done = true,
                    Some(Err(e)) => {
                        // Let the rest finish, then report the first error.
                        stopping.store(true, Ordering::Relaxed);
                        first_error.get_or_insert(e);
                    }
                    Some(Ok(batch)) => {
                        report.encrypted += batch.encrypted;
                        report.retried += batch.retried;
                        report.not_in_manifest.extend(batch.not_in_manifest);
                        status.plaintext -= batch.encrypted as i64;
                        status.unverified += batch.encrypted as i64;
                        if stopped || first_error.is_some() {
                            // Written and left unverified: the next run verifies it.
                            continue;
                        }
                        if batch.encrypted > 0 {
                            progress(&status);
                            if stop(Step::Written).is_break() {
                                stopped = true;
                                stopping.store(true, Ordering::Relaxed);
                                continue;
                            }
                        }
                        if !batch.verified.is_empty() || !batch.mismatched.is_empty() {
                            settling.push(self.settle_batch(keyring, batch.verified, batch.mismatched));
                        }
                    }
                },
                Some(result) = settling.next(), if !settling.is_empty() => match result {
                    Err(e) => {
                        stopping.store(true, Ordering::Relaxed);
                        first_error.get_or_insert(e);
                    }
                    Ok((cleared, reset)) => {
                        report.verified_and_cleared += cleared;
                        report.reset += reset;
                        status.unverified -= (cleared + reset) as i64;
                        status.done += cleared as i64;
                        status.plaintext += reset as i64;
                        if cleared > 0 && !stopped && first_error.is_none() {
                            progress(&status);
                            if stop(Step::Cleared).is_break() {
                                stopped = true;
                                stopping.store(true, Ordering::Relaxed);
                            }
                        }
                    }
                },
                else => break,
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        if stopped {
            return Ok(ControlFlow::Break(()));
        }
        Ok(ControlFlow::Continue(()))
    }
}
