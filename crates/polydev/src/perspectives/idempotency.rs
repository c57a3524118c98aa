//! Idempotency keys: the same key from the same user within 24 hours returns the first call's
//! result and charges nothing again (`perspective_idempotency`).

use std::time::Duration;

use sha2::{Digest, Sha256};
use sqlx::PgPool;
use uuid::Uuid;

use super::{PerspectivesRequest, PerspectivesResult};
use crate::error::{Error, Result};

pub enum Claim {
    /// This call runs; it must `complete` or `release` the key.
    Owner,
    /// An earlier call with this key finished: its result.
    Replay(Box<PerspectivesResult>),
}

/// The arguments, without the key, as a stable hash: a key reused with other arguments is an error.
pub fn request_hash(request: &PerspectivesRequest) -> String {
    let mut request = request.clone();
    request.idempotency_key = None;
    let json = serde_json::to_vec(&request).expect("a request serializes");
    hex::encode(Sha256::digest(json))
}

/// Claims `key` for this call, or waits for the call that holds it and returns its result.
/// A holder that has not finished by `running_for` (it crashed) is taken over.
pub async fn claim(
    pool: &PgPool,
    user_id: Uuid,
    key: &str,
    hash: &str,
    running_for: Duration,
) -> Result<Claim> {
    loop {
        sqlx::query!(
            "DELETE FROM perspective_idempotency
              WHERE user_id = $1 AND idempotency_key = $2
                AND (created_at < now() - interval '24 hours'
                     OR (response IS NULL AND running_until < now()))",
            user_id,
            key
        )
        .execute(pool)
        .await?;
        let claimed = sqlx::query_scalar!(
            r#"INSERT INTO perspective_idempotency (user_id, idempotency_key, request_hash, running_until)
               VALUES ($1, $2, $3, now() + make_interval(secs => $4))
               ON CONFLICT DO NOTHING RETURNING true AS "claimed!""#,
            user_id,
            key,
            hash,
            running_for.as_secs_f64()
        )
        .fetch_optional(pool)
        .await?;
        if claimed.is_some() {
            return Ok(Claim::Owner);
        }
        let existing = sqlx::query!(
            "SELECT request_hash, response FROM perspective_idempotency
              WHERE user_id = $1 AND idempotency_key = $2",
            user_id,
            key
        )
        .fetch_optional(pool)
        .await?
        .map(|row| (row.request_hash, row.response));
        match existing {
            Some((first_hash, _)) if first_hash != hash => {
                return Err(Error::Conflict(
                    "this idempotency_key was already used with different arguments".into(),
                ));
            }
            Some((_, Some(response))) => {
                let mut result: PerspectivesResult =
                    serde_json::from_value(response).map_err(|e| {
                        Error::internal(format_args!("stored idempotent result unreadable: {e}"))
                    })?;
                result.replayed = true;
                return Ok(Claim::Replay(Box::new(result)));
            }
            // The first call is still running (or the row just expired): look again shortly.
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

pub async fn complete(
    pool: &PgPool,
    user_id: Uuid,
    key: &str,
    result: &PerspectivesResult,
) -> Result<()> {
    sqlx::query!(
        "UPDATE perspective_idempotency SET response = $3 WHERE user_id = $1 AND idempotency_key = $2",
        user_id,
        key,
        serde_json::to_value(result).expect("a result serializes")
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// Frees the key of a call that failed as a whole, so a retry runs afresh.
pub async fn release(pool: &PgPool, user_id: Uuid, key: &str) -> Result<()> {
    sqlx::query!(
        "DELETE FROM perspective_idempotency
          WHERE user_id = $1 AND idempotency_key = $2 AND response IS NULL",
        user_id,
        key
    )
    .execute(pool)
    .await?;
    Ok(())
}
