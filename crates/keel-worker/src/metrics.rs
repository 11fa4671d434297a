//! `/metrics` in the OpenMetrics text format (1.0.0, which Prometheus reads), encoded by the
//! Prometheus project's own client (`prometheus-client`) from a snapshot taken at the scrape.
//!
//! - `keel_runs{status}`: runs by status (gauge).
//! - `keel_runs_in_memory{state}`: runs this worker holds, `loaded` (a cell and a driver) or
//!   `parked` (waiting, a small entry: `EngineBuilder::park_after`) (gauge).
//! - `keel_operation_seconds{operation}`: latency of every step and wait kind, as a histogram
//!   (`_bucket{le}`, `_sum`, `_count`) with the fixed bounds of [`BUCKET_BOUNDS_S`]. The
//!   cumulative counts come from the engine's HDR histogram of the operation (3 significant
//!   figures: an execution within 0.1% of a bound may be counted on either side of it); the
//!   sum is the exact mean times the count.
//! - `keel_throttles_total{service}`: throttled calls per service (counter).
//! - `keel_rate_limit_per_second{service}`: each service's current admitted rate (gauge).
//! - `keel_retries_total`, `keel_step_compensations_total`, `keel_waits_total`: counting them
//!   from the runs' journals at every scrape is too costly, so these are the engine's counters
//!   since the worker started.

use std::collections::BTreeMap;
use std::time::Duration;

use keel_engine::{Engine, OperationStats, RunStatus};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::api::SERVICES;

/// The content type of the metrics page.
pub(crate) const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Upper bounds of `keel_operation_seconds`' buckets, in seconds (`+Inf` follows): from a
/// millisecond, for fast steps, to ten minutes, for waits.
pub(crate) const BUCKET_BOUNDS_S: [f64; 18] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0, 600.0,
];

/// The metrics page.
pub(crate) fn render(
    counts: &BTreeMap<RunStatus, u64>,
    stats: &[OperationStats],
    engine: &Engine,
) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Snapshot::take(counts, stats, engine)));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry)
        .expect("encoding into a String does not fail");
    out
}

/// Everything the page shows, read at the scrape.
#[derive(Debug)]
struct Snapshot {
    /// Runs by status name, every status listed even at 0.
    runs: BTreeMap<&'static str, u64>,
    operations: Vec<OperationHistogram>,
    /// Per service: throttles so far, rate now.
    limiters: Vec<(&'static str, u64, f64)>,
    counters: keel_engine::Counters,
    resident: keel_engine::Resident,
}

/// One operation's latency as a histogram.
#[derive(Debug)]
struct OperationHistogram {
    /// The operation, escaped as a label value.
    operation: String,
    sum_s: f64,
    count: u64,
    /// Non-cumulative counts per bound of [`BUCKET_BOUNDS_S`], then `+Inf` as `f64::MAX`.
    buckets: Vec<(f64, u64)>,
}

impl Snapshot {
    fn take(counts: &BTreeMap<RunStatus, u64>, stats: &[OperationStats], engine: &Engine) -> Self {
        let mut runs: BTreeMap<&'static str, u64> =
            RunStatus::ALL.iter().map(|s| (s.as_str(), 0)).collect();
        for (status, n) in counts {
            *runs.entry(status.as_str()).or_default() += n;
        }
        let bounds: Vec<Duration> = BUCKET_BOUNDS_S
            .iter()
            .map(|&s| Duration::from_secs_f64(s))
            .collect();
        let operations = stats
            .iter()
            .map(|s| {
                let cumulative = engine
                    .operation_counts_at_or_below(&s.operation, &bounds)
                    .unwrap_or_else(|| vec![0; bounds.len()]);
                let mut buckets = Vec::with_capacity(bounds.len() + 1);
                let mut below = 0;
                for (&bound, &at_or_below) in BUCKET_BOUNDS_S.iter().zip(&cumulative) {
                    // Never above the count: the statistics may have grown between reads.
                    let at_or_below = at_or_below.clamp(below, s.count);
                    buckets.push((bound, at_or_below - below));
                    below = at_or_below;
                }
                buckets.push((f64::MAX, s.count - below));
                OperationHistogram {
                    operation: escape(&s.operation),
                    sum_s: s.mean.as_secs_f64() * s.count as f64,
                    count: s.count,
                    buckets,
                }
            })
            .collect();
        let limiters = SERVICES
            .iter()
            .map(|&service| {
                let limiter = engine.rate_limiter(service);
                (service, limiter.throttles(), limiter.rate())
            })
            .collect();
        Snapshot {
            runs,
            operations,
            limiters,
            counters: engine.counters(),
            resident: engine.resident(),
        }
    }
}

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut family = encoder.encode_descriptor(
            "keel_runs",
            "Runs in the store, by status.",
            None,
            MetricType::Gauge,
        )?;
        for (status, n) in &self.runs {
            ConstGauge::new(*n).encode(family.encode_family(&[("status", *status)])?)?;
        }
        let mut family = encoder.encode_descriptor(
            "keel_runs_in_memory",
            "Runs this worker holds: loaded (driven), or parked while they wait.",
            None,
            MetricType::Gauge,
        )?;
        for (state, n) in [
            ("loaded", self.resident.loaded),
            ("parked", self.resident.parked),
        ] {
            ConstGauge::new(n as u64).encode(family.encode_family(&[("state", state)])?)?;
        }
        let mut family = encoder.encode_descriptor(
            "keel_operation_seconds",
            "Latency of successful step and wait executions.",
            None,
            MetricType::Histogram,
        )?;
        for op in &self.operations {
            family
                .encode_family(&[("operation", op.operation.as_str())])?
                .encode_histogram::<NoLabelSet>(op.sum_s, op.count, &op.buckets, None)?;
        }
        let mut family = encoder.encode_descriptor(
            "keel_throttles",
            "Calls answered with throttling, per service.",
            None,
            MetricType::Counter,
        )?;
        for (service, throttles, _) in &self.limiters {
            ConstCounter::new(*throttles)
                .encode(family.encode_family(&[("service", *service)])?)?;
        }
        let mut family = encoder.encode_descriptor(
            "keel_rate_limit_per_second",
            "The rate each service's limiter admits now.",
            None,
            MetricType::Gauge,
        )?;
        for (service, _, rate) in &self.limiters {
            ConstGauge::new(*rate).encode(family.encode_family(&[("service", *service)])?)?;
        }
        for (name, help, value) in [
            (
                "keel_retries",
                "Step attempts that failed and were retried, since start.",
                self.counters.retries,
            ),
            (
                "keel_step_compensations",
                "Steps undone, since start.",
                self.counters.compensations,
            ),
            (
                "keel_waits",
                "Waits that ended, since start.",
                self.counters.waits,
            ),
        ] {
            let family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            ConstCounter::new(value).encode(family)?;
        }
        Ok(())
    }
}

/// A label value with `\`, `"` and newlines escaped.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
