//! The failover torture's report: the failover figures (median and max over the kills), then
//! what the schedule did and what the stopped workers did once continued; and the account of
//! effects a stopped worker made once continued. It returns text; the test prints it.

use std::time::Duration;

use super::database::{self, Failover};
use super::workers::{LateEffect, Stop};
use super::EXIT_LINE;
use crate::check::Tally;

/// What the stopped workers did once continued.
#[derive(Debug)]
pub struct Zombies {
    /// "write refused" lines in their logs.
    pub refused: usize,
    /// Effects they made after their SIGCONT.
    pub late: usize,
    /// Those the step had begun making before the stop (`LateEffect::under_way`).
    pub under_way: usize,
    /// Those against their run's end, each as a sentence.
    pub left: Vec<String>,
}

/// Everything the report tells.
#[derive(Debug)]
pub struct Report<'a> {
    /// The failover of every kill whose victim owned unfinished runs.
    pub failovers: &'a [Failover],
    /// Kills made in all.
    pub kills: usize,
    /// Kills made while runs were unfinished.
    pub kills_counted: usize,
    /// The workers' lease.
    pub lease: Duration,
    /// The stop cycles.
    pub stops: &'a [Stop],
    /// What the stopped workers did once continued.
    pub zombies: &'a Zombies,
    /// Workers that lost their lease without being stopped.
    pub unplanned: &'a [String],
    /// How many runs ran.
    pub runs: usize,
    /// The effect log's totals.
    pub tally: &'a Tally,
    /// The schedule's seed.
    pub seed: u64,
    /// How long the torture took.
    pub took: Duration,
}

/// Median and max of `values`, or `None` when empty.
pub fn median_max(mut values: Vec<f64>) -> Option<(f64, f64)> {
    values.sort_by(f64::total_cmp);
    let median = *values.get(values.len() / 2)?;
    Some((median, *values.last()?))
}

/// "`label`: N kills measured, median X ms, max Y ms" over `failovers`' `figure`.
pub fn figures(
    label: &str,
    failovers: &[&Failover],
    figure: fn(&Failover) -> Option<f64>,
) -> String {
    let values: Vec<f64> = failovers.iter().filter_map(|f| figure(f)).collect();
    let n = values.len();
    match median_max(values) {
        Some((median, max)) => {
            format!("{label}: {n} kills measured, median {median:.0} ms, max {max:.0} ms")
        }
        None => format!("{label}: no kill measured"),
    }
}

impl Report<'_> {
    /// The report, a paragraph a line: failover figures first, then what the schedule did.
    pub fn render(&self) -> String {
        let mut lines = self.failover_lines();
        lines.extend(self.schedule_lines());
        lines.join("\n")
    }

    /// The failover figures: to another directory (waiting for the lease), to the first
    /// claim, and in place (superseding).
    fn failover_lines(&self) -> Vec<String> {
        let (in_place, elsewhere): (Vec<&Failover>, Vec<&Failover>) =
            self.failovers.iter().partition(|f| f.in_place);
        let in_place_label = "failover to a successor in the victim's directory (superseding it; \
                              includes the harness's 0.1-1 s restart delay)";
        vec![
            figures("failover", &elsewhere, |f| f.first_entry_ms),
            format!(
                "  (SIGKILL to the first journal row of the victim's unfinished runs by another \
                 worker, the victim's successor opening elsewhere, so that its runs wait for its \
                 lease of {:?}; {} kills in all, {} while runs were unfinished)",
                self.lease, self.kills, self.kills_counted
            ),
            figures("failover to the first claim", &elsewhere, |f| {
                f.first_claim_ms
            }),
            figures(in_place_label, &in_place, |f| f.first_entry_ms),
        ]
    }

    /// The stops, the zombies, the unplanned lease losses and the totals.
    fn schedule_lines(&self) -> Vec<String> {
        let exits: Vec<String> = self
            .stops
            .iter()
            .filter_map(|s| s.exited_after.map(|d| d.as_millis().to_string()))
            .collect();
        let (zombies, tally) = (self.zombies, self.tally);
        vec![
            format!(
                "stops: {}, the stopped workers owning {} unfinished runs; each exited this many \
                 ms after its SIGCONT: {}",
                self.stops.len(),
                self.stops.iter().map(|s| s.owned).sum::<usize>(),
                exits.join(" ")
            ),
            format!(
                "zombies: {} writes refused in their logs; {} effects made after their SIGCONT by \
                 steps in flight when stopped ({} begun before the stop, inside the poll it \
                 caught), {} of them against their run's end: {:?}",
                zombies.refused,
                zombies.late,
                zombies.under_way,
                zombies.left.len(),
                zombies.left
            ),
            format!(
                "leases lost unasked: {} {:?}",
                self.unplanned.len(),
                self.unplanned
            ),
            format!(
                "runs: {}, effects {}, steps re-run {}, undos {}; seed {}, took {:.0} s",
                self.runs,
                tally.effects,
                tally.steps_rerun,
                tally.undos,
                self.seed,
                self.took.as_secs_f64()
            ),
        ]
    }
}

/// Each late effect, with the stop it followed, the worker's lease-lost lines and what the
/// database at `url` knows around it (`database::late_effect_context`): for the failure
/// message of a torture that allows none.
pub async fn late_effects_told(url: &str, late: &[&LateEffect], stops: &[Stop]) -> String {
    let mut told = Vec::new();
    for &LateEffect { effect, worker, .. } in late {
        let stop = stops
            .iter()
            .find(|s| s.pid == effect.pid && &s.worker == worker);
        let stop = stop.expect("a late effect's stop");
        let lost = stop.log.lines().filter(|l| {
            l.contains("lease lost") || l.contains(EXIT_LINE) || l.contains("write refused")
        });
        let context = database::late_effect_context(url, effect, worker).await;
        told.push(format!(
            "{effect:?} by worker {worker}, SIGCONT at {} (exited {:?} later)\n  {}\n  {}",
            stop.cont_at.as_deref().unwrap_or("?"),
            stop.exited_after,
            lost.collect::<Vec<_>>().join("\n  "),
            context.join("\n  ")
        ));
    }
    told.join("\n")
}

#[cfg(test)]
mod tests {
    use super::median_max;

    /// The median of an odd count is the middle value, of an even count the upper middle one;
    /// nothing has no figures.
    #[test]
    fn median_and_max() {
        assert_eq!(median_max(vec![3.0, 1.0, 2.0]), Some((2.0, 3.0)));
        assert_eq!(median_max(vec![4.0, 1.0, 3.0, 2.0]), Some((3.0, 4.0)));
        assert_eq!(median_max(Vec::new()), None);
    }
}
