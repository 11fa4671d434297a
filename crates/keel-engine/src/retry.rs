//! Retry policies: capped exponential backoff with full jitter, a bound on attempts and a
//! bound on elapsed time. The arithmetic is pure; the executor supplies the clock and the
//! random draw, and journals the resulting absolute time so a restart cannot shorten it.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::clock::millis_saturating;
use crate::ids::Attempt;
use crate::limits::{ATTEMPTS_MAX, BACKOFF_MAX};

/// How a step (or a compensation) is retried after a retryable error.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// Ceiling of the first backoff; each later ceiling doubles, up to `backoff_max`.
    pub backoff_initial: Duration,
    /// Largest backoff ceiling.
    pub backoff_max: Duration,
    /// Attempts in all, the first included (1 means no retry).
    pub attempts_max: u32,
    /// No attempt starts later than this after the first attempt started.
    pub elapsed_max: Option<Duration>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy::DEFAULT
    }
}

/// The shorter of two durations, in a `const` context.
const fn shorter(a: Duration, b: Duration) -> Duration {
    if a.as_nanos() < b.as_nanos() {
        a
    } else {
        b
    }
}

impl RetryPolicy {
    /// 8 attempts, backoff ceilings from 100 ms doubling up to 30 s, no bound on elapsed time.
    pub const DEFAULT: RetryPolicy = RetryPolicy {
        backoff_initial: Duration::from_millis(100),
        backoff_max: Duration::from_secs(30),
        attempts_max: 8,
        elapsed_max: None,
    };

    /// The default of a step's compensation ([`crate::Step::COMPENSATION_RETRY_POLICY`]): 10
    /// attempts, backoff ceilings from 200 ms doubling up to 60 s.
    pub const COMPENSATION_DEFAULT: RetryPolicy = RetryPolicy::DEFAULT
        .with_attempts_max(10)
        .with_backoff(Duration::from_millis(200), Duration::from_secs(60));

    /// One attempt, no retries.
    pub const fn no_retry() -> Self {
        RetryPolicy::DEFAULT.with_attempts_max(1)
    }

    /// This policy with `attempts_max` attempts in all (clamped to `1..=ATTEMPTS_MAX`).
    pub const fn with_attempts_max(self, attempts_max: u32) -> Self {
        let attempts_max = if attempts_max < 1 {
            1
        } else if attempts_max > ATTEMPTS_MAX {
            ATTEMPTS_MAX
        } else {
            attempts_max
        };
        RetryPolicy {
            attempts_max,
            ..self
        }
    }

    /// This policy with backoff ceilings from `initial` doubling up to `max` (clamped to
    /// `BACKOFF_MAX`).
    pub const fn with_backoff(self, initial: Duration, max: Duration) -> Self {
        let max = shorter(max, BACKOFF_MAX);
        RetryPolicy {
            backoff_initial: shorter(initial, max),
            backoff_max: max,
            ..self
        }
    }

    /// This policy with a bound on the time from the first attempt to the start of the last.
    pub const fn with_elapsed_max(self, elapsed_max: Duration) -> Self {
        RetryPolicy {
            elapsed_max: Some(elapsed_max),
            ..self
        }
    }

    /// The backoff ceiling after attempt `failed` failed: `initial * 2^(failed-1)`, capped.
    pub fn backoff_ceiling(&self, failed: Attempt) -> Duration {
        let doublings = failed.0.saturating_sub(1).min(62);
        let ceiling_ms = millis_saturating(self.backoff_initial).saturating_mul(1u64 << doublings);
        Duration::from_millis(ceiling_ms)
            .min(self.backoff_max)
            .min(BACKOFF_MAX)
    }

