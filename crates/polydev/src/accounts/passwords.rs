//! Sign-up, sign-in, e-mail verification and password reset with e-mail and password.
//!
//! Passwords are hashed with Argon2id (OWASP's m=19 MiB, t=2, p=1; the parameters live in the
//! stored PHC string, so they can be raised later without breaking old hashes). Nothing a
//! caller sees tells whether an address has an account: sign-up and reset requests always
//! answer the same and send their mail in the background; sign-in runs the hash for unknown
//! addresses too and answers one error for a wrong password and an unknown address.

use std::sync::{Arc, LazyLock};

use argon2::{Algorithm, Argon2, Params, PasswordHasher, PasswordVerifier, Version};
use sqlx::PgPool;
use uuid::Uuid;

use super::email::{LinkPurpose, Mailer, consume_link, create_link};
use super::users::normalize_email;
use super::{Plan, create_user};
use crate::error::{AuthFailure, Error, Result};

pub const MIN_PASSWORD_CHARS: usize = 10;
/// Longest password accepted (bytes): bounds the work an attacker can ask of the hash.
pub const MAX_PASSWORD_BYTES: usize = 1024;

fn hasher() -> Argon2<'static> {
    let params = Params::new(19 * 1024, 2, 1, None).expect("valid Argon2 parameters");
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

fn check_password_rules(password: &str) -> Result<()> {
    if password.len() > MAX_PASSWORD_BYTES {
        return Err(Error::Invalid(format!(
            "a password may be at most {MAX_PASSWORD_BYTES} bytes"
        )));
    }
    if password.chars().count() < MIN_PASSWORD_CHARS {
        return Err(Error::Invalid(format!(
            "a password needs at least {MIN_PASSWORD_CHARS} characters (several words are best)"
        )));
    }
    Ok(())
}

/// Argon2id PHC string of `password` (on a blocking thread: it takes tens of milliseconds).
pub async fn hash_password(password: &str) -> Result<String> {
    let password = zeroize::Zeroizing::new(password.as_bytes().to_vec());
    tokio::task::spawn_blocking(move || {
        let mut salt = [0u8; 16];
        getrandom::fill(&mut salt).map_err(Error::internal)?;
        hasher()
            .hash_password_with_salt(&password, &salt)
            .map(|hash| hash.to_string())
            .map_err(Error::internal)
    })
    .await
    .map_err(Error::internal)?
}

/// True when `password` matches the PHC string `stored` (the comparison is constant-time
/// inside the verifier).
async fn verify_password(password: &str, stored: String) -> Result<bool> {
    let password = zeroize::Zeroizing::new(password.as_bytes().to_vec());
    tokio::task::spawn_blocking(move || {
        Ok(hasher().verify_password(&password, stored.as_str()).is_ok())
    })
    .await
    .map_err(Error::internal)?
}

/// A hash of a random password, verified against when the address is unknown, so an unknown
/// address costs the same as a wrong password.
static DUMMY_HASH: LazyLock<String> = LazyLock::new(|| {
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).expect("random");
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).expect("random");
    hasher()
        .hash_password_with_salt(hex::encode(secret).as_bytes(), &salt)
        .expect("hash")
        .to_string()
});

/// Where e-mail links point: `{base}/account/verify?token=...` and `/account/reset?token=...`.
#[derive(Debug, Clone)]
pub struct Links<'a> {
    pub base: &'a str,
    pub mailer: &'a Arc<Mailer>,
}

impl Links<'_> {
    fn send_verify(&self, to: &str, secret: &str) {
        let link = format!("{}/account/verify?token={secret}", self.base);
        self.mailer.send(
            to,
            "Confirm your Polydev e-mail address",
            format!(
                "Open this link to confirm your e-mail address and finish signing up:\n\n{link}\n\n\
                 It works once, for {} hours. If you did not sign up, ignore this message.\n",
                super::email::VERIFY_LINK_HOURS
            ),
        );
    }

    fn send_reset(&self, to: &str, secret: &str, intro: &str) {
        let link = format!("{}/account/reset?token={secret}", self.base);
        self.mailer.send(
            to,
            "Reset your Polydev password",
            format!(
                "{intro}Open this link to choose a new password:\n\n{link}\n\n\
                 It works once, for {} minutes. If you did not ask for it, ignore this message: \
                 your password stays as it is.\n",
                super::email::RESET_LINK_MINUTES
            ),
        );
    }
}

