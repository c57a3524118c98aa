//! WebRTC signalling between the user's browser and the login agent, through the server.
//!
//! Storage: the offer and the answer land in `auth_sessions.webrtc_offer` / `webrtc_answer`
//! (with who sent them and their numbers); trickle candidates are appended to the JSONB array
//! `ice_candidates` by one `UPDATE` under the row lock, so concurrent appends are serialised,
//! never lost. Every message gets the next number of the session's `signal_seq` in the same
//! statement: both sides share one order.
//!
//! Relay: the same statement calls `pg_notify('polydev_login', …)`, delivered at commit to
//! every `polydev serve` process's listener ([`Relay`]), which hands it to the streams of that
//! session. A message whose notification would pass NOTIFY's 8000-byte limit is announced by a
//! pointer (session and number); the follower reads it from the row. A follower that falls
//! behind, or whose process lost its listening connection, re-reads the row from its last
//! number: nothing is skipped, nothing is delivered twice, and nobody polls.

use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{Login, Session};
use crate::error::{Error, Result};

/// The NOTIFY channel of the relay.
pub const CHANNEL: &str = "polydev_login";
/// Largest SDP (offer or answer), in bytes. Real ones are a few KiB; a browser offer with
/// many codecs stays under 16 KiB.
pub const MAX_SDP: usize = 32 * 1024;
/// Largest candidate line, in bytes.
pub const MAX_CANDIDATE: usize = 1024;
/// Candidates each side may send per attempt (a retry starts again).
pub const MAX_CANDIDATES_PER_SIDE: i64 = 128;
/// Largest `sdpMid` / `usernameFragment`.
const MAX_SHORT_FIELD: usize = 256;
/// Notifications up to this size carry the message; larger ones carry a pointer (NOTIFY's
/// limit is 8000 bytes).
pub const MAX_INLINE_NOTIFY: i32 = 7900;

/// Which peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    /// The user's browser.
    User,
    /// The login agent in the sandbox.
    Agent,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::User => "user",
            Side::Agent => "agent",
        }
    }

    pub fn other(self) -> Side {
        match self {
            Side::User => Side::Agent,
            Side::Agent => Side::User,
        }
    }
}

/// One trickled ICE candidate, as `RTCIceCandidate.toJSON()` gives it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Candidate {
    /// The `candidate:` line; empty for the end of candidates.
    pub candidate: String,
    #[serde(rename = "sdpMid", default)]
    pub sdp_mid: Option<String>,
    #[serde(rename = "sdpMLineIndex", default)]
    pub sdp_mline_index: Option<u16>,
    #[serde(
        rename = "usernameFragment",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub username_fragment: Option<String>,
}

/// What a peer posts.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Signal {
    Offer { sdp: String },
    Answer { sdp: String },
    Candidate { candidate: Candidate },
}

impl Signal {
    fn kind(&self) -> &'static str {
        match self {
            Signal::Offer { .. } => "offer",
            Signal::Answer { .. } => "answer",
            Signal::Candidate { .. } => "candidate",
        }
    }

    /// Sizes within the limits above.
    pub fn check(&self) -> Result<()> {
        match self {
            Signal::Offer { sdp } | Signal::Answer { sdp } => {
                if sdp.trim().is_empty() {
                    return Err(Error::Invalid("`sdp` is empty".into()));
                }
                if sdp.len() > MAX_SDP {
                    return Err(Error::TooLarge(format!(
                        "`sdp` is {} bytes; at most {MAX_SDP}",
                        sdp.len()
                    )));
                }
            }
            Signal::Candidate { candidate } => {
                if candidate.candidate.len() > MAX_CANDIDATE {
                    return Err(Error::TooLarge(format!(
                        "`candidate.candidate` is {} bytes; at most {MAX_CANDIDATE}",
                        candidate.candidate.len()
                    )));
                }
                let long = [&candidate.sdp_mid, &candidate.username_fragment]
                    .into_iter()
                    .flatten()
                    .any(|f| f.len() > MAX_SHORT_FIELD);
                if long {
                    return Err(Error::TooLarge(format!(
                        "`sdpMid` and `usernameFragment` are at most {MAX_SHORT_FIELD} bytes"
                    )));
                }
            }
        }
        Ok(())
    }
}

