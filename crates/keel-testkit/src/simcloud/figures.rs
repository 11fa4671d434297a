//! The figures of a load scenario, computed from the cloud's ground truth and the runs'
//! records: health (what was destroyed, what did not complete), throughput (what the cloud
//! accepted while busy) and latency (time to a usable machine, probes per resource).

use std::collections::{BTreeMap, HashMap};

use keel_engine::RunStatus;
use serde::Serialize;

use super::load::LoadParams;
use super::model::{Call, CallOutcome, GroundTruth, Resource};
use super::report::{Life, LimiterSample, RunFacts};
use super::wire::{Kind, Op, Throttle};

/// What was destroyed although healthy, and which runs did not complete.
#[derive(Clone, Debug, Serialize)]
pub struct Health {
    /// Runs by final status.
    pub runs_by_status: BTreeMap<String, u32>,
    /// The most frequent reasons of runs that did not complete, with counts.
    pub run_errors: Vec<(String, u32)>,
    /// Each run that did not complete: its id, status, and what the cloud saw of each of its
    /// resources (at most 10 runs).
    pub not_completed: Vec<String>,
    /// Instances created (every generation).
    pub instances_created: u32,
    /// Volumes created (every generation).
    pub volumes_created: u32,
    /// Resources of generation 1 or later.
    pub recreations: u32,
    /// Waits that timed out, from the journals.
    pub wait_timeouts: u32,
    /// Goal 0: resources destroyed although healthy, by their run's recreation.
    pub healthy_recreated: u32,
    /// A few of them: what the cloud saw.
    pub healthy_recreated_examples: Vec<String>,
    /// Resources destroyed although healthy, by a saga (not superseded by another generation).
    pub healthy_destroyed_by_saga: u32,
    /// Goal 0: runs that did not complete although every resource they created became ready.
    pub healthy_runs_compensated: u32,
    /// Resources left alive that are not part of a completed run's machine.
    pub leaked: u32,
}

impl Health {
    /// Judges every resource and run; a resource is healthy once it has been ready for
    /// `grace_ms`.
    pub fn new(truth: &GroundTruth, runs: &[RunFacts], grace_ms: u64) -> Health {
        let resources = &truth.resources;
        let by_run = resources_by_run(resources);
        let superseded = |r: &&Resource| {
            by_run.get(r.run.as_str()).is_some_and(|rs| {
                rs.iter()
                    .any(|o| o.kind == r.kind && o.generation > r.generation)
            })
        };
        let healthy: Vec<&Resource> = resources
            .iter()
            .filter(|r| r.destroyed_healthy(grace_ms))
            .collect();
        let recreated: Vec<&Resource> = healthy.iter().copied().filter(superseded).collect();
        let kept: Vec<&str> = runs
            .iter()
            .filter_map(|r| r.machine.as_ref())
            .flat_map(|m| [m.instance.as_str(), m.volume.as_str()])
            .collect();
        let count = |kind| resources.iter().filter(|r| r.kind == kind).count() as u32;
        let mut health = Health {
            runs_by_status: BTreeMap::new(),
            run_errors: Vec::new(),
            not_completed: Vec::new(),
            instances_created: count(Kind::Instance),
            volumes_created: count(Kind::Volume),
            recreations: resources.iter().filter(|r| r.generation > 0).count() as u32,
            wait_timeouts: runs.iter().map(|r| r.wait_timeouts).sum(),
            healthy_recreated: recreated.len() as u32,
            healthy_recreated_examples: recreated.iter().take(5).map(|r| describe(r)).collect(),
            healthy_destroyed_by_saga: (healthy.len() - recreated.len()) as u32,
            healthy_runs_compensated: 0,
            leaked: resources
                .iter()
                .filter(|r| r.deleted_at_ms.is_none() && !kept.contains(&r.id.as_str()))
                .count() as u32,
        };
        health.judge_runs(runs, &by_run);
        health
    }

