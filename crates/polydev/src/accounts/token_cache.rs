//! The in-process cache of token lookups (docs/operations.md, "Token cache").
//!
//! A bearer token's lookup (its row, its user's status and tier) is kept in this process for at
//! most the cache's TTL, so a call does not ask the database who its token belongs to. Every
//! change that can make a cached answer wrong — a token revoked, deactivated, expired early,
//! re-scoped or deleted; a user suspended, deleted or moved to another tier — fires a trigger
//! in the database (migration 0075) that sends `pg_notify('polydev_auth', <user id>)` in the
//! changing transaction, whatever wrote it (this server, another replica, the admin CLI, the
//! legacy application, `psql`). Every `polydev serve` LISTENs on that channel and drops the
//! user's entries when the notification arrives, i.e. right after the commit.
//!
//! While the listening connection is down nothing is served from the cache nor put into it;
//! when it is back the whole cache is dropped (what happened meanwhile was not heard). A
//! notification that is lost without the connection noticing (a silent network failure) can
//! leave an entry for at most the TTL, after which the database is asked again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::Caller;
use crate::error::Result;

/// The channel the triggers of migration 0075 notify, with a user id (or `*`: everyone).
pub const CHANNEL: &str = "polydev_auth";
/// The default time an answer is kept (`serve --token-cache-ttl`).
pub const DEFAULT_TTL: Duration = Duration::from_secs(15);
/// The longest TTL accepted: a notification lost without the connection noticing leaves a
/// revoked token usable for at most this long.
pub const MAX_TTL: Duration = Duration::from_secs(30);
/// Entries kept at most; when full, the cache is emptied (it refills from the database).
const MAX_ENTRIES: usize = 100_000;

/// A token lookup cache; the default one (no listener) caches nothing.
#[derive(Clone, Default)]
pub struct TokenCache {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    ttl: Duration,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Bumped by every eviction: a lookup that began before it does not store its answer.
    generation: u64,
    /// True while this process is subscribed to [`CHANNEL`].
    listening: bool,
    entries: HashMap<[u8; 32], Entry>,
}

struct Entry {
    caller: Caller,
    expires_at: Option<DateTime<Utc>>,
    cached_at: Instant,
}

/// Where a lookup stands: served from the cache, or to be stored under `generation`.
pub(super) enum Lookup {
    Hit(Caller),
    Miss { generation: u64 },
}

impl TokenCache {
    /// A cache that keeps answers for `ttl` once [`TokenCache::set_listening`] says the
    /// process hears revocations (tests drive it by hand; `polydev serve` uses [`start`]).
    pub fn new(ttl: Duration) -> Self {
        if ttl.is_zero() {
            return TokenCache::default();
        }
        TokenCache {
            inner: Some(Arc::new(Inner {
                ttl: ttl.min(MAX_TTL),
                state: Mutex::new(State::default()),
            })),
        }
    }

    /// Subscribes to [`CHANNEL`] before returning, then keeps listening until `shutdown`,
    /// reconnecting when the connection drops. A zero `ttl` disables the cache.
    pub async fn start(pool: &PgPool, ttl: Duration, shutdown: CancellationToken) -> Result<Self> {
        let cache = TokenCache::new(ttl);
        if cache.inner.is_none() {
            return Ok(cache);
        }
        let mut listener = subscribe(pool).await?;
        cache.set_listening(true);
        let (task_cache, pool) = (cache.clone(), pool.clone());
        tokio::spawn(async move {
            loop {
                let received = tokio::select! {
                    () = shutdown.cancelled() => return,
                    received = listener.try_recv() => received,
                };
                match received {
                    Ok(Some(notification)) => task_cache.apply(notification.payload()),
                    lost => {
                        if let Err(error) = lost {
                            tracing::warn!(%error, "token cache: listening failed; reconnecting");
                        } else {
                            tracing::warn!(
                                "token cache: the listening connection was lost; reconnecting"
                            );
                        }
                        // Nothing from the cache until we hear revocations again.
                        task_cache.set_listening(false);
                        listener = loop {
                            tokio::select! {
                                () = shutdown.cancelled() => return,
                                () = tokio::time::sleep(Duration::from_millis(250)) => {}
                            }
                            match subscribe(&pool).await {
                                Ok(listener) => break listener,
                                Err(error) => {
                                    tracing::warn!(%error, "token cache: could not listen; retrying")
                                }
                            }
                        };
                        task_cache.set_listening(true);
                    }
                }
            }
        });
        Ok(cache)
    }

