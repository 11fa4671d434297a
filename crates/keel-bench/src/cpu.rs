//! `keel-bench cpu`: where a step's CPU goes. Runs the main benchmark's concurrent phase
//! (runs of 10 no-op steps started from 100 callers) several times in one process, each on a
//! fresh store, and reports for every repeat the steps/s and the CPU per step, split by
//! thread: the tokio workers (the runs' own code), the committer (group commit and its
//! syncs), sled's threads, and the rest. At `process-crash` durability the syncs wait for no
//! device, which separates the engine's CPU from the disk's waits. With `--steps 0` the runs
//! only start and settle, and the figures are per run: what a durable start costs. Each
//! repeat also says how much of the machine's CPU the hypervisor stole meanwhile.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context};
use keel_engine::Durability;
use serde::Serialize;

use crate::system::{CpuShares, MachineCpu};
use crate::workload::{self, Steps, StepsInput};

/// What `cpu` is asked to do.
pub(crate) struct CpuParams {
    pub runs: u32,
    /// No-op steps of each run; 0 measures starts (the figures are then per run).
    pub steps: u32,
    pub repeats: u32,
    pub durability: Durability,
    /// Bytes of each step's output; 0 for no-op steps.
    pub output_bytes: u32,
    /// The bound on sled's cache (`--cache-mib`); the engine's default otherwise.
    pub cache_bytes: Option<u64>,
}

/// One repeat's figures.
#[derive(Serialize)]
pub(crate) struct Repeat {
    /// Steps (runs, with `--steps 0`) completed per second.
    pub steps_per_s: f64,
    /// CPU per step (per run, with `--steps 0`) of the whole process, in microseconds.
    pub cpu_us_per_step: f64,
    /// The same, for each group of threads.
    pub by_thread_us_per_step: BTreeMap<&'static str, f64>,
    /// How the machine's CPU was shared during the repeat: a repeat the hypervisor took much
    /// from is slow, and its CPU per step may be high too (caches, wake-ups).
    pub machine_cpu: CpuShares,
}

/// The report of `cpu`.
#[derive(Serialize)]
pub(crate) struct CpuReport {
    pub runs: u32,
    pub steps_per_run: u32,
    /// What the figures are per: `step`, or `run` when the runs take no steps.
    pub unit: &'static str,
    pub durability: String,
    /// Bytes of each step's output (0: no-op steps).
    pub output_bytes: u32,
    /// The bound on sled's cache, in bytes.
    pub sled_cache_bytes: u64,
    pub repeats: Vec<Repeat>,
}

impl CpuReport {
    /// The report as a table: one line per repeat, then the median.
    pub(crate) fn table(&self) -> String {
        let groups: Vec<&str> = GROUPS.iter().map(|(name, _)| *name).collect();
        let unit = self.unit;
        let steps = match self.output_bytes {
            0 => "no-op steps".to_string(),
            bytes => format!("steps of {bytes}-byte outputs"),
        };
        let mut out = format!(
            "{} runs x {} {steps} at {}, sled's cache {} MiB; CPU in us per {unit} (user + system)\n\n",
            self.runs,
            self.steps_per_run,
            self.durability,
            self.sled_cache_bytes >> 20
        );
        out.push_str(&format!("| repeat | {unit}s/s | CPU/{unit} |"));
        for group in &groups {
            out.push_str(&format!(" {group} |"));
        }
        out.push_str(" stolen | idle |");
        out.push_str("\n|---|---|---|");
        out.push_str(&"---|".repeat(groups.len() + 2));
        out.push('\n');
        for (n, repeat) in self.repeats.iter().enumerate() {
            out.push_str(&format!(
                "| {} | {:.0} | {:.1} |",
                n + 1,
                repeat.steps_per_s,
                repeat.cpu_us_per_step
            ));
            for group in &groups {
                out.push_str(&format!(
                    " {:.1} |",
                    repeat
                        .by_thread_us_per_step
                        .get(group)
                        .copied()
                        .unwrap_or(0.0)
                ));
            }
            let machine = repeat.machine_cpu;
            out.push_str(&match machine.judged() {
                true => format!(
                    " {:.0}% | {:.0}% |",
                    machine.stolen * 100.0,
                    machine.idle * 100.0
                ),
                false => " too short | too short |".to_string(),
            });
            out.push('\n');
        }
        let mut cpu: Vec<f64> = self.repeats.iter().map(|r| r.cpu_us_per_step).collect();
        cpu.sort_by(f64::total_cmp);
        out.push_str(&format!(
            "\nCPU per {unit}: median {:.1} us, from {:.1} to {:.1} us\n",
            cpu[cpu.len() / 2],
            cpu[0],
            cpu[cpu.len() - 1]
        ));
        out
    }
}

