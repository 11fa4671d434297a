//! `keel-bench [DIR] [--quick]`: measures the engine at the default (power-loss) durability and
//! reports each figure as a ratio to the disk's raw rate of 200-byte appends with one
//! `fdatasync` each, measured in the same run on the same disk (before and after, averaged),
//! because this disk's sync rate swings 20x from minute to minute.

// The binary's output is its report.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use keel_engine::{Ctx, Engine, RunStatus, Step, StepContext, StepError, Workflow, WorkflowError};
use serde::{Deserialize, Serialize};

/// A step with no side effect: what is measured is the journal.
#[derive(Serialize, Deserialize)]
struct Noop(u32);

impl Step for Noop {
    const KIND: &'static str = "bench.noop";
    type Output = ();
    async fn execute(&self, _ctx: &StepContext) -> Result<(), StepError> {
        Ok(())
    }
}

/// `steps` no-op steps, then an optional durable sleep.
struct Steps;

#[derive(Serialize, Deserialize)]
struct StepsInput {
    steps: u32,
    sleep_ms: u64,
}

impl Workflow for Steps {
    const NAME: &'static str = "bench.steps";
    type Input = StepsInput;
    type Output = ();
    async fn run(ctx: &mut Ctx, input: StepsInput) -> Result<(), WorkflowError> {
        for n in 0..input.steps {
            ctx.step(Noop(n)).await?;
        }
        if input.sleep_ms > 0 {
            ctx.sleep(Duration::from_millis(input.sleep_ms)).await?;
        }
        Ok(())
    }
}

async fn open(dir: &Path) -> anyhow::Result<Engine> {
    Ok(Engine::builder(dir)
        .workflow::<Steps>()
        .step::<Noop>()
        .open()
        .await?)
}

struct Sizes {
    sequential_steps: u32,
    concurrent_runs: u32,
    starts: u32,
    resume_runs: u32,
    sleeping_runs: u32,
}

/// Appends of 200 bytes with one fdatasync each, for about 3 s: appends/s.
fn baseline(dir: &Path) -> anyhow::Result<f64> {
    let path = dir.join("baseline.log");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)?;
    let record = [b'x'; 200];
    let started = Instant::now();
    let mut n = 0u32;
    while started.elapsed() < Duration::from_secs(3) && n < 2000 {
        file.write_all(&record)?;
        file.sync_data()?;
        n += 1;
    }
    let rate = f64::from(n) / started.elapsed().as_secs_f64();
    std::fs::remove_file(path)?;
    Ok(rate)
}

/// One run of many sequential steps: journaled steps/s.
async fn sequential(dir: &Path, steps: u32) -> anyhow::Result<f64> {
    let engine = open(&dir.join("sequential")).await?;
    let started = Instant::now();
    engine
        .start::<Steps>("seq", StepsInput { steps, sleep_ms: 0 })
        .await?
        .result()
        .await?;
    let rate = f64::from(steps) / started.elapsed().as_secs_f64();
    engine.shutdown().await;
    Ok(rate)
}

/// Many concurrent runs of 10 steps: journaled steps/s across all of them.
async fn concurrent(dir: &Path, runs: u32) -> anyhow::Result<f64> {
    let engine = open(&dir.join("concurrent")).await?;
    let started = Instant::now();
    let mut handles = Vec::new();
    for i in 0..runs {
        handles.push(
            engine
                .start::<Steps>(
                    &format!("c{i}"),
                    StepsInput {
                        steps: 10,
                        sleep_ms: 0,
                    },
                )
                .await?,
        );
    }
    for handle in handles {
        handle.result().await?;
    }
    let rate = f64::from(runs * 10) / started.elapsed().as_secs_f64();
    engine.shutdown().await;
    Ok(rate)
}

