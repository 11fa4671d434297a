//! The report's lines: each measured figure with its target (set for the full sizes), next to
//! the baseline it is a ratio to.

use crate::report::{Baseline, Figure};
use crate::{Measured, Sizes};

/// The report's lines, with their targets (set for the full sizes).
pub(crate) fn figures(m: &Measured, sizes: Sizes) -> Vec<Figure> {
    let mut figures = baseline_figures(&m.baseline);
    figures.extend(rate_figures(m, sizes));
    figures.extend(resume_figures(m, sizes));
    figures.extend(memory_figures(m, sizes));
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
fn rate_figures(m: &Measured, sizes: Sizes) -> Vec<Figure> {
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
            Some(0.6),
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
            Some(5.0),
        ),
        Figure::rate(
            format!(
                "durable starts, 100 callers, {} runs",
                thousands(sizes.starts)
            ),
            m.starts_per_s,
            "starts/s",
            base,
            Some(3.0),
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
            Some(1.0),
        ),
    ]
}

/// How long resume after SIGKILL took: until `open()` returned, and until every run completed.
fn resume_figures(m: &Measured, sizes: Sizes) -> Vec<Figure> {
    let base = &m.baseline;
    let resume_runs = thousands(sizes.resume_runs);
    vec![
        Figure::duration(
            format!("resume of {resume_runs} runs after SIGKILL: open() returned"),
            m.resumed.opened.as_secs_f64(),
            base,
            Some(2.0),
        ),
        Figure::duration(
            format!("resume of {resume_runs} runs after SIGKILL: all completed"),
            m.resumed.completed.as_secs_f64(),
            base,
            Some(2.0),
        ),
    ]
}

/// What the disk does not decide: memory per sleeping run, CPU per step, the whole run's
/// peak memory.
fn memory_figures(m: &Measured, sizes: Sizes) -> Vec<Figure> {
    vec![
        Figure::size(
            format!(
                "memory per sleeping run ({} runs)",
                thousands(sizes.sleeping_runs)
            ),
            m.memory_per_run_bytes,
            "bytes",
            Some(10_240.0),
        ),
        Figure::size(
            format!(
                "CPU per step, {} concurrent runs x 10 (user + system, every thread)",
                thousands(sizes.concurrent_runs)
            ),
            m.concurrent_cpu_us_per_step,
            "us",
            Some(25.0),
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