/// Thread groups by the start of the thread's name, in the order reported; a thread that
/// matches none is `other` (the benchmark's main thread, sled's flusher, the marker).
const GROUPS: [(&str, &str); 4] = [
    ("tokio", "tokio-rt-worker"),
    ("committer", "keel-committer"),
    ("sled-io", "sled-io"),
    ("other", ""),
];

/// Runs the measurement.
pub(crate) async fn run(parent: &Path, params: &CpuParams) -> anyhow::Result<CpuReport> {
    if params.runs == 0 || params.repeats == 0 {
        bail!("--runs and --repeats must be at least 1");
    }
    let unit = if params.steps == 0 { "run" } else { "step" };
    let data = crate::system::fresh_data_dir(parent, "cpu-")?;
    let mut repeats = Vec::new();
    for n in 0..params.repeats {
        let path = data.path().join(format!("repeat-{n}"));
        let mut builder = workload::registered(&path).durability(params.durability);
        if let Some(bytes) = params.cache_bytes {
            builder = builder.sled_cache_bytes(bytes);
        }
        let engine = builder
            .open()
            .await
            .with_context(|| format!("opening an engine in {}", path.display()))?;
        let before = thread_cpu_ns()?;
        let machine_before = MachineCpu::now()?;
        let started = Instant::now();
        let input = StepsInput {
            steps: params.steps,
            output_bytes: params.output_bytes,
        };
        workload::start_concurrently::<Steps>(&engine, "cpu", params.runs, &input).await?;
        workload::wait_all_completed(&engine, "cpu", params.runs).await?;
        let elapsed = started.elapsed().as_secs_f64();
        let after = thread_cpu_ns()?;
        let machine_cpu = MachineCpu::now()?.since(machine_before);
        engine.shutdown().await;
        let steps = f64::from(params.runs * params.steps.max(1));
        let mut by_thread: BTreeMap<&'static str, f64> = BTreeMap::new();
        for (tid, (group, ns)) in &after {
            let earlier = before.get(tid).map_or(0, |(_, ns)| *ns);
            *by_thread.entry(group).or_default() += ns.saturating_sub(earlier) as f64 / 1e3 / steps;
        }
        if by_thread.values().sum::<f64>() <= 0.0 {
            // A kernel without scheduler statistics has no `schedstat`, or one of zeros.
            bail!("no thread's CPU time moved in /proc/self/task/*/schedstat during a repeat: does this kernel keep scheduler statistics (CONFIG_SCHED_INFO)?");
        }
        let repeat = Repeat {
            steps_per_s: steps / elapsed,
            cpu_us_per_step: by_thread.values().sum(),
            by_thread_us_per_step: by_thread,
            machine_cpu,
        };
        eprintln!(
            "[{}/{}] {:.0} {unit}s/s, {:.1} us of CPU per {unit}, {:.0}% of the machine's CPU stolen",
            n + 1,
            params.repeats,
            repeat.steps_per_s,
            repeat.cpu_us_per_step,
            repeat.machine_cpu.stolen * 100.0
        );
        repeats.push(repeat);
    }
    Ok(CpuReport {
        runs: params.runs,
        steps_per_run: params.steps,
        unit,
        durability: format!("{:?}", params.durability),
        output_bytes: params.output_bytes,
        // `--cache-mib` is at least the engine's least, so the builder takes it as given.
        sled_cache_bytes: params
            .cache_bytes
            .unwrap_or(keel_engine::limits::SLED_CACHE_BYTES_DEFAULT),
        repeats,
    })
}

/// Every live thread of this process: its id, its group and its CPU time so far in
/// nanoseconds (user and system: the first field of `/proc/self/task/TID/schedstat`, which
/// the scheduler keeps in nanoseconds, where `stat`'s ticks are good to 10 ms, a tenth of a
/// repeat's CPU for a thread that works 100 ms). A thread that ended between two readings
/// takes its time with it, so only threads that live through a repeat are counted in full;
/// the engine's threads live as long as the engine.
fn thread_cpu_ns() -> anyhow::Result<BTreeMap<u64, (&'static str, u64)>> {
    let mut threads = BTreeMap::new();
    for entry in std::fs::read_dir("/proc/self/task").context("listing /proc/self/task")? {
        let entry = entry?;
        let Ok(tid) = entry.file_name().to_string_lossy().parse::<u64>() else {
            continue;
        };
        // A thread may end between the listing and the reads.
        let (Ok(name), Ok(schedstat)) = (
            std::fs::read_to_string(entry.path().join("comm")),
            std::fs::read_to_string(entry.path().join("schedstat")),
        ) else {
            continue;
        };
        let ns = crate::system::schedstat_run_ns(&schedstat)?;
        let group = GROUPS
            .iter()
            .find(|(_, prefix)| name.starts_with(prefix))
            .map_or("other", |(group, _)| group);
        threads.insert(tid, (group, ns));
    }
    Ok(threads)
}
