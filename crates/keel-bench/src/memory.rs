//! `keel-bench memory`: what runs that wait cost in memory. Opens an engine on a fresh sled
//! store (or PostgreSQL database, with `--store`), starts runs that each wait (on a 1-day durable timer, for an event that never
//! comes, for a child run that waits for one, or for a resource polled every hour), and reports the process's RSS before the engine opened, once it is open and idle,
//! and once every run waits, with what the engine holds (`Engine::resident`: runs loaded,
//! runs parked). With parking off, every waiting run keeps its cell and its driver.
//!
//! The runs start in two halves, the second once every run of the first waits, so that the
//! report also has what a waiting run adds to an engine that already holds as many: (RSS
//! with all waiting - RSS with the first half waiting) / the second half's runs. It leaves
//! out what the first runs set up once (the allocator's and sled's first pages), and once
//! sled's cache is full, what the cache holds: its bound keeps that whatever the number of
//! runs.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::bail;
use keel_engine::{Engine, Resident};
use serde::Serialize;

use crate::system;
use crate::workload::{self, AwaitsInbox, Inbox, Polls, SleepInput, StepsThenSleep};

/// The prefix of the runs' ids.
const PREFIX: &str = "waiter";

/// What the runs wait for.
#[derive(Clone, Copy, Debug, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum WaitKind {
    /// A 1-day durable timer (a store kept with `--keep` holds sleeping runs for a day).
    Timer,
    /// An event no one sends (a receive with no deadline).
    Event,
    /// A child run that waits for an event no one sends: each run started is a parent, and
    /// with its child two runs wait.
    Child,
    /// A resource never ready, polled every hour: each run waits for its second poll.
    Poll,
}

impl WaitKind {
    /// Runs that wait when `started` runs were started.
    fn waiting(self, started: u32) -> u32 {
        match self {
            WaitKind::Child => started * 2,
            WaitKind::Timer | WaitKind::Event | WaitKind::Poll => started,
        }
    }
}

/// How long a reopened engine on PostgreSQL is watched for claims of runs not due (a claim
/// a second by default).
const CLAIMS_WATCHED: Duration = Duration::from_millis(2_500);

/// What `memory` is asked to do.
pub(crate) struct MemoryParams {
    pub runs: u32,
    pub wait: WaitKind,
    /// The engine's `park_after`; `None`: runs never park.
    pub park_after: Option<Duration>,
    /// Whether to open the engine again once every run waits, and time it.
    pub reopen: bool,
    /// Whether to keep the store (see `MemoryReport::kept`).
    pub keep: bool,
    /// The bound on sled's cache; the engine's default when `None`.
    pub cache_bytes: Option<u64>,
    /// How long a reopened engine stays open after every run waits again.
    pub linger: Duration,
}

impl MemoryParams {
    /// The engine these runs are measured in, on the store in `path` (or its database, with
    /// `--store`).
    async fn builder(&self, path: &Path) -> keel_engine::EngineBuilder {
        let mut builder = workload::registered(path).park_after(self.park_after);
        if let Some(bytes) = self.cache_bytes {
            builder = builder.sled_cache_bytes(bytes);
        }
        if let Some(server) = workload::postgres_server() {
            builder = builder.postgres(workload::database_of(&server, path).await);
        }
        builder
    }
}

/// The report of `memory`.
#[derive(Serialize)]
pub(crate) struct MemoryReport {
    pub runs: u32,
    pub wait: WaitKind,
    pub parks: bool,
    /// The PostgreSQL server measured (`--store`); `None`: sled.
    pub store: Option<String>,
    /// The bound on sled's cache, in bytes (`--cache-mib`, or the engine's default); `None`
    /// with `--store`.
    pub sled_cache_bytes: Option<u64>,
    /// RSS before the engine opened, in bytes.
    pub rss_before_open: u64,
    /// RSS with the engine open and no run, in bytes.
    pub rss_idle: u64,
    /// RSS once every run waits, in bytes.
    pub rss_waiting: u64,
    /// (waiting - idle) / waiting runs (with `--wait child`, parents and children), in bytes.
    pub bytes_per_run: f64,
    /// RSS once the first half of the runs waited (the first `runs / 2` started), in bytes.
    pub rss_half_waiting: u64,
    /// (waiting - half waiting) / the second half's waiting runs, in bytes: what a waiting
    /// run adds to an engine holding as many. `None` with fewer than 2 runs.
    pub marginal_bytes_per_run: Option<f64>,
    /// What the engine held once every run waited.
    pub resident: Resident,
    /// Seconds from the first start until every run waited.
    pub seconds_to_wait: f64,
    /// With `--reopen`: the engine opened again on the same store.
    pub reopened: Option<Reopened>,
    /// With `--keep`: the store's directory, left in place.
    pub kept: Option<std::path::PathBuf>,
}