/// One step of a signalling stream.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// A message of the other side: `{"seq", "from", "type", …}`.
    Signal(Value),
    /// The session changed state (or the stream's first look at it).
    Status(Box<Session>),
}

/// A notification, as the listener passes it on.
#[derive(Debug, Clone)]
enum Note {
    /// A message numbered `seq`; the message itself unless it was too large to carry.
    Signal {
        session: Uuid,
        seq: i64,
        message: Option<Value>,
    },
    /// The session's state changed.
    Status { session: Uuid },
    /// Notifications may have been lost (the listening connection was re-established):
    /// every follower re-reads.
    Resync,
}

impl Note {
    fn parse(payload: &str) -> Option<Note> {
        let value: Value = serde_json::from_str(payload).ok()?;
        let session = value.get("s")?.as_str()?.parse().ok()?;
        if value.get("st").is_some() {
            return Some(Note::Status { session });
        }
        let seq = value.get("q")?.as_i64()?;
        let message = match (value.get("f"), value.get("m")) {
            (Some(Value::String(from)), Some(Value::Object(m))) => {
                let mut object = serde_json::Map::new();
                object.insert("seq".into(), seq.into());
                object.insert("from".into(), from.clone().into());
                object.extend(m.clone());
                Some(Value::Object(object))
            }
            _ => None,
        };
        Some(Note::Signal {
            session,
            seq,
            message,
        })
    }

    fn session(&self) -> Option<Uuid> {
        match self {
            Note::Signal { session, .. } | Note::Status { session } => Some(*session),
            Note::Resync => None,
        }
    }
}

/// This process's listener on [`CHANNEL`], fanned out to its followers.
#[derive(Clone)]
pub struct Relay {
    notes: broadcast::Sender<Arc<Note>>,
}

impl Relay {
    /// Listens before returning (nothing committed after this returns is missed), then keeps
    /// listening until `shutdown`, reconnecting when the connection drops.
    pub async fn start(pool: &PgPool, shutdown: CancellationToken) -> Result<Relay> {
        let mut listener = PgListener::connect_with(pool).await?;
        listener.listen(CHANNEL).await?;
        let (notes, _) = broadcast::channel(4096);
        let relay = Relay {
            notes: notes.clone(),
        };
        tokio::spawn(async move {
            loop {
                let received = tokio::select! {
                    () = shutdown.cancelled() => return,
                    received = listener.try_recv() => received,
                };
                let note = match received {
                    Ok(Some(notification)) => match Note::parse(notification.payload()) {
                        Some(note) => note,
                        None => {
                            tracing::warn!(payload = %notification.payload(), "unreadable login notification");
                            continue;
                        }
                    },
                    // The connection was lost and is re-established on the next call:
                    // whatever was sent meanwhile is gone.
                    Ok(None) => Note::Resync,
                    Err(error) => {
                        tracing::warn!(%error, "login relay: listening failed; retrying");
                        tokio::select! {
                            () = shutdown.cancelled() => return,
                            () = tokio::time::sleep(Duration::from_millis(500)) => {}
                        }
                        Note::Resync
                    }
                };
                let _ = notes.send(Arc::new(note));
            }
        });
        Ok(relay)
    }

    fn subscribe(&self) -> broadcast::Receiver<Arc<Note>> {
        self.notes.subscribe()
    }
}

/// What of a session's signalling a follower has not seen.
struct Stored {
    /// The session's counter when read: everything up to it is in `messages`.
    seq: i64,
    /// Of the side asked for, after the number asked for, in order.
    messages: Vec<Value>,
}

fn to_value(value: &impl Serialize) -> Result<Value> {
    serde_json::to_value(value).map_err(|e| Error::internal(format!("serialising a signal: {e}")))
}

