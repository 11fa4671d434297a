//! A wait's journaled forms: the schedule resolved at its start, the polls so far of a run
//! parked between two polls, and the outcome (the policy they come from is `crate::wait`).

use serde::{Deserialize, Serialize};

use super::ErrorRecord;

/// A resolved wait schedule, journaled when the wait starts. Offsets count from the start.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WaitSchedule {
    /// First poll no sooner than this offset.
    pub initial_delay_ms: u64,
    /// Interval while the offset is below `dense_until_ms` (and the first interval after).
    pub dense_interval_ms: u64,
    /// Offset until which polls stay dense.
    pub dense_until_ms: u64,
    /// Growth of the interval past `dense_until_ms`.
    pub growth: f64,
    /// Largest interval.
    pub interval_max_ms: u64,
    /// Jitter fraction.
    pub jitter: f64,
    /// Consecutive successes needed.
    pub confirmations: u32,
    /// Absolute deadline (ms since the Unix epoch).
    pub deadline_ms: u64,
    /// Whether the schedule came from statistics.
    pub learned: bool,
}

impl WaitSchedule {
    /// The interval after a poll at `offset_ms` whose previous interval was `previous_ms`
    /// (0 for the first poll), before jitter.
    pub fn interval_after(&self, offset_ms: u64, previous_ms: u64) -> u64 {
        if offset_ms < self.dense_until_ms || previous_ms == 0 {
            return self.dense_interval_ms;
        }
        (((previous_ms as f64) * self.growth).round() as u64).clamp(1, self.interval_max_ms.max(1))
    }

    /// When to poll next, after a poll at `offset_ms` (from the wait's start) that left a run
    /// of `streak` confirmations, when the previous growing interval was `previous_ms` (0
    /// before the first). Returns the next poll's offset and the growing interval to carry
    /// on. A run of confirmations is checked at the dense interval; `u` (uniform in [0, 1))
    /// draws the jitter.
    pub fn next_poll(&self, offset_ms: u64, previous_ms: u64, streak: u32, u: f64) -> (u64, u64) {
        let (step_ms, carried_ms) = if streak > 0 {
            (self.dense_interval_ms, previous_ms)
        } else {
            let interval = self.interval_after(offset_ms, previous_ms);
            (interval, interval)
        };
        (
            offset_ms.saturating_add(self.jittered(step_ms, u)),
            carried_ms,
        )
    }

    /// Applies jitter: `u` is uniform in [0, 1).
    pub fn jittered(&self, interval_ms: u64, u: f64) -> u64 {
        let factor = 1.0 + self.jitter * (2.0 * u - 1.0);
        ((interval_ms as f64) * factor).round().max(1.0) as u64
    }
}

/// What a wait's polls have seen since it started (or, after a restart, started over), and
/// when its next poll is due: journaled when its run parks between two polls
/// ([`Event::WaitParked`]). Times are absolute (ms since the Unix epoch). Counts and times
/// that are zero (no run of confirmations, nothing unanswered or queued) are left out of the
/// stored entry, which every later load of the run reads.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaitPolls {
    /// Polls sent.
    pub sent: u32,
    /// Polls answered (ready or not ready).
    pub answers: u32,
    /// Ready answers in a row.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub streak: u32,
    /// When the poll that began the current run of ready answers was sent.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub streak_started_ms: u64,
    /// When the last poll was sent (the wait's start before the first).
    pub last_sent_ms: u64,
    /// Polls past the deadline in a row that got no answer.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub unanswered: u32,
    /// When the first of them was sent.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub unanswered_since_ms: u64,
    /// Time polls spent queued at the limiter (the deadline moves later by as much).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub queued_ms: u64,
    /// Of the poll that began the run of ready answers: the time it was held, queued at the
    /// limiter (and, the first poll after a load from the wait's park, late by that load).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub first_ready_queued_ms: u64,
    /// Of the same poll: the interval it was scheduled after.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub first_ready_gap_ms: u64,
    /// The interval the schedule carries from one poll to the next (as it grows).
    pub interval_ms: u64,
    /// When the next poll is due, before the deadline's own poll is considered.
    pub next_at_ms: u64,
}

/// How a wait ended.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum WaitOutcome {
    /// The probe held `confirmations` times in a row.
    Ready {
        /// The last poll's output.
        output: serde_json::Value,
        /// Polls made since the wait began, or since it last started over after a restart
        /// (a load from its own park goes on counting).
        polls: u32,
    },
    /// The deadline passed first.
    TimedOut {
        /// Polls made since the wait began, or since it last started over after a restart
        /// (a load from its own park goes on counting).
        polls: u32,
    },
    /// The probe failed permanently.
    Failed {
        /// The error.
        error: ErrorRecord,
        /// Polls made since the wait began, or since it last started over after a restart
        /// (a load from its own park goes on counting).
        polls: u32,
    },
}

fn is_zero<T: Default + PartialEq>(value: &T) -> bool {
    *value == T::default()
}
