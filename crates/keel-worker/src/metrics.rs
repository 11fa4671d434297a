//! `/metrics` in the Prometheus text format (version 0.0.4).
//!
//! - `keel_runs{status}`: runs by status (gauge).
//! - `keel_operation_seconds{operation,quantile}`, `_sum`, `_count`: latency of every step
//!   and wait kind, as a summary. The engine keeps exact percentiles over a reservoir of
//!   samples rather than fixed buckets, so a summary states what it knows; a histogram would
//!   have to invent bucket counts.
//! - `keel_throttles_total{service}`: throttled calls per service (counter).
//! - `keel_rate_limit_per_second{service}`: each service's current admitted rate (gauge).
//! - `keel_retries_total`, `keel_step_compensations_total`: from the runs' journals at the
//!   last scrape is too costly, so these are the engine's counters since the worker started.

use std::collections::BTreeMap;
use std::fmt::Write;

use keel_engine::{Engine, OperationStats, RunStatus};

use crate::api::SERVICES;

/// Every status, in the order the console and `/metrics` list them.
pub(crate) const STATUSES: [RunStatus; 9] = [
    RunStatus::Running,
    RunStatus::Suspended,
    RunStatus::Paused,
    RunStatus::Compensating,
    RunStatus::CompensationFailed,
    RunStatus::Completed,
    RunStatus::Failed,
    RunStatus::Compensated,
    RunStatus::Resolved,
];

/// The metrics page.
pub(crate) fn render(
    counts: &BTreeMap<RunStatus, u64>,
    stats: &[OperationStats],
    engine: &Engine,
) -> String {
    let mut out = String::new();
    write_runs(&mut out, counts);
    write_operations(&mut out, stats);
    write_limiters(&mut out, engine);
    write_counters(&mut out, engine);
    out
}

/// `keel_runs`: runs by status, every status listed even at 0.
fn write_runs(out: &mut String, counts: &BTreeMap<RunStatus, u64>) {
    let mut by_status: BTreeMap<&str, u64> = STATUSES.iter().map(|s| (s.as_str(), 0)).collect();
    for (status, n) in counts {
        *by_status.entry(status.as_str()).or_default() += n;
    }
    *out += "# HELP keel_runs Runs in the store, by status.\n# TYPE keel_runs gauge\n";
    for (status, n) in &by_status {
        let _ = writeln!(out, "keel_runs{{status=\"{status}\"}} {n}");
    }
}

/// `keel_operation_seconds`: each operation's latency as a summary (quantiles, sum, count).
fn write_operations(out: &mut String, stats: &[OperationStats]) {
    *out += "# HELP keel_operation_seconds Latency of successful step and wait executions.\n";
    *out += "# TYPE keel_operation_seconds summary\n";
    for s in stats {
        let op = escape(&s.operation);
        for (q, d) in [
            ("0.5", s.p50),
            ("0.9", s.p90),
            ("0.99", s.p99),
            ("0.999", s.p999),
        ] {
            let _ = writeln!(
                out,
                "keel_operation_seconds{{operation=\"{op}\",quantile=\"{q}\"}} {}",
                d.as_secs_f64()
            );
        }
        let sum = s.mean.as_secs_f64() * s.count as f64;
        let _ = writeln!(
            out,
            "keel_operation_seconds_sum{{operation=\"{op}\"}} {sum}"
        );
        let _ = writeln!(
            out,
            "keel_operation_seconds_count{{operation=\"{op}\"}} {}",
            s.count
        );
    }
}

/// `keel_throttles_total` and `keel_rate_limit_per_second`: each service's limiter.
fn write_limiters(out: &mut String, engine: &Engine) {
    *out += "# HELP keel_throttles_total Calls answered with throttling, per service.\n";
    *out += "# TYPE keel_throttles_total counter\n";
    for service in SERVICES {
        let _ = writeln!(
            out,
            "keel_throttles_total{{service=\"{service}\"}} {}",
            engine.rate_limiter(service).throttles()
        );
    }
    *out += "# HELP keel_rate_limit_per_second The rate each service's limiter admits now.\n";
    *out += "# TYPE keel_rate_limit_per_second gauge\n";
    for service in SERVICES {
        let _ = writeln!(
            out,
            "keel_rate_limit_per_second{{service=\"{service}\"}} {}",
            engine.rate_limiter(service).rate()
        );
    }
}

/// The engine's counters since the worker started: retries, compensations and waits.
fn write_counters(out: &mut String, engine: &Engine) {
    let counters = engine.counters();
    *out += "# HELP keel_retries_total Step attempts that failed and were retried, since start.\n";
    *out += "# TYPE keel_retries_total counter\n";
    let _ = writeln!(out, "keel_retries_total {}", counters.retries);
    *out += "# HELP keel_step_compensations_total Steps undone, since start.\n";
    *out += "# TYPE keel_step_compensations_total counter\n";
    let _ = writeln!(
        out,
        "keel_step_compensations_total {}",
        counters.compensations
    );
    *out += "# HELP keel_waits_total Waits that ended, since start.\n";
    *out += "# TYPE keel_waits_total counter\n";
    let _ = writeln!(out, "keel_waits_total {}", counters.waits);
}

/// A label value with `\`, `"` and newlines escaped.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