/// Sends a status note for `session` (its state changed).
pub(crate) async fn notify_status(pool: &PgPool, session: Uuid) -> Result<()> {
    let payload = json!({ "s": session, "st": true }).to_string();
    sqlx::query!("SELECT pg_notify($1, $2)::text AS done", CHANNEL, payload)
        .fetch_one(pool)
        .await?;
    Ok(())
}

impl Login {
    /// Stores `signal` from `side` and relays it. `owner`: the user the session must belong
    /// to (the user's side); the agent's side is authenticated already. Returns its number.
    pub async fn post_signal(
        &self,
        session: Uuid,
        owner: Option<Uuid>,
        side: Side,
        signal: &Signal,
    ) -> Result<i64> {
        signal.check()?;
        let kind = signal.kind();
        let sdp = match signal {
            Signal::Offer { sdp } | Signal::Answer { sdp } => Some(sdp.as_str()),
            Signal::Candidate { .. } => None,
        };
        let candidate = match signal {
            Signal::Candidate { candidate } => Some(to_value(candidate)?),
            _ => None,
        };
        let message = to_value(signal)?;
        let posted = sqlx::query!(
            r#"WITH updated AS (
                   UPDATE auth_sessions SET
                       signal_seq = signal_seq + 1,
                       webrtc_offer = CASE WHEN $3 = 'offer' THEN $4 ELSE webrtc_offer END,
                       offer_from = CASE WHEN $3 = 'offer' THEN $5 ELSE offer_from END,
                       offer_seq = CASE WHEN $3 = 'offer' THEN signal_seq + 1 ELSE offer_seq END,
                       webrtc_answer = CASE WHEN $3 = 'answer' THEN $4 ELSE webrtc_answer END,
                       answer_from = CASE WHEN $3 = 'answer' THEN $5 ELSE answer_from END,
                       answer_seq = CASE WHEN $3 = 'answer' THEN signal_seq + 1 ELSE answer_seq END,
                       ice_candidates = CASE WHEN $3 = 'candidate'
                           THEN COALESCE(ice_candidates, '[]'::jsonb) || jsonb_build_array(
                                    jsonb_build_object('seq', signal_seq + 1, 'from', $5::text,
                                                       'candidate', $6::jsonb))
                           ELSE ice_candidates END
                   WHERE session_id = $1 AND ($2::uuid IS NULL OR user_id = $2)
                     AND status IN ('pending', 'authenticating') AND timeout_at > NOW()
                     AND ($3 <> 'candidate' OR (
                         SELECT COUNT(*) FROM jsonb_array_elements(COALESCE(ice_candidates, '[]'::jsonb)) e
                         WHERE e->>'from' = $5) < $7)
                   RETURNING signal_seq
               )
               SELECT signal_seq AS "seq!",
                      pg_notify($8, CASE WHEN octet_length($9::text) <= $10
                          THEN json_build_object('s', $1::uuid, 'q', signal_seq, 'f', $5::text,
                                                 'm', $9::json)::text
                          ELSE json_build_object('s', $1::uuid, 'q', signal_seq)::text END)::text
                          AS "notified"
               FROM updated"#,
            session,
            owner,
            kind,
            sdp,
            side.as_str(),
            candidate,
            MAX_CANDIDATES_PER_SIDE,
            CHANNEL,
            message.to_string(),
            MAX_INLINE_NOTIFY - 200,
        )
        .fetch_optional(&self.pool)
        .await?;
        match posted {
            Some(posted) => Ok(posted.seq),
            None => Err(self.why_refused(session, owner, side).await?),
        }
    }

    /// Why a signalling write touched no row.
    async fn why_refused(&self, session: Uuid, owner: Option<Uuid>, side: Side) -> Result<Error> {
        let row = sqlx::query!(
            r#"SELECT status AS "status!", timeout_at <= NOW() AS "expired!",
                      (SELECT COUNT(*) FROM jsonb_array_elements(COALESCE(ice_candidates, '[]'::jsonb)) e
                       WHERE e->>'from' = $3) AS "candidates!"
               FROM auth_sessions WHERE session_id = $1 AND ($2::uuid IS NULL OR user_id = $2)"#,
            session,
            owner,
            side.as_str()
        )
        .fetch_optional(&self.pool)
        .await?;
        Ok(match row {
            None => Error::NotFound("login session"),
            Some(row) if !super::auth_sessions::is_live(&row.status) => Error::Conflict(format!(
                "the login session is {}: it takes no more signalling",
                row.status
            )),
            Some(row) if row.expired => Error::Conflict(
                "the login session has timed out: it takes no more signalling".into(),
            ),
            Some(row) if row.candidates >= MAX_CANDIDATES_PER_SIDE => Error::TooLarge(format!(
                "at most {MAX_CANDIDATES_PER_SIDE} candidates per side and attempt"
            )),
            Some(_) => Error::Conflict("the login session changed meanwhile; try again".into()),
        })
    }

    /// The messages `from` sent with a number above `after`, in order.
    async fn stored(&self, session: Uuid, from: Side, after: i64) -> Result<Stored> {
        let row = sqlx::query!(
            r#"SELECT signal_seq, webrtc_offer, offer_from, offer_seq, webrtc_answer, answer_from,
                      answer_seq, ice_candidates
               FROM auth_sessions WHERE session_id = $1"#,
            session
        )
        .fetch_optional(&self.pool)
        .await?
        .ok_or(Error::NotFound("login session"))?;
        let from_str = from.as_str();
        let mut messages = Vec::new();
        for (kind, sdp, who, seq) in [
            ("offer", row.webrtc_offer, row.offer_from, row.offer_seq),
            ("answer", row.webrtc_answer, row.answer_from, row.answer_seq),
        ] {
            if let (Some(sdp), Some(who), Some(seq)) = (sdp, who, seq)
                && who == from_str
                && seq > after
            {
                messages.push(json!({ "seq": seq, "from": who, "type": kind, "sdp": sdp }));
            }
        }
        if let Some(Value::Array(candidates)) = row.ice_candidates {
            for entry in candidates {
                let seq = entry.get("seq").and_then(Value::as_i64).unwrap_or(0);
                if entry.get("from").and_then(Value::as_str) == Some(from_str) && seq > after {
                    messages.push(json!({
                        "seq": seq,
                        "from": from_str,
                        "type": "candidate",
                        "candidate": entry.get("candidate").cloned().unwrap_or(Value::Null),
                    }));
                }
            }
        }
        messages.sort_by_key(|m| m.get("seq").and_then(Value::as_i64).unwrap_or(0));
        Ok(Stored {
            seq: row.signal_seq,
            messages,
        })
    }

    /// The stream of `reader`: first every stored message of the other side, then the
    /// session's state, then what comes, live; it ends after the session has finished (its
    /// last status), or at `shutdown`. Errors (unknown session, finished) come before it
    /// starts. `owner`: the user the session must belong to (the user's side).
    pub async fn follow(
        &self,
        session: Uuid,
        owner: Option<Uuid>,
        reader: Side,
        shutdown: CancellationToken,
    ) -> Result<impl Stream<Item = Step> + Send + use<>> {
        // Subscribe before reading, so nothing committed in between is missed.
        let mut notes = self.relay.subscribe();
        let current = self.session_any(session).await?;
        if owner.is_some_and(|owner| owner != current.1) {
            return Err(Error::NotFound("login session"));
        }
        let current = current.0;
        if !super::auth_sessions::is_live(&current.status) {
            return Err(Error::Conflict(format!(
                "the login session is {}: it takes no more signalling",
                current.status
            )));
        }
        let (tx, rx) = mpsc::channel::<Step>(64);
        let login = self.clone();
        let from = reader.other();
        tokio::spawn(async move {
            let run = async {
                let stored = login.stored(session, from, 0).await.ok()?;
                let mut last = stored.seq;
                for message in stored.messages {
                    tx.send(Step::Signal(message)).await.ok()?;
                }
                let mut status = current.status.clone();
                tx.send(Step::Status(Box::new(current))).await.ok()?;
                loop {
                    let note = tokio::select! {
                        () = tx.closed() => return None,
                        () = shutdown.cancelled() => return None,
                        note = notes.recv() => note,
                    };
                    let resync = match note {
                        Ok(note) if note.session().is_some_and(|s| s != session) => continue,
                        Ok(note) => match &*note {
                            Note::Signal {
                                seq,
                                message: Some(message),
                                ..
                            } if *seq > last => {
                                last = *seq;
                                if message.get("from").and_then(Value::as_str)
                                    == Some(from.as_str())
                                {
                                    tx.send(Step::Signal(message.clone())).await.ok()?;
                                }
                                false
                            }
                            Note::Signal { seq, .. } if *seq <= last => false,
                            Note::Signal { .. } => true,
                            Note::Status { .. } => {
                                let (now, _) = login.session_any(session).await.ok()?;
                                if now.status != status {
                                    status = now.status.clone();
                                    let live = super::auth_sessions::is_live(&status);
                                    tx.send(Step::Status(Box::new(now))).await.ok()?;
                                    if !live {
                                        return None;
                                    }
                                }
                                false
                            }
                            Note::Resync => true,
                        },
                        Err(broadcast::error::RecvError::Lagged(_)) => true,
                        Err(broadcast::error::RecvError::Closed) => return None,
                    };
                    if resync {
                        let stored = login.stored(session, from, last).await.ok()?;
                        last = last.max(stored.seq);
                        for message in stored.messages {
                            tx.send(Step::Signal(message)).await.ok()?;
                        }
                        let (now, _) = login.session_any(session).await.ok()?;
                        if now.status != status {
                            status = now.status.clone();
                            let live = super::auth_sessions::is_live(&status);
                            tx.send(Step::Status(Box::new(now))).await.ok()?;
                            if !live {
                                return None;
                            }
                        }
                    }
                }
            };
            let _: Option<()> = run.await;
        });
        Ok(futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|step| (step, rx))
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_carry_the_message_or_a_pointer() {
        let session = Uuid::new_v4();
        let inline =
            json!({"s": session, "q": 3, "f": "agent", "m": {"type": "answer", "sdp": "v=0"}});
        match Note::parse(&inline.to_string()) {
            Some(Note::Signal {
                seq: 3,
                message: Some(m),
                ..
            }) => assert_eq!(
                m,
                json!({"seq": 3, "from": "agent", "type": "answer", "sdp": "v=0"})
            ),
            other => panic!("{other:?}"),
        }
        let pointer = json!({"s": session, "q": 4});
        assert!(matches!(
            Note::parse(&pointer.to_string()),
            Some(Note::Signal {
                seq: 4,
                message: None,
                ..
            })
        ));
        let status = json!({"s": session, "st": true});
        assert!(matches!(
            Note::parse(&status.to_string()),
            Some(Note::Status { .. })
        ));
        assert!(Note::parse("not json").is_none());
    }

    #[test]
    fn signals_parse_as_the_browser_sends_them_and_are_bounded() {
        let candidate: Signal = serde_json::from_value(json!({
            "type": "candidate",
            "candidate": {"candidate": "candidate:1 1 udp 1 127.0.0.1 9 typ host", "sdpMid": "0", "sdpMLineIndex": 0}
        }))
        .unwrap();
        candidate.check().unwrap();
        let huge = Signal::Offer {
            sdp: "a".repeat(MAX_SDP + 1),
        };
        assert!(matches!(huge.check(), Err(Error::TooLarge(_))));
        let empty = Signal::Answer { sdp: " ".into() };
        assert!(matches!(empty.check(), Err(Error::Invalid(_))));
    }
}
