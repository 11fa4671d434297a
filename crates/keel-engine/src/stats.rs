//! Latency statistics per operation (`step:<kind>` and `wait:<kind>`): every successful
//! execution's duration, kept across restarts. The raw material of learned wait policies and
//! of the `keel stats` table.
//!
//! Count, min, max, sum and sum of squares are exact over every sample ever recorded. The
//! percentiles come from the samples kept: all of them up to [`LATENCY_SAMPLES_KEPT`] (then
//! they are exact), past that a uniform reservoir sample (then they are estimates, and
//! [`OperationStats::exact`] says so). The ten worst samples are kept with their run.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::limits::{LATENCY_OUTLIERS_KEPT, LATENCY_SAMPLES_KEPT};
use crate::store::JournalStore;

/// The statistics of one operation, as persisted. Reached through `crate::test_utilities` by
/// the wait-policy simulation of `keel-bench`, which computes the same summaries.
#[cfg_attr(not(feature = "test-utilities"), allow(unreachable_pub))]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencyStats {
    count: u64,
    sum_us: u128,
    sum_sq_us: u128,
    min_us: u64,
    max_us: u64,
    /// All samples while `count <= LATENCY_SAMPLES_KEPT`; a uniform reservoir after.
    samples: Vec<u64>,
    /// The worst samples, largest first.
    worst: Vec<Outlier>,
    /// State of the reservoir's generator (deterministic, so a restart continues it).
    rng: u64,
}

/// One of the worst samples of an operation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outlier {
    /// How long it took.
    #[serde(with = "micros")]
    pub duration: Duration,
    /// The run it belonged to (empty for samples recorded by hand).
    pub run_id: String,
    /// When it ended (ms since the Unix epoch).
    pub at_ms: u64,
}

mod micros {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        // Saturating, not wrapping: a duration past 2^64 us (only a caller's
        // `Engine::record_duration` can make one) is kept as the longest there is.
        s.serialize_u64(u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_micros(u64::deserialize(d)?))
    }
}

/// What `Engine::stats` reports for one operation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OperationStats {
    /// `step:<kind>` or `wait:<kind>`.
    pub operation: String,
    /// Successful executions recorded.
    pub count: u64,
    /// Shortest.
    pub min: Duration,
    /// Mean.
    pub mean: Duration,
    /// Longest.
    pub max: Duration,
    /// Standard deviation (population).
    pub std_dev: Duration,
    /// Median.
    pub p50: Duration,
    /// 90th percentile.
    pub p90: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// 99.9th percentile.
    pub p999: Duration,
    /// Whether the percentiles are exact (every sample kept) or estimated from a reservoir.
    pub exact: bool,
    /// The worst samples, largest first.
    pub outliers: Vec<Outlier>,
}

#[cfg_attr(not(feature = "test-utilities"), allow(unreachable_pub))]
impl LatencyStats {
    /// Records one successful execution of `run_id` that took `duration`, ending at `at_ms`.
    pub fn record(&mut self, duration: Duration, run_id: &str, at_ms: u64) {
        let us = u64::try_from(duration.as_micros()).unwrap_or(u64::MAX);
        if self.count == 0 || us < self.min_us {
            self.min_us = us;
        }
        self.max_us = self.max_us.max(us);
        self.count += 1;
        self.sum_us += u128::from(us);
        self.sum_sq_us += u128::from(us) * u128::from(us);
        if self.samples.len() < LATENCY_SAMPLES_KEPT {
            self.samples.push(us);
        } else {
            // Algorithm R: the n-th sample replaces a kept one with probability kept/n.
            self.rng = splitmix(self.rng);
            let slot = self.rng % self.count;
            if (slot as usize) < LATENCY_SAMPLES_KEPT {
                self.samples[slot as usize] = us;
            }
        }
        let worst_kept = self.worst.len() >= LATENCY_OUTLIERS_KEPT;
        if !worst_kept || self.worst.last().is_some_and(|w| w.duration < duration) {
            let at = self.worst.partition_point(|w| w.duration >= duration);
            self.worst.insert(
                at,
                Outlier {
                    duration,
                    run_id: run_id.to_string(),
                    at_ms,
                },
            );
            self.worst.truncate(LATENCY_OUTLIERS_KEPT);
        }
    }

