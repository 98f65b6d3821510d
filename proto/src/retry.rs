//! Retrying control-plane calls that may succeed later (see
//! [`ApiError::is_retryable`]): exponential backoff up to a deadline.
//!
//! [`Backoff`] is the pure schedule (unit-tested without a clock);
//! [`retry`] runs a call on it with `tokio::time`, logging each retry once.

use std::future::Future;
use std::time::Duration;

use crate::ApiError;

/// Delays between attempts: `initial`, doubling up to `max`, until `deadline` has
/// passed since the first failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Delay after the first failure.
    pub initial: Duration,
    /// Longest delay between two attempts.
    pub max: Duration,
    /// Give up once this long has passed since the first failure; zero: never retry.
    pub deadline: Duration,
}

impl Backoff {
    /// 100 ms doubling to 1 s, giving up after `deadline`. The 1 s cap: a worker
    /// notices a restarted coordinator within about a second.
    pub fn until(deadline: Duration) -> Self {
        Self {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
            deadline,
        }
    }

    /// The delay before attempt `attempt + 1` (after `attempt` failures, >= 1), when
    /// `elapsed` has passed since the first failure; `None`: give up. The last delay
    /// is cut so that the last attempt falls on the deadline.
    pub fn delay(&self, attempt: u32, elapsed: Duration) -> Option<Duration> {
        let left = self
            .deadline
            .checked_sub(elapsed)
            .filter(|d| !d.is_zero())?;
        let doublings = attempt.saturating_sub(1).min(31);
        let delay = self
            .initial
            .checked_mul(1u32 << doublings)
            .map_or(self.max, |d| d.min(self.max));
        Some(delay.min(left))
    }
}

/// Why [`retry`] gave up.
#[derive(Debug, thiserror::Error)]
pub enum RetryError {
    /// The error is not one that trying again could fix.
    #[error(transparent)]
    Fatal(ApiError),
    /// Every attempt failed with a retryable error until the deadline.
    #[error("gave up after retrying for {:.0} s ({attempts} attempts)", elapsed.as_secs_f64())]
    GaveUp {
        /// Attempts made.
        attempts: u32,
        /// Time from the first failure to giving up.
        elapsed: Duration,
        /// The last attempt's error.
        #[source]
        last: ApiError,
    },
}

impl RetryError {
    /// The coordinator's error (the last one, when retries ran out).
    pub fn api_error(&self) -> &ApiError {
        match self {
            Self::Fatal(err) | Self::GaveUp { last: err, .. } => err,
        }
    }
}

/// Runs `call` until it succeeds, fails with an error that is not retryable, or
/// `backoff`'s deadline passes; each retry is logged once (warn) with `action` and
/// the error.
pub async fn retry<T, F, Fut>(action: &str, backoff: Backoff, mut call: F) -> Result<T, RetryError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, ApiError>>,
{
    let mut first_failure: Option<tokio::time::Instant> = None;
    let mut attempt = 0u32;
    loop {
        let err = match call().await {
            Ok(value) => {
                if attempt > 0 {
                    tracing::info!(action, attempts = attempt + 1, "succeeded after retrying");
                }
                return Ok(value);
            }
            Err(err) if err.is_retryable() => err,
            Err(err) => return Err(RetryError::Fatal(err)),
        };
        attempt += 1;
        let since = *first_failure.get_or_insert_with(tokio::time::Instant::now);
        let elapsed = since.elapsed();
        let Some(delay) = backoff.delay(attempt, elapsed) else {
            return Err(RetryError::GaveUp {
                attempts: attempt,
                elapsed,
                last: err,
            });
        };
        tracing::warn!(action, attempt, error = %err, retry_in = ?delay, "retrying a coordinator call");
        tokio::time::sleep(delay).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_doubles_from_100_ms_to_1_s() {
        let b = Backoff::until(Duration::from_secs(600));
        let delays: Vec<u64> = (1..=9)
            .map(|attempt| b.delay(attempt, Duration::ZERO).unwrap().as_millis() as u64)
            .collect();
        assert_eq!(delays, [100, 200, 400, 800, 1000, 1000, 1000, 1000, 1000]);
        assert_eq!(b.delay(u32::MAX, Duration::ZERO), Some(b.max));
    }

    #[test]
    fn the_schedule_stops_at_the_deadline_and_lands_on_it() {
        let b = Backoff::until(Duration::from_secs(1));
        assert_eq!(
            b.delay(5, Duration::from_millis(900)),
            Some(Duration::from_millis(100)),
            "the last delay is cut to the time left"
        );
        assert_eq!(b.delay(1, Duration::from_secs(1)), None);
        assert_eq!(b.delay(1, Duration::from_secs(2)), None);
        assert_eq!(
            Backoff::until(Duration::ZERO).delay(1, Duration::ZERO),
            None
        );
    }

    #[tokio::test(start_paused = true)]
    async fn retryable_errors_are_retried_until_success() {
        let mut calls = 0;
        let value = retry("ask", Backoff::until(Duration::from_secs(60)), || {
            calls += 1;
            let result = if calls < 4 {
                Err(ApiError::Unavailable("down".into()))
            } else {
                Ok(calls)
            };
            async move { result }
        })
        .await
        .unwrap();
        assert_eq!(value, 4);
    }

    #[tokio::test(start_paused = true)]
    async fn retries_give_up_at_the_deadline_naming_the_last_error() {
        let started = tokio::time::Instant::now();
        let err = retry("ask", Backoff::until(Duration::from_secs(2)), || async {
            Err::<(), _>(ApiError::Unavailable("connection refused".into()))
        })
        .await
        .unwrap_err();
        let RetryError::GaveUp { attempts, last, .. } = &err else {
            panic!("{err:?}")
        };
        // 100 + 200 + 400 + 800 ms, then the 500 ms left: 6 attempts in 2 s.
        assert_eq!(*attempts, 6);
        assert_eq!(*last, ApiError::Unavailable("connection refused".into()));
        assert_eq!(started.elapsed(), Duration::from_secs(2));
        assert_eq!(
            err.to_string(),
            "gave up after retrying for 2 s (6 attempts)"
        );
        // The cause stays reachable as the source (what `{:#}` prints after it).
        let source = std::error::Error::source(&err).map(ToString::to_string);
        assert_eq!(
            source.as_deref(),
            Some("coordinator unavailable: connection refused")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn errors_that_are_not_retryable_fail_at_once() {
        for fatal in [
            ApiError::Refused("r".into()),
            ApiError::InvalidArgument("i".into()),
            ApiError::UnknownWorker("u".into()),
            ApiError::Internal("x".into()),
        ] {
            let mut calls = 0;
            let err = retry("ask", Backoff::until(Duration::from_secs(60)), || {
                calls += 1;
                let fatal = fatal.clone();
                async move { Err::<(), _>(fatal) }
            })
            .await
            .unwrap_err();
            assert_eq!(calls, 1, "{fatal:?}");
            assert!(
                matches!(&err, RetryError::Fatal(e) if *e == fatal),
                "{err:?}"
            );
        }
    }
}