/// The engine opened again on the store of the waiting runs.
#[derive(Serialize)]
pub(crate) struct Reopened {
    /// RSS before `open()`, in bytes.
    pub rss_before: u64,
    /// Seconds `open()` took.
    pub open_seconds: f64,
    /// Seconds from the start of `open()` until every run waited again (parked, with
    /// parking on).
    pub waiting_seconds: f64,
    /// RSS once every run waited again, in bytes.
    pub rss: u64,
    /// The process's peak RSS by then, in bytes (with `--reopen`, the runs' starts count).
    pub rss_peak: u64,
    /// With `--linger`: RSS at its end, in bytes.
    pub rss_lingered: Option<u64>,
    /// What the engine held then.
    pub resident: Resident,
}

impl MemoryReport {
    pub(crate) fn table(&self) -> String {
        let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
        format!(
            "{} runs waiting for {:?}, parking {}, {}\n\n\
             | figure | value |\n|---|---|\n\
             | RSS before open | {:.1} MiB |\n\
             | RSS open, idle | {:.1} MiB |\n\
             | RSS with every run waiting | {:.1} MiB |\n\
             | memory per waiting run | {:.0} bytes |\n\
             | RSS with the first half waiting | {:.1} MiB |\n\
             | memory per waiting run of the second half | {} |\n\
             | runs loaded / parked | {} / {} |\n\
             | every run waiting after | {:.1} s |\n{}",
            self.runs,
            self.wait,
            if self.parks { "on" } else { "off" },
            match (&self.store, self.sled_cache_bytes) {
                (Some(store), _) => store.clone(),
                (None, Some(b)) if b == keel_engine::limits::SLED_CACHE_BYTES_DEFAULT => {
                    format!("sled's cache {:.0} MiB (default)", mib(b))
                }
                (None, Some(b)) => format!("sled's cache {:.0} MiB", mib(b)),
                (None, None) => "sled".to_string(),
            },
            mib(self.rss_before_open),
            mib(self.rss_idle),
            mib(self.rss_waiting),
            self.bytes_per_run,
            mib(self.rss_half_waiting),
            self.marginal_bytes_per_run
                .map_or("-".to_string(), |b| format!("{b:.0} bytes")),
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
        ) + &self.kept.as_ref().map_or(String::new(), |d| {
            format!("\nstore kept in {}\n", d.display())
        })
    }
}

impl Reopened {
    pub(crate) fn table(&self) -> String {
        let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
        format!(
            "| figure | value |\n|---|---|\n\
             | RSS before open | {:.1} MiB |\n\
             | open() | {:.2} s |\n\
             | every run waiting again | {:.2} s |\n\
             | RSS then | {:.1} MiB |\n\
             | peak RSS | {:.1} MiB |\n\
             | runs loaded / parked | {} / {} |\n{}",
            mib(self.rss_before),
            self.open_seconds,
            self.waiting_seconds,
            mib(self.rss),
            mib(self.rss_peak),
            self.resident.loaded,
            self.resident.parked,
            self.rss_lingered.map_or(String::new(), |rss| format!(
                "| RSS after lingering | {:.1} MiB |\n",
                mib(rss)
            ))
        )
    }
}

/// Measures `params` in a fresh data directory under `dir`.
pub(crate) async fn run(dir: &Path, params: &MemoryParams) -> anyhow::Result<MemoryReport> {
    let data = system::fresh_data_dir(dir, "keel-bench-memory-")?;
    let page_bytes = system::page_bytes();
    let rss_before_open = system::rss_bytes(page_bytes)?;
    let engine = params.builder(data.path()).await.open().await?;
    let rss_idle = system::rss_bytes(page_bytes)?;
    let started = Instant::now();
    let half = params.runs / 2;
    start_waiting(&engine, params.wait, 0..half).await?;
    all_waiting(&engine, params, half).await?;
    let rss_half_waiting = system::rss_bytes(page_bytes)?;
    start_waiting(&engine, params.wait, half..params.runs).await?;
    let resident = all_waiting(&engine, params, params.runs).await?;
    let seconds_to_wait = started.elapsed().as_secs_f64();
    let rss_waiting = system::rss_bytes(page_bytes)?;
    engine.shutdown().await;
    drop(engine);
    let reopened = match params.reopen {
        true => Some(reopen(data.path(), params, page_bytes).await?),
        false => None,
    };
    let kept = params.keep.then(|| data.keep());
    Ok(MemoryReport {
        runs: params.runs,
        wait: params.wait,
        parks: params.park_after.is_some(),
        store: workload::postgres_server().map(|server| workload::postgres_store_name(&server)),
        sled_cache_bytes: match workload::postgres_server() {
            Some(_) => None,
            // `--cache-mib` is at least the engine's least, so the builder takes it as given.
            None => Some(
                params
                    .cache_bytes
                    .unwrap_or(keel_engine::limits::SLED_CACHE_BYTES_DEFAULT),
            ),
        },
        rss_before_open,
        rss_idle,
        rss_waiting,
        bytes_per_run: rss_waiting.saturating_sub(rss_idle) as f64
            / f64::from(params.wait.waiting(params.runs)),
        rss_half_waiting,
        marginal_bytes_per_run: (half > 0).then(|| {
            (rss_waiting as f64 - rss_half_waiting as f64)
                / f64::from(params.wait.waiting(params.runs) - params.wait.waiting(half))
        }),
        resident,
        seconds_to_wait,
        reopened,
        kept,
    })
}