    /// These statistics and `other`'s (another worker's, of the same operation) as one:
    /// counts, sums and extremes add up exactly; the kept samples are drawn from each side in
    /// proportion to its count (a fair sample of the union when both sides are fair); the
    /// worst samples are the worst of both.
    pub fn merged(&self, other: &LatencyStats) -> LatencyStats {
        let count = self.count + other.count;
        let mut samples = Vec::with_capacity(LATENCY_SAMPLES_KEPT);
        if self.samples.len() + other.samples.len() <= LATENCY_SAMPLES_KEPT {
            samples.extend(&self.samples);
            samples.extend(&other.samples);
        } else {
            for side in [self, other] {
                let share = (LATENCY_SAMPLES_KEPT as u128 * u128::from(side.count)
                    / u128::from(count.max(1))) as usize;
                let share = share.min(side.samples.len());
                // Evenly spaced over a reservoir, which is in no particular order.
                samples.extend(
                    (0..share).map(|i| side.samples[i * side.samples.len() / share.max(1)]),
                );
            }
        }
        let mut worst: Vec<Outlier> = self.worst.iter().chain(&other.worst).cloned().collect();
        worst.sort_by_key(|w| std::cmp::Reverse(w.duration));
        worst.truncate(LATENCY_OUTLIERS_KEPT);
        let extreme =
            |mine: u64, theirs: u64, pick: fn(u64, u64) -> u64| match (self.count, other.count) {
                (0, _) => theirs,
                (_, 0) => mine,
                _ => pick(mine, theirs),
            };
        LatencyStats {
            count,
            sum_us: self.sum_us + other.sum_us,
            sum_sq_us: self.sum_sq_us + other.sum_sq_us,
            min_us: extreme(self.min_us, other.min_us, u64::min),
            max_us: extreme(self.max_us, other.max_us, u64::max),
            samples,
            worst,
            rng: self.rng,
        }
    }

    /// The summary `Engine::stats` reports, under the name `operation`.
    pub fn summary(&self, operation: &str) -> OperationStats {
        let n = self.count.max(1) as u128;
        let mean_us = self.sum_us / n;
        // Var = E[x^2] - E[x]^2, in exact integers before the square root.
        let variance =
            (self.sum_sq_us * n).saturating_sub(self.sum_us * self.sum_us) as f64 / (n * n) as f64;
        let mut sorted = self.samples.clone();
        sorted.sort_unstable();
        let rank = |p: f64| -> Duration {
            if sorted.is_empty() {
                return Duration::ZERO;
            }
            // Nearest rank: the smallest sample with at least p of all samples at or below it.
            let r = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
            Duration::from_micros(sorted[r - 1])
        };
        OperationStats {
            operation: operation.to_string(),
            count: self.count,
            min: Duration::from_micros(self.min_us),
            mean: Duration::from_micros(mean_us as u64),
            max: Duration::from_micros(self.max_us),
            std_dev: Duration::from_micros(variance.sqrt().round() as u64),
            p50: rank(0.5),
            p90: rank(0.9),
            p99: rank(0.99),
            p999: rank(0.999),
            exact: self.count as usize <= LATENCY_SAMPLES_KEPT,
            outliers: self.worst.clone(),
        }
    }
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// All operations' statistics, in memory, with the set changed since the last flush.
#[derive(Default)]
pub(crate) struct StatsBook {
    inner: Mutex<Book>,
}

#[derive(Default)]
struct Book {
    /// This engine's own statistics: what it records and writes.
    by_operation: BTreeMap<String, LatencyStats>,
    dirty: BTreeSet<String>,
    /// The other engines' sharing the store, as last read (`StatsBook::refresh_others`):
    /// reported merged with this engine's own.
    others: BTreeMap<String, LatencyStats>,
}

impl Book {
    /// This engine's statistics of `operation` merged with the other engines'.
    fn shared(&self, operation: &str) -> Option<LatencyStats> {
        match (self.by_operation.get(operation), self.others.get(operation)) {
            (Some(mine), Some(theirs)) => Some(mine.merged(theirs)),
            (Some(one), None) | (None, Some(one)) => Some(one.clone()),
            (None, None) => None,
        }
    }
}

impl StatsBook {
    /// Loads what the store holds. A record that does not decode is reported and started
    /// afresh: statistics are advisory, and losing one operation's must not stop the engine.
    pub(crate) async fn load(store: &dyn JournalStore) -> Result<StatsBook> {
        let mut book = Book::default();
        for (operation, bytes) in store.stats().await? {
            match serde_json::from_slice::<LatencyStats>(&bytes) {
                Ok(stats) => {
                    book.by_operation.insert(operation, stats);
                }
                Err(error) => {
                    tracing::warn!(%operation, %error, "latency statistics do not decode; starting them afresh")
                }
            }
        }
        Ok(StatsBook {
            inner: Mutex::new(book),
        })
    }