/// Durable starts from 100 concurrent callers: starts/s (until every start returned).
async fn starts(dir: &Path, total: u32) -> anyhow::Result<f64> {
    let engine = open(&dir.join("starts")).await?;
    let started = Instant::now();
    let mut callers = Vec::new();
    for caller in 0..100 {
        let engine = engine.clone();
        callers.push(tokio::spawn(async move {
            for i in (caller..total).step_by(100) {
                engine
                    .start::<Steps>(
                        &format!("s{i}"),
                        StepsInput {
                            steps: 0,
                            sleep_ms: 0,
                        },
                    )
                    .await?;
            }
            anyhow::Ok(())
        }));
    }
    for caller in callers {
        caller.await??;
    }
    let rate = f64::from(total) / started.elapsed().as_secs_f64();
    engine.shutdown().await;
    Ok(rate)
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn peak_rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Waits until every run `prefix{0..n}` has journaled a timer.
async fn until_all_asleep(engine: &Engine, prefix: &str, n: u32) -> anyhow::Result<()> {
    for i in 0..n {
        let id = format!("{prefix}{i}");
        let deadline = Instant::now() + Duration::from_secs(120);
        while !engine
            .history(&id)?
            .entries
            .iter()
            .any(|e| matches!(e.event, keel_engine::Event::TimerSet { .. }))
        {
            if Instant::now() > deadline {
                bail!("run {id} never went to sleep");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    Ok(())
}

/// Resident memory per run asleep on a durable timer: (RSS after - RSS before) / runs.
async fn memory(dir: &Path, runs: u32) -> anyhow::Result<f64> {
    let engine = open(&dir.join("memory")).await?;
    let before = rss_bytes();
    for i in 0..runs {
        engine
            .start::<Steps>(
                &format!("m{i}"),
                StepsInput {
                    steps: 1,
                    sleep_ms: 3_600_000,
                },
            )
            .await?;
    }
    until_all_asleep(&engine, "m", runs).await?;
    let per_run = (rss_bytes().saturating_sub(before)) as f64 / f64::from(runs);
    engine.shutdown().await;
    Ok(per_run)
}

/// The child of the resume measurement: starts `runs` runs that sleep 4 s after one step,
/// says "ready" once all are asleep, and waits to be killed.
async fn populate(dir: &Path, runs: u32) -> anyhow::Result<()> {
    let engine = open(dir).await?;
    for i in 0..runs {
        engine
            .start::<Steps>(
                &format!("r{i}"),
                StepsInput {
                    steps: 1,
                    sleep_ms: 4_000,
                },
            )
            .await?;
    }
    until_all_asleep(&engine, "r", runs).await?;
    println!("ready");
    std::io::stdout().flush()?;
    std::future::pending::<()>().await;
    Ok(())
}

/// Resume after SIGKILL: a child starts the runs and is killed once they sleep; then the
/// store is reopened once the timers expired. Returns (open() duration, duration until every
/// run completed).
async fn resume(dir: &Path, runs: u32) -> anyhow::Result<(Duration, Duration)> {
    let data = dir.join("resume");
    let mut child = Command::new(std::env::current_exe()?)
        .args(["populate", &data.to_string_lossy(), &runs.to_string()])
        .stdout(Stdio::piped())
        .spawn()?;
    let populated = Instant::now();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().context("child stdout")?),
        &mut line,
    )?;
    if line.trim() != "ready" {
        bail!("populate child said {line:?}");
    }
    child.kill()?; // SIGKILL
    child.wait()?;
    // Let every timer expire, so what is timed is resuming and finishing, not sleeping.
    tokio::time::sleep(
        Duration::from_secs(4).saturating_sub(populated.elapsed()) + Duration::from_millis(200),
    )
    .await;
    let started = Instant::now();
    let engine = open(&data).await?;
    let opened = started.elapsed();
    for i in 0..runs {
        let record = engine.wait(&format!("r{i}")).await?;
        if record.status != RunStatus::Completed {
            bail!("run r{i} ended {}", record.status);
        }
    }
    let finished = started.elapsed();
    engine.shutdown().await;
    Ok((opened, finished))
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if args.first().map(String::as_str) == Some("populate") {
        let dir = PathBuf::from(&args[1]);
        let runs: u32 = args[2].parse()?;
        return runtime.block_on(populate(&dir, runs));
    }
    let quick = args.iter().any(|a| a == "--quick");
    let root = args
        .iter()
        .find(|a| !a.starts_with("--"))
        .map_or_else(|| PathBuf::from("target/bench-data"), PathBuf::from);
    let sizes = if quick {
        Sizes {
            sequential_steps: 1_000,
            concurrent_runs: 200,
            starts: 1_000,
            resume_runs: 2_000,
            sleeping_runs: 2_000,
        }
    } else {
        Sizes {
            sequential_steps: 10_000,
            concurrent_runs: 1_000,
            starts: 5_000,
            resume_runs: 10_000,
            sleeping_runs: 10_000,
        }
    };
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root)?;
    let dir = root.canonicalize()?;
    eprintln!(
        "keel-bench: data in {} (durability: power loss)",
        dir.display()
    );

    runtime.block_on(async {
        eprintln!("baseline (before)...");
        let base_before = baseline(&dir)?;
        eprintln!("one run of {} steps...", sizes.sequential_steps);
        let seq = sequential(&dir, sizes.sequential_steps).await?;
        eprintln!("{} concurrent runs of 10 steps...", sizes.concurrent_runs);
        let conc = concurrent(&dir, sizes.concurrent_runs).await?;
        eprintln!("{} starts from 100 callers...", sizes.starts);
        let st = starts(&dir, sizes.starts).await?;
        eprintln!("resume of {} runs after SIGKILL...", sizes.resume_runs);
        let (opened, finished) = resume(&dir, sizes.resume_runs).await?;
        eprintln!("memory of {} sleeping runs...", sizes.sleeping_runs);
        let mem = memory(&dir, sizes.sleeping_runs).await?;
        eprintln!("baseline (after)...");
        let base_after = baseline(&dir)?;
        let base = (base_before + base_after) / 2.0;

        println!("| figure | value | ratio to baseline | target |");
        println!("|---|---|---|---|");
        println!("| baseline: 200-byte append + fdatasync | {base:.0}/s (before {base_before:.0}, after {base_after:.0}) | 1.00 | |");
        println!("| one run of {} steps | {seq:.0} steps/s | {:.2} | >= 0.6 |", sizes.sequential_steps, seq / base);
        println!("| {} concurrent runs x 10 steps | {conc:.0} steps/s | {:.2} | >= 5 |", sizes.concurrent_runs, conc / base);
        println!("| durable starts, 100 callers | {st:.0} starts/s | {:.2} | >= 3 |", st / base);
        println!("| resume {} runs after SIGKILL: open() | {:.3} s | | < 2 s |", sizes.resume_runs, opened.as_secs_f64());
        println!("| resume {} runs after SIGKILL: all completed | {:.3} s | | |", sizes.resume_runs, finished.as_secs_f64());
        println!("| memory per sleeping run ({} runs) | {:.0} bytes | | < 10240 |", sizes.sleeping_runs, mem);
        println!("| peak RSS | {:.1} MiB | | |", peak_rss_bytes() as f64 / (1024.0 * 1024.0));
        anyhow::Ok(())
    })?;
    let _ = std::fs::remove_dir_all(&root);
    Ok(())
}
