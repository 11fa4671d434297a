//! Resume after SIGKILL: a child process (this binary's hidden `populate` subcommand) fills a
//! store with runs that are asleep on durable timers, and is killed; the parent reopens the
//! store once the timers have expired and times how long resuming takes.
//!
//! Every run sleeps until the same absolute wake time, chosen by the parent, so that all of
//! them are unfinished at the kill and all of them are due at the reopen: what is timed is
//! loading and finishing runs, never sleeping. The wake time must lie after the child is
//! ready, which takes as long as the disk's syncs allow; the parent estimates it from the
//! measured start rate, the child says `late` instead of `ready` if the estimate was short,
//! and the parent then tries again with twice the margin.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::workload::{
    now_ms, open, start_concurrently, sync_barrier, wait_all_asleep, wait_all_completed,
    SleepInput, StepsThenSleep,
};

/// The ids of the populated runs start with this.
const PREFIX: &str = "resume";

/// How long before the wake time the child must be ready, so that no timer fires before the
/// parent has killed it.
const SPARE_MIN: Duration = Duration::from_millis(500);

/// How many times the parent populates a fresh store before giving up on a too-slow disk.
const ATTEMPTS_MAX: u32 = 3;

/// The timings of one resume.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Resume {
    /// From calling `open` until it returned: the store recovered, every unfinished run
    /// loaded from its journal and its driver spawned.
    pub opened: Duration,
    /// From calling `open` until every run completed (timer fired, terminal record durable).
    pub completed: Duration,
}

/// What the child said.
enum Populated {
    /// Every run is durably asleep and the child has been killed.
    Killed,
    /// The child was ready too close to the wake time, and exited.
    Late,
}

/// Populates `runs` sleeping runs in a child, SIGKILLs it, waits for their wake time, then
/// reopens the store and times `open()` and the completion of every run. `starts_per_s` (the
/// measured durable start rate) sizes the first wake-time margin.
pub(crate) async fn resume(dir: &Path, runs: u32, starts_per_s: f64) -> anyhow::Result<Resume> {
    // Each populated run costs three syncs (its start, its step, its timer), but group commit
    // shares them across runs, so populating takes about as long as starting the same number
    // of runs did (1.2 s for 10,000 runs against 2.6 s at the measured start rate, in one
    // run); twice that plus the child's start-up, and a retry should the disk slow down.
    let estimate = Duration::from_secs_f64(f64::from(runs) / starts_per_s.max(1.0));
    let mut margin = (Duration::from_secs(2) + estimate * 2).max(Duration::from_secs(3));
    for attempt in 1..=ATTEMPTS_MAX {
        let data = dir.join(format!("resume-{attempt}"));
        let wake_at_ms = now_ms() + margin.as_millis() as u64;
        eprintln!(
            "  populating {runs} runs in a child (attempt {attempt}, wake in {:.1} s)...",
            margin.as_secs_f64()
        );
        let child_data = data.clone();
        let populated =
            tokio::task::spawn_blocking(move || populate_in_child(&child_data, runs, wake_at_ms))
                .await
                .context("the populating thread panicked")??;
        match populated {
            Populated::Late => {
                margin *= 2;
                continue;
            }
            Populated::Killed => {}
        }
        // Let every timer expire, so that the reopened runs are all due at once.
        let due_in_ms = (wake_at_ms + 100).saturating_sub(now_ms());
        tokio::time::sleep(Duration::from_millis(due_in_ms)).await;
        eprintln!("  reopening the store after SIGKILL...");
        let started = Instant::now();
        let engine = open(&data).await?;
        let opened = started.elapsed();
        wait_all_completed(&engine, PREFIX, runs).await?;
        let completed = started.elapsed();
        engine.shutdown().await;
        return Ok(Resume { opened, completed });
    }
    bail!("the populating child was late {ATTEMPTS_MAX} times: the disk is too slow right now")
}

/// Kills the child on drop, so that no error path leaves it behind.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `keel-bench populate` on `data` and reads its one line; on `ready`, SIGKILLs it.
fn populate_in_child(data: &Path, runs: u32, wake_at_ms: u64) -> anyhow::Result<Populated> {
    let exe = std::env::current_exe().context("finding this binary")?;
    let child = Command::new(exe)
        .arg("populate")
        .arg("--dir")
        .arg(data)
        .args(["--runs", &runs.to_string()])
        .args(["--wake-at-ms", &wake_at_ms.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting the populate child")?;
    let mut child = KillOnDrop(child);
    let stdout = child.0.stdout.take().context("the child's stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    match line.trim() {
        "ready" => {
            // Child::kill sends SIGKILL on Unix: no destructor, no flush, no shutdown.
            child.0.kill().context("killing the populate child")?;
            child.0.wait()?;
            Ok(Populated::Killed)
        }
        "late" => {
            child.0.wait()?;
            Ok(Populated::Late)
        }
        other => {
            let status = child.0.wait()?;
            bail!("the populate child said {other:?} and exited with {status}")
        }
    }
}

/// The child's side (`keel-bench populate`): opens an engine on `dir`, starts `runs` runs that
/// take one no-op step and then sleep until `wake_at_ms`, waits until every run has journaled
/// its timer and that is durable, then prints `ready` and waits to be killed. Prints `late`
/// and returns instead if the wake time is too close.
pub(crate) async fn populate(dir: &Path, runs: u32, wake_at_ms: u64) -> anyhow::Result<()> {
    let started = Instant::now();
    let engine = open(dir).await?;
    let input = SleepInput {
        steps: 1,
        wake_at_ms,
    };
    start_concurrently::<StepsThenSleep>(&engine, PREFIX, runs, &input).await?;
    wait_all_asleep(&engine, PREFIX, runs).await?;
    // A timer seen through history() may not be durable yet; the kill must not lose it.
    sync_barrier(&engine, "barrier").await?;
    let populated = started.elapsed();
    let spare_ms = wake_at_ms.saturating_sub(now_ms());
    let mut stdout = std::io::stdout();
    if spare_ms < SPARE_MIN.as_millis() as u64 {
        eprintln!(
            "  populate: ready after {:.1} s, only {spare_ms} ms before the wake time: late",
            populated.as_secs_f64()
        );
        writeln!(stdout, "late")?;
        stdout.flush()?;
        return Ok(());
    }
    eprintln!(
        "  populate: {runs} runs asleep after {:.1} s, {spare_ms} ms before the wake time",
        populated.as_secs_f64()
    );
    writeln!(stdout, "ready")?;
    stdout.flush()?;
    // Wait to be killed; should the parent die first, its end of stdin closes and this ends.
    tokio::task::spawn_blocking(|| std::io::stdin().read_to_end(&mut Vec::new())).await??;
    bail!("the parent went away before killing this child")
}