    pub(crate) fn record(&self, operation: &str, duration: Duration, run_id: &str, at_ms: u64) {
        let mut book = self.inner.lock().expect("stats lock");
        book.by_operation
            .entry(operation.to_string())
            .or_default()
            .record(duration, run_id, at_ms);
        book.dirty.insert(operation.to_string());
    }

    /// The statistics of `operation`, this engine's merged with those of the other engines
    /// sharing the store.
    pub(crate) fn summary(&self, operation: &str) -> Option<OperationStats> {
        let book = self.inner.lock().expect("stats lock");
        book.shared(operation).map(|s| s.summary(operation))
    }

    /// Every operation's statistics, as [`StatsBook::summary`].
    pub(crate) fn all(&self) -> Vec<OperationStats> {
        let book = self.inner.lock().expect("stats lock");
        let operations: BTreeSet<&String> =
            book.by_operation.keys().chain(book.others.keys()).collect();
        operations
            .into_iter()
            .filter_map(|op| book.shared(op).map(|s| s.summary(op)))
            .collect()
    }

    /// Reads the statistics the other engines sharing the store wrote, each operation's
    /// merged over them, for [`StatsBook::summary`]. Records that do not decode are skipped.
    pub(crate) async fn refresh_others(&self, store: &dyn JournalStore) -> Result<()> {
        let mut others: BTreeMap<String, LatencyStats> = BTreeMap::new();
        for (operation, bytes) in store.others_stats().await? {
            let Ok(stats) = serde_json::from_slice::<LatencyStats>(&bytes) else {
                continue;
            };
            let merged = match others.get(&operation) {
                Some(so_far) => so_far.merged(&stats),
                None => stats,
            };
            others.insert(operation, merged);
        }
        self.inner.lock().expect("stats lock").others = others;
        Ok(())
    }

