//! Reading the history back without trusting the server: every sealed item is opened and its
//! record compared with the row it came in (session, role, creation time, kind); for an account
//! with zero-knowledge on, plaintext is shown only if the migration manifest lists it (history
//! from before zero-knowledge, not yet encrypted). Everything else is quarantined: listed apart,
//! with the reason, never shown as the user's.

use anyhow::Context;
use chrono::{DateTime, Utc};
use polydev_zk::{Context as ZkContext, Keyring, Opened, Record, RecordKind};
use uuid::Uuid;

use super::manifest::{Manifest, message_record, micros, session_record};
use super::{KeysChanged, ZkClient};
use crate::chat::{ChatMessage, ChatSession, System};
use crate::zk::{CHAT_MESSAGE, CHAT_SESSION};

/// How far an item shown can be trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trust {
    /// Sealed as a record that matches its row: text and place are the user's.
    Sealed,
    /// Sealed in the older format (the bare text): the text is the user's, its place (session,
    /// role, order) is not bound.
    OlderFormat,
    /// Plaintext from before zero-knowledge was turned on, listed in the manifest with this
    /// exact content and place; the migration has not encrypted it yet.
    NotYetEncrypted,
    /// Zero-knowledge is off for this account: plaintext, as stored.
    Plaintext,
}

#[derive(Debug, Clone)]
pub struct MessageView {
    pub id: Uuid,
    pub role: String,
    pub text: String,
    pub created_at: Option<DateTime<Utc>>,
    pub trust: Trust,
}

#[derive(Debug, Clone)]
pub struct SessionView {
    pub id: Uuid,
    pub system: System,
    pub title: Option<String>,
    /// `None` when the session has no title at all.
    pub title_trust: Option<Trust>,
    pub messages: Vec<MessageView>,
}

/// Something the server served that is not shown as the user's.
#[derive(Debug, Clone)]
pub struct Quarantined {
    pub session_id: Uuid,
    /// The message's id, or the session's for its title.
    pub id: Uuid,
    /// `message` or `session title`.
    pub what: &'static str,
    pub reason: String,
    /// The plaintext as served (for plaintext rows), to show apart.
    pub served_text: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct History {
    pub zero_knowledge: bool,
    pub sessions: Vec<SessionView>,
    pub quarantined: Vec<Quarantined>,
}

impl History {
    /// Every message shown, in order.
    pub fn messages(&self) -> impl Iterator<Item = &MessageView> {
        self.sessions.iter().flat_map(|s| s.messages.iter())
    }
}

/// Compares an opened message record with its row; `Err` says what differs.
fn check_message(record: &Record, session_id: Uuid, message: &ChatMessage) -> Result<(), String> {
    if record.kind != RecordKind::Message {
        return Err(format!(
            "sealed as a {:?}, served as a message",
            record.kind
        ));
    }
    if record.session != session_id.to_string() {
        return Err(format!(
            "sealed in session {}, served in session {session_id} (moved)",
            record.session
        ));
    }
    if record.role != message.role {
        return Err(format!(
            "sealed with role {}, served with role {} (role changed)",
            record.role.as_deref().unwrap_or("-"),
            message.role.as_deref().unwrap_or("-")
        ));
    }
    if record.created_at_us != micros(message.created_at) {
        return Err("its creation time differs from the sealed one (reordered)".into());
    }
    Ok(())
}

impl ZkClient {
    /// The account's history as the user may trust it. With zero-knowledge on, `keyring` is
    /// required; a server that says it is off for an account this machine saw on is refused
    /// ([`KeysChanged`]).
    pub async fn history(&self, keyring: Option<&Keyring>) -> anyhow::Result<History> {
        let account = self.account().await?;
        let zero_knowledge = account.status.enabled;
        let keyring = match (zero_knowledge, keyring) {
            (true, Some(keyring)) => Some(keyring),
            (true, None) => anyhow::bail!("zero-knowledge is on: unlock first"),
            (false, _) => None,
        };
        let manifest = match keyring {
            Some(keyring) => {
                let pinned = account.pin.as_ref().and_then(|p| p.manifest.clone());
                match (self.load_manifest(keyring).await?, pinned) {
                    (Some(m), Some(pin)) if pin.digest != m.digest => {
                        return Err(KeysChanged(
                            "it serves another migration manifest than the one this machine recorded"
                                .into(),
                        )
                        .into());
                    }
                    (None, Some(_)) => {
                        return Err(KeysChanged(
                            "the migration manifest this machine recorded is gone".into(),
                        )
                        .into());
                    }
                    (m, _) => m.unwrap_or_default(),
                }
            }
            None => Manifest::default(),
        };
        let mut history = History {
            zero_knowledge,
            ..History::default()
        };
        let sessions: Vec<ChatSession> = self.api.get("/v1/chat/sessions").await?;
        for session in sessions {
            let mut view = SessionView {
                id: session.id,
                system: session.system.0,
                title: None,
                title_trust: None,
                messages: Vec::new(),
            };
            self.read_title(keyring, &manifest, &session, &mut view, &mut history)?;
            let messages: Vec<ChatMessage> = self
                .api
                .get(&format!("/v1/chat/sessions/{}/messages", session.id))
                .await?;
            for message in messages {
                if let Some(shown) = read_message(
                    keyring,
                    &manifest,
                    &session,
                    message,
                    &mut history.quarantined,
                )? {
                    view.messages.push(shown);
                }
            }
            view.messages.sort_by_key(|m| (m.created_at, m.id));
            history.sessions.push(view);
        }
        Ok(history)
    }

