//! Durable waits: poll a probe until it holds `k` times in a row or a deadline passes.
//!
//! The wait's start (with its resolved schedule and absolute deadline) and its end are
//! journaled, and its polls so far whenever its run parks between two polls, never a single
//! poll; a restart resumes polling under the journaled schedule and deadline. The schedule is
//! resolved once, when the wait starts, from an explicit policy or from the recorded latency
//! statistics of the wait's kind ([`WaitPolicy::learned`]), and the journaled schedule is what
//! replay and resumption use, so later statistics never change a wait already under way.

use std::future::Future;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::clock::millis_saturating;
use crate::journal::WaitSchedule;
use crate::stats::OperationStats;
use crate::step::{StepContext, StepError};

/// A read that tells whether something is ready: `Ok(Some(output))` when it is, `Ok(None)`
/// when not yet. A retryable error (throttling, a timeout, a 5xx) is no answer: it neither
/// counts as a confirmation nor breaks a run of them (see [`crate::limits::UNANSWERED_POLLS_MAX`]); a
/// permanent error ends the wait as failed.
pub trait Probe: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The wait kind, e.g. `iam.role-assumable`. Groups the wait's statistics.
    const KIND: &'static str;

    /// What a successful probe returns; the last confirmation's output is the wait's result.
    type Output: Serialize + DeserializeOwned + Send + 'static;

    /// One poll. `ctx.attempt()` is the poll number (from 1, counted since the wait or its
    /// resumption began).
    fn probe(
        &self,
        ctx: &StepContext,
    ) -> impl Future<Output = Result<Option<Self::Output>, StepError>> + Send;

    /// The rate-limited service the probe calls, if any (as [`crate::Step::rate_limit`]).
    fn rate_limit(&self) -> Option<&str> {
        None
    }
}

/// How to wait: when to poll, how many confirmations, and for how long at most.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WaitPolicy {
    /// No poll before this much time has passed.
    pub initial_delay: Duration,
    /// The first interval between polls.
    pub interval: Duration,
    /// Each later interval is the previous one times this (1.0: fixed interval).
    pub growth: f64,
    /// Intervals never exceed this.
    pub interval_max: Duration,
    /// Each interval is stretched or shrunk at random by up to this fraction (0..1).
    pub jitter: f64,
    /// Consecutive successful polls needed (for reads that flap).
    pub confirmations: u32,
    /// The wait is judged hopeless by a "not ready" answer to a poll sent this long after it
    /// starts or later (plus the time its polls queued at the rate limiter).
    pub timeout: Duration,
    /// Derive the schedule from the wait kind's statistics once this many samples exist.
    pub learn_after: Option<u64>,
    /// Where a learned schedule puts its deadline.
    #[serde(default)]
    pub learned_deadline: LearnedDeadline,
}

/// Where a learned schedule judges waiting hopeless.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LearnedDeadline {
    /// Past the far tail: twice p99.9, and past 1.2x the slowest seen. For waits with no
    /// alternative to waiting.
    #[default]
    FarTail,
    /// Past the usual tail: twice p90 (robust to a few outliers in the samples). For a
    /// resource that can be created again ([`crate::Ctx::create_and_wait`]): a fresh one
    /// usually takes about p50, so waiting on one already past twice p90 costs more than
    /// replacing it.
    UsualTail,
}

impl Default for WaitPolicy {
    fn default() -> Self {
        Self {
            initial_delay: Duration::ZERO,
            interval: Duration::from_secs(1),
            growth: 1.5,
            interval_max: Duration::from_secs(30),
            jitter: 0.2,
            confirmations: 1,
            timeout: Duration::from_secs(600),
            learn_after: None,
            learned_deadline: LearnedDeadline::FarTail,
        }
    }
}

impl WaitPolicy {
    /// Polls every `interval`, growing by 1.5x per poll up to 30 s, for at most `timeout`.
    pub fn every(interval: Duration, timeout: Duration) -> Self {
        Self {
            interval,
            timeout,
            ..Self::default()
        }
    }

    /// A schedule learned from the statistics of the wait's kind once
    /// [`LEARN_AFTER_DEFAULT`] samples exist; until then, these explicit settings.
    pub fn learned(self) -> Self {
        Self {
            learn_after: Some(LEARN_AFTER_DEFAULT),
            ..self
        }
    }

    /// Learns only once `samples` samples exist.
    pub fn learn_after(self, samples: u64) -> Self {
        Self {
            learn_after: Some(samples.max(1)),
            ..self
        }
    }

    /// Where a learned schedule puts its deadline.
    pub fn learned_deadline(self, deadline: LearnedDeadline) -> Self {
        Self {
            learned_deadline: deadline,
            ..self
        }
    }

    /// Needs `k` consecutive successful polls.
    pub fn confirmations(self, k: u32) -> Self {
        Self {
            confirmations: k.max(1),
            ..self
        }
    }

    /// No poll before `delay`.
    pub fn initial_delay(self, delay: Duration) -> Self {
        Self {
            initial_delay: delay,
            ..self
        }
    }

    /// Growth factor of the interval (1.0 for a fixed interval).
    pub fn growth(self, growth: f64) -> Self {
        Self {
            growth: growth.max(1.0),
            ..self
        }
    }

    /// Jitter fraction (0 for none).
    pub fn jitter(self, jitter: f64) -> Self {
        Self {
            jitter: jitter.clamp(0.0, 1.0),
            ..self
        }
    }

