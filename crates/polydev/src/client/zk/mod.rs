//! The client side of zero-knowledge, for `polydev zk ...`: it talks to a polydev server over
//! HTTP with the user's token and does all the cryptography locally (`polydev_zk`), so the
//! server never sees the master password, the keys or the plaintext it encrypts.
//!
//! It does not trust the server either (docs/crypto.md, threat model):
//! - it pins what it saw of the account's keys ([`pins`]) and refuses a server that turns
//!   zero-knowledge off, serves older or other key material, or weaker KDF parameters;
//! - it proves the master password to the server with a separate HKDF output
//!   ([`polydev_zk::AuthProof`]) for every change that needs the owner;
//! - it records which plaintext rows existed when zero-knowledge was turned on ([`manifest`])
//!   and seals only those;
//! - it seals whole records (text, role, session, creation time) and checks them against the
//!   row they come in ([`history`]), and never shows plaintext served for an account with
//!   zero-knowledge on as the user's.

mod connect;
pub mod history;
pub mod manifest;
pub mod pins;
mod pipeline;
pub mod rotate;

use std::ops::ControlFlow;

use anyhow::{Context, bail};
use polydev_zk::{
    Context as ZkContext, Error as ZkError, KdfParams, KeyMaterial, Keyring, Opened, ProofKind,
    Record, RecoveryKey,
};
use reqwest::Method;
use serde::Serialize;
use serde::de::DeserializeOwned;
use uuid::Uuid;

use super::ApiClient;
use crate::api::{Cleared, MessageBatch, ReplaceKeyMaterial, Reset, Stored, Written};
use crate::chat::System;
use crate::chat::migration::{
    EncryptedSession, EncryptedWrite, Item, Plaintext, PlaintextSession, Status, Unverified,
    UnverifiedSession,
};
use crate::zk::{
    CHAT_MESSAGE, CHAT_SESSION, Enable, PROOF_HEADER, RECOVERY_PROOF_HEADER, RegisterProofs,
    Registered, ZkStatus,
};
use manifest::{Manifest, message_record, page, session_record, system_name};
use pins::{ManifestPin, Pin, PinStore};

/// The server answered with key material (or a zero-knowledge state) that contradicts what this
/// machine pinned: it changed the account's keys. Never reported as a wrong password.
#[derive(Debug, thiserror::Error)]
#[error(
    "the server changed this account's keys: {0}. Refusing to continue; your master password is not the problem. If you changed them yourself, or restored the server from a backup, check it and run `polydev zk forget-pin`"
)]
pub struct KeysChanged(pub String);