/// Starts runs `numbers` (of ids `waiter-n`), each of which waits for `wait`.
async fn start_waiting(
    engine: &Engine,
    wait: WaitKind,
    numbers: std::ops::Range<u32>,
) -> anyhow::Result<()> {
    match wait {
        WaitKind::Timer => {
            let input = SleepInput {
                steps: 0,
                wake_at_ms: workload::now_ms() + 86_400_000,
            };
            workload::start_range_concurrently::<StepsThenSleep>(engine, PREFIX, numbers, &input)
                .await
        }
        WaitKind::Event => {
            workload::start_range_concurrently::<Inbox>(engine, PREFIX, numbers, &1).await
        }
        WaitKind::Child => {
            workload::start_range_concurrently::<AwaitsInbox>(engine, PREFIX, numbers, &1).await
        }
        WaitKind::Poll => {
            workload::start_range_concurrently::<Polls>(engine, PREFIX, numbers, &()).await
        }
    }
}

/// Opens the store a `--keep` run left in `path` and times it until every run waits again;
/// with `after_crash`, first removes what a clean close leaves (the run counts), so that the
/// open reads the store as after a crash.
pub(crate) async fn reopen_only(
    path: &Path,
    params: &MemoryParams,
    after_crash: bool,
) -> anyhow::Result<Reopened> {
    if workload::postgres_server().is_none() && !path.join("db").is_file() {
        bail!(
            "{}: no sled store there (keep one with --keep)",
            path.display()
        );
    }
    if after_crash {
        drop(keel_testkit::raw::open(path));
    }
    reopen(path, params, system::page_bytes()).await
}

/// Opens the engine again on `path` and times it until every run waits again. On PostgreSQL
/// the runs wait in the database (claims take only those due): the engine must hold none of
/// them after a few claims, and they wait from the open's end.
async fn reopen(path: &Path, params: &MemoryParams, page_bytes: u64) -> anyhow::Result<Reopened> {
    let builder = params.builder(path).await;
    let rss_before = system::rss_bytes(page_bytes)?;
    let started = Instant::now();
    let engine = builder.open().await?;
    let open_seconds = started.elapsed().as_secs_f64();
    let (resident, waiting_seconds) = match workload::postgres_server() {
        Some(_) => {
            tokio::time::sleep(CLAIMS_WATCHED).await;
            let held = engine.resident();
            if held != Resident::default() {
                bail!("the reopened engine holds {held:?}: it took runs that are not due");
            }
            (held, open_seconds)
        }
        None => (
            all_waiting(&engine, params, params.runs).await?,
            started.elapsed().as_secs_f64(),
        ),
    };
    let rss = system::rss_bytes(page_bytes)?;
    let rss_peak = system::peak_rss_bytes()?;
    let rss_lingered = match params.linger.is_zero() {
        true => None,
        false => {
            tokio::time::sleep(params.linger).await;
            Some(system::rss_bytes(page_bytes)?)
        }
    };
    engine.shutdown().await;
    Ok(Reopened {
        rss_before,
        open_seconds,
        waiting_seconds,
        rss,
        rss_peak,
        rss_lingered,
        resident,
    })
}

/// Waits until runs `waiter-0` .. `waiter-{started-1}` wait: parked, with parking on; with
/// it off, journaled their waits.
async fn all_waiting(
    engine: &Engine,
    params: &MemoryParams,
    started: u32,
) -> anyhow::Result<Resident> {
    if params.park_after.is_some() {
        workload::wait_all_parked(engine, params.wait.waiting(started)).await?;
        return Ok(engine.resident());
    }
    match params.wait {
        WaitKind::Timer => workload::wait_all_asleep(engine, PREFIX, started).await?,
        WaitKind::Event | WaitKind::Child | WaitKind::Poll => {
            for n in 0..started {
                let id = workload::run_id(PREFIX, n);
                // A parent's child is the one that receives.
                let id = match params.wait {
                    WaitKind::Child => keel_engine::child_id(
                        &keel_engine::RunId::new(id)?,
                        keel_engine::OperationIndex(0),
                    )
                    .to_string(),
                    _ => id,
                };
                let deadline = Instant::now() + Duration::from_secs(300);
                while !engine.history(&id).await?.entries.iter().any(|e| {
                    matches!(
                        e.event,
                        keel_engine::Event::ReceiveStarted { .. }
                            | keel_engine::Event::WaitStarted { .. }
                    )
                }) {
                    if Instant::now() > deadline {
                        bail!("run {id} did not reach its receive or wait within 300 s");
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
    }
    Ok(engine.resident())
}