    /// The TTL, `None` when the cache is off.
    pub fn ttl(&self) -> Option<Duration> {
        self.inner.as_ref().map(|inner| inner.ttl)
    }

    /// Whether this process hears revocations (and so serves from the cache) now.
    pub fn is_listening(&self) -> bool {
        self.inner
            .as_ref()
            .is_some_and(|inner| inner.lock().listening)
    }

    /// Starts or stops serving from the cache. Either way everything cached is dropped: after
    /// a gap in listening, any entry may have been revoked unheard.
    pub fn set_listening(&self, listening: bool) {
        if let Some(inner) = &self.inner {
            let mut state = inner.lock();
            state.listening = listening;
            state.entries.clear();
            state.generation += 1;
        }
    }

    /// Drops every entry of `user_id` (their tokens, or the user, changed).
    pub fn evict_user(&self, user_id: Uuid) {
        if let Some(inner) = &self.inner {
            let mut state = inner.lock();
            state.entries.retain(|_, e| e.caller.user_id != user_id);
            state.generation += 1;
        }
    }

    /// Drops everything.
    pub fn clear(&self) {
        if let Some(inner) = &self.inner {
            let mut state = inner.lock();
            state.entries.clear();
            state.generation += 1;
        }
    }

    /// A notification's payload: a user id, or `*` for everyone. Anything else clears the
    /// cache (better a few lookups than a stale answer).
    fn apply(&self, payload: &str) {
        match payload.parse::<Uuid>() {
            Ok(user_id) => self.evict_user(user_id),
            Err(_) => {
                if payload != "*" {
                    tracing::warn!(%payload, "token cache: unreadable notification; clearing");
                }
                self.clear();
            }
        }
    }

    /// The cached caller of the token whose SHA-256 is `digest`, when fresh.
    pub(super) fn lookup(&self, digest: &[u8; 32], now: Instant) -> Lookup {
        let Some(inner) = &self.inner else {
            return Lookup::Miss { generation: 0 };
        };
        let mut state = inner.lock();
        if state.listening
            && let Some(entry) = state.entries.get(digest)
        {
            let fresh = now.saturating_duration_since(entry.cached_at) < inner.ttl;
            let unexpired = entry.expires_at.is_none_or(|at| at > Utc::now());
            if fresh && unexpired {
                return Lookup::Hit(entry.caller.clone());
            }
            state.entries.remove(digest);
        }
        Lookup::Miss {
            generation: state.generation,
        }
    }

    /// Keeps a lookup's answer, unless something was evicted since it began (`generation`)
    /// or the process is not listening.
    pub(super) fn store(
        &self,
        digest: [u8; 32],
        generation: u64,
        caller: &Caller,
        expires_at: Option<DateTime<Utc>>,
        now: Instant,
    ) {
        let Some(inner) = &self.inner else { return };
        let mut state = inner.lock();
        if !state.listening || state.generation != generation {
            return;
        }
        if state.entries.len() >= MAX_ENTRIES {
            state.entries.clear();
        }
        state.entries.insert(
            digest,
            Entry {
                caller: caller.clone(),
                expires_at,
                cached_at: now,
            },
        );
    }