    /// Resolves the policy into the schedule of a wait starting at `start_ms`, from `stats`
    /// (the wait kind's statistics) when the policy learns and enough samples exist.
    pub fn resolve(&self, start_ms: u64, stats: Option<&OperationStats>) -> WaitSchedule {
        let ms = millis_saturating;
        let learned = match (self.learn_after, stats) {
            (Some(n), Some(s)) if s.count >= n => Some(s),
            _ => None,
        };
        match learned {
            None => WaitSchedule {
                initial_delay_ms: ms(self.initial_delay),
                dense_interval_ms: ms(self.interval).max(1),
                dense_until_ms: 0,
                growth: self.growth.max(1.0),
                interval_max_ms: ms(self.interval_max).max(1),
                jitter: self.jitter.clamp(0.0, 1.0),
                confirmations: self.confirmations.max(1),
                deadline_ms: start_ms.saturating_add(ms(self.timeout)),
                learned: false,
            },
            Some(s) => {
                // Nothing completes before the fastest completion seen; most complete between
                // there and p99, where polls come every mean/8 (a median overshoot near 6% of
                // the mean); past p99 the interval grows; past the deadline (see
                // LearnedDeadline) waiting is judged hopeless.
                let mean = ms(s.mean).max(1);
                let dense = (mean / 8).max(1);
                let timeout = match self.learned_deadline {
                    LearnedDeadline::FarTail => ms(s.p999)
                        .saturating_mul(2)
                        .max(ms(s.max).saturating_add(ms(s.max) / 5)),
                    LearnedDeadline::UsualTail => ms(s.p90)
                        .saturating_mul(2)
                        .max(ms(s.min).saturating_add(ms(s.min) / 5)),
                }
                .max(1);
                WaitSchedule {
                    initial_delay_ms: ms(s.min).saturating_mul(95) / 100,
                    dense_interval_ms: dense,
                    dense_until_ms: ms(s.p99),
                    growth: 1.5,
                    interval_max_ms: dense
                        .saturating_mul(16)
                        .min(ms(self.interval_max).max(1))
                        .max(dense),
                    jitter: 0.0,
                    confirmations: self.confirmations.max(1),
                    deadline_ms: start_ms.saturating_add(timeout),
                    learned: true,
                }
            }
        }
    }
}

/// Samples a learned policy needs by default.
pub const LEARN_AFTER_DEFAULT: u64 = 50;

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(min: u64, mean: u64, p99: u64, p999: u64, max: u64) -> OperationStats {
        let d = Duration::from_millis;
        OperationStats {
            operation: "wait:x".into(),
            count: 1000,
            min: d(min),
            mean: d(mean),
            max: d(max),
            std_dev: d(10),
            p50: d(mean),
            p90: d(mean),
            p99: d(p99),
            p999: d(p999),
            outliers: vec![],
            distribution: vec![],
        }
    }

    #[test]
    fn an_explicit_policy_grows_its_interval_to_the_cap() {
        let p = WaitPolicy::every(Duration::from_millis(100), Duration::from_secs(5));
        let s = p.resolve(1_000, None);
        assert_eq!(
            (s.deadline_ms, s.learned, s.confirmations),
            (6_000, false, 1)
        );
        let mut previous = 0;
        let mut seen = vec![];
        for _ in 0..20 {
            previous = s.interval_after(0, previous);
            seen.push(previous);
        }
        assert_eq!(&seen[..4], &[100, 150, 225, 338]);
        assert_eq!(*seen.last().unwrap(), 30_000);
    }

    #[test]
    fn too_few_samples_keep_the_explicit_policy() {
        let p =
            WaitPolicy::every(Duration::from_millis(100), Duration::from_secs(5)).learn_after(2000);
        assert!(!p.resolve(0, Some(&stats(16, 30, 60, 300, 400))).learned);
    }

    #[test]
    fn a_learned_schedule_waits_for_the_earliest_completion_and_probes_densely_around_the_usual() {
        let p = WaitPolicy::every(Duration::from_secs(1), Duration::from_secs(600)).learned();
        let s = p.resolve(0, Some(&stats(16, 30, 60, 300, 400)));
        assert!(s.learned);
        assert_eq!(s.initial_delay_ms, 15);
        assert_eq!(s.dense_interval_ms, 3);
        assert_eq!(s.interval_after(40, 3), 3, "dense until p99");
        assert_eq!(s.interval_after(61, 3), 5, "grows past p99");
        assert_eq!(s.deadline_ms, 600, "twice p99.9, past the slowest seen");
    }

    #[test]
    fn a_recreatable_resource_gives_up_past_the_usual_tail() {
        let p = WaitPolicy::default()
            .learned()
            .learned_deadline(LearnedDeadline::UsualTail);
        let mut s = stats(16, 30, 60, 300, 400);
        s.p90 = Duration::from_millis(43);
        assert_eq!(p.resolve(1_000, Some(&s)).deadline_ms, 1_086);
    }

    /// A timeout or interval longer than milliseconds can count (18446744073709552 s is
    /// 2^64 + 384 ms) saturates to the end of time instead of wrapping to 384 ms.
    #[test]
    fn durations_past_what_milliseconds_count_saturate() {
        let huge = Duration::from_secs(18_446_744_073_709_552);
        let s = WaitPolicy::every(huge, huge).resolve(1_000, None);
        assert_eq!(s.deadline_ms, u64::MAX);
        assert_eq!(s.dense_interval_ms, u64::MAX);
        let s = WaitPolicy::every(Duration::from_millis(250), Duration::MAX).resolve(1_000, None);
        assert_eq!(s.deadline_ms, u64::MAX);
    }

    #[test]
    fn jitter_stays_within_its_fraction() {
        let s = WaitPolicy::default().jitter(0.2).resolve(0, None);
        assert_eq!(s.jittered(100, 0.0), 80);
        assert_eq!(s.jittered(100, 0.5), 100);
        assert!(s.jittered(100, 0.999_999) <= 120);
    }
}
