//! The report's lines: each measured figure with its target (set for the full sizes), next to
//! the baseline it is a ratio to.

use crate::report::{Baseline, Figure};
use crate::{Measured, Sizes};

/// What each figure should reach, at the full sizes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Targets {
    /// One sequential run's steps/s, as a ratio to the baseline.
    sequential: f64,
    /// 1,000 concurrent runs x 10 steps, steps/s, as a ratio.
    concurrent: f64,
    /// Durable starts/s from 100 callers, as a ratio.
    starts: f64,
    /// Events sent and received/s, as a ratio.
    events: f64,
    /// Resume after SIGKILL, in seconds (both figures).
    resume_s: f64,
    /// Memory per sleeping run, in bytes.
    memory_bytes: f64,
    /// CPU per step of the concurrent runs, in microseconds.
    cpu_us_per_step: f64,
}

impl Targets {
    /// The embedded sled store's: issue 28's goals where it set one (the sequential run,
    /// concurrent runs, starts, memory and CPU per step), the earlier issues' elsewhere.
    pub(crate) const SLED: Targets = Targets {
        sequential: 0.8,
        concurrent: 12.0,
        starts: 8.0,
        events: 1.0,
        resume_s: 2.0,
        memory_bytes: 1024.0,
        cpu_us_per_step: 25.0,
    };

    /// The PostgreSQL store's, set against its commit rate: those the sled store had before
    /// issue 28 (no issue set the PostgreSQL store's own).
    pub(crate) const POSTGRES: Targets = Targets {
        sequential: 0.6,
        concurrent: 5.0,
        starts: 3.0,
        memory_bytes: 10_240.0,
        ..Targets::SLED
    };
}

/// The report's lines, with their `targets` (set for the full sizes).
pub(crate) fn figures(m: &Measured, sizes: Sizes, targets: Targets) -> Vec<Figure> {
    let mut figures = baseline_figures(&m.baseline);
    figures.extend(rate_figures(m, sizes, targets));
    figures.extend(resume_figures(m, sizes, targets));
    figures.extend(memory_figures(m, sizes, targets));
    figures
}

/// The disk's raw append rate, before and after: the yardstick of every other figure.
fn baseline_figures(base: &Baseline) -> Vec<Figure> {
    vec![
        Figure::rate(
            "baseline, before",
            base.before_per_s,
            base.unit_per_s,
            base,
            None,
        ),
        Figure::rate(
            "baseline, after",
            base.after_per_s,
            base.unit_per_s,
            base,
            None,
        ),
    ]
}

/// The engine's rates: steps of one run, of a fan-out, of concurrent runs, and starts.
fn rate_figures(m: &Measured, sizes: Sizes, targets: Targets) -> Vec<Figure> {
    let base = &m.baseline;
    vec![
        Figure::rate(
            format!(
                "one run of {} no-op steps",
                thousands(sizes.sequential_steps)
            ),
            m.sequential_steps_per_s,
            "steps/s",
            base,
            Some(targets.sequential),
        ),
        Figure::rate(
            format!(
                "one run fanning out {} parallel no-op steps",
                thousands(sizes.fan_out_branches)
            ),
            m.fan_out_steps_per_s,
            "steps/s",
            base,
            None,
        ),
        Figure::rate(
            format!(
                "{} concurrent runs x 10 no-op steps",
                thousands(sizes.concurrent_runs)
            ),
            m.concurrent_steps_per_s,
            "steps/s",
            base,
            Some(targets.concurrent),
        ),
        Figure::rate(
            format!(
                "durable starts, 100 callers, {} runs",
                thousands(sizes.starts)
            ),
            m.starts_per_s,
            "starts/s",
            base,
            Some(targets.starts),
        ),
        Figure::rate(
            format!(
                "events sent and received, 100 callers, {} runs x {}",
                thousands(sizes.event_runs),
                sizes.events_per_run
            ),
            m.events_per_s,
            "events/s",
            base,
            Some(targets.events),
        ),
    ]
}

/// How long resume after SIGKILL took: until `open()` returned, and until every run completed.
fn resume_figures(m: &Measured, sizes: Sizes, targets: Targets) -> Vec<Figure> {
    let base = &m.baseline;
    let resume_runs = thousands(sizes.resume_runs);
    vec![
        Figure::duration(
            format!("resume of {resume_runs} runs after SIGKILL: open() returned"),
            m.resumed.opened.as_secs_f64(),
            base,
            Some(targets.resume_s),
        ),
        Figure::duration(
            format!("resume of {resume_runs} runs after SIGKILL: all completed"),
            m.resumed.completed.as_secs_f64(),
            base,
            Some(targets.resume_s),
        ),
    ]
}

/// What the disk does not decide: memory per sleeping run, CPU per step, the whole run's
/// peak memory.
fn memory_figures(m: &Measured, sizes: Sizes, targets: Targets) -> Vec<Figure> {
    vec![
        Figure::size_at_most(
            format!(
                "memory per sleeping run ({} runs)",
                thousands(sizes.sleeping_runs)
            ),
            m.memory_per_run_bytes,
            "bytes",
            targets.memory_bytes,
        ),
        Figure::size(
            format!(
                "CPU per step, {} concurrent runs x 10 (user + system, every thread)",
                thousands(sizes.concurrent_runs)
            ),
            m.concurrent_cpu_us_per_step,
            "us",
            Some(targets.cpu_us_per_step),
        ),
        Figure::size(
            "peak RSS of the whole run (VmHWM)",
            m.peak_rss_bytes as f64 / (1024.0 * 1024.0),
            "MiB",
            None,
        ),
    ]
}

/// `12345` as `12,345`.
pub(crate) fn thousands(n: u32) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}
