//! `keel-bench memory`: what runs that wait cost in memory. Opens an engine on a fresh sled
//! store, starts runs that each wait (on a 1-hour durable timer, or for an event that never
//! comes), and reports the process's RSS before the engine opened, once it is open and idle,
//! and once every run waits, with what the engine holds (`Engine::resident`: runs loaded,
//! runs parked). With parking off, every waiting run keeps its cell and its driver.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::bail;
use keel_engine::{Engine, Resident};
use serde::Serialize;

use crate::system;
use crate::workload::{self, Inbox, SleepInput, StepsThenSleep};

/// What the runs wait for.
#[derive(Clone, Copy, Debug, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum WaitKind {
    /// A 1-hour durable timer.
    Timer,
    /// An event no one sends (a receive with no deadline).
    Event,
}

/// What `memory` is asked to do.
pub(crate) struct MemoryParams {
    pub runs: u32,
    pub wait: WaitKind,
    /// The engine's `park_after`; `None`: runs never park.
    pub park_after: Option<Duration>,
    /// Whether to open the engine again once every run waits, and time it.
    pub reopen: bool,
}

/// The report of `memory`.
#[derive(Serialize)]
pub(crate) struct MemoryReport {
    pub runs: u32,
    pub wait: WaitKind,
    pub parks: bool,
    /// RSS before the engine opened, in bytes.
    pub rss_before_open: u64,
    /// RSS with the engine open and no run, in bytes.
    pub rss_idle: u64,
    /// RSS once every run waits, in bytes.
    pub rss_waiting: u64,
    /// (waiting - idle) / runs, in bytes.
    pub bytes_per_run: f64,
    /// What the engine held once every run waited.
    pub resident: Resident,
    /// Seconds from the first start until every run waited.
    pub seconds_to_wait: f64,
    /// With `--reopen`: the engine opened again on the same store.
    pub reopened: Option<Reopened>,
}

/// The engine opened again on the store of the waiting runs.
#[derive(Serialize)]
pub(crate) struct Reopened {
    /// Seconds `open()` took.
    pub open_seconds: f64,
    /// Seconds from the start of `open()` until every run waited again (parked, with
    /// parking on).
    pub waiting_seconds: f64,
    /// RSS once every run waited again, in bytes.
    pub rss: u64,
    /// What the engine held then.
    pub resident: Resident,
}

impl MemoryReport {
    pub(crate) fn table(&self) -> String {
        let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
        format!(
            "{} runs waiting for {:?}, parking {}\n\n\
             | figure | value |\n|---|---|\n\
             | RSS before open | {:.1} MiB |\n\
             | RSS open, idle | {:.1} MiB |\n\
             | RSS with every run waiting | {:.1} MiB |\n\
             | memory per waiting run | {:.0} bytes |\n\
             | runs loaded / parked | {} / {} |\n\
             | every run waiting after | {:.1} s |\n{}",
            self.runs,
            self.wait,
            if self.parks { "on" } else { "off" },
            mib(self.rss_before_open),
            mib(self.rss_idle),
            mib(self.rss_waiting),
            self.bytes_per_run,
            self.resident.loaded,
            self.resident.parked,
            self.seconds_to_wait,
            match &self.reopened {
                None => String::new(),
                Some(r) => format!(
                    "| reopened: open() | {:.2} s |\n\
                     | reopened: every run waiting again | {:.2} s |\n\
                     | reopened: RSS | {:.1} MiB |\n\
                     | reopened: runs loaded / parked | {} / {} |\n",
                    r.open_seconds,
                    r.waiting_seconds,
                    mib(r.rss),
                    r.resident.loaded,
                    r.resident.parked
                ),
            }
        )
    }
}

/// Measures `params` in a fresh data directory under `dir`.
pub(crate) async fn run(dir: &Path, params: &MemoryParams) -> anyhow::Result<MemoryReport> {
    let data = system::fresh_data_dir(dir, "keel-bench-memory-")?;
    let page_bytes = system::page_bytes();
    let rss_before_open = system::rss_bytes(page_bytes)?;
    let engine = workload::registered(data.path())
        .park_after(params.park_after)
        .open()
        .await?;
    let rss_idle = system::rss_bytes(page_bytes)?;
    let started = Instant::now();
    match params.wait {
        WaitKind::Timer => {
            let input = SleepInput {
                steps: 0,
                wake_at_ms: workload::now_ms() + 3_600_000,
            };
            workload::start_concurrently::<StepsThenSleep>(&engine, "waiter", params.runs, &input)
                .await?;
        }
        WaitKind::Event => {
            workload::start_concurrently::<Inbox>(&engine, "waiter", params.runs, &1).await?;
        }
    }
    let resident = all_waiting(&engine, params).await?;
    let seconds_to_wait = started.elapsed().as_secs_f64();
    let rss_waiting = system::rss_bytes(page_bytes)?;
    engine.shutdown().await;
    drop(engine);
    let reopened = match params.reopen {
        true => Some(reopen(data.path(), params, page_bytes).await?),
        false => None,
    };
    Ok(MemoryReport {
        runs: params.runs,
        wait: params.wait,
        parks: params.park_after.is_some(),
        rss_before_open,
        rss_idle,
        rss_waiting,
        bytes_per_run: rss_waiting.saturating_sub(rss_idle) as f64 / f64::from(params.runs),
        resident,
        seconds_to_wait,
        reopened,
    })
}

/// Opens the engine again on `path` and times it until every run waits again.
async fn reopen(path: &Path, params: &MemoryParams, page_bytes: u64) -> anyhow::Result<Reopened> {
    let started = Instant::now();
    let engine = workload::registered(path)
        .park_after(params.park_after)
        .open()
        .await?;
    let open_seconds = started.elapsed().as_secs_f64();
    let resident = all_waiting(&engine, params).await?;
    let waiting_seconds = started.elapsed().as_secs_f64();
    let rss = system::rss_bytes(page_bytes)?;
    engine.shutdown().await;
    Ok(Reopened {
        open_seconds,
        waiting_seconds,
        rss,
        resident,
    })
}

/// Waits until every run waits: parked, with parking on; with it off, journaled its wait.
async fn all_waiting(engine: &Engine, params: &MemoryParams) -> anyhow::Result<Resident> {
    if params.park_after.is_some() {
        workload::wait_all_parked(engine, params.runs).await?;
        return Ok(engine.resident());
    }
    match params.wait {
        WaitKind::Timer => workload::wait_all_asleep(engine, "waiter", params.runs).await?,
        WaitKind::Event => {
            for n in 0..params.runs {
                let id = workload::run_id("waiter", n);
                let deadline = Instant::now() + Duration::from_secs(300);
                while !engine
                    .history(&id)
                    .await?
                    .entries
                    .iter()
                    .any(|e| matches!(e.event, keel_engine::Event::ReceiveStarted { .. }))
                {
                    if Instant::now() > deadline {
                        bail!("run {id} did not reach its receive within 300 s");
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
    }
    Ok(engine.resident())
}