pub struct ZkClient {
    api: ApiClient,
    pins: PinStore,
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
    /// Session texts sealed (title; name, description, system prompt).
    pub sessions_encrypted: u64,
    pub sessions_verified_and_cleared: u64,
    /// Plaintext rows the manifest does not list (injected, or changed, after zero-knowledge
    /// was turned on): left alone, never sealed.
    pub not_in_manifest: Vec<Uuid>,
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

/// The proof headers for a keyring's proof.
fn proof_headers(keyring: &Keyring) -> [(&'static str, String); 1] {
    let proof = keyring.proof();
    let name = match proof.kind() {
        ProofKind::Password => PROOF_HEADER,
        ProofKind::Recovery => RECOVERY_PROOF_HEADER,
    };
    [(name, proof.to_hex())]
}

/// Checks the server's zero-knowledge state against this machine's pin.
fn check_pin(pin: &Pin, status: &ZkStatus) -> Result<(), KeysChanged> {
    if !status.enabled {
        return Err(KeysChanged(format!(
            "it now says zero-knowledge is off for this account, but this machine saw it on (key material version {})",
            pin.version
        )));
    }
    let Some(material) = &status.material else {
        return Err(KeysChanged(
            "it says zero-knowledge is on but serves no key material".into(),
        ));
    };
    if status.version < pin.version {
        return Err(KeysChanged(format!(
            "it serves key material version {} but this machine already saw version {}: an older copy",
            status.version, pin.version
        )));
    }
    if status.version == pin.version && material.fingerprint() != pin.fingerprint {
        return Err(KeysChanged(format!(
            "at version {} it serves other key material than this machine saw (fingerprint {} instead of {})",
            status.version,
            &material.fingerprint()[..16],
            &pin.fingerprint[..pin.fingerprint.len().min(16)]
        )));
    }
    let kdf = material
        .kdf_params()
        .map_err(|e| KeysChanged(format!("its password envelope is unreadable ({e})")))?;
    if kdf.memory_kib < pin.kdf.memory_kib
        || kdf.iterations < pin.kdf.iterations
        || kdf.parallelism != pin.kdf.parallelism
    {
        return Err(KeysChanged(format!(
            "it serves different key derivation parameters (Argon2id m={} KiB, t={}, p={}) than this machine saw (m={} KiB, t={}, p={})",
            kdf.memory_kib,
            kdf.iterations,
            kdf.parallelism,
            pin.kdf.memory_kib,
            pin.kdf.iterations,
            pin.kdf.parallelism
        )));
    }
    Ok(())
}

/// A checked read of the account's zero-knowledge state.
struct Account {
    status: ZkStatus,
    user_id: String,
    pin: Option<Pin>,
}

impl Account {
    fn material(&self) -> anyhow::Result<&KeyMaterial> {
        self.status
            .material
            .as_ref()
            .filter(|_| self.status.enabled)
            .context("zero-knowledge is not enabled for this account")
    }
}

impl ZkClient {
    /// A client that pins under the default config directory ([`PinStore::default_dir`]).
    pub fn new(base: &str, token: &str) -> ZkClient {
        ZkClient {
            api: ApiClient::new(base, token),
            pins: PinStore::new(PinStore::default_dir()),
        }
    }

    /// Pins under `dir` instead (tests; several profiles on one machine).
    pub fn with_config_dir(mut self, dir: impl Into<std::path::PathBuf>) -> ZkClient {
        self.pins = PinStore::new(dir);
        self
    }

    pub fn pins(&self) -> &PinStore {
        &self.pins
    }

    pub async fn user_id(&self) -> anyhow::Result<String> {
        Ok(self.api.me().await?.user.user_id.to_string())
    }

    /// The account's zero-knowledge state, checked against this machine's pin (and pinned, the
    /// first time it is seen on).
    pub async fn status(&self) -> anyhow::Result<ZkStatus> {
        Ok(self.account().await?.status)
    }

    async fn account(&self) -> anyhow::Result<Account> {
        let user_id = self.user_id().await?;
        let status: ZkStatus = self.api.get("/v1/zk").await?;
        let mut pin = self.pins.load(self.api.base(), &user_id)?;
        match &pin {
            Some(pin) => check_pin(pin, &status)?,
            None => {
                if let (true, Some(material)) = (status.enabled, &status.material) {
                    let first = self.pin_for(&user_id, status.version, material, None)?;
                    self.pins.save(&first)?;
                    pin = Some(first);
                }
            }
        }
        Ok(Account {
            status,
            user_id,
            pin,
        })
    }

    fn pin_for(
        &self,
        user_id: &str,
        version: i64,
        material: &KeyMaterial,
        manifest: Option<ManifestPin>,
    ) -> anyhow::Result<Pin> {
        Ok(Pin {
            server: self.api.base().to_string(),
            user_id: user_id.to_string(),
            version,
            fingerprint: material.fingerprint(),
            kdf: material.kdf_params()?,
            manifest,
        })
    }

    /// After this client changed the material: the server must now serve exactly `material`;
    /// the pin moves to it.
    async fn repin(&self, user_id: &str, material: &KeyMaterial) -> anyhow::Result<()> {
        let status: ZkStatus = self.api.get("/v1/zk").await?;
        let served = status.material.as_ref().filter(|_| status.enabled);
        if served.map(KeyMaterial::fingerprint) != Some(material.fingerprint()) {
            return Err(KeysChanged(
                "it did not store the key material this client just sent".into(),
            )
            .into());
        }
        let manifest = self
            .pins
            .load(self.api.base(), user_id)?
            .and_then(|p| p.manifest);
        if let Some(old) = self.pins.load(self.api.base(), user_id)?
            && status.version <= old.version
        {
            return Err(KeysChanged(format!(
                "after a change its key material version did not grow ({} after {})",
                status.version, old.version
            ))
            .into());
        }
        self.pins
            .save(&self.pin_for(user_id, status.version, material, manifest)?)
    }

    pub async fn migration_status(&self) -> anyhow::Result<Status> {
        self.api.get("/v1/zk/migration").await
    }

    /// POST with the keyring's proof of the password or recovery key.
    async fn post_proved<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        keyring: &Keyring,
    ) -> anyhow::Result<T> {
        self.api
            .call_with(Method::POST, path, Some(body), &proof_headers(keyring))
            .await
    }

    async fn put_proved<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        keyring: &Keyring,
    ) -> anyhow::Result<T> {
        self.api
            .call_with(Method::PUT, path, Some(body), &proof_headers(keyring))
            .await
    }