/// Signs up `email`. Whether or not the address has an account, the answer is the same and
/// one message goes to the address: a verification link for a new account, a password-reset
/// link for an existing one.
pub async fn sign_up(pool: &PgPool, links: &Links<'_>, email: &str, password: &str) -> Result<()> {
    let email = normalize_email(email)?;
    check_password_rules(password)?;
    let password_hash = hash_password(password).await?;
    let existing = sqlx::query_scalar!(
        "SELECT user_id FROM users WHERE lower(email) = $1 ORDER BY created_at LIMIT 1",
        &email
    )
    .fetch_optional(pool)
    .await?;
    let mut conn = pool.acquire().await?;
    match existing {
        Some(user_id) => {
            let secret = create_link(&mut conn, user_id, LinkPurpose::Reset).await?;
            links.send_reset(
                &email,
                &secret,
                "Someone (perhaps you) tried to sign up to Polydev with this address, which \
                 already has an account. To sign in, use your password. ",
            );
        }
        None => {
            let user = match create_user(pool, &email, Plan::Free).await {
                Ok(user) => user,
                // Created concurrently by another request: that one sends the mail.
                Err(Error::Conflict(_)) => return Ok(()),
                Err(other) => return Err(other),
            };
            sqlx::query!(
                "INSERT INTO account_passwords (user_id, password_hash) VALUES ($1, $2)",
                user.user_id,
                password_hash
            )
            .execute(&mut *conn)
            .await?;
            let secret = create_link(&mut conn, user.user_id, LinkPurpose::Verify).await?;
            links.send_verify(&email, &secret);
            tracing::info!(user_id = %user.user_id, "account signed up");
        }
    }
    Ok(())
}

/// Checks an e-mail and password; the user on success. A wrong password and an unknown
/// address are the same error after the same work. A correct password of an address not yet
/// verified is refused with `email_unverified`, and a new verification link is sent.
pub async fn sign_in(
    pool: &PgPool,
    links: &Links<'_>,
    email: &str,
    password: &str,
) -> Result<Uuid> {
    let bad = Error::Unauthorized(AuthFailure::BadCredentials);
    let Ok(email) = normalize_email(email) else {
        verify_password(password, DUMMY_HASH.clone()).await?;
        return Err(bad);
    };
    if password.len() > MAX_PASSWORD_BYTES {
        return Err(bad);
    }
    let row = sqlx::query!(
        r#"SELECT p.user_id, p.password_hash, p.email_verified_at, u.status
             FROM users u JOIN account_passwords p ON p.user_id = u.user_id
            WHERE lower(u.email) = $1 ORDER BY u.created_at LIMIT 1"#,
        &email
    )
    .fetch_optional(pool)
    .await?;
    let Some(row) = row else {
        verify_password(password, DUMMY_HASH.clone()).await?;
        return Err(bad);
    };
    if !verify_password(password, row.password_hash).await? {
        return Err(bad);
    }
    super::tokens::account_status(row.status.as_deref())?;
    if row.email_verified_at.is_none() {
        let mut conn = pool.acquire().await?;
        let secret = create_link(&mut conn, row.user_id, LinkPurpose::Verify).await?;
        links.send_verify(&email, &secret);
        return Err(Error::Forbidden {
            code: "email_unverified",
            message: "confirm your e-mail address first: a new link has been sent to it".into(),
        });
    }
    Ok(row.user_id)
}

/// Confirms the address of the link's user.
pub async fn verify_email(pool: &PgPool, secret: &str) -> Result<Uuid> {
    let mut tx = pool.begin().await?;
    let user_id = consume_link(&mut tx, secret, LinkPurpose::Verify).await?;
    sqlx::query!(
        "UPDATE account_passwords SET email_verified_at = coalesce(email_verified_at, now()),
                updated_at = now() WHERE user_id = $1",
        user_id
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    tracing::info!(%user_id, "e-mail address verified");
    Ok(user_id)
}

/// Sends a reset link if the address has an account (a user made by `polydev user create`
/// too: that is how such a user gets a password). The same answer either way.
pub async fn request_password_reset(pool: &PgPool, links: &Links<'_>, email: &str) -> Result<()> {
    let Ok(email) = normalize_email(email) else {
        return Ok(());
    };
    let user = sqlx::query_scalar!(
        "SELECT user_id FROM users WHERE lower(email) = $1 ORDER BY created_at LIMIT 1",
        &email
    )
    .fetch_optional(pool)
    .await?;
    if let Some(user_id) = user {
        let mut conn = pool.acquire().await?;
        let secret = create_link(&mut conn, user_id, LinkPurpose::Reset).await?;
        links.send_reset(&email, &secret, "");
    }
    Ok(())
}

/// Sets a new password with a reset link (which also proves the address), and ends every
/// session of the user.
pub async fn reset_password(pool: &PgPool, secret: &str, password: &str) -> Result<Uuid> {
    check_password_rules(password)?;
    let password_hash = hash_password(password).await?;
    let mut tx = pool.begin().await?;
    let user_id = consume_link(&mut tx, secret, LinkPurpose::Reset).await?;
    sqlx::query!(
        "INSERT INTO account_passwords (user_id, password_hash, email_verified_at)
         VALUES ($1, $2, now())
         ON CONFLICT (user_id) DO UPDATE SET password_hash = EXCLUDED.password_hash,
             email_verified_at = coalesce(account_passwords.email_verified_at, now()),
             updated_at = now()",
        user_id,
        password_hash
    )
    .execute(&mut *tx)
    .await?;
    super::web_sessions::end_all_sessions_in(&mut tx, user_id).await?;
    tx.commit().await?;
    tracing::info!(%user_id, "password reset; every session ended");
    Ok(user_id)
}
