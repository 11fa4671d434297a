//! What a load scenario measured, from the cloud's ground truth and the runs' records, and
//! the goals (each a defect when missed):
//! - **healthy resources recreated: 0.** A resource whose run went on to create another
//!   generation of it, although, when its delete was first asked for, it had been ready for
//!   longer than the cloud's flap window (after which reads no longer lie) plus one explicit
//!   poll interval per confirmation: long enough for a wait polling on that interval to have
//!   confirmed it.
//! - **healthy runs compensated: 0.** A run that did not complete although every resource it
//!   created became ready before anything asked to delete it (vacuously true for a run that
//!   created nothing).
//! - **limiter use >= 80% of capacity.** Calls the cloud accepted per second during the busy
//!   phase, over its capacity. The busy phase runs from the first call until fewer runs are
//!   unfinished (no machine yet) than would poll at twice the capacity on the explicit
//!   interval, with the time the engine was down (from a kill to the first call of the next
//!   child) left out.

use std::fmt::Write;

use keel_engine::RunStatus;
use serde::{Deserialize, Serialize};

use super::figures::{machine_at_ms, Health, Latency, Throughput};
use super::load::LoadParams;
use super::machine::Machine;
use super::model::GroundTruth;

/// One run, as its record and journal tell it.
#[derive(Clone, Debug)]
pub struct RunFacts {
    /// The run id.
    pub id: String,
    /// How it ended.
    pub status: RunStatus,
    /// When it was started (ms since the Unix epoch).
    pub created_at_ms: u64,
    /// When it settled.
    pub finished_at_ms: Option<u64>,
    /// Why it did not complete.
    pub error: Option<String>,
    /// Waits that ended timed out.
    pub wait_timeouts: u32,
    /// Its output, if it completed.
    pub machine: Option<Machine>,
}

/// One engine process.
#[derive(Clone, Copy, Debug)]
pub struct Life {
    /// When it was spawned (ms since the Unix epoch).
    pub spawned_at_ms: u64,
    /// When it was killed, if it was.
    pub killed_at_ms: Option<u64>,
}

/// The engine's limiter rate at one moment, as a child records it.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct LimiterSample {
    /// When (ms since the Unix epoch).
    pub at_ms: u64,
    /// Calls per second.
    pub rate: f64,
    /// Throttled answers reported to it so far (since the child started).
    pub throttles: u64,
}

/// The figures of one scenario.
#[derive(Clone, Debug, Serialize)]
pub struct LoadReport {
    /// The knobs.
    pub params: LoadParams,
    /// SIGKILLs made.
    pub kills: u32,
    /// Seconds from the first call to the last run settled.
    pub duration_s: f64,
    /// What was destroyed although healthy; which runs did not complete.
    #[serde(flatten)]
    pub health: Health,
    /// What the cloud accepted while busy.
    #[serde(flatten)]
    pub throughput: Throughput,
    /// Time to a usable machine; probes per resource.
    #[serde(flatten)]
    pub latency: Latency,
}

impl LoadReport {
    /// Computes the figures.
    pub fn new(
        params: &LoadParams,
        truth: &GroundTruth,
        runs: &[RunFacts],
        lives: &[Life],
        samples: &[LimiterSample],
    ) -> LoadReport {
        let grace_ms = params.cloud.flap_window_ms
            + u64::from(params.machine.confirmations) * params.machine.poll_interval_ms;
        // A run is finished when its machine is usable, or when it settled without one.
        let usable_at_ms: Vec<u64> = runs
            .iter()
            .zip(machine_at_ms(truth, runs))
            .map(|(run, at)| at.or(run.finished_at_ms).unwrap_or(u64::MAX))
            .collect();
        let first_ms = truth.calls.first().map_or(0, |c| c.at_ms);
        let settled_ms = runs
            .iter()
            .filter_map(|r| r.finished_at_ms)
            .max()
            .unwrap_or(first_ms);
        LoadReport {
            params: params.clone(),
            kills: lives.iter().filter(|l| l.killed_at_ms.is_some()).count() as u32,
            duration_s: settled_ms.saturating_sub(first_ms) as f64 / 1000.0,
            health: Health::new(truth, runs, grace_ms),
            throughput: Throughput::new(params, truth, &usable_at_ms, lives, samples),
            latency: Latency::new(truth, runs),
        }
    }

    /// The goals missed, each as a sentence with its figure; empty when all are met.
    pub fn missed_goals(&self) -> Vec<String> {
        let (h, t) = (&self.health, &self.throughput);
        let mut missed = Vec::new();
        if h.healthy_recreated > 0 {
            missed.push(format!(
                "{} healthy resources were destroyed and recreated (goal 0)",
                h.healthy_recreated
            ));
        }
        if h.healthy_runs_compensated > 0 {
            missed.push(format!(
                "{} runs did not complete although every resource they created became ready (goal 0)",
                h.healthy_runs_compensated
            ));
        }
        if t.busy_fraction_of_capacity < 0.8 {
            missed.push(format!(
                "the cloud accepted {:.1} calls/s during the busy phase, {:.0}% of its capacity of {} (goal >= 80%)",
                t.busy_accepted_per_s,
                t.busy_fraction_of_capacity * 100.0,
                self.params.cloud.capacity_per_s
            ));
        }
        missed
    }

