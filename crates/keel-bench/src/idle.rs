//! `keel-bench idle`: the resident memory of an idle `keel worker` (issue 28's goal: under
//! 30 MiB in release), on an empty store and on a store of many runs, a fresh worker process
//! each time.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

use crate::console::{keel_binary, populate, Worker};
use crate::system;

/// What to measure.
#[derive(Clone, Copy, Debug, Serialize)]
pub(crate) struct IdleParams {
    /// Runs in the second store (0: the empty store only).
    pub runs: u32,
    /// Workers started on each store.
    pub repeats: u32,
    /// From the API's first answer to the measurement.
    #[serde(serialize_with = "as_secs")]
    pub settle: Duration,
}

fn as_secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// One idle worker, measured.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct IdleSample {
    /// Runs in its store.
    pub runs: u32,
    /// From its start to its API's first answer.
    pub ready_s: f64,
    /// Resident memory at the measurement.
    pub rss_bytes: u64,
    /// Of it, its own memory (`RssAnon`): the rest is mostly the binary's mapped code, clean
    /// pages of the file that the kernel can drop and processes share.
    pub anon_bytes: u64,
    /// The most it was resident so far (`VmHWM`).
    pub peak_bytes: u64,
    /// Its threads.
    pub threads: u64,
}

/// The measurement.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct IdleReport {
    pub params: IdleParams,
    pub samples: Vec<IdleSample>,
}

/// Starts `keel worker` `repeats` times on an empty store, then on a filled one.
pub(crate) async fn run(dir: &Path, params: IdleParams) -> anyhow::Result<IdleReport> {
    let keel = keel_binary()?;
    let data = tempfile::Builder::new()
        .prefix("idle-")
        .tempdir_in(dir)
        .with_context(|| format!("creating a data directory in {}", dir.display()))?;
    let mut samples = Vec::new();
    let mut stores = vec![(0, data.path().join("empty"))];
    if params.runs > 0 {
        let filled = data.path().join("filled");
        // The worker keeps its store in `journal` under its data directory.
        populate(&filled.join("journal"), params.runs).await?;
        stores.push((params.runs, filled));
    }
    for (runs, worker_dir) in &stores {
        for _ in 0..params.repeats {
            let sample = measure(&keel, worker_dir, *runs, params.settle)?;
            eprintln!(
                "  {runs} runs: ready in {:.2} s, {:.1} MiB resident ({:.1} MiB its own, {:.1} MiB peak), {} threads",
                sample.ready_s,
                mib(sample.rss_bytes),
                mib(sample.anon_bytes),
                mib(sample.peak_bytes),
                sample.threads
            );
            samples.push(sample);
        }
    }
    Ok(IdleReport { params, samples })
}

/// One fresh worker on `worker_dir`, measured `settle` after it first answers.
fn measure(
    keel: &Path,
    worker_dir: &Path,
    runs: u32,
    settle: Duration,
) -> anyhow::Result<IdleSample> {
    let started = Instant::now();
    let worker = Worker::start(keel, worker_dir)?;
    let ready_s = started.elapsed().as_secs_f64();
    std::thread::sleep(settle);
    let status = worker.status()?;
    Ok(IdleSample {
        runs,
        ready_s,
        rss_bytes: system::vm_kib(&status, "VmRSS:")? * 1024,
        anon_bytes: system::vm_kib(&status, "RssAnon:")? * 1024,
        peak_bytes: system::vm_kib(&status, "VmHWM:")? * 1024,
        threads: status
            .lines()
            .find_map(|line| line.strip_prefix("Threads:"))
            .and_then(|n| n.trim().parse().ok())
            .context("Threads: in /proc/PID/status")?,
    })
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

impl IdleReport {
    /// The samples per store, with their spread.
    pub(crate) fn table(&self) -> String {
        let mut out = format!(
            "idle keel worker, release build, measured {:.0} s after its API first answered\n\
             (issue 28's goal: under 30 MiB resident)\n\n\
             | runs in the store | resident (MiB) | of it anonymous (MiB) | peak (MiB) | threads | ready (s) |\n\
             |---|---|---|---|---|---|\n",
            self.params.settle.as_secs_f64()
        );
        let mut stores: Vec<u32> = self.samples.iter().map(|s| s.runs).collect();
        stores.dedup();
        for runs in stores {
            let of: Vec<&IdleSample> = self.samples.iter().filter(|s| s.runs == runs).collect();
            let spread = |f: &dyn Fn(&IdleSample) -> f64, digits: usize| {
                let lo = of.iter().map(|s| f(s)).fold(f64::INFINITY, f64::min);
                let hi = of.iter().map(|s| f(s)).fold(f64::NEG_INFINITY, f64::max);
                format!("{lo:.digits$} - {hi:.digits$}")
            };
            out += &format!(
                "| {runs} | {} | {} | {} | {} | {} |\n",
                spread(&|s| mib(s.rss_bytes), 1),
                spread(&|s| mib(s.anon_bytes), 1),
                spread(&|s| mib(s.peak_bytes), 1),
                spread(&|s| s.threads as f64, 0),
                spread(&|s| s.ready_s, 2),
            );
        }
        out
    }
}