    /// Counts runs by status; for those that did not complete, their reasons and whether
    /// every resource they created became ready before anything asked to delete it.
    fn judge_runs(&mut self, runs: &[RunFacts], by_run: &HashMap<&str, Vec<&Resource>>) {
        let mut errors: HashMap<String, u32> = HashMap::new();
        for run in runs {
            *self
                .runs_by_status
                .entry(run.status.to_string())
                .or_insert(0) += 1;
            if run.status == RunStatus::Completed {
                continue;
            }
            *errors
                .entry(shorten(run.error.as_deref().unwrap_or("")))
                .or_insert(0) += 1;
            let created = by_run.get(run.id.as_str()).cloned().unwrap_or_default();
            let all_ready = created.iter().all(|r| {
                r.delete_requested_at_ms
                    .is_none_or(|at| r.ready_at_ms <= at)
            });
            if all_ready {
                self.healthy_runs_compensated += 1;
            }
            if self.not_completed.len() < 10 {
                let seen: Vec<String> = created.iter().map(|r| describe(r)).collect();
                self.not_completed.push(format!(
                    "{} {} (healthy: {all_ready}): {}",
                    run.id,
                    run.status,
                    seen.join("; ")
                ));
            }
        }
        self.run_errors = errors.into_iter().collect();
        self.run_errors
            .sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        self.run_errors.truncate(5);
    }
}

/// What the cloud accepted, and when.
#[derive(Clone, Debug, Serialize)]
pub struct Throughput {
    /// Every call the cloud saw.
    pub calls: u32,
    /// Calls served.
    pub calls_accepted: u32,
    /// Calls throttled because the bucket was empty.
    pub throttled_capacity: u32,
    /// Calls throttled at random.
    pub throttled_random: u32,
    /// Calls per operation (all outcomes).
    pub calls_by_op: BTreeMap<String, u32>,
    /// The busy phase: its length, engine downtime excluded, in s.
    pub busy_s: f64,
    /// Engine downtime inside the busy phase, in s.
    pub busy_downtime_s: f64,
    /// Runs unfinished below which the busy phase ends.
    pub busy_runs_min: u32,
    /// Accepted calls per second during the busy phase.
    pub busy_accepted_per_s: f64,
    /// Goal >= 0.8: `busy_accepted_per_s` over the capacity.
    pub busy_fraction_of_capacity: f64,
    /// Accepted calls per second from the first call to the last, downtime excluded.
    pub overall_accepted_per_s: f64,
    /// Accepted calls in each 10 s since the first call.
    pub accepted_per_10s: Vec<u32>,
    /// The engine's limiter rate during the busy phase: median (calls/s).
    pub limiter_rate_p50: f64,
    /// The same: largest.
    pub limiter_rate_max: f64,
}

impl Throughput {
    /// The figures of `truth.calls`. The busy phase runs from the first call until fewer
    /// runs are unfinished than would poll at twice the capacity on the explicit interval
    /// (`usable_at_ms`: when each run got its machine or settled), without the windows in
    /// which no engine ran (from a kill to the first call of the next child).
    pub fn new(
        params: &LoadParams,
        truth: &GroundTruth,
        usable_at_ms: &[u64],
        lives: &[Life],
        samples: &[LimiterSample],
    ) -> Throughput {
        let calls = &truth.calls;
        let first_ms = calls.first().map_or(0, |c| c.at_ms);
        let last_ms = calls.last().map_or(0, |c| c.at_ms).max(first_ms + 1);
        let downtime = downtime_windows(lives, calls);
        let interval_s = params.machine.poll_interval_ms as f64 / 1000.0;
        let busy_runs_min = ((2.0 * params.cloud.capacity_per_s * interval_s).ceil() as u32)
            .clamp(1, (params.runs / 2).max(1));
        let busy_end_ms = busy_end_ms(usable_at_ms, busy_runs_min, first_ms, last_ms);
        let busy_downtime_ms = overlap(&downtime, first_ms, busy_end_ms);
        let busy_ms = (busy_end_ms - first_ms)
            .saturating_sub(busy_downtime_ms)
            .max(1);
        let accepted: Vec<&Call> = calls
            .iter()
            .filter(|c| c.outcome == CallOutcome::Accepted)
            .collect();
        let busy_accepted = accepted.iter().filter(|c| c.at_ms < busy_end_ms).count();
        let busy_accepted_per_s = busy_accepted as f64 / (busy_ms as f64 / 1000.0);
        let all_ms = (last_ms - first_ms)
            .saturating_sub(overlap(&downtime, first_ms, last_ms))
            .max(1);
        let accepted_per_10s = accepted_per_10s(&accepted, first_ms, last_ms);
        let calls_by_op = calls_by_op(calls);
        let throttled = |cause| {
            calls
                .iter()
                .filter(|c| c.outcome == CallOutcome::Throttled(cause))
                .count() as u32
        };
        let rates = sorted(
            samples
                .iter()
                .filter(|s| s.at_ms >= first_ms && s.at_ms < busy_end_ms)
                .map(|s| s.rate)
                .collect(),
        );
        Throughput {
            calls: calls.len() as u32,
            calls_accepted: accepted.len() as u32,
            throttled_capacity: throttled(Throttle::Capacity),
            throttled_random: throttled(Throttle::Random),
            calls_by_op,
            busy_s: busy_ms as f64 / 1000.0,
            busy_downtime_s: busy_downtime_ms as f64 / 1000.0,
            busy_runs_min,
            busy_accepted_per_s,
            busy_fraction_of_capacity: busy_accepted_per_s / params.cloud.capacity_per_s,
            overall_accepted_per_s: accepted.len() as f64 / (all_ms as f64 / 1000.0),
            accepted_per_10s,
            limiter_rate_p50: quantile(&rates, 0.5),
            limiter_rate_max: rates.last().copied().unwrap_or(0.0),
        }
    }
}