    /// Turns zero-knowledge on; returns the keyring and the recovery key to show once. Stores
    /// the proofs of both, pins the new material, and records the manifest of the plaintext
    /// rows there are now.
    pub async fn enable(
        &self,
        password: &str,
        params: KdfParams,
    ) -> anyhow::Result<(Keyring, RecoveryKey)> {
        let account = self.account().await?;
        let user_id = account.user_id;
        let (keyring, material, recovery) = Keyring::setup(password, &user_id, params)?;
        let body = Enable {
            material: material.clone(),
            password_proof: keyring.proof().to_hex(),
            recovery_proof: recovery.proof().to_hex(),
        };
        let () = self.api.post("/v1/zk/enable", &body).await?;
        let status: ZkStatus = self.api.get("/v1/zk").await?;
        if status.material.as_ref().map(KeyMaterial::fingerprint) != Some(material.fingerprint()) {
            return Err(KeysChanged(
                "it did not store the key material this client just sent".into(),
            )
            .into());
        }
        self.pins
            .save(&self.pin_for(&user_id, status.version, &material, None)?)?;
        let manifest = self.record_manifest(&keyring).await?;
        self.pin_manifest(&user_id, &manifest)?;
        Ok((keyring, recovery))
    }

    fn pin_manifest(&self, user_id: &str, manifest: &Manifest) -> anyhow::Result<()> {
        let mut pin = self
            .pins
            .load(self.api.base(), user_id)?
            .context("no pin for this account")?;
        pin.manifest = Some(ManifestPin {
            chunks: manifest.chunks,
            digest: manifest.digest.clone(),
        });
        self.pins.save(&pin)
    }

    /// Unlocks with the master password. The material is checked against the pin first; a
    /// wrong password on material that changed since this machine last unlocked says so. The
    /// proof is registered if the server has none (an account enabled before proofs existed),
    /// and the pin moves to the material that opened.
    pub async fn unlock(&self, password: &str) -> anyhow::Result<Keyring> {
        let account = self.account().await?;
        self.unlock_account(&account, Unlock::Password(password))
            .await
    }

    async fn unlock_account(&self, account: &Account, how: Unlock<'_>) -> anyhow::Result<Keyring> {
        let material = account.material()?;
        let user_id = &account.user_id;
        let opened = match how {
            Unlock::Password(password) => Keyring::unlock(material, password, user_id),
            Unlock::RecoveryKey(key) => Keyring::unlock_with_recovery(material, key, user_id),
        };
        let keyring = match opened {
            Ok(keyring) => keyring,
            Err(e @ (ZkError::WrongPassword | ZkError::WrongRecoveryKey))
                if account
                    .pin
                    .as_ref()
                    .is_some_and(|p| p.fingerprint != material.fingerprint()) =>
            {
                let pin = account.pin.as_ref().expect("checked");
                bail!(
                    "{e} — or the server changed this account's keys: the key material changed since this machine last unlocked it (version {} then, {} now). If you did not change your password or recovery key elsewhere, do not trust this server",
                    pin.version,
                    account.status.version
                );
            }
            Err(e) => return Err(e.into()),
        };
        self.register_proof(&account.status.proofs, &keyring)
            .await?;
        let manifest = account.pin.as_ref().and_then(|p| p.manifest.clone());
        self.pins
            .save(&self.pin_for(user_id, account.status.version, material, manifest)?)?;
        Ok(keyring)
    }