    /// The report as a readable table.
    pub fn table(&self) -> String {
        let p = &self.params;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "load: {} runs, cloud {:.0} calls/s, {:.0}% random throttling, readiness median {:.1} s, {} kills ({} ms down each), seed {}",
            p.runs,
            p.cloud.capacity_per_s,
            p.cloud.throttle_p * 100.0,
            p.cloud.ready_median_ms / 1000.0,
            self.kills,
            p.downtime_ms,
            p.seed
        );
        let _ = writeln!(
            out,
            "waits: every {} ms, {} confirmations, deadline {} ms, learned after {:?} samples, {} generations; engine limiter {}",
            p.machine.poll_interval_ms,
            p.machine.confirmations,
            p.machine.wait_timeout_ms,
            p.machine.learn_after,
            p.machine.generations,
            match &p.engine_rate_limit {
                Some(limit) => format!("{limit:?}"),
                None => "defaults".into(),
            }
        );
        let rows = self.rows();
        let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        for (k, v) in rows {
            let _ = writeln!(out, "  {k:<width$}  {v}");
        }
        let h = &self.health;
        for example in &h.healthy_recreated_examples {
            let _ = writeln!(out, "  healthy, recreated: {example}");
        }
        for run in &h.not_completed {
            let _ = writeln!(out, "  not completed: {run}");
        }
        for (error, n) in &h.run_errors {
            let _ = writeln!(out, "  not completed x{n}: {error}");
        }
        out
    }

    /// The table's rows (label, value): the goals first, then throughput, latency and counts.
    fn rows(&self) -> Vec<(&'static str, String)> {
        let mut rows = self.goal_rows();
        rows.extend(self.throughput_rows());
        rows.extend(self.latency_rows());
        rows.extend(self.count_rows());
        rows
    }

    /// The duration, the runs' ends and the goals, each marked met or missed.
    fn goal_rows(&self) -> Vec<(&'static str, String)> {
        let (h, t) = (&self.health, &self.throughput);
        vec![
            (
                "duration (first call to last run settled)",
                format!("{:.1} s", self.duration_s),
            ),
            ("runs by status", format!("{:?}", h.runs_by_status)),
            (
                "healthy resources recreated (goal 0)",
                format!(
                    "{}  {}",
                    h.healthy_recreated,
                    goal(h.healthy_recreated == 0)
                ),
            ),
            (
                "healthy runs compensated (goal 0)",
                format!(
                    "{}  {}",
                    h.healthy_runs_compensated,
                    goal(h.healthy_runs_compensated == 0)
                ),
            ),
            (
                "accepted calls/s in the busy phase (goal >= 80% of capacity)",
                format!(
                    "{:.1} = {:.0}%  {}",
                    t.busy_accepted_per_s,
                    t.busy_fraction_of_capacity * 100.0,
                    goal(t.busy_fraction_of_capacity >= 0.8)
                ),
            ),
        ]
    }

    /// The busy phase, the engine limiter's rate and the accepted calls over time.
    fn throughput_rows(&self) -> Vec<(&'static str, String)> {
        let t = &self.throughput;
        vec![
            (
                "busy phase",
                format!(
                    "{:.1} s (+{:.1} s engine down), until < {} runs unfinished",
                    t.busy_s, t.busy_downtime_s, t.busy_runs_min
                ),
            ),
            (
                "engine limiter rate in the busy phase, p50 / max",
                format!(
                    "{:.1} / {:.1} calls/s",
                    t.limiter_rate_p50, t.limiter_rate_max
                ),
            ),
            (
                "accepted calls/s overall",
                format!("{:.1}", t.overall_accepted_per_s),
            ),
            (
                "accepted calls per 10 s",
                format!("{:?}", t.accepted_per_10s),
            ),
        ]
    }

    /// How long runs took to a usable machine and how many probes their waits made.
    fn latency_rows(&self) -> Vec<(&'static str, String)> {
        let l = &self.latency;
        vec![
            (
                "time to a usable machine p50 / p99 / max",
                format!(
                    "{:.1} / {:.1} / {:.1} s ({} machines)",
                    l.time_to_machine_p50_s,
                    l.time_to_machine_p99_s,
                    l.time_to_machine_max_s,
                    l.machines
                ),
            ),
            (
                "probes per resource mean / p50 / p99 / max (answered mean)",
                format!(
                    "{:.1} / {:.0} / {:.0} / {:.0} ({:.1})",
                    l.probes_per_resource_mean,
                    l.probes_per_resource_p50,
                    l.probes_per_resource_p99,
                    l.probes_per_resource_max,
                    l.probes_answered_per_resource_mean
                ),
            ),
        ]
    }

    /// Counts of resources (created, recreated, destroyed, leaked) and of calls.
    fn count_rows(&self) -> Vec<(&'static str, String)> {
        let (h, t) = (&self.health, &self.throughput);
        vec![
            (
                "instances / volumes created, recreations, wait timeouts",
                format!(
                    "{} / {}, {}, {}",
                    h.instances_created, h.volumes_created, h.recreations, h.wait_timeouts
                ),
            ),
            (
                "healthy resources destroyed by a saga",
                h.healthy_destroyed_by_saga.to_string(),
            ),
            ("resources leaked", h.leaked.to_string()),
            (
                "calls: all / accepted / throttled capacity / throttled random",
                format!(
                    "{} / {} / {} / {}",
                    t.calls, t.calls_accepted, t.throttled_capacity, t.throttled_random
                ),
            ),
            ("calls by operation", format!("{:?}", t.calls_by_op)),
        ]
    }
}

/// How a goal reads in the table.
fn goal(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "MISSED"
    }
}