/// When the busy phase ends: when no more than `busy_runs_min` runs are left without a
/// usable machine, kept within the calls' span.
fn busy_end_ms(usable_at_ms: &[u64], busy_runs_min: u32, first_ms: u64, last_ms: u64) -> u64 {
    let mut done = usable_at_ms.to_vec();
    done.sort_unstable();
    done.get(done.len().saturating_sub(busy_runs_min as usize))
        .copied()
        .unwrap_or(last_ms)
        .clamp(first_ms + 1, last_ms)
}

/// Accepted calls in each 10 s from `first_ms` to `last_ms`.
fn accepted_per_10s(accepted: &[&Call], first_ms: u64, last_ms: u64) -> Vec<u32> {
    let mut per_10s = vec![0; ((last_ms - first_ms) / 10_000 + 1) as usize];
    for call in accepted {
        per_10s[((call.at_ms - first_ms) / 10_000) as usize] += 1;
    }
    per_10s
}

/// Calls per operation name, whatever their outcome.
fn calls_by_op(calls: &[Call]) -> BTreeMap<String, u32> {
    let mut by_op = BTreeMap::new();
    for call in calls {
        *by_op.entry(op_name(call.op).to_string()).or_insert(0) += 1;
    }
    by_op
}

/// How long runs took to a usable machine, and how many probes each resource cost.
#[derive(Clone, Debug, Serialize)]
pub struct Latency {
    /// Runs that got a usable machine.
    pub machines: u32,
    /// Run start to volume attached, over the runs that got one (s): median.
    pub time_to_machine_p50_s: f64,
    /// The same: p99.
    pub time_to_machine_p99_s: f64,
    /// The same: the slowest.
    pub time_to_machine_max_s: f64,
    /// Reads naming a resource (throttled ones included), per resource: mean.
    pub probes_per_resource_mean: f64,
    /// The same: median.
    pub probes_per_resource_p50: f64,
    /// The same: p99.
    pub probes_per_resource_p99: f64,
    /// The same: most.
    pub probes_per_resource_max: f64,
    /// Reads answered (not throttled) per resource, mean.
    pub probes_answered_per_resource_mean: f64,
}

impl Latency {
    /// The figures, from each run's start and the time its machine became usable (if it
    /// did) and the reads of every resource.
    pub fn new(truth: &GroundTruth, runs: &[RunFacts]) -> Latency {
        let resources = &truth.resources;
        let to_machine_s = sorted(
            runs.iter()
                .zip(machine_at_ms(truth, runs))
                .filter_map(|(run, at)| at.map(|at| at.saturating_sub(run.created_at_ms)))
                .map(|ms| ms as f64 / 1000.0)
                .collect(),
        );
        let probes = sorted(resources.iter().map(|r| f64::from(r.describes)).collect());
        let answered: f64 = resources
            .iter()
            .map(|r| f64::from(r.describes_answered))
            .sum();
        Latency {
            machines: to_machine_s.len() as u32,
            time_to_machine_p50_s: quantile(&to_machine_s, 0.5),
            time_to_machine_p99_s: quantile(&to_machine_s, 0.99),
            time_to_machine_max_s: to_machine_s.last().copied().unwrap_or(0.0),
            probes_per_resource_mean: probes.iter().sum::<f64>() / (probes.len().max(1) as f64),
            probes_per_resource_p50: quantile(&probes, 0.5),
            probes_per_resource_p99: quantile(&probes, 0.99),
            probes_per_resource_max: probes.last().copied().unwrap_or(0.0),
            probes_answered_per_resource_mean: answered / (resources.len().max(1) as f64),
        }
    }
}