    /// Registers the keyring's proof if the server has none of its kind.
    async fn register_proof(
        &self,
        registered: &Registered,
        keyring: &Keyring,
    ) -> anyhow::Result<()> {
        let proof = keyring.proof();
        let request = match proof.kind() {
            ProofKind::Password if !registered.password => RegisterProofs {
                password_proof: Some(proof.to_hex()),
                recovery_proof: None,
            },
            ProofKind::Recovery if !registered.recovery => RegisterProofs {
                password_proof: None,
                recovery_proof: Some(proof.to_hex()),
            },
            _ => return Ok(()),
        };
        let _: Registered = self.api.post("/v1/zk/proof", &request).await?;
        tracing::info!(
            "registered the proof of the {:?} with the server",
            proof.kind()
        );
        Ok(())
    }

    /// A new master password; `unlock` opens the account with the current password or, after a
    /// forgotten one, with the recovery key. Re-wraps one key; no data is re-encrypted (see
    /// [`ZkClient::rotate`] for a new account key).
    pub async fn set_password(&self, unlock: Unlock<'_>, new_password: &str) -> anyhow::Result<()> {
        let account = self.account().await?;
        let keyring = self.unlock_account(&account, unlock).await?;
        let material = account.material()?;
        let (changed, proof) =
            keyring.change_password(material, new_password, KdfParams::DEFAULT)?;
        let body = ReplaceKeyMaterial {
            previous: material.password_wrapped.clone(),
            material: changed.clone(),
            password_proof: Some(proof.to_hex()),
            recovery_proof: None,
        };
        let () = self.put_proved("/v1/zk/password", &body, &keyring).await?;
        self.repin(&account.user_id, &changed).await
    }

    /// A new recovery key (the old one no longer opens the material on the server); returns it
    /// to show once.
    pub async fn new_recovery_key(&self, password: &str) -> anyhow::Result<RecoveryKey> {
        let account = self.account().await?;
        let keyring = self
            .unlock_account(&account, Unlock::Password(password))
            .await?;
        let material = account.material()?;
        let (replaced, recovery) = keyring.replace_recovery_key(material)?;
        let body = ReplaceKeyMaterial {
            previous: material.recovery_wrapped.clone(),
            material: replaced.clone(),
            password_proof: None,
            recovery_proof: Some(recovery.proof().to_hex()),
        };
        let () = self.put_proved("/v1/zk/recovery", &body, &keyring).await?;
        self.repin(&account.user_id, &replaced).await?;
        Ok(recovery)
    }

    /// The manifest for the migration: the stored one, checked against the pin; or, if the
    /// account has none and this machine never saw one, recorded now (an account turned on by
    /// an older client: the rows there are now are taken as the user's).
    async fn manifest(&self, keyring: &Keyring) -> anyhow::Result<Manifest> {
        let user_id = keyring.user_id();
        let pinned = self
            .pins
            .load(self.api.base(), user_id)?
            .and_then(|p| p.manifest);
        match (self.load_manifest(keyring).await?, pinned) {
            (Some(manifest), Some(pin)) => {
                if pin.digest != manifest.digest || pin.chunks != manifest.chunks {
                    return Err(KeysChanged(
                        "it serves another migration manifest than the one this machine recorded"
                            .into(),
                    )
                    .into());
                }
                Ok(manifest)
            }
            (Some(manifest), None) => {
                self.pin_manifest(user_id, &manifest)?;
                Ok(manifest)
            }
            (None, Some(_)) => Err(KeysChanged(
                "the migration manifest this machine recorded is gone".into(),
            )
            .into()),
            (None, None) => {
                let manifest = self.record_manifest(keyring).await?;
                self.pin_manifest(user_id, &manifest)?;
                Ok(manifest)
            }
        }
    }

