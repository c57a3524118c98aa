//! The client side of zero-knowledge, for `polydev zk ...`: it talks to a polydev server over
//! HTTP with the user's token and does all the cryptography locally (`polydev_zk`), so the
//! server never sees the master password, the keys or the plaintext it encrypts.

use std::ops::ControlFlow;

use anyhow::{Context, bail};
use polydev_zk::{Context as ZkContext, KdfParams, KeyMaterial, Keyring, RecoveryKey};
use sha2::{Digest, Sha256};

use super::ApiClient;
use crate::api::{Cleared, MessageBatch, ReplaceKeyMaterial, Reset, Stored, Written};
use crate::chat::migration::{EncryptedWrite, Item, Plaintext, Status, Unverified};
use crate::zk::{CHAT_MESSAGE, ZkStatus};

pub struct ZkClient {
    api: ApiClient,
}

/// What one run of the migration did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MigrationReport {
    pub encrypted: u64,
    pub verified_and_cleared: u64,
    /// Rows whose envelope did not match their plaintext: put back in the queue.
    pub reset: u64,
    /// Rows that changed while being encrypted: picked up again.
    pub retried: u64,
}

/// How to open the account before changing its password.
#[derive(Debug, Clone, Copy)]
pub enum Unlock<'a> {
    Password(&'a str),
    RecoveryKey(&'a str),
}

/// Where a migration run may be stopped (tests use it to simulate a crash between steps).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// A batch was encrypted and written; not yet verified.
    Written,
    /// A batch was verified and its plaintext cleared.
    Cleared,
}

impl ZkClient {
    pub fn new(base: &str, token: &str) -> ZkClient {
        ZkClient {
            api: ApiClient::new(base, token),
        }
    }

    pub async fn user_id(&self) -> anyhow::Result<String> {
        Ok(self.api.me().await?.user.user_id.to_string())
    }

    pub async fn status(&self) -> anyhow::Result<ZkStatus> {
        self.api.get("/v1/zk").await
    }

    pub async fn migration_status(&self) -> anyhow::Result<Status> {
        self.api.get("/v1/zk/migration").await
    }

    /// Turns zero-knowledge on; returns the keyring and the recovery key to show once.
    pub async fn enable(
        &self,
        password: &str,
        params: KdfParams,
    ) -> anyhow::Result<(Keyring, RecoveryKey)> {
        let user_id = self.user_id().await?;
        let (keyring, material, recovery) = Keyring::setup(password, &user_id, params)?;
        let () = self.api.post("/v1/zk/enable", &material).await?;
        Ok((keyring, recovery))
    }

    /// The stored key material and the caller's user id.
    async fn material(&self) -> anyhow::Result<(KeyMaterial, String)> {
        let user_id = self.user_id().await?;
        let material = self
            .status()
            .await?
            .material
            .context("zero-knowledge is not enabled for this account")?;
        Ok((material, user_id))
    }

    pub async fn unlock(&self, password: &str) -> anyhow::Result<Keyring> {
        let (material, user_id) = self.material().await?;
        Ok(Keyring::unlock(&material, password, &user_id)?)
    }

    /// Replaces one envelope of the stored material (compare-and-swap on `previous`).
    async fn replace(
        &self,
        path: &str,
        previous: &str,
        material: &KeyMaterial,
    ) -> anyhow::Result<()> {
        let body = ReplaceKeyMaterial {
            previous: previous.to_string(),
            material: material.clone(),
        };
        self.api.put(path, &body).await
    }

    /// A new master password; `unlock` opens the account with the current password or, after a
    /// forgotten one, with the recovery key. Re-wraps one key; no data is re-encrypted.
    pub async fn set_password(
        &self,
        unlock: Unlock<'_>,
        new_password: &str,
    ) -> anyhow::Result<Keyring> {
        let (material, user_id) = self.material().await?;
        let keyring = match unlock {
            Unlock::Password(password) => Keyring::unlock(&material, password, &user_id)?,
            Unlock::RecoveryKey(key) => Keyring::unlock_with_recovery(&material, key, &user_id)?,
        };
        let changed = keyring.change_password(&material, new_password, KdfParams::DEFAULT)?;
        self.replace("/v1/zk/password", &material.password_wrapped, &changed)
            .await?;
        Ok(keyring)
    }

    /// A new recovery key (the old one stops working); returns it to show once.
    pub async fn new_recovery_key(&self, password: &str) -> anyhow::Result<RecoveryKey> {
        let (material, user_id) = self.material().await?;
        let keyring = Keyring::unlock(&material, password, &user_id)?;
        let (replaced, recovery) = keyring.replace_recovery_key(&material)?;
        self.replace("/v1/zk/recovery", &material.recovery_wrapped, &replaced)
            .await?;
        Ok(recovery)
    }

