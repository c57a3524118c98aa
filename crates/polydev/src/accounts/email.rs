//! Account e-mail: verification and password-reset links. Sent over SMTP (`--smtp-url`, lettre
//! with rustls) in the background, so how long a server takes to answer cannot tell whether an
//! address has an account; without SMTP the message goes to the server log (the embedded
//! default: whoever runs the server reads the link there).

use std::sync::Arc;

use lettre::message::Mailbox;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use sha2::{Digest, Sha256};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::error::{Error, Result};

/// How long an e-mail link stays valid.
pub const VERIFY_LINK_HOURS: i64 = 24;
pub const RESET_LINK_MINUTES: i64 = 60;

pub enum Mailer {
    /// No SMTP server configured: messages go to the server log.
    Log,
    Smtp {
        transport: Box<AsyncSmtpTransport<Tokio1Executor>>,
        from: Mailbox,
    },
}

impl std::fmt::Debug for Mailer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Mailer::Log => f.write_str("Mailer::Log"),
            Mailer::Smtp { from, .. } => write!(f, "Mailer::Smtp(from {from})"),
        }
    }
}

impl Mailer {
    /// `smtp://host:port` (plain, for a relay on localhost), `smtp://host?tls=required`
    /// (STARTTLS) or `smtps://user:pass@host` (implicit TLS); `from` is the sender address.
    pub fn smtp(url: &str, from: &str) -> Result<Mailer> {
        let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(url)
            .map_err(|e| Error::Invalid(format!("--smtp-url is not a valid SMTP URL: {e}")))?
            .timeout(Some(std::time::Duration::from_secs(20)))
            .build();
        let from = from
            .parse()
            .map_err(|e| Error::Invalid(format!("--smtp-from is not an e-mail address: {e}")))?;
        Ok(Mailer::Smtp {
            transport: Box::new(transport),
            from,
        })
    }

    /// Sends in the background; failures are logged (without the body, which holds a link).
    pub fn send(self: &Arc<Self>, to: &str, subject: &str, body: String) {
        match &**self {
            Mailer::Log => {
                tracing::warn!(
                    %to, %subject, %body,
                    "e-mail not sent (no --smtp-url): the message is written here instead"
                );
            }
            Mailer::Smtp { from, .. } => {
                let message = to.parse::<Mailbox>().ok().and_then(|to| {
                    Message::builder()
                        .from(from.clone())
                        .to(to)
                        .subject(subject)
                        .body(body)
                        .ok()
                });
                let Some(message) = message else {
                    tracing::warn!("e-mail not sent: the message could not be built");
                    return;
                };
                let mailer = self.clone();
                tokio::spawn(async move {
                    if let Mailer::Smtp { transport, .. } = &*mailer
                        && let Err(error) = transport.send(message).await
                    {
                        tracing::warn!(%error, "e-mail not sent");
                    }
                });
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkPurpose {
    Verify,
    Reset,
}

impl LinkPurpose {
    fn as_str(self) -> &'static str {
        match self {
            LinkPurpose::Verify => "verify",
            LinkPurpose::Reset => "reset",
        }
    }

    fn lifetime_secs(self) -> f64 {
        match self {
            LinkPurpose::Verify => (VERIFY_LINK_HOURS * 3600) as f64,
            LinkPurpose::Reset => (RESET_LINK_MINUTES * 60) as f64,
        }
    }
}

/// Creates a single-use link secret for `user_id` (only its SHA-256 is stored).
pub(super) async fn create_link(
    conn: &mut PgConnection,
    user_id: Uuid,
    purpose: LinkPurpose,
) -> Result<String> {
    let secret = super::tokens::generate()[3..].to_string();
    sqlx::query!(
        "INSERT INTO account_email_links (link_hash, user_id, purpose, expires_at)
         VALUES ($1, $2, $3, now() + make_interval(secs => $4))",
        link_hash(&secret),
        user_id,
        purpose.as_str(),
        purpose.lifetime_secs()
    )
    .execute(conn)
    .await?;
    Ok(secret)
}

/// Uses a link: its user, once. Unknown, used and expired links are told apart from nothing.
pub(super) async fn consume_link(
    conn: &mut PgConnection,
    secret: &str,
    purpose: LinkPurpose,
) -> Result<Uuid> {
    let invalid = || {
        Error::Invalid(
            "this link is not valid: it was already used, has expired, or was mistyped; ask for a new one"
                .into(),
        )
    };
    if secret.len() != 64 || !secret.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(invalid());
    }
    sqlx::query_scalar!(
        "UPDATE account_email_links SET used_at = now()
          WHERE link_hash = $1 AND purpose = $2 AND used_at IS NULL AND expires_at > now()
         RETURNING user_id",
        link_hash(secret),
        purpose.as_str()
    )
    .fetch_optional(conn)
    .await?
    .ok_or_else(invalid)
}

fn link_hash(secret: &str) -> String {
    hex::encode(Sha256::digest(
        format!("polydev-email-link:{secret}").as_bytes(),
    ))
}