    /// Writes every operation changed since the last flush (durable with the store's next
    /// sync). Returns how many were written.
    pub(crate) fn flush(&self, store: &dyn JournalStore) -> Result<usize> {
        let changed: Vec<(String, Vec<u8>)> = {
            let mut book = self.inner.lock().expect("stats lock");
            let dirty = std::mem::take(&mut book.dirty);
            dirty
                .into_iter()
                .filter_map(|op| {
                    let bytes =
                        serde_json::to_vec(book.by_operation.get(&op)?).expect("stats serialise");
                    Some((op, bytes))
                })
                .collect()
        };
        for (operation, bytes) in &changed {
            store.put_stats(operation, bytes)?;
        }
        Ok(changed.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_known_sample_set_gives_exact_figures() {
        let mut s = LatencyStats::default();
        for v in 1..=1000u64 {
            s.record(ms(v), "r", v);
        }
        let o = s.summary("step:x");
        assert_eq!(
            (o.count, o.min, o.max, o.mean),
            (1000, ms(1), ms(1000), Duration::from_micros(500_500))
        );
        assert_eq!(
            (o.p50, o.p90, o.p99, o.p999),
            (ms(500), ms(900), ms(990), ms(999))
        );
        // Population sigma of 1..=1000 ms: sqrt((1000^2 - 1) / 12) ms = 288.6749 ms.
        assert_eq!(o.std_dev, Duration::from_micros(288_675));
        let worst: Vec<_> = o.outliers.iter().map(|w| w.duration).collect();
        assert_eq!(worst, (991..=1000).rev().map(ms).collect::<Vec<_>>());
        assert!(o.exact);
    }

    /// Two workers' statistics merge exactly while every sample is kept (the merge of 1..=500
    /// and 501..=1000 ms is 1..=1000 ms), and past that, totals stay exact and the kept
    /// samples come from each side in proportion to its count.
    #[test]
    fn two_workers_statistics_merge_into_those_of_all_their_samples() {
        let (mut low, mut high) = (LatencyStats::default(), LatencyStats::default());
        for v in 1..=500u64 {
            low.record(ms(v), "low", v);
            high.record(ms(v + 500), "high", v);
        }
        let both = low.merged(&high).summary("step:x");
        let mut all = LatencyStats::default();
        for v in 1..=1000u64 {
            all.record(ms(v), "r", v);
        }
        let expected = all.summary("step:x");
        assert_eq!(
            (both.count, both.min, both.max, both.mean, both.std_dev),
            (1000, ms(1), ms(1000), expected.mean, expected.std_dev)
        );
        assert_eq!((both.p50, both.p90, both.p99), (ms(500), ms(900), ms(990)));
        assert!(both.outliers.iter().all(|o| o.run_id == "high"));
        assert_eq!(LatencyStats::default().merged(&low).summary("x").min, ms(1));

        let (mut fast, mut slow) = (LatencyStats::default(), LatencyStats::default());
        let n = LATENCY_SAMPLES_KEPT as u64 * 3;
        for v in 0..n {
            fast.record(ms(1), "fast", v);
        }
        for v in 0..n / 3 {
            slow.record(ms(100), "slow", v);
        }
        let merged = fast.merged(&slow);
        assert_eq!(merged.count, n + n / 3);
        let slow_kept = merged.samples.iter().filter(|&&us| us == 100_000).count();
        let share = slow_kept as f64 / merged.samples.len() as f64;
        assert!((0.24..=0.26).contains(&share), "slow share {share}");
    }

    #[test]
    fn past_the_kept_samples_percentiles_are_estimates_and_totals_stay_exact() {
        let mut s = LatencyStats::default();
        let n = LATENCY_SAMPLES_KEPT as u64 * 4;
        for v in 0..n {
            s.record(Duration::from_micros(v), "r", 0);
        }
        let o = s.summary("step:x");
        assert_eq!(o.count, n);
        assert!(!o.exact);
        assert_eq!(o.max, Duration::from_micros(n - 1));
        let p50 = o.p50.as_micros() as f64;
        assert!(
            (p50 / (n as f64 / 2.0) - 1.0).abs() < 0.05,
            "p50 {p50} of 0..{n}"
        );
    }

    #[test]
    fn statistics_survive_a_round_trip_through_json() {
        let mut s = LatencyStats::default();
        for v in [5, 3, 9, 1] {
            s.record(ms(v), "run-1", 7);
        }
        let back: LatencyStats = serde_json::from_slice(&serde_json::to_vec(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }
}

/// Counts of events since the engine opened (for metrics; the journals hold the durable
/// record of each).
#[derive(Debug, Default)]
pub(crate) struct EventCounters {
    pub(crate) retries: std::sync::atomic::AtomicU64,
    pub(crate) compensations: std::sync::atomic::AtomicU64,
    pub(crate) waits: std::sync::atomic::AtomicU64,
}

impl EventCounters {
    /// Adds one to `counter`.
    pub(crate) fn bump(counter: &std::sync::atomic::AtomicU64) {
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// The counts now.
    pub(crate) fn read(&self) -> Counters {
        use std::sync::atomic::Ordering::Relaxed;
        Counters {
            retries: self.retries.load(Relaxed),
            compensations: self.compensations.load(Relaxed),
            waits: self.waits.load(Relaxed),
        }
    }
}

/// What [`crate::Engine::counters`] reports: events since the engine opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Step attempts that failed and were scheduled for another attempt.
    pub retries: u64,
    /// Steps undone by compensation.
    pub compensations: u64,
    /// Waits that ended (ready, timed out or failed).
    pub waits: u64,
}
