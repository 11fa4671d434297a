//! Latency statistics per operation (`step:<kind>` and `wait:<kind>`): every successful
//! execution's duration, kept across restarts. The raw material of learned wait policies, of
//! the `keel stats` table, of `/metrics` and of the console's distribution plot.
//!
//! Count, min, max, sum and sum of squares (so the mean and standard deviation) are exact over
//! every execution ever recorded. The distribution is an HDR histogram (the `hdrhistogram`
//! crate) of microseconds at [`LATENCY_SIGNIFICANT_FIGURES`] significant figures, bounded to
//! 1 us ..= [`LATENCY_TRACKED_US_MAX`] (one day): a longer duration is counted as one day in
//! the histogram (saturation, not a resize, so the stored record has a fixed bound) while the
//! exact max still says how long it took. Percentiles come from the histogram, so they are
//! within 0.1% of a true sample's value (3 significant figures: a bucket is at most 1/1024 of
//! its values wide), clamped to the exact min and max. The ten worst executions are kept with
//! their run.
//!
//! The stored record is JSON with the histogram in its V2 encoding, base64. Records written
//! before the histogram (a reservoir of at most 4,096 `samples`) still load: their samples are
//! recorded into a histogram, each standing for its share of the exact count.

use std::time::Duration;

use base64::Engine as _;
use hdrhistogram::serialization::{Deserializer, Serializer as _, V2Serializer};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::limits::{LATENCY_OUTLIERS_KEPT, LATENCY_SIGNIFICANT_FIGURES, LATENCY_TRACKED_US_MAX};

mod book;
pub(crate) use book::StatsBook;

/// The statistics of one operation, as persisted. Reached through `crate::test_utilities` by
/// the wait-policy simulation of `keel-bench`, which computes the same summaries.
#[cfg_attr(not(feature = "test-utilities"), allow(unreachable_pub))]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "StoredStats", into = "StoredStats")]
pub struct LatencyStats {
    count: u64,
    sum_us: u128,
    sum_sq_us: u128,
    min_us: u64,
    max_us: u64,
    /// Every execution's duration in microseconds, saturated at [`LATENCY_TRACKED_US_MAX`].
    histogram: Histogram<u64>,
    /// The worst executions, largest first.
    worst: Vec<Outlier>,
}

impl Default for LatencyStats {
    fn default() -> Self {
        LatencyStats {
            count: 0,
            sum_us: 0,
            sum_sq_us: 0,
            min_us: 0,
            max_us: 0,
            histogram: empty_histogram(),
            worst: Vec::new(),
        }
    }
}

/// A histogram with the engine's bounds and precision, empty.
fn empty_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_TRACKED_US_MAX, LATENCY_SIGNIFICANT_FIGURES)
        .expect("the latency histogram's bounds are valid")
}

/// A [`LatencyStats`] as stored: the histogram as base64 of its V2 encoding. `samples` is the
/// reservoir of records written before the histogram, read (never written) to fill one.
#[derive(Serialize, Deserialize)]
struct StoredStats {
    count: u64,
    sum_us: u128,
    sum_sq_us: u128,
    min_us: u64,
    max_us: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    histogram_v2: Option<String>,
    #[serde(default, skip_serializing)]
    samples: Vec<u64>,
    worst: Vec<Outlier>,
}