    /// Runs the migration to the end (or until `stop` says so after a step), reporting progress.
    /// Safe to interrupt anywhere and run again. Seals only rows the manifest lists, as whole
    /// records (text, role, session, creation time).
    pub async fn migrate(
        &self,
        keyring: &Keyring,
        batch: usize,
        mut progress: impl FnMut(&Status),
        mut stop: impl FnMut(Step) -> ControlFlow<()>,
    ) -> anyhow::Result<MigrationReport> {
        let manifest = self.manifest(keyring).await?;
        let user_id = keyring.user_id().to_string();
        let mut report = MigrationReport::default();
        // What an interrupted run left sealed but not verified: read back, verified, cleared.
        loop {
            let (verified, pending) = self
                .verify_messages(keyring, &user_id, batch, &mut report)
                .await?;
            if verified && stop(Step::Cleared).is_break() {
                return Ok(report);
            }
            if !pending || !verified {
                break;
            }
        }
        // The bulk of the messages, several batches in flight (`pipeline`); what it leaves (rows
        // changed meanwhile, reset, or a server that does not report what it stored) goes
        // through the steps below.
        if self
            .migrate_messages_pipelined(
                keyring,
                &manifest,
                batch,
                &mut report,
                &mut progress,
                &mut stop,
            )
            .await?
            .is_break()
        {
            return Ok(report);
        }
        // The plaintext to go through, one cursor per kind of row and chat system.
        let mut phases: Vec<(bool, System, Option<Uuid>)> = vec![
            (false, System::Chat, None),
            (false, System::Sessions, None),
            (true, System::Chat, None),
            (true, System::Sessions, None),
        ];
        let mut resets_seen = 0;
        let mut passes = 0;
        loop {
            let before = (
                report.verified_and_cleared,
                report.sessions_verified_and_cleared,
                report.reset,
            );
            // 1. Verify what is encrypted but still has its plaintext (this run's last batch, or
            //    an interrupted run's), then clear those plaintexts.
            let (verified, pending) = self
                .verify_messages(keyring, &user_id, batch, &mut report)
                .await?;
            let (sessions_verified, sessions_pending) = self
                .verify_sessions(keyring, &user_id, batch, &mut report)
                .await?;
            if (verified || sessions_verified) && stop(Step::Cleared).is_break() {
                return Ok(report);
            }

            // 2. Seal the next batch of listed plaintext and write it with compare-and-swap.
            let Some(phase) = phases.first_mut() else {
                if pending || sessions_pending {
                    let after = (
                        report.verified_and_cleared,
                        report.sessions_verified_and_cleared,
                        report.reset,
                    );
                    if after == before {
                        bail!(
                            "the migration makes no progress: the server keeps serving rows to verify that neither clear nor reset"
                        );
                    }
                    continue;
                }
                // Rows put back in the queue this pass are tried again, a few times.
                if report.reset > resets_seen && passes < 3 {
                    resets_seen = report.reset;
                    passes += 1;
                    phases = vec![
                        (false, System::Chat, None),
                        (false, System::Sessions, None),
                        (true, System::Chat, None),
                        (true, System::Sessions, None),
                    ];
                    continue;
                }
                progress(&self.migration_status().await?);
                report.not_in_manifest.sort();
                report.not_in_manifest.dedup();
                return Ok(report);
            };
            let (is_session, system, after) = *phase;
            let written = if is_session {
                let path = limited(
                    page("/v1/zk/migration/sessions", system_name(system), after),
                    batch,
                );
                let rows: MessageBatch<PlaintextSession> = self.api.get(&path).await?;
                match rows.messages.last() {
                    None => {
                        phases.remove(0);
                        continue;
                    }
                    Some(last) => phase.2 = Some(last.id),
                }
                self.seal_sessions(keyring, &user_id, &manifest, &rows.messages, &mut report)
                    .await?
            } else {
                let path = limited(
                    page("/v1/zk/migration/plaintext", system_name(system), after),
                    batch,
                );
                let rows: MessageBatch<Plaintext> = self.api.get(&path).await?;
                match rows.messages.last() {
                    None => {
                        phases.remove(0);
                        continue;
                    }
                    Some(last) => phase.2 = Some(last.id),
                }
                self.seal_messages(keyring, &user_id, &manifest, &rows.messages, &mut report)
                    .await?
            };
            if written {
                progress(&self.migration_status().await?);
                if stop(Step::Written).is_break() {
                    return Ok(report);
                }
            }
        }
    }