    /// When attempt `failed + 1` may start, or `None` when the policy allows no more attempts.
    ///
    /// `jitter` is a uniform draw from `[0, 1)`: the delay is `jitter * ceiling` (full jitter),
    /// raised to the server's `retry_after` hint when there is one.
    pub fn next_attempt_at_ms(
        &self,
        failed: Attempt,
        first_started_at_ms: u64,
        now_ms: u64,
        retry_after: Option<Duration>,
        jitter: f64,
    ) -> Option<u64> {
        if failed.0 >= self.attempts_max.min(ATTEMPTS_MAX) {
            return None;
        }
        let ceiling_ms = self.backoff_ceiling(failed).as_millis() as f64;
        let mut delay_ms = (jitter.clamp(0.0, 1.0) * ceiling_ms) as u64;
        if let Some(hint) = retry_after {
            delay_ms = delay_ms.max(millis_saturating(hint.min(BACKOFF_MAX)));
        }
        let at_ms = now_ms.saturating_add(delay_ms);
        if let Some(elapsed_max) = self.elapsed_max {
            if at_ms.saturating_sub(first_started_at_ms) > millis_saturating(elapsed_max) {
                return None;
            }
        }
        Some(at_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The builders clamp the same way in a `const` (a step's `RETRY_POLICY`) as at run time.
    #[test]
    fn const_policies_are_clamped_like_built_ones() {
        const NONE: RetryPolicy = RetryPolicy::DEFAULT.with_attempts_max(0);
        const HUGE: RetryPolicy = RetryPolicy::DEFAULT
            .with_attempts_max(u32::MAX)
            .with_backoff(
                Duration::from_secs(7 * 86_400),
                Duration::from_secs(30 * 86_400),
            );
        assert_eq!(NONE.attempts_max, 1);
        assert_eq!(HUGE.attempts_max, ATTEMPTS_MAX);
        assert_eq!(HUGE.backoff_max, BACKOFF_MAX);
        assert_eq!(HUGE.backoff_initial, BACKOFF_MAX);
        assert_eq!(RetryPolicy::default(), RetryPolicy::DEFAULT);
        assert_eq!(RetryPolicy::no_retry().attempts_max, 1);
        let compensation = RetryPolicy::COMPENSATION_DEFAULT;
        assert_eq!(compensation.attempts_max, 10);
        assert_eq!(compensation.backoff_initial, Duration::from_millis(200));
        assert_eq!(compensation.backoff_max, Duration::from_secs(60));
    }

    /// Ceilings double from the initial backoff and stop at the cap.
    #[test]
    fn ceilings_double_then_cap() {
        let p = RetryPolicy::default()
            .with_backoff(Duration::from_millis(100), Duration::from_millis(1000));
        let ceilings: Vec<u64> = (1..=6)
            .map(|a| p.backoff_ceiling(Attempt(a)).as_millis() as u64)
            .collect();
        assert_eq!(ceilings, vec![100, 200, 400, 800, 1000, 1000]);
    }

    /// Full jitter spans [0, ceiling); hints raise the delay; attempts and elapsed time bound it.
    #[test]
    fn next_attempt_time() {
        let p = RetryPolicy::default().with_attempts_max(3);
        assert_eq!(
            p.next_attempt_at_ms(Attempt(1), 0, 1000, None, 0.0),
            Some(1000)
        );
        assert_eq!(
            p.next_attempt_at_ms(Attempt(2), 0, 1000, None, 0.5),
            Some(1100)
        );
        assert_eq!(p.next_attempt_at_ms(Attempt(3), 0, 1000, None, 0.5), None);
        assert_eq!(
            p.next_attempt_at_ms(Attempt(1), 0, 1000, Some(Duration::from_secs(2)), 0.5),
            Some(3000)
        );
        let p = p.with_elapsed_max(Duration::from_millis(1050));
        assert_eq!(
            p.next_attempt_at_ms(Attempt(1), 0, 1000, None, 0.0),
            Some(1000)
        );
        assert_eq!(p.next_attempt_at_ms(Attempt(2), 0, 1000, None, 0.9), None);
    }

    /// Durations longer than milliseconds can count (18446744073709552 s is 2^64 + 384 ms)
    /// saturate instead of wrapping: such a backoff is capped at `BACKOFF_MAX`, not 384 ms,
    /// and such an elapsed bound never ends the retries.
    #[test]
    fn durations_past_what_milliseconds_count_saturate() {
        let huge = Duration::from_secs(18_446_744_073_709_552);
        let p = RetryPolicy {
            backoff_initial: huge,
            backoff_max: huge,
            attempts_max: 3,
            elapsed_max: Some(huge),
        };
        assert_eq!(p.backoff_ceiling(Attempt(1)), BACKOFF_MAX);
        let day_ms = BACKOFF_MAX.as_millis() as u64;
        assert_eq!(
            p.next_attempt_at_ms(Attempt(1), 0, 1000, None, 0.5),
            Some(1000 + day_ms / 2)
        );
    }
}