    /// Entries held now (for tests and metrics).
    pub fn len(&self) -> usize {
        self.inner
            .as_ref()
            .map_or(0, |inner| inner.lock().entries.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

async fn subscribe(pool: &PgPool) -> Result<PgListener> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(CHANNEL).await?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accounts::{Scope, Via};

    fn caller(user_id: Uuid) -> Caller {
        Caller {
            user_id,
            token_id: Uuid::new_v4(),
            rate_limit_tier: None,
            user_tier: None,
            scope: Scope::Mcp,
            audience: None,
            via: Via::Token,
        }
    }

    fn hit(cache: &TokenCache, digest: &[u8; 32], now: Instant) -> Option<Uuid> {
        match cache.lookup(digest, now) {
            Lookup::Hit(c) => Some(c.user_id),
            Lookup::Miss { .. } => None,
        }
    }

    fn miss_generation(cache: &TokenCache, digest: &[u8; 32], now: Instant) -> u64 {
        match cache.lookup(digest, now) {
            Lookup::Miss { generation } => generation,
            Lookup::Hit(_) => panic!("expected a miss"),
        }
    }

    #[test]
    fn entries_live_for_the_ttl_while_listening() {
        let cache = TokenCache::new(Duration::from_secs(10));
        cache.set_listening(true);
        let (user, t0) = (Uuid::new_v4(), Instant::now());
        let g = miss_generation(&cache, &[1; 32], t0);
        cache.store([1; 32], g, &caller(user), None, t0);
        assert_eq!(
            hit(&cache, &[1; 32], t0 + Duration::from_secs(9)),
            Some(user)
        );
        assert_eq!(hit(&cache, &[1; 32], t0 + Duration::from_secs(10)), None);
        assert!(cache.is_empty(), "a stale entry is dropped when read");
    }

    #[test]
    fn an_expired_token_is_not_served() {
        let cache = TokenCache::new(Duration::from_secs(10));
        cache.set_listening(true);
        let now = Instant::now();
        let g = miss_generation(&cache, &[1; 32], now);
        let past = Utc::now() - chrono::Duration::seconds(1);
        cache.store([1; 32], g, &caller(Uuid::new_v4()), Some(past), now);
        assert_eq!(hit(&cache, &[1; 32], now), None);
    }

    #[test]
    fn a_users_eviction_drops_their_entries_only() {
        let cache = TokenCache::new(Duration::from_secs(10));
        cache.set_listening(true);
        let (a, b, now) = (Uuid::new_v4(), Uuid::new_v4(), Instant::now());
        let g = miss_generation(&cache, &[1; 32], now);
        cache.store([1; 32], g, &caller(a), None, now);
        cache.store([2; 32], g, &caller(a), None, now);
        cache.store([3; 32], g, &caller(b), None, now);
        cache.apply(&a.to_string());
        assert_eq!(hit(&cache, &[1; 32], now), None);
        assert_eq!(hit(&cache, &[2; 32], now), None);
        assert_eq!(hit(&cache, &[3; 32], now), Some(b));
        cache.apply("*");
        assert_eq!(hit(&cache, &[3; 32], now), None);
    }

    #[test]
    fn a_lookup_that_raced_an_eviction_is_not_stored() {
        let cache = TokenCache::new(Duration::from_secs(10));
        cache.set_listening(true);
        let (user, now) = (Uuid::new_v4(), Instant::now());
        let g = miss_generation(&cache, &[1; 32], now);
        // The revocation commits (and is heard) while the lookup's answer is on its way.
        cache.evict_user(user);
        cache.store([1; 32], g, &caller(user), None, now);
        assert_eq!(hit(&cache, &[1; 32], now), None);
    }

    #[test]
    fn nothing_is_served_or_kept_while_not_listening() {
        let cache = TokenCache::new(Duration::from_secs(10));
        let (user, now) = (Uuid::new_v4(), Instant::now());
        let g = miss_generation(&cache, &[1; 32], now);
        cache.store([1; 32], g, &caller(user), None, now);
        assert!(cache.is_empty(), "not listening yet");
        cache.set_listening(true);
        let g = miss_generation(&cache, &[1; 32], now);
        cache.store([1; 32], g, &caller(user), None, now);
        assert_eq!(hit(&cache, &[1; 32], now), Some(user));
        // The connection drops: everything goes, and nothing is served until it is back.
        cache.set_listening(false);
        assert_eq!(hit(&cache, &[1; 32], now), None);
        assert!(cache.is_empty());
        cache.set_listening(true);
        assert_eq!(hit(&cache, &[1; 32], now), None, "not refilled by itself");
    }

    #[test]
    fn a_zero_ttl_disables_and_long_ones_are_capped() {
        assert_eq!(TokenCache::new(Duration::ZERO).ttl(), None);
        assert_eq!(
            TokenCache::new(Duration::from_secs(600)).ttl(),
            Some(MAX_TTL)
        );
    }
}