    /// Verifies a batch of sealed-but-not-cleared messages; clears the good ones, resets the
    /// others. Returns (something was cleared, something was there).
    async fn verify_messages(
        &self,
        keyring: &Keyring,
        user_id: &str,
        batch: usize,
        report: &mut MigrationReport,
    ) -> anyhow::Result<(bool, bool)> {
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
                user_id,
                row_id: &row.id.to_string(),
            };
            let expected = message_record(
                row.session_id,
                row.role.as_deref(),
                row.created_at,
                &row.content,
            );
            match keyring.open_record(&ctx, &row.encrypted_content) {
                Ok(Opened::Record(record)) if record == expected => good.push(item),
                // Sealed by an older client as bare text: the text is what counts.
                Ok(Opened::Bare(text)) if text == row.content => good.push(item),
                _ => bad.push(item),
            }
        }
        if !good.is_empty() {
            let cleared: Cleared = self
                .post_proved("/v1/zk/migration/clear", &good, keyring)
                .await?;
            report.verified_and_cleared += cleared.cleared;
        }
        if !bad.is_empty() {
            let reset: Reset = self.api.post("/v1/zk/migration/reset", &bad).await?;
            report.reset += reset.reset;
        }
        Ok((!good.is_empty(), !unverified.messages.is_empty()))
    }

    async fn verify_sessions(
        &self,
        keyring: &Keyring,
        user_id: &str,
        batch: usize,
        report: &mut MigrationReport,
    ) -> anyhow::Result<(bool, bool)> {
        let unverified: MessageBatch<UnverifiedSession> = self
            .api
            .get(&format!(
                "/v1/zk/migration/sessions/unverified?limit={batch}"
            ))
            .await?;
        let (mut good, mut bad) = (Vec::new(), Vec::new());
        for row in &unverified.messages {
            let item = Item {
                system: row.system.context("row without its chat system")?,
                id: row.id,
            };
            let ctx = ZkContext {
                namespace: CHAT_SESSION,
                user_id,
                row_id: &row.id.to_string(),
            };
            let expected = session_record(
                row.id,
                row.title.as_deref(),
                row.description.as_deref(),
                row.system_prompt.as_deref(),
            );
            match keyring.open_record(&ctx, &row.encrypted_meta) {
                Ok(Opened::Record(record)) if record == expected => good.push(item),
                _ => bad.push(item),
            }
        }
        if !good.is_empty() {
            let cleared: Cleared = self
                .post_proved("/v1/zk/migration/sessions/clear", &good, keyring)
                .await?;
            report.sessions_verified_and_cleared += cleared.cleared;
        }
        if !bad.is_empty() {
            let reset: Reset = self
                .api
                .post("/v1/zk/migration/sessions/reset", &bad)
                .await?;
            report.reset += reset.reset;
        }
        Ok((!good.is_empty(), !unverified.messages.is_empty()))
    }

    /// Seals the listed rows of a batch and writes them; returns whether anything was written.
    async fn seal_messages(
        &self,
        keyring: &Keyring,
        user_id: &str,
        manifest: &Manifest,
        rows: &[Plaintext],
        report: &mut MigrationReport,
    ) -> anyhow::Result<bool> {
        // Sealed as the pipeline seals (each envelope checked to open to its record).
        let (sealed, not_in_manifest) = pipeline::seal_rows(keyring, user_id, manifest, rows)?;
        report.not_in_manifest.extend(not_in_manifest);
        let writes: Vec<EncryptedWrite> = sealed.into_iter().map(|s| s.write).collect();
        if writes.is_empty() {
            return Ok(false);
        }
        let written: Written = self.api.post("/v1/zk/migration/encrypted", &writes).await?;
        report.encrypted += written.written.len() as u64;
        report.retried += (writes.len() - written.written.len()) as u64;
        Ok(!written.written.is_empty())
    }

    async fn seal_sessions(
        &self,
        keyring: &Keyring,
        user_id: &str,
        manifest: &Manifest,
        rows: &[PlaintextSession],
        report: &mut MigrationReport,
    ) -> anyhow::Result<bool> {
        let mut writes = Vec::with_capacity(rows.len());
        for row in rows {
            let system = row.system.context("row without its chat system")?;
            let record = session_record(
                row.id,
                row.title.as_deref(),
                row.description.as_deref(),
                row.system_prompt.as_deref(),
            );
            if !manifest.lists(system, row.id, &record) {
                report.not_in_manifest.push(row.id);
                continue;
            }
            let ctx = ZkContext {
                namespace: CHAT_SESSION,
                user_id,
                row_id: &row.id.to_string(),
            };
            writes.push(EncryptedSession {
                system,
                id: row.id,
                texts_sha256: row.texts_sha256.clone(),
                encrypted_meta: keyring.seal_record(&ctx, &record)?,
            });
        }
        if writes.is_empty() {
            return Ok(false);
        }
        let written: Written = self.api.post("/v1/zk/migration/sessions", &writes).await?;
        report.sessions_encrypted += written.written.len() as u64;
        report.retried += (writes.len() - written.written.len()) as u64;
        Ok(!written.written.is_empty())
    }

    /// Creates a session whose title is sealed (bound to the id chosen here).
    pub async fn create_session(&self, keyring: &Keyring, title: &str) -> anyhow::Result<Uuid> {
        let id = Uuid::new_v4();
        let row = id.to_string();
        let ctx = ZkContext {
            namespace: CHAT_SESSION,
            user_id: keyring.user_id(),
            row_id: &row,
        };
        let record = session_record(id, Some(title), None, None);
        let body = crate::api::NewSession {
            id: Some(id),
            title: None,
            encrypted_meta: Some(keyring.seal_record(&ctx, &record)?),
        };
        let _: crate::chat::ChatSession = self.api.post("/v1/chat/sessions", &body).await?;
        Ok(id)
    }

    /// Adds a message sealed as a whole record (role, session, creation time, text).
    pub async fn add_message(
        &self,
        keyring: &Keyring,
        session_id: Uuid,
        role: &str,
        text: &str,
    ) -> anyhow::Result<Uuid> {
        let id = Uuid::new_v4();
        // Microseconds: what PostgreSQL stores, so the row reads back as sealed.
        let now = chrono::Utc::now();
        let created_at = chrono::DateTime::from_timestamp_micros(now.timestamp_micros())
            .context("the clock is out of range")?;
        let record: Record = message_record(session_id, Some(role), Some(created_at), text);
        let row = id.to_string();
        let ctx = ZkContext {
            namespace: CHAT_MESSAGE,
            user_id: keyring.user_id(),
            row_id: &row,
        };
        let body = crate::chat::NewMessage {
            id: Some(id),
            role: role.to_string(),
            content: None,
            encrypted_content: Some(keyring.seal_record(&ctx, &record)?),
            created_at: Some(created_at),
            model: None,
            usage: None,
        };
        let _: crate::chat::ChatMessage = self
            .api
            .post(&format!("/v1/chat/sessions/{session_id}/messages"), &body)
            .await?;
        Ok(id)
    }
}

/// Replaces the page size of a migration read.
fn limited(path: String, batch: usize) -> String {
    path.replace("limit=500", &format!("limit={}", batch.clamp(1, 500)))
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
    /// each legacy credential over once (given the proof of the password), it is sealed here
    /// and stored, then every stored envelope is opened to verify it before the legacy
    /// ciphertext is cleared.
    pub async fn migrate_credentials(&self, keyring: &Keyring) -> anyhow::Result<CredentialReport> {
        use crate::vault::{CredentialRef, HandOver, Sealed};
        use base64::Engine;
        let user_id = keyring.user_id().to_string();
        let mut report = CredentialReport::default();
        let mut held = std::collections::HashMap::new();
        let mut from = String::new();
        loop {
            let batch: HandOver = self
                .post_proved(
                    &format!("/v1/zk/credentials/hand-over?limit=50{from}"),
                    &(),
                    keyring,
                )
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
                    provider: None,
                    updated_at: None,
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
            // A login session's credential is a sealed box to the runtime key, never legacy
            // ciphertext: nothing of it to verify or clear here.
            if polydev_zk::inspect_sealed(&s.envelope).is_ok() {
                continue;
            }
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
