//! The waits simulation's report as text: the readiness drawn, one block per strategy, a
//! legend and the targets, each said met or not.

use std::fmt::Write;

use super::{Outliers, WaitsReport, GENERATIONS};

impl WaitsReport {
    /// The report as text: one block per strategy and the targets.
    pub(crate) fn table(&self) -> String {
        let mut out = String::new();
        self.write_readiness(&mut out);
        self.write_strategies(&mut out);
        self.write_legend(&mut out);
        self.write_targets(&mut out);
        out
    }

    /// A time of this report in its unit: ms for the synthetic run, s for a published one.
    fn time(&self, ms: f64) -> String {
        if self.published.is_some() {
            format!("{:.1}s", ms / 1000.0)
        } else {
            format!("{ms:.1}ms")
        }
    }

    /// What was simulated: the readiness distribution, and what was drawn from it.
    fn write_readiness(&self, out: &mut String) {
        let r = &self.readiness;
        let _ = writeln!(
            out,
            "wait strategies, simulated: {}: {} resources, seed {}, warm-up {} samples",
            r.what, self.resources, self.seed, self.warm_up
        );
        if let Some(p) = &self.published {
            let worst: Vec<String> = p
                .outliers_ms
                .iter()
                .map(|ms| format!("{}", ms / 1000.0))
                .collect();
            let _ = writeln!(
                out,
                "published (BOSH AWS CPI): count {}, min {} s, mean {} s, max {} s, sigma {} s, worst {}",
                p.count,
                p.min_s,
                p.mean_s,
                p.max_s,
                p.sigma_s,
                worst.join(", ")
            );
        }
        match r.outliers {
            Outliers::Relative { rate, low, high } => {
                let _ = writeln!(
                    out,
                    "readiness: log-normal mean {} ms sigma {} ms min {} ms, {}% outliers at {low}-{high}x mean",
                    r.mean_ms, r.sigma_ms, r.min_ms, rate * 100.0
                );
            }
            Outliers::Published { values_ms, count } => {
                let _ = writeln!(
                    out,
                    "fitted: log-normal body mean {} sigma {} above {}, and the {} published outliers at {:.2}% (their rate in the published sample)",
                    self.time(r.mean_ms),
                    self.time(r.sigma_ms),
                    self.time(r.min_ms),
                    values_ms.len(),
                    values_ms.len() as f64 * 100.0 / f64::from(count)
                );
            }
        }
        let _ = writeln!(
            out,
            "drawn: mean {}, p50 {}, p99 {}, max {}, {} outliers\n",
            self.time(self.readiness_mean_ms),
            self.time(self.readiness_p50_ms),
            self.time(self.readiness_p99_ms),
            self.time(self.readiness_max_ms),
            self.outliers
        );
    }

    /// The table proper: a header and one row per strategy.
    fn write_strategies(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "{:<40} {:>9} {:>9} {:>7} {:>8} | {:>9} {:>9} {:>9} {:>9} {:>9} {:>6} {:>7}",
            "strategy",
            "over p50",
            "over p99",
            "p50/mu",
            "probes",
            "ttr p50",
            "ttr p99",
            "ttr max",
            "wait p99",
            "wait max",
            "recr.",
            "probes"
        );
        for s in &self.strategies {
            let _ = writeln!(
                out,
                "{:<40} {:>9} {:>9} {:>6.1}% {:>8.1} | {:>9} {:>9} {:>9} {:>9} {:>9} {:>6} {:>7.1}",
                s.strategy,
                self.time(s.overshoot_p50_ms),
                self.time(s.overshoot_p99_ms),
                s.overshoot_p50_of_mean * 100.0,
                s.probes_per_resource,
                self.time(s.recreate_time_to_ready_p50_ms),
                self.time(s.recreate_time_to_ready_p99_ms),
                self.time(s.recreate_time_to_ready_max_ms),
                self.time(s.wait_time_to_ready_p99_ms),
                self.time(s.wait_total_parallel_ms),
                s.recreations,
                s.recreate_probes_per_resource,
            );
        }
    }

    /// What the table's two halves mean, and each strategy's resolved schedule.
    fn write_legend(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "\nleft: waiting each resource out (overshoot = noticed - ready; p50/mu = median overshoot / mean readiness)"
        );
        let _ = writeln!(
            out,
            "right: recreate on the strategy's deadline, up to {GENERATIONS} generations (ttr = time to ready from the first create; wait = the same without recreate; recr. = generations abandoned; probes with recreate)"
        );
        for s in &self.strategies {
            let _ = writeln!(out, "  {}: {}", s.strategy, s.schedule);
        }
    }

    /// The learned policy against its targets, next to 1 ms polling (when both were run).
    fn write_targets(&self, out: &mut String) {
        // The targets are set for the synthetic distribution.
        if self.published.is_some() {
            return;
        }
        let (Some(learned), Some(polling)) = (
            self.strategies
                .iter()
                .find(|s| s.strategy.starts_with("learned")),
            self.strategies
                .iter()
                .find(|s| s.strategy.starts_with("fixed polling")),
        ) else {
            return;
        };
        let probe_ratio = learned.probes_per_resource / polling.probes_per_resource;
        let p99_ratio = learned.recreate_time_to_ready_p99_ms / learned.wait_time_to_ready_p99_ms;
        let p999_ratio =
            learned.recreate_time_to_ready_p999_ms / learned.wait_time_to_ready_p999_ms;
        let _ = writeln!(out, "\ntargets (learned policy):");
        let _ = writeln!(
            out,
            "  median overshoot {:.1}% of the mean readiness (target <= 10%): {}",
            learned.overshoot_p50_of_mean * 100.0,
            verdict(learned.overshoot_p50_of_mean <= 0.10)
        );
        let _ = writeln!(
            out,
            "  probes {:.2}x those of 1 ms polling (target <= 0.33x): {}",
            probe_ratio,
            verdict(probe_ratio <= 1.0 / 3.0)
        );
        let _ = writeln!(
            out,
            "  recreate p99 time to ready {:.2}x waiting it out (target <= 0.5x): {}; p99.9 {:.2}x",
            p99_ratio,
            verdict(p99_ratio <= 0.5),
            p999_ratio
        );
    }
}

/// How a target reads in the report.
fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "NOT met"
    }
}