    fn read_title(
        &self,
        keyring: Option<&Keyring>,
        manifest: &Manifest,
        session: &ChatSession,
        view: &mut SessionView,
        history: &mut History,
    ) -> anyhow::Result<()> {
        let quarantine = |reason: String, served_text: Option<String>| Quarantined {
            session_id: session.id,
            id: session.id,
            what: "session title",
            reason,
            served_text,
        };
        let Some(keyring) = keyring else {
            view.title = session.title.clone();
            view.title_trust = session.title.as_ref().map(|_| Trust::Plaintext);
            return Ok(());
        };
        if let Some(envelope) = &session.encrypted_meta {
            let row = session.id.to_string();
            let ctx = ZkContext {
                namespace: CHAT_SESSION,
                user_id: keyring.user_id(),
                row_id: &row,
            };
            match keyring.open_record(&ctx, envelope) {
                Ok(Opened::Record(record))
                    if record.kind == RecordKind::Session && record.session == row =>
                {
                    view.title_trust = record.text.as_ref().map(|_| Trust::Sealed);
                    view.title = record.text;
                }
                Ok(Opened::Record(record)) => history.quarantined.push(quarantine(
                    format!(
                        "sealed as a {:?} of session {}, served as this session's",
                        record.kind, record.session
                    ),
                    None,
                )),
                Ok(Opened::Bare(text)) => {
                    view.title = Some(text);
                    view.title_trust = Some(Trust::OlderFormat);
                }
                Err(e) => history
                    .quarantined
                    .push(quarantine(format!("does not open: {e}"), None)),
            }
            return Ok(());
        }
        if session.title.is_none()
            && session.description.is_none()
            && session.system_prompt.is_none()
        {
            return Ok(());
        }
        let record = session_record(
            session.id,
            session.title.as_deref(),
            session.description.as_deref(),
            session.system_prompt.as_deref(),
        );
        if manifest.lists(session.system.0, session.id, &record) {
            view.title = session.title.clone();
            view.title_trust = session.title.as_ref().map(|_| Trust::NotYetEncrypted);
        } else {
            history.quarantined.push(quarantine(
                "plaintext served for an account with zero-knowledge on, and not in the manifest of what existed when it was turned on".into(),
                session.title.clone(),
            ));
        }
        Ok(())
    }
}

/// One message as it may be shown, or `None` (quarantined).
fn read_message(
    keyring: Option<&Keyring>,
    manifest: &Manifest,
    session: &ChatSession,
    message: ChatMessage,
    quarantined: &mut Vec<Quarantined>,
) -> anyhow::Result<Option<MessageView>> {
    let mut quarantine = |reason: String, served_text: Option<String>| {
        quarantined.push(Quarantined {
            session_id: session.id,
            id: message.id,
            what: "message",
            reason,
            served_text,
        });
        Ok(None)
    };
    let role = message.role.clone().unwrap_or_default();
    let Some(keyring) = keyring else {
        return Ok(Some(MessageView {
            id: message.id,
            role,
            text: message.content.clone().unwrap_or_default(),
            created_at: message.created_at,
            trust: Trust::Plaintext,
        }));
    };
    if let Some(envelope) = &message.encrypted_content {
        let row = message.id.to_string();
        let ctx = ZkContext {
            namespace: CHAT_MESSAGE,
            user_id: keyring.user_id(),
            row_id: &row,
        };
        return match keyring.open_record(&ctx, envelope) {
            Ok(Opened::Record(record)) => match check_message(&record, session.id, &message) {
                Ok(()) => Ok(Some(MessageView {
                    id: message.id,
                    role,
                    text: record.text.context("a message record without text")?,
                    created_at: message.created_at,
                    trust: Trust::Sealed,
                })),
                Err(reason) => quarantine(reason, None),
            },
            Ok(Opened::Bare(text)) => Ok(Some(MessageView {
                id: message.id,
                role,
                text,
                created_at: message.created_at,
                trust: Trust::OlderFormat,
            })),
            Err(e) => quarantine(format!("does not open: {e}"), None),
        };
    }
    let Some(content) = &message.content else {
        return quarantine("served with neither text nor envelope".into(), None);
    };
    let record = message_record(
        session.id,
        message.role.as_deref(),
        message.created_at,
        content,
    );
    if manifest.lists(session.system.0, message.id, &record) {
        Ok(Some(MessageView {
            id: message.id,
            role,
            text: content.clone(),
            created_at: message.created_at,
            trust: Trust::NotYetEncrypted,
        }))
    } else {
        quarantine(
            "plaintext served for an account with zero-knowledge on, and not in the manifest of what existed when it was turned on".into(),
            Some(content.clone()),
        )
    }
}