/// When each run's machine became usable (its volume attached), if it completed.
pub fn machine_at_ms(truth: &GroundTruth, runs: &[RunFacts]) -> Vec<Option<u64>> {
    let attached: HashMap<&str, u64> = truth
        .resources
        .iter()
        .filter_map(|r| r.attached_at_ms.map(|at| (r.id.as_str(), at)))
        .collect();
    runs.iter()
        .map(|run| {
            run.machine
                .as_ref()
                .and_then(|m| attached.get(m.volume.as_str()).copied())
        })
        .collect()
}

/// The `q` quantile (nearest rank) of sorted `values`; 0 when empty.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn sorted(mut values: Vec<f64>) -> Vec<f64> {
    values.sort_by(f64::total_cmp);
    values
}

/// What the cloud saw of a resource, times from its creation.
pub fn describe(r: &Resource) -> String {
    let s = |at: u64| at.saturating_sub(r.created_at_ms) as f64 / 1000.0;
    let deleted = match r.delete_requested_at_ms {
        Some(at) => format!("delete asked at {:.1} s", s(at)),
        None => "never deleted".into(),
    };
    format!(
        "{} {} of {} (generation {}): ready at {:.1} s, {deleted}, {} reads ({} answered)",
        r.kind,
        r.id,
        r.run,
        r.generation,
        s(r.ready_at_ms),
        r.describes,
        r.describes_answered
    )
}

fn op_name(op: Op) -> &'static str {
    match op {
        Op::Create => "create",
        Op::Describe => "describe",
        Op::FindByToken => "find_by_token",
        Op::Delete => "delete",
        Op::Attach => "attach",
        Op::Detach => "detach",
    }
}

/// A run's error without its varying ids, cut short, so equal causes count together.
fn shorten(error: &str) -> String {
    let generic: String = error
        .split_whitespace()
        .map(|w| {
            if w.starts_with("i-") || w.starts_with("vol-") || w.starts_with('#') {
                "<id>"
            } else {
                w
            }
        })
        .collect::<Vec<_>>()
        .join(" ");
    generic.chars().take(160).collect()
}

fn resources_by_run(resources: &[Resource]) -> HashMap<&str, Vec<&Resource>> {
    let mut by_run: HashMap<&str, Vec<&Resource>> = HashMap::new();
    for r in resources {
        by_run.entry(r.run.as_str()).or_default().push(r);
    }
    by_run
}

/// The windows in which no engine ran: from each kill to the first call after the next spawn.
fn downtime_windows(lives: &[Life], calls: &[Call]) -> Vec<(u64, u64)> {
    let mut windows = Vec::new();
    for pair in lives.windows(2) {
        let (Some(killed), next) = (pair[0].killed_at_ms, pair[1]) else {
            continue;
        };
        let back = calls
            .iter()
            .map(|c| c.at_ms)
            .find(|&at| at >= next.spawned_at_ms)
            .unwrap_or(next.spawned_at_ms);
        windows.push((killed, back.max(killed)));
    }
    windows
}

/// How much of `windows` lies within `[from, to)`.
fn overlap(windows: &[(u64, u64)], from: u64, to: u64) -> u64 {
    windows
        .iter()
        .map(|&(a, b)| b.min(to).saturating_sub(a.max(from)))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_take_the_nearest_rank() {
        let v = sorted(vec![5.0, 1.0, 3.0, 2.0, 4.0]);
        assert_eq!(
            (quantile(&v, 0.5), quantile(&v, 0.99), quantile(&[], 0.5)),
            (3.0, 5.0, 0.0)
        );
    }

    #[test]
    fn downtime_runs_from_a_kill_to_the_next_childs_first_call() {
        let lives = [
            Life {
                spawned_at_ms: 0,
                killed_at_ms: Some(100),
            },
            Life {
                spawned_at_ms: 150,
                killed_at_ms: None,
            },
        ];
        let call = |at_ms| Call {
            at_ms,
            op: Op::Describe,
            resource: None,
            outcome: CallOutcome::Accepted,
        };
        let windows = downtime_windows(&lives, &[call(50), call(90), call(170)]);
        assert_eq!(windows, vec![(100, 170)]);
        assert_eq!(overlap(&windows, 0, 120), 20);
        assert_eq!(overlap(&windows, 0, 1_000), 70);
    }
}
