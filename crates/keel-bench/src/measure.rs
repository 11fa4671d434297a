//! The measurements that run inside this process, one function each. Each one opens its own
//! engine in its own subdirectory, measures, and shuts the engine down. (Resume after a kill
//! needs a child process and lives in `resume.rs`.)

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use keel_engine::Engine;

use crate::system::{self, CpuShares, PhaseClock};
use crate::workload::{
    self, open, start_concurrently, wait_all_asleep, wait_all_completed, FanOut, FanOutInput,
    Inbox, SleepInput, Steps, StepsInput, StepsThenSleep,
};

/// The baseline: 200-byte appends to a file, each followed by one `fdatasync`
/// (`File::sync_data`), for about 3 s or 2,000 appends, whichever comes first. Returns
/// appends/s: what the disk does with nothing but syncs in the way.
pub(crate) fn baseline(dir: &Path, name: &str) -> anyhow::Result<f64> {
    const DURATION: Duration = Duration::from_secs(3);
    const APPENDS_MAX: u32 = 2_000;
    let path = dir.join(name);
    let mut file = std::fs::OpenOptions::new()
        .create_new(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    let record = [b'x'; 200];
    let started = Instant::now();
    let mut appends = 0u32;
    while appends < APPENDS_MAX && started.elapsed() < DURATION {
        file.write_all(&record)?;
        file.sync_data()?;
        appends += 1;
    }
    let rate = f64::from(appends) / started.elapsed().as_secs_f64();
    drop(file);
    std::fs::remove_file(&path)?;
    Ok(rate)
}

/// The database's baseline: single-row INSERTs of 200 bytes from one connection, each its
/// own transaction (one COMMIT each), for about 3 s or 2,000 rows, whichever comes first, in
/// a fresh database named after `dir` and `name`. Returns commits/s: what the database does
/// with nothing but commits in the way.
pub(crate) async fn baseline_postgres(server: &str, dir: &Path, name: &str) -> anyhow::Result<f64> {
    const DURATION: Duration = Duration::from_secs(3);
    const ROWS_MAX: u32 = 2_000;
    let url = workload::database_of(server, &dir.join(name)).await;
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .context("connecting for the baseline")?;
    let connection = tokio::spawn(connection);
    client
        .batch_execute("CREATE TABLE IF NOT EXISTS baseline (row text NOT NULL)")
        .await?;
    let insert = client
        .prepare("INSERT INTO baseline (row) VALUES ($1)")
        .await?;
    let row = "x".repeat(200);
    let started = Instant::now();
    let mut rows = 0u32;
    while rows < ROWS_MAX && started.elapsed() < DURATION {
        client.execute(&insert, &[&row]).await?;
        rows += 1;
    }
    let rate = f64::from(rows) / started.elapsed().as_secs_f64();
    drop(client);
    let _ = connection.await;
    Ok(rate)
}

/// A rate, and how the machine's CPU was shared while it was timed.
pub(crate) struct Rate {
    /// Per second.
    pub per_s: f64,
    /// The machine's CPU, over the timed stretch only (not the engine's open and shutdown).
    pub machine_cpu: CpuShares,
}

impl Rate {
    /// `count` over the time `clock` has run.
    fn of(count: f64, clock: &PhaseClock) -> anyhow::Result<Rate> {
        let (seconds, machine_cpu) = clock.read()?;
        Ok(Rate {
            per_s: count / seconds,
            machine_cpu,
        })
    }
}

/// One run of `steps` no-op steps, timed from `start` until its result is available: journaled
/// steps/s of a single sequential workflow (one sync per step, none to share).
pub(crate) async fn sequential(dir: &Path, steps: u32) -> anyhow::Result<Rate> {
    let engine = open(&dir.join("sequential")).await?;
    let clock = PhaseClock::start()?;
    engine
        .start::<Steps>("sequential", StepsInput::noop(steps))
        .await?
        .result()
        .await?;
    let rate = Rate::of(f64::from(steps), &clock)?;
    engine.shutdown().await;
    Ok(rate)
}

/// One run fanning out `branches` no-op steps, all at once: journaled steps/s of parallel
/// branches of one workflow, which share syncs (group commit) as concurrent runs do.
pub(crate) async fn fan_out(dir: &Path, branches: u32) -> anyhow::Result<Rate> {
    let engine = open(&dir.join("fan-out")).await?;
    let clock = PhaseClock::start()?;
    let input = FanOutInput {
        branches,
        width: branches,
    };
    engine
        .start::<FanOut>("fan-out", input)
        .await?
        .result()
        .await?;
    let rate = Rate::of(f64::from(branches), &clock)?;
    engine.shutdown().await;
    Ok(rate)
}

/// `runs` concurrent runs of [`workload::CONCURRENT_RUN_STEPS`] (10) no-op steps each: all
/// are started (from [`workload::CALLERS`] concurrent tasks, as a service would), then every
/// result is awaited. Returns journaled steps/s across all runs, from the first start until
/// the last result, and the CPU the process spent meanwhile per step.
pub(crate) async fn concurrent(dir: &Path, runs: u32) -> anyhow::Result<Concurrent> {
    const STEPS: u32 = workload::CONCURRENT_RUN_STEPS;
    let engine = open(&dir.join("concurrent")).await?;
    let cpu_before = system::cpu_seconds()?;
    let clock = PhaseClock::start()?;
    start_concurrently::<Steps>(&engine, "concurrent", runs, &StepsInput::noop(STEPS)).await?;
    wait_all_completed(&engine, "concurrent", runs).await?;
    let steps = f64::from(runs * STEPS);
    let rate = Rate::of(steps, &clock)?;
    let cpu = system::cpu_seconds()? - cpu_before;
    engine.shutdown().await;
    Ok(Concurrent {
        steps: rate,
        cpu_us_per_step: cpu * 1e6 / steps,
    })
}

/// What [`concurrent`] measured.
pub(crate) struct Concurrent {
    /// Steps completed per second.
    pub steps: Rate,
    /// The process's CPU time (every thread: the runs, the committer, sled's flusher, and the
    /// benchmark's own starts and waits, which are a small part) per step, in microseconds.
    pub cpu_us_per_step: f64,
}

/// Durable starts: [`workload::CALLERS`] concurrent tasks start `total` runs (distinct ids)
/// of a workflow with no steps. Returns starts/s, timed until every `start` call returned
/// (each returns once its run is durable). The started runs complete meanwhile, so their
/// terminal records compete with the starts for syncs, as they would in a service.
pub(crate) async fn starts(dir: &Path, total: u32) -> anyhow::Result<Rate> {
    let engine = open(&dir.join("starts")).await?;
    let clock = PhaseClock::start()?;
    start_concurrently::<Steps>(&engine, "start", total, &StepsInput::noop(0)).await?;
    let rate = Rate::of(f64::from(total), &clock)?;
    engine.shutdown().await;
    Ok(rate)
}

/// Events: `runs` runs each take `per_run` events, sent from [`workload::CALLERS`] concurrent
/// tasks (each sending to its share of the runs, one event after the other). Returns events/s,
/// timed from the first send until every run completed: each event is delivered durably
/// before its send returns and then taken by its run's receive, so group commit decides the
/// rate.
pub(crate) async fn events(dir: &Path, runs: u32, per_run: u32) -> anyhow::Result<Rate> {
    let engine = open(&dir.join("events")).await?;
    start_concurrently::<Inbox>(&engine, "inbox", runs, &per_run).await?;
    let clock = PhaseClock::start()?;
    let mut senders = tokio::task::JoinSet::new();
    for caller in 0..workload::CALLERS.min(runs) {
        let engine = engine.clone();
        senders.spawn(async move {
            for n in 0..per_run {
                for run in (caller..runs).step_by(workload::CALLERS as usize) {
                    let id = workload::run_id("inbox", run);
                    engine
                        .send(&id, "item", &n, &format!("{id}-{n}"))
                        .await
                        .with_context(|| format!("sending event {n} to {id}"))?;
                }
            }
            anyhow::Ok(())
        });
    }
    while let Some(sender) = senders.join_next().await {
        sender.context("a sending task panicked")??;
    }
    wait_all_completed(&engine, "inbox", runs).await?;
    let rate = Rate::of(f64::from(runs * per_run), &clock)?;
    engine.shutdown().await;
    Ok(rate)
}

/// Resident memory per sleeping run: RSS (from `/proc/self/statm`) before and after starting
/// `runs` runs that each sleep on a 1-hour durable timer, once every one has journaled its
/// timer. Returns (after - before) / runs, in bytes; the engine is then shut down.
///
/// The figure is only honest in a process whose allocator has not yet grown and freed a
/// bigger heap (freed memory is reused without raising RSS), so call this before the other
/// engine measurements.
pub(crate) async fn memory(dir: &Path, runs: u32) -> anyhow::Result<f64> {
    const SLEEP: Duration = Duration::from_secs(3600);
    let page_bytes = system::page_bytes();
    let engine: Engine = open(&dir.join("memory")).await?;
    let before = system::rss_bytes(page_bytes)?;
    let input = SleepInput {
        steps: 0,
        wake_at_ms: workload::now_ms() + SLEEP.as_millis() as u64,
    };
    start_concurrently::<StepsThenSleep>(&engine, "sleeper", runs, &input).await?;
    wait_all_asleep(&engine, "sleeper", runs).await?;
    workload::wait_all_parked(&engine, runs).await?;
    let after = system::rss_bytes(page_bytes)?;
    engine.shutdown().await;
    Ok(after.saturating_sub(before) as f64 / f64::from(runs))
}