/// Why a stored record does not make statistics.
#[derive(Debug, thiserror::Error)]
enum StoredStatsError {
    #[error("latency histogram is not base64: {0}")]
    Base64(#[source] base64::DecodeError),
    #[error("latency histogram does not decode: {0}")]
    Histogram(#[source] hdrhistogram::serialization::DeserializeError),
    #[error("latency histogram does not fit the engine's bounds: {0}")]
    Bounds(#[source] hdrhistogram::AdditionError),
}

impl TryFrom<StoredStats> for LatencyStats {
    type Error = StoredStatsError;

    fn try_from(stored: StoredStats) -> std::result::Result<Self, Self::Error> {
        let mut histogram = empty_histogram();
        match &stored.histogram_v2 {
            Some(text) => {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(text)
                    .map_err(StoredStatsError::Base64)?;
                let decoded: Histogram<u64> = Deserializer::new()
                    .deserialize(&mut bytes.as_slice())
                    .map_err(StoredStatsError::Histogram)?;
                // Into the engine's own bounds, so that merging never meets two layouts.
                histogram.add(&decoded).map_err(StoredStatsError::Bounds)?;
            }
            None => record_old_samples(&mut histogram, &stored.samples, stored.count),
        }
        Ok(LatencyStats {
            count: stored.count,
            sum_us: stored.sum_us,
            sum_sq_us: stored.sum_sq_us,
            min_us: stored.min_us,
            max_us: stored.max_us,
            histogram,
            worst: stored.worst,
        })
    }
}

/// Records an old record's kept samples, each standing for an equal share of `count` (the
/// first `count % len` one more), so the histogram's count is the exact count: all samples
/// were kept up to 4,096, a uniform reservoir of them past it.
fn record_old_samples(histogram: &mut Histogram<u64>, samples: &[u64], count: u64) {
    let Some(len) = u64::try_from(samples.len()).ok().filter(|&n| n > 0) else {
        return;
    };
    let count = count.max(len);
    for (i, &us) in (0u64..).zip(samples) {
        let weight = count / len + u64::from(i < count % len);
        let us = us.clamp(1, LATENCY_TRACKED_US_MAX);
        histogram
            .record_n(us, weight)
            .expect("a clamped value is within the histogram's bounds");
    }
}

impl From<LatencyStats> for StoredStats {
    fn from(stats: LatencyStats) -> Self {
        let mut bytes = Vec::new();
        V2Serializer::new()
            .serialize(&stats.histogram, &mut bytes)
            .expect("a histogram serialises into memory");
        StoredStats {
            count: stats.count,
            sum_us: stats.sum_us,
            sum_sq_us: stats.sum_sq_us,
            min_us: stats.min_us,
            max_us: stats.max_us,
            histogram_v2: Some(base64::engine::general_purpose::STANDARD.encode(bytes)),
            samples: Vec::new(),
            worst: stats.worst,
        }
    }
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
///
/// Count, min, mean, max and standard deviation are exact. The percentiles come from an HDR
/// histogram at 3 significant figures: each is within 0.1% of the duration of an execution at
/// that rank (the highest duration its histogram bucket stands for, never below the min or
/// above the max), at any count; durations past one day count as one day there.
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
    /// The worst samples, largest first.
    pub outliers: Vec<Outlier>,
    /// The executions by duration, for a plot: see [`Bucket`]. Empty when there are none.
    #[serde(default)]
    pub distribution: Vec<Bucket>,
}

/// One bucket of [`OperationStats::distribution`]: how many executions took at most `le_us`
/// microseconds and more than the previous bucket's bound (not cumulative). The bounds grow by
/// a factor of sqrt(2) from 100 us ([`DISTRIBUTION_FIRST_US`]: the first bucket holds every
/// execution up to 100 us) to the first bound at or past the max, with no bucket left out, so
/// a plot has a continuous logarithmic axis. Counts are the histogram's, whose buckets are
/// within 0.1% of a duration, so an execution within 0.1% of a bound may be counted on either
/// side of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bucket {
    /// Upper bound, in microseconds, inclusive.
    pub le_us: u64,
    /// Executions in this bucket.
    pub count: u64,
}

/// The upper bound of the first bucket of [`OperationStats::distribution`], in microseconds.
pub const DISTRIBUTION_FIRST_US: u64 = 100;

/// The upper bound of bucket `index` of a distribution: 100 us times sqrt(2) to the `index`,
/// rounded to the microsecond, saturating.
fn distribution_bound_us(index: u32) -> u64 {
    let bound = DISTRIBUTION_FIRST_US as f64 * std::f64::consts::SQRT_2.powi(index as i32);
    // `as` saturates a float past u64::MAX.
    bound.round() as u64
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
        // Saturating at one day keeps the histogram (and its record) within its bound.
        self.histogram.saturating_record(us);
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
    /// counts, sums and extremes add up exactly, the histograms add bucket by bucket (so the
    /// percentiles are those of the union, within the histogram's precision), and the worst
    /// samples are the worst of both.
    pub fn merged(&self, other: &LatencyStats) -> LatencyStats {
        let mut histogram = self.histogram.clone();
        histogram
            .add(&other.histogram)
            .expect("every latency histogram has the engine's bounds");
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
            count: self.count + other.count,
            sum_us: self.sum_us + other.sum_us,
            sum_sq_us: self.sum_sq_us + other.sum_sq_us,
            min_us: extreme(self.min_us, other.min_us, u64::min),
            max_us: extreme(self.max_us, other.max_us, u64::max),
            histogram,
            worst,
        }
    }

    /// The summary `Engine::stats` reports, under the name `operation`.
    pub fn summary(&self, operation: &str) -> OperationStats {
        let n = self.count.max(1) as u128;
        let mean_us = self.sum_us / n;
        // Var = E[x^2] - E[x]^2, in exact integers before the square root.
        let variance =
            (self.sum_sq_us * n).saturating_sub(self.sum_us * self.sum_us) as f64 / (n * n) as f64;
        let rank = |q: f64| -> Duration {
            if self.count == 0 {
                return Duration::ZERO;
            }
            let us = self.histogram.value_at_quantile(q);
            Duration::from_micros(us.clamp(self.min_us, self.max_us))
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
            outliers: self.worst.clone(),
            distribution: self.distribution(),
        }
    }

    /// The executions in sqrt(2)-spaced buckets from 100 us to the one holding the max.
    fn distribution(&self) -> Vec<Bucket> {
        if self.count == 0 {
            return Vec::new();
        }
        let mut buckets: Vec<Bucket> = (0u32..)
            .map(|index| Bucket {
                le_us: distribution_bound_us(index),
                count: 0,
            })
            .take_while(|b| b.le_us < self.max_us)
            .collect();
        buckets.push(Bucket {
            le_us: distribution_bound_us(buckets.len() as u32),
            count: 0,
        });
        for value in self.histogram.iter_recorded() {
            // The value a histogram bucket stands for, as its percentiles report it; past the
            // last bound only through that rounding, so it belongs to the last bucket.
            let us = value.value_iterated_to();
            let at = buckets
                .partition_point(|b| b.le_us < us)
                .min(buckets.len() - 1);
            buckets[at].count += value.count_at_value();
        }
        buckets
    }

    /// How many executions took at most each of `bounds_us` (cumulative, for a Prometheus
    /// histogram), within the histogram's precision; past one day, all of them.
    pub fn counts_at_or_below(&self, bounds_us: &[u64]) -> Vec<u64> {
        bounds_us
            .iter()
            .map(|&bound| {
                if bound >= LATENCY_TRACKED_US_MAX {
                    self.histogram.len()
                } else {
                    self.histogram.count_between(0, bound)
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::{
        LATENCY_HISTOGRAM_COUNTERS, LATENCY_TRACKED_US_MAX, STATS_RECORD_BYTES_MAX,
    };

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Asserts `got` is within the histogram's 0.1% of `want`.
    fn close(got: Duration, want: Duration) {
        let (g, w) = (got.as_micros() as f64, want.as_micros() as f64);
        assert!(
            (g - w).abs() <= w / 1000.0,
            "{got:?} is not within 0.1% of {want:?}"
        );
    }

    #[test]
    fn a_known_sample_set_gives_exact_totals_and_percentiles_within_a_thousandth() {
        let mut s = LatencyStats::default();
        for v in 1..=1000u64 {
            s.record(ms(v), "r", v);
        }
        let o = s.summary("step:x");
        assert_eq!(
            (o.count, o.min, o.max, o.mean),
            (1000, ms(1), ms(1000), Duration::from_micros(500_500))
        );
        for (got, want) in [(o.p50, 500), (o.p90, 900), (o.p99, 990), (o.p999, 999)] {
            close(got, ms(want));
        }
        // Population sigma of 1..=1000 ms: sqrt((1000^2 - 1) / 12) ms = 288.6749 ms.
        assert_eq!(o.std_dev, Duration::from_micros(288_675));
        let worst: Vec<_> = o.outliers.iter().map(|w| w.duration).collect();
        assert_eq!(worst, (991..=1000).rev().map(ms).collect::<Vec<_>>());
    }

    /// Durations below 2,048 us are their own histogram buckets, so their percentiles are
    /// exact; and no percentile passes the exact max.
    #[test]
    fn short_durations_have_exact_percentiles_clamped_to_the_extremes() {
        let mut s = LatencyStats::default();
        for v in 1..=1000u64 {
            s.record(Duration::from_micros(v), "r", v);
        }
        let o = s.summary("step:x");
        let us = Duration::from_micros;
        assert_eq!(
            (o.p50, o.p90, o.p99, o.p999),
            (us(500), us(900), us(990), us(999))
        );
        let mut long = LatencyStats::default();
        long.record(ms(123_457), "r", 0);
        assert_eq!(long.summary("x").p999, ms(123_457));
    }

    /// Two workers' statistics merge into those of all their samples: the merge of 1..=500
    /// and 501..=1000 ms has the same totals and percentiles as 1..=1000 ms.
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
        let mut expected = all.summary("step:x");
        expected.outliers = both.outliers.clone();
        assert_eq!(both, expected);
        assert!(both.outliers.iter().all(|o| o.run_id == "high"));
        assert_eq!(LatencyStats::default().merged(&low).summary("x").min, ms(1));
    }

    #[test]
    fn many_samples_keep_exact_totals_and_close_percentiles() {
        let mut s = LatencyStats::default();
        let n = 100_000u64;
        for v in 1..=n {
            s.record(Duration::from_micros(v * 10), "r", 0);
        }
        let o = s.summary("step:x");
        assert_eq!((o.count, o.max), (n, Duration::from_micros(n * 10)));
        close(o.p50, Duration::from_micros(n * 5));
        close(o.p99, Duration::from_micros(n * 10 * 99 / 100));
    }

    #[test]
    fn statistics_survive_a_round_trip_through_json() {
        let mut s = LatencyStats::default();
        for v in [5, 3, 9, 1] {
            s.record(ms(v), "run-1", 7);
        }
        s.record(Duration::from_secs(3 * 86_400), "run-2", 8);
        let back: LatencyStats = serde_json::from_slice(&serde_json::to_vec(&s).unwrap()).unwrap();
        assert_eq!(back, s);
        assert_eq!(back.summary("x").max, Duration::from_secs(3 * 86_400));
    }

    /// A record written before the histogram (exact totals and a reservoir of `samples`) loads
    /// with its totals, its outliers, and its samples in the histogram, each standing for its
    /// share of the count.
    #[test]
    fn an_old_record_with_a_reservoir_of_samples_loads_into_a_histogram() {
        let old = r#"{"count":8,"sum_us":10000,"sum_sq_us":30000000,"min_us":500,"max_us":2000,
            "samples":[500,1000,2000,1500],
            "worst":[{"duration":2000,"run_id":"r-9","at_ms":42}],"rng":12345}"#;
        let stats: LatencyStats = serde_json::from_str(old).expect("an old record loads");
        let o = stats.summary("step:x");
        assert_eq!(
            (o.count, o.min, o.max, o.mean),
            (
                8,
                ms(0) + Duration::from_micros(500),
                ms(2),
                Duration::from_micros(1250)
            )
        );
        assert_eq!(stats.histogram.len(), 8);
        assert_eq!(o.p50, ms(1));
        close(o.p999, ms(2));
        assert_eq!(o.outliers[0].run_id, "r-9");
        // Written back, it is the new format, and reads back the same.
        let written = serde_json::to_string(&stats).unwrap();
        assert!(written.contains("histogram_v2") && !written.contains("samples"));
        let back: LatencyStats = serde_json::from_str(&written).unwrap();
        assert_eq!(back, stats);
    }

    /// The distribution starts at 100 us, grows by sqrt(2), leaves no bucket out, ends with
    /// the bucket holding the max, and counts every execution once.
    #[test]
    fn the_distribution_covers_100_us_to_the_max_in_sqrt_2_steps() {
        let mut s = LatencyStats::default();
        for us in [50, 100, 101, 150, 1_000, 1_000, 1_000_000] {
            s.record(Duration::from_micros(us), "r", 0);
        }
        let d = s.summary("x").distribution;
        assert_eq!(
            d[0],
            Bucket {
                le_us: 100,
                count: 2
            }
        );
        assert_eq!(
            d[1],
            Bucket {
                le_us: 141,
                count: 1
            }
        );
        assert_eq!(
            d[2],
            Bucket {
                le_us: 200,
                count: 1
            }
        );
        assert_eq!((d[6].le_us, d[7].le_us, d[7].count), (800, 1131, 2));
        let last = d.last().unwrap();
        assert!(last.le_us >= 1_000_000 && d[d.len() - 2].le_us < 1_000_000);
        assert_eq!(last.count, 1);
        assert_eq!(d.iter().map(|b| b.count).sum::<u64>(), 7);
        assert!(d.windows(2).all(|w| {
            let ratio = w[1].le_us as f64 / w[0].le_us as f64;
            (ratio - std::f64::consts::SQRT_2).abs() < 0.01
        }));
        assert!(LatencyStats::default().summary("x").distribution.is_empty());
    }

    #[test]
    fn cumulative_counts_at_fixed_bounds_come_from_the_histogram() {
        let mut s = LatencyStats::default();
        for v in 1..=100u64 {
            s.record(ms(v), "r", 0);
        }
        s.record(Duration::from_secs(2 * 86_400), "r", 0);
        let bounds = [1_000, 10_000, 50_000, 100_000, 1_000_000, u64::MAX];
        assert_eq!(s.counts_at_or_below(&bounds), [1, 10, 50, 100, 100, 101]);
    }

    /// The record bound in limits.rs holds: the histogram has the counters it counts, and a
    /// record with every counter at 2^48 (eight bytes each) fits.
    #[test]
    fn a_full_record_fits_its_bound() {
        let mut s = LatencyStats::default();
        assert_eq!(s.histogram.distinct_values(), LATENCY_HISTOGRAM_COUNTERS);
        let mut value = 0;
        while value <= LATENCY_TRACKED_US_MAX {
            s.histogram.record_n(value, 1 << 48).unwrap();
            value = s.histogram.next_non_equivalent(value);
        }
        for i in 0..10 {
            s.record(ms(i), &"r".repeat(crate::limits::RUN_ID_LEN_MAX), u64::MAX);
        }
        let bytes = serde_json::to_vec(&s).unwrap();
        assert!(
            bytes.len() <= STATS_RECORD_BYTES_MAX,
            "{} bytes",
            bytes.len()
        );
        assert!(
            bytes.len() > STATS_RECORD_BYTES_MAX * 8 / 10,
            "{} bytes",
            bytes.len()
        );
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
