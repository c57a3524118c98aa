//! Key rotation (`polydev zk rotate`, `polydev zk change-password --rotate`): a new account key
//! replaces the old one, every envelope of the account is re-sealed under it, and only then is
//! the key material swapped (compare-and-swap). Afterwards the old password and a backup of the
//! old key material open nothing written later, nor anything re-sealed.
//!
//! Resumable: the new key is stored first, wrapped by the current password, as the rotation in
//! progress; an interrupted run finds it, unlocks it with the same password and re-seals what is
//! left (an item that already opens with the new key is skipped). The new recovery key is made
//! at the very end, so it is shown once, after the swap.

use polydev_zk::{Context as ZkContext, KdfParams, KeyMaterial, Keyring, RecoveryKey};
use uuid::Uuid;

use super::{Account, KeysChanged, Unlock, ZkClient};
use crate::api::Resealed;
use crate::zk::PASSWORD_HINT;
use crate::zk::rotation::{Commit, Count, ItemKind, Reseal, ResealItem, RotationItem, Start};

/// What a rotation did.
#[derive(Debug)]
pub struct RotationReport {
    /// Items re-sealed in this run.
    pub resealed: u64,
    /// Items already under the new key (an earlier, interrupted run's).
    pub already: u64,
    /// Items that open with neither key (not this account's, or corrupt): left as they are.
    pub unreadable: Vec<(ItemKind, String)>,
    /// The new recovery key, to show once (the old one no longer opens anything written from
    /// now on).
    pub recovery_key: RecoveryKey,
    /// Whether this run resumed a rotation that was in progress.
    pub resumed: bool,
}

/// Progress: items seen so far of `total`.
#[derive(Debug, Clone, Copy)]
pub struct RotationProgress {
    pub done: u64,
    pub total: u64,
}

const BATCH: i64 = 100;