    /// Runs the migration to the end (or until `stop` says so after a step), reporting progress.
    /// Safe to interrupt anywhere and run again.
    pub async fn migrate(
        &self,
        keyring: &Keyring,
        batch: usize,
        mut progress: impl FnMut(&Status),
        mut stop: impl FnMut(Step) -> ControlFlow<()>,
    ) -> anyhow::Result<MigrationReport> {
        let user_id = keyring.user_id().to_string();
        let mut report = MigrationReport::default();
        let mut stalled = 0;
        loop {
            let before = report.clone();
            // 1. Verify what is encrypted but still has its plaintext (this run's last batch, or
            //    an interrupted run's), then clear those plaintexts.
            let unverified: MessageBatch<Unverified> = self
                .api
                .get(&format!("/v1/zk/migration/unverified?limit={batch}"))
                .await?;
            let (mut good, mut bad) = (Vec::new(), Vec::new());
            for row in &unverified.messages {
                let item = Item {
                    system: row.system.context("row without its chat system")?,
                    id: row.id,
                };
                let ctx = ZkContext {
                    namespace: CHAT_MESSAGE,
                    user_id: &user_id,
                    row_id: &row.id.to_string(),
                };
                match keyring.open(&ctx, &row.encrypted_content) {
                    Ok(plaintext) if plaintext == row.content.as_bytes() => good.push(item),
                    _ => bad.push(item),
                }
            }
            if !good.is_empty() {
                let cleared: Cleared = self.api.post("/v1/zk/migration/clear", &good).await?;
                report.verified_and_cleared += cleared.cleared;
            }
            if !bad.is_empty() {
                let reset: Reset = self.api.post("/v1/zk/migration/reset", &bad).await?;
                report.reset += reset.reset;
            }
            if !good.is_empty() && stop(Step::Cleared).is_break() {
                return Ok(report);
            }

            // 2. Encrypt the next batch of plaintext locally and write it with compare-and-swap.
            let plaintext: MessageBatch<Plaintext> = self
                .api
                .get(&format!("/v1/zk/migration/plaintext?limit={batch}"))
                .await?;
            if plaintext.messages.is_empty() && unverified.messages.is_empty() {
                progress(&self.migration_status().await?);
                return Ok(report);
            }
            let mut writes = Vec::with_capacity(plaintext.messages.len());
            for row in &plaintext.messages {
                let ctx = ZkContext {
                    namespace: CHAT_MESSAGE,
                    user_id: &user_id,
                    row_id: &row.id.to_string(),
                };
                writes.push(EncryptedWrite {
                    system: row.system.context("row without its chat system")?,
                    id: row.id,
                    content_sha256: hex::encode(Sha256::digest(row.content.as_bytes())),
                    encrypted_content: keyring.seal(&ctx, row.content.as_bytes())?,
                });
            }
            if report == before {
                stalled += 1;
                if stalled >= 3 {
                    bail!(
                        "the migration makes no progress: {} rows keep changing while being encrypted",
                        writes.len()
                    );
                }
            } else {
                stalled = 0;
            }
            if !writes.is_empty() {
                let written: Written = self.api.post("/v1/zk/migration/encrypted", &writes).await?;
                report.encrypted += written.written.len() as u64;
                report.retried += (writes.len() - written.written.len()) as u64;
                progress(&self.migration_status().await?);
                if stop(Step::Written).is_break() {
                    return Ok(report);
                }
            }
        }
    }
}

/// What moving the credentials did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CredentialReport {
    pub moved: u64,
    pub verified_and_cleared: u64,
    /// Legacy rows the server could not decrypt (left where they are, with the reason).
    pub unreadable: Vec<crate::vault::Unreadable>,
}

impl ZkClient {
    /// Moves the caller's provider and CLI credentials to client-side keys: the server hands
    /// each legacy credential over once, it is sealed here and stored, then every stored
    /// envelope is opened to verify it before the legacy ciphertext is cleared.
    pub async fn migrate_credentials(&self, keyring: &Keyring) -> anyhow::Result<CredentialReport> {
        use crate::vault::{CredentialRef, HandOver, Sealed};
        use base64::Engine;
        let user_id = keyring.user_id().to_string();
        let mut report = CredentialReport::default();
        let mut held = std::collections::HashMap::new();
        let mut from = String::new();
        loop {
            let batch: HandOver = self
                .api
                .post(&format!("/v1/zk/credentials/hand-over?limit=50{from}"), &())
                .await?;
            report.unreadable.extend(batch.unreadable);
            let mut sealed = Vec::with_capacity(batch.credentials.len());
            for h in batch.credentials {
                let plaintext = zeroize::Zeroizing::new(
                    base64::engine::general_purpose::STANDARD
                        .decode(&h.plaintext)
                        .map_err(|_| anyhow::anyhow!("credential is not base64"))?,
                );
                let row = h.credential_id.to_string();
                let ctx = ZkContext {
                    namespace: h.table.namespace(),
                    user_id: &user_id,
                    row_id: &row,
                };
                sealed.push(Sealed {
                    table: h.table,
                    credential_id: h.credential_id,
                    envelope: keyring.seal(&ctx, &plaintext)?,
                });
                held.insert(h.credential_id, plaintext);
            }
            let stored: Stored = self
                .api
                .post("/v1/zk/credentials/encrypted", &sealed)
                .await?;
            report.moved += stored.stored.len() as u64;
            match batch.next {
                Some(next) => from = format!("&table={}&after={}", next.table.as_str(), next.after),
                None => break,
            }
        }
        let mut verified = Vec::new();
        for s in self.api.get::<Vec<Sealed>>("/v1/zk/credentials").await? {
            let row = s.credential_id.to_string();
            let ctx = ZkContext {
                namespace: s.table.namespace(),
                user_id: &user_id,
                row_id: &row,
            };
            let opened = keyring.open(&ctx, &s.envelope)?;
            // Compare with what was handed over in this run; an envelope from an earlier run
            // is verified by opening (it authenticates what this user's client sealed).
            if held
                .get(&s.credential_id)
                .is_none_or(|p| p.as_slice() == opened.as_slice())
            {
                verified.push(CredentialRef {
                    table: s.table,
                    credential_id: s.credential_id,
                });
            }
        }
        if !verified.is_empty() {
            let cleared: Cleared = self.api.post("/v1/zk/credentials/clear", &verified).await?;
            report.verified_and_cleared = cleared.cleared;
        }
        Ok(report)
    }
}
