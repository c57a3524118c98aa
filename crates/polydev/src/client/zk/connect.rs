//! `polydev zk connect`: gives one of the user's runtime containers their CLI subscription
//! (docs/cli-backends.md, "In runtime containers"). The credential a login session stored is
//! sealed to the user's runtime key; this opens it here and seals it again to a claimed
//! container's agent key, as a grant. The server sees neither the credential nor the keys.

use std::collections::BTreeMap;

use anyhow::Context as _;
use polydev_agent::proto::{GRANT_NAMESPACE, Grant, credential_file};
use polydev_zk::{Context as ZkContext, Keyring, X25519KeyPair};
use zeroize::Zeroizing;

use super::ZkClient;
use crate::login::auth_sessions::CREDENTIAL_NAMESPACE;
use crate::runtime::grants::{GrantView, PutGrant, provider_of_cli};
use crate::runtime::jobs::UserKey;
use crate::runtime::pool::ContainerView;
use crate::vault::{Sealed, Table};

impl ZkClient {
    /// Claims a container for `cli` (`claude`, `codex`, `gemini`) and grants it the credential
    /// the newest login session stored for that CLI's provider.
    pub async fn connect_cli(&self, keyring: &Keyring, cli: &str) -> anyhow::Result<GrantView> {
        let provider = provider_of_cli(cli).with_context(|| {
            format!("`{cli}` is not a CLI polydev runs: claude, codex or gemini")
        })?;
        let file = credential_file(cli).context("no credential file for this CLI")?;
        let user_id = self.user_id().await?;
        let key: UserKey = self.api.get("/v1/runtime/keys").await.context(
            "no runtime key: sign a CLI in through a login session first (docs/login.md)",
        )?;
        let keys = X25519KeyPair::unwrap(keyring, &key.wrapped_private_key)?;

        // The credential: the newest one a login session stored for the provider (sealed to
        // this user's runtime key; a credential moved from the legacy encryption is not a CLI
        // login's file).
        let stored: Vec<Sealed> = self.api.get("/v1/zk/credentials").await?;
        let stored = stored
            .iter()
            .filter(|s| s.table == Table::CliCredentials && s.provider.as_deref() == Some(provider))
            .filter(|s| {
                polydev_zk::inspect_sealed(&s.envelope)
                    .is_ok_and(|h| h.recipient_key() == key.public_key)
            })
            .max_by_key(|s| s.updated_at)
            .with_context(|| {
                format!("no {provider} credential from a login session: sign `{cli}` in first (docs/login.md)")
            })?;
        let row = stored.credential_id.to_string();
        let credential = Zeroizing::new(keys.open(
            &ZkContext {
                namespace: CREDENTIAL_NAMESPACE,
                user_id: &user_id,
                row_id: &row,
            },
            &stored.envelope,
        )?);
        let credential = Zeroizing::new(
            String::from_utf8(credential.to_vec()).context("the credential file is not text")?,
        );

        // A container of that provider (the one the user holds, else a warm one), and the grant.
        let container: ContainerView = self
            .api
            .post(
                "/v1/runtime/containers",
                &serde_json::json!({ "provider": provider }),
            )
            .await?;
        let public_key = container
            .public_key
            .context("the claimed container has no agent key yet")?;
        let grant = Zeroizing::new(serde_json::to_vec(&Grant {
            cli: cli.into(),
            files: BTreeMap::from([(file.to_string(), credential.to_string())]),
        })?);
        let container_row = container.id.to_string();
        let sealed = polydev_zk::seal_to(
            &public_key,
            &ZkContext {
                namespace: GRANT_NAMESPACE,
                user_id: &user_id,
                row_id: &container_row,
            },
            &grant,
        )?;
        self.api
            .put(
                &format!("/v1/runtime/containers/{}/grant", container.id),
                &PutGrant {
                    cli: cli.into(),
                    sealed,
                },
            )
            .await
    }
}
