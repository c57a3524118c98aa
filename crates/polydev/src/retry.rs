//! The one retry policy for outbound calls worth repeating: provider calls
//! (`perspectives::provider`) and the `polydev zk` client's calls to a polydev server.
//!
//! A bounded number of attempts, exponential backoff with jitter, and a server's `Retry-After`
//! honoured when it fits within the longest wait: a longer one gives up rather than retrying
//! before the server said it would accept the call. What is worth retrying is the caller's
//! decision ([`Verdict`]).

use std::future::Future;
use std::time::{Duration, Instant};

use reqwest::header::{HeaderMap, RETRY_AFTER};

/// How often and how long to retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first one included.
    pub max_attempts: u32,
    /// The first backoff's upper bound; it doubles with each further attempt.
    pub base_delay: Duration,
    /// The longest wait: a computed backoff is capped at it; a longer `Retry-After` gives up.
    pub max_wait: Duration,
}

/// What an attempt's outcome calls for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Done: a success, or a failure that another attempt would not change.
    Done,
    /// A transient failure: try again, after the server's `Retry-After` when it gave one.
    Retry { after: Option<Duration> },
}

impl RetryPolicy {
    /// How long to wait after failed attempt `attempt` (1-based) before the next one, or `None`
    /// to give up.
    pub fn backoff(&self, attempt: u32, retry_after: Option<Duration>) -> Option<Duration> {
        if attempt >= self.max_attempts {
            return None;
        }
        if let Some(wait) = retry_after {
            return (wait <= self.max_wait).then_some(wait);
        }
        let exp = self
            .base_delay
            .saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1)))
            .min(self.max_wait);
        // Jitter in [exp/2, exp]: clients retrying together do not stampede.
        let jitter = f64::from(getrandom::u32().unwrap_or(0) % 1000) / 1000.0;
        Some(exp / 2 + (exp / 2).mul_f64(jitter))
    }

    /// Runs `attempt` until `verdict` says it is done or the policy gives up, and returns the
    /// last outcome. `on_retry` sees each outcome retried, its attempt number and the wait.
    pub async fn run<T, Fut>(
        &self,
        attempt: impl FnMut() -> Fut,
        verdict: impl Fn(&T) -> Verdict,
        on_retry: impl FnMut(&T, u32, Duration),
    ) -> T
    where
        Fut: Future<Output = T>,
    {
        self.run_until(None, attempt, verdict, on_retry).await
    }

    /// [`RetryPolicy::run`] for a caller with a deadline: a retry whose backoff would end at
    /// or after `deadline` is not waited for; the last outcome is returned at once (its own
    /// error, rather than a sleep the deadline would cut).
    pub async fn run_until<T, Fut>(
        &self,
        deadline: Option<Instant>,
        mut attempt: impl FnMut() -> Fut,
        verdict: impl Fn(&T) -> Verdict,
        mut on_retry: impl FnMut(&T, u32, Duration),
    ) -> T
    where
        Fut: Future<Output = T>,
    {
        let mut n = 0;
        loop {
            n += 1;
            let outcome = attempt().await;
            let Verdict::Retry { after } = verdict(&outcome) else {
                return outcome;
            };
            let Some(wait) = self.backoff(n, after) else {
                return outcome;
            };
            if deadline.is_some_and(|deadline| Instant::now() + wait >= deadline) {
                return outcome;
            }
            on_retry(&outcome, n, wait);
            // Release what the outcome holds (a response's connection) before sleeping.
            drop(outcome);
            tokio::time::sleep(wait).await;
        }
    }
}

/// A `Retry-After` header in seconds. (Its HTTP-date form is not parsed: the servers polydev
/// calls send seconds.)
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get(RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    const POLICY: RetryPolicy = RetryPolicy {
        max_attempts: 3,
        base_delay: Duration::from_millis(200),
        max_wait: Duration::from_secs(5),
    };

    #[test]
    fn backoff_grows_with_jitter_and_stops_at_the_bound() {
        for _ in 0..50 {
            let first = POLICY.backoff(1, None).expect("retried");
            assert!(first >= Duration::from_millis(100) && first <= POLICY.base_delay);
            let second = POLICY.backoff(2, None).expect("retried");
            assert!(second >= Duration::from_millis(200) && second <= 2 * POLICY.base_delay);
        }
        assert_eq!(POLICY.backoff(POLICY.max_attempts, None), None);
        let capped = RetryPolicy {
            max_attempts: 100,
            ..POLICY
        };
        let late = capped.backoff(60, None).expect("retried");
        assert!(
            late <= POLICY.max_wait && late >= POLICY.max_wait / 2,
            "{late:?}"
        );
    }

    #[test]
    fn retry_after_is_honoured_within_the_longest_wait() {
        let two = Some(Duration::from_secs(2));
        assert_eq!(POLICY.backoff(1, two), two);
        assert_eq!(POLICY.backoff(POLICY.max_attempts, two), None);
        assert_eq!(
            POLICY.backoff(1, Some(Duration::from_secs(60))),
            None,
            "too long a wait is a failure, not an early retry"
        );
    }

    #[test]
    fn retry_after_header_in_seconds() {
        let mut headers = HeaderMap::new();
        assert_eq!(retry_after(&headers), None);
        headers.insert(RETRY_AFTER, " 7 ".parse().unwrap());
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(7)));
        headers.insert(
            RETRY_AFTER,
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&headers), None);
    }

    #[tokio::test]
    async fn run_retries_until_done_or_the_bound() {
        let fast = RetryPolicy {
            max_attempts: 4,
            base_delay: Duration::from_millis(1),
            max_wait: Duration::from_millis(10),
        };
        let calls = AtomicU32::new(0);
        let retried = AtomicU32::new(0);
        let outcome = fast
            .run(
                || async { calls.fetch_add(1, Ordering::SeqCst) + 1 },
                |&n| match n {
                    1 | 2 => Verdict::Retry { after: None },
                    _ => Verdict::Done,
                },
                |_, _, _| {
                    retried.fetch_add(1, Ordering::SeqCst);
                },
            )
            .await;
        assert_eq!((outcome, retried.into_inner()), (3, 2));

        calls.store(0, Ordering::SeqCst);
        let outcome = fast
            .run(
                || async { calls.fetch_add(1, Ordering::SeqCst) + 1 },
                |_| Verdict::Retry { after: None },
                |_, _, _| {},
            )
            .await;
        assert_eq!(outcome, fast.max_attempts, "never more than the bound");
    }

    #[tokio::test]
    async fn no_retry_is_waited_for_past_the_deadline() {
        let slow = RetryPolicy {
            max_attempts: 5,
            base_delay: Duration::from_secs(60),
            max_wait: Duration::from_secs(60),
        };
        let calls = AtomicU32::new(0);
        let deadline = Instant::now() + Duration::from_secs(10);
        let outcome = slow
            .run_until(
                Some(deadline),
                || async { calls.fetch_add(1, Ordering::SeqCst) + 1 },
                |_| Verdict::Retry { after: None },
                |_, _, _| panic!("no backoff fits before the deadline"),
            )
            .await;
        assert_eq!(outcome, 1, "the first outcome, returned at once");
    }
}
