//! `keel-bench load`: many concurrent BOSH-like runs (create an instance, wait until it runs,
//! create a volume, wait until it is available, attach) against the simulated EC2-like cloud
//! of `keel_testkit::simcloud`, with the engine in a child process (this binary, `load-child`)
//! that is SIGKILLed at random moments and restarted until every run settles. The cloud runs
//! in this process and keeps the ground truth.
//!
//! Reports, against the goals: healthy resources recreated (goal 0), healthy runs
//! compensated (goal 0), the cloud's accepted calls/s during the busy phase as a fraction of
//! its capacity (goal >= 80%); and the time to a usable machine (p50, p99), probes per
//! resource, calls by outcome and operation, the engine limiter's rate. The figures do not
//! depend on the disk as much as on the engine's scheduling; no baseline is measured.

use std::path::{Path, PathBuf};

use anyhow::Context;
use keel_testkit::simcloud::load::{self, ChildProgram, LoadParams};
use keel_testkit::simcloud::LoadReport;

/// The knobs of `keel-bench load` (see `main.rs` for their help).
#[derive(Clone, Debug)]
pub(crate) struct LoadKnobs {
    /// Concurrent runs.
    pub runs: u32,
    /// Every time constant of the scenario multiplied by this.
    pub time_scale: f64,
    /// SIGKILLs of the engine.
    pub kills: u32,
    /// Engine downtime after each kill (ms); `None`: 5 s times the scale.
    pub downtime_ms: Option<u64>,
    /// The cloud's capacity (calls/s).
    pub capacity: f64,
    /// The cloud's random throttling (0..1).
    pub throttle: f64,
    /// Samples before the waits learn their schedule; `None`: half the runs; 0: never.
    pub learn_after: Option<u64>,
    /// The engine's limiter fixed at this rate instead of its defaults.
    pub fixed_rate: Option<f64>,
    /// Seeds the cloud and the kills.
    pub seed: u64,
    /// Keep the store and the children's logs.
    pub keep: bool,
}

impl LoadKnobs {
    fn params(&self) -> LoadParams {
        let mut params = LoadParams::scenario(self.runs, self.time_scale);
        params.kills = self.kills;
        if let Some(ms) = self.downtime_ms {
            params.downtime_ms = ms;
        }
        params.cloud.capacity_per_s = self.capacity;
        params.cloud.burst = self.capacity;
        params.cloud.throttle_p = self.throttle;
        params.cloud.seed = self.seed;
        params.seed = self.seed;
        match self.learn_after {
            Some(0) => params.machine.learn_after = None,
            Some(n) => params.machine.learn_after = Some(n),
            None => {}
        }
        params.engine_rate_limit = self.fixed_rate.map(load::fixed_rate_limit);
        params
    }
}

/// Runs the scenario in a fresh directory under `parent`; returns the report and, with
/// `keep`, where the store and logs are.
pub(crate) async fn run(
    parent: &Path,
    knobs: &LoadKnobs,
) -> anyhow::Result<(LoadReport, Option<PathBuf>)> {
    let dir = crate::system::fresh_data_dir(parent, "load-")?;
    let program = ChildProgram::Program {
        path: std::env::current_exe().context("finding keel-bench's own executable")?,
        args: vec!["load-child".into()],
    };
    let params = knobs.params();
    eprintln!(
        "keel-bench load: {} runs, {} kills, in {}",
        params.runs,
        params.kills,
        dir.path().display()
    );
    let report = load::run(&params, &program, dir.path()).await?;
    let kept = knobs.keep.then(|| dir.keep());
    Ok((report, kept))
}

/// The engine's process: runs the child of the scenario, configured by its environment.
pub(crate) async fn child() -> anyhow::Result<()> {
    let config = load::child_config()?;
    load::init_child_tracing();
    load::run_child(&config).await?;
    Ok(())
}