impl ZkClient {
    /// Rotates the account key (see the module). `password` is the current master password;
    /// with `new_password` the material is also re-wrapped under a new one (the password hint
    /// is dropped, as with any password change).
    pub async fn rotate(
        &self,
        password: &str,
        new_password: Option<&str>,
        params: KdfParams,
        mut progress: impl FnMut(RotationProgress),
    ) -> anyhow::Result<RotationReport> {
        let account = self.account().await?;
        let old = self
            .unlock_account(&account, Unlock::Password(password))
            .await?;
        let material = account.material()?.clone();
        let user_id = account.user_id.clone();
        let (new, pending, resumed) = self.new_key(&account, &old, password, params).await?;

        let total: Count = self.api.get("/v1/zk/rotation/count").await?;
        let mut state = RotationProgress {
            done: 0,
            total: total.total.max(0) as u64,
        };
        progress(state);
        let mut report_resealed = 0;
        let mut already = 0;
        let mut unreadable = Vec::new();
        for kind in ItemKind::ALL {
            let mut after: Option<String> = None;
            loop {
                let path = match &after {
                    Some(after) => format!(
                        "/v1/zk/rotation/items?kind={}&after={after}&limit={BATCH}",
                        kind_name(kind)
                    ),
                    None => format!(
                        "/v1/zk/rotation/items?kind={}&limit={BATCH}",
                        kind_name(kind)
                    ),
                };
                let items: Vec<RotationItem> = self.api.get(&path).await?;
                let Some(last) = items.last() else { break };
                after = Some(last.id.clone());
                let mut writes = Vec::new();
                for item in &items {
                    let ctx = ZkContext {
                        namespace: kind.namespace(),
                        user_id: &user_id,
                        row_id: &item.id,
                    };
                    if new.open(&ctx, &item.envelope).is_ok() {
                        already += 1;
                        continue;
                    }
                    match old.open(&ctx, &item.envelope) {
                        Ok(plaintext) => writes.push(ResealItem {
                            id: item.id.clone(),
                            previous: item.envelope.clone(),
                            envelope: new.seal(&ctx, &zeroize::Zeroizing::new(plaintext))?,
                        }),
                        Err(_) => unreadable.push((kind, item.id.clone())),
                    }
                }
                if !writes.is_empty() {
                    let done: Resealed = self
                        .post_proved(
                            "/v1/zk/rotation/items",
                            &Reseal {
                                kind,
                                items: writes.clone(),
                            },
                            &old,
                        )
                        .await?;
                    if done.resealed.len() != writes.len() {
                        anyhow::bail!(
                            "{} items changed while being re-sealed: run the rotation again to finish it",
                            writes.len() - done.resealed.len()
                        );
                    }
                    report_resealed += done.resealed.len() as u64;
                }
                state.done += items.len() as u64;
                state.total = state.total.max(state.done);
                progress(state);
            }
        }

        // The final material: the new key under the password (the pending envelope, or a new
        // password's), a new recovery key, the hint re-sealed (or dropped with a new password).
        let (password_wrapped, password_proof) = match new_password {
            Some(new_password) => {
                let (changed, proof) = new.change_password(&material, new_password, params)?;
                (changed.password_wrapped, proof.to_hex())
            }
            None => (pending, new.proof().to_hex()),
        };
        let hint = match (&material.password_hint, new_password) {
            (Some(hint), None) => {
                let ctx = ZkContext {
                    namespace: PASSWORD_HINT,
                    user_id: &user_id,
                    row_id: &user_id,
                };
                match old.open(&ctx, hint) {
                    Ok(text) => Some(new.seal(&ctx, &zeroize::Zeroizing::new(text))?),
                    Err(_) => None,
                }
            }
            _ => None,
        };
        let (rotated, recovery_key) = new.replace_recovery_key(&KeyMaterial {
            password_wrapped,
            recovery_wrapped: String::new(),
            password_hint: hint,
        })?;
        let commit = Commit {
            previous: material.password_wrapped.clone(),
            material: rotated.clone(),
            password_proof,
            recovery_proof: recovery_key.proof().to_hex(),
        };
        let () = self
            .post_proved("/v1/zk/rotation/commit", &commit, &old)
            .await?;
        self.repin(&user_id, &rotated).await?;
        Ok(RotationReport {
            resealed: report_resealed,
            already,
            unreadable,
            recovery_key,
            resumed,
        })
    }

    /// The rotation's new key: the one in progress (unlocked with the password), or a new one
    /// stored as in progress now. Returns it, its password envelope, and whether it resumed.
    async fn new_key(
        &self,
        account: &Account,
        old: &Keyring,
        password: &str,
        params: KdfParams,
    ) -> anyhow::Result<(Keyring, String, bool)> {
        let user_id = &account.user_id;
        if let Some(pending) = &account.status.rotation {
            let new = Keyring::unlock_password_envelope(pending, password, user_id).map_err(
                |e| {
                    anyhow::anyhow!(
                        "a key rotation is in progress but its new key does not open with this password ({e}): it was started with the password of that time"
                    )
                },
            )?;
            if new_matches_old(old, &new, user_id)? {
                return Err(KeysChanged(
                    "it serves the current account key as the rotation's new one".into(),
                )
                .into());
            }
            return Ok((new, pending.clone(), true));
        }
        let (new, material, _) = Keyring::setup(password, user_id, params)?;
        let () = self
            .post_proved(
                "/v1/zk/rotation",
                &Start {
                    wrapped_key: material.password_wrapped.clone(),
                },
                old,
            )
            .await?;
        Ok((new, material.password_wrapped, false))
    }
}

/// Whether two keyrings hold the same account key (an item sealed by one opens with the other).
fn new_matches_old(old: &Keyring, new: &Keyring, user_id: &str) -> anyhow::Result<bool> {
    let row = Uuid::new_v4().to_string();
    let ctx = ZkContext {
        namespace: "zk.probe",
        user_id,
        row_id: &row,
    };
    let probe = old.seal(&ctx, b"probe")?;
    Ok(new.open(&ctx, &probe).is_ok())
}

fn kind_name(kind: ItemKind) -> String {
    serde_json::to_value(kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}
