//! `keel-bench`: measures Keel's engine at the default durability (power loss) and reports
//! every figure next to the disk's raw rate of 200-byte appends with one `fdatasync` each,
//! measured in the same run on the same disk, before and after everything else. The disk's
//! sync rate swings widely from minute to minute, so only the ratios carry over between runs.
//!
//! Measured, in this order:
//! 1. the baseline (first time);
//! 2. memory per run asleep on a durable timer (first among the engine measurements, so that
//!    the allocator has not yet grown a heap it could reuse without raising RSS);
//! 3. one run of many sequential no-op steps: journaled steps/s;
//! 4. many concurrent runs of 10 no-op steps: steps/s;
//! 5. durable starts from 100 concurrent callers: starts/s;
//! 6. events sent from 100 callers to runs that receive them: events delivered and taken/s;
//! 7. resume after SIGKILL: `open()` time and time until every run completed;
//! 8. the baseline (second time); then the peak RSS of the whole run.
//!
//! The disk's baseline does not see the CPU: for the timed part of each phase from 3 to 6,
//! and of the fan-out, the report also gives the share of the machine's CPU the hypervisor
//! stole meanwhile (`/proc/stat`), with a warning above 5%.
//!
//! Subcommands measure apart from the engine core: `waits` simulates wait strategies,
//! `fleet` onboards a fleet of devices against moto through a throttling proxy, `load` runs
//! concurrent BOSH-like runs against a simulated cloud while killing the engine's process,
//! `workers` measures throughput with several engine processes on one PostgreSQL database,
//! `machines` provisions machines with disks against moto playing the CPI's latencies,
//! `console` times the web console's requests against a worker with many runs, `cpu` splits
//! the CPU of a step by thread over repeated concurrent phases.

// The binary's output is its report: printing it to stdout is its job.
#![allow(clippy::print_stdout)]
// Progress goes to stderr, so that a long run shows what it is doing while stdout holds only
// the report.
#![allow(clippy::print_stderr)]

/// The allocator the `keel` worker uses, so that the figures are the worker's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod cli;
mod console;
mod cpi;
mod cpu;
mod disk;
mod figures;
mod fleet;
mod idle;
mod load;
mod machines;
mod measure;
mod memory;
mod report;
mod resume;
mod system;
mod waits;
mod workers;
mod workload;

use std::path::Path;

use anyhow::{bail, Context};
use clap::{CommandFactory, Parser};
use keel_engine::Durability;

use crate::cli::{Cli, Command};
use crate::figures::{figures, Targets};
use crate::report::{Baseline, PhaseCpu, Report};

/// How much work each measurement does.
#[derive(Clone, Copy)]
struct Sizes {
    /// Whether these are the reduced `--quick` sizes.
    quick: bool,
    sequential_steps: u32,
    fan_out_branches: u32,
    concurrent_runs: u32,
    /// Durable starts. The full size takes a seventh of a second or so on sled; timing
    /// 20,000 instead gave no narrower a spread over ten alternated calls (medians 5.19x and
    /// 5.67x): the spread comes from the machine's windows (docs/benchmarks.md).
    starts: u32,
    /// Runs that take events, and events each takes.
    event_runs: u32,
    events_per_run: u32,
    resume_runs: u32,
    sleeping_runs: u32,
}

impl Sizes {
    /// The sizes the targets are set for.
    const FULL: Sizes = Sizes {
        quick: false,
        sequential_steps: 10_000,
        fan_out_branches: 1_000,
        concurrent_runs: 1_000,
        starts: 5_000,
        event_runs: 100,
        events_per_run: 50,
        resume_runs: 10_000,
        sleeping_runs: 10_000,
    };

    /// `--quick`.
    const QUICK: Sizes = Sizes {
        quick: true,
        sequential_steps: 1_000,
        fan_out_branches: 1_000,
        concurrent_runs: 200,
        starts: 1_000,
        event_runs: 100,
        events_per_run: 10,
        resume_runs: 2_000,
        sleeping_runs: 2_000,
    };
}

/// How the report is printed.
#[derive(Clone, Copy)]
enum Output {
    Table,
    Json,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if std::env::var_os("RUST_LOG").is_some() {
        // The engine's logs (the store's open phases, say), on stderr, only when asked.
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    if let Some(store) = &cli.store {
        if !(store.starts_with("postgres://") || store.starts_with("postgresql://")) {
            eprintln!(
                "keel-bench: --store: expected a PostgreSQL URL (postgres://user@host:port/db)"
            );
            std::process::exit(2);
        }
        // Children (the resume measurement's) measure the same store.
        std::env::set_var(workload::STORE_ENV, store);
    }
    let output = if cli.json {
        Output::Json
    } else {
        Output::Table
    };
    dispatch(cli, output).await
}

/// Runs the subcommand `cli` names (the engine figures when none), reporting as `output`.
async fn dispatch(cli: Cli, output: Output) -> anyhow::Result<()> {
    match cli.command {
        Some(Command::Populate {
            dir,
            runs,
            wake_at_ms,
        }) => resume::populate(&dir, runs, wake_at_ms).await,
        Some(Command::Fleet {
            devices,
            concurrency,
            throttle,
            seed,
        }) => {
            let params = fleet::FleetParams {
                devices,
                concurrency,
                throttle,
                seed,
            };
            run_fleet(&cli.dir, params, output).await
        }
        Some(Command::Machines {
            machines,
            waves,
            scale,
            throttle,
            lost,
            seed,
        }) => {
            let params = machines::MachineParams {
                machines,
                waves,
                scale,
                throttle,
                lost,
                seed,
            };
            std::fs::create_dir_all(&cli.dir)
                .with_context(|| format!("creating {}", cli.dir.display()))?;
            let report = machines::run(&cli.dir, params).await?;
            print_report(output, &report, machines::MachinesReport::table)
        }
        Some(Command::LoadChild) => load::child().await,
        Some(Command::Cpu {
            runs,
            steps,
            repeats,
            durability,
            output_bytes,
            cache_mib,
        }) => {
            if workload::postgres_server().is_some() {
                bail!("cpu measures the sled store; it takes no --store");
            }
            let params = cpu::CpuParams {
                runs,
                steps,
                repeats,
                durability,
                output_bytes,
                cache_bytes: cache_mib.map(|mib| mib * 1024 * 1024),
            };
            let report = cpu::run(&cli.dir, &params).await?;
            print_report(output, &report, cpu::CpuReport::table)
        }
        Some(Command::Memory {
            runs,
            wait,
            no_park,
            reopen,
            keep,
            reopen_only,
            after_crash,
            cache_mib,
            linger,
        }) => {
            if workload::postgres_server().is_some() && (cache_mib.is_some() || after_crash) {
                bail!("--cache-mib and --after-crash are sled's: not with --store");
            }
            if runs == 0 {
                bail!("--runs must be at least 1");
            }
            let params = memory::MemoryParams {
                runs,
                wait,
                park_after: (!no_park).then_some(keel_engine::PARK_AFTER_DEFAULT),
                reopen,
                keep,
                cache_bytes: cache_mib.map(|mib| mib * 1024 * 1024),
                linger: std::time::Duration::from_secs(linger),
            };
            if let Some(data) = reopen_only {
                let report = memory::reopen_only(&data, &params, after_crash).await?;
                return print_report(output, &report, memory::Reopened::table);
            }
            let report = memory::run(&cli.dir, &params).await?;
            print_report(output, &report, memory::MemoryReport::table)
        }
        Some(Command::Console { runs, repeats }) => {
            if runs < 1_000 || repeats == 0 {
                bail!("--runs must be at least 1000 and --repeats at least 1");
            }
            std::fs::create_dir_all(&cli.dir)
                .with_context(|| format!("creating {}", cli.dir.display()))?;
            let params = console::ConsoleParams { runs, repeats };
            let report = console::run(&cli.dir, params).await?;
            print_report(output, &report, console::ConsoleReport::table)
        }
        Some(Command::Idle {
            runs,
            repeats,
            settle_s,
        }) => {
            if (runs != 0 && runs < 1_000) || repeats == 0 {
                bail!("--runs must be 0 or at least 1000, and --repeats at least 1");
            }
            std::fs::create_dir_all(&cli.dir)
                .with_context(|| format!("creating {}", cli.dir.display()))?;
            let params = idle::IdleParams {
                runs,
                repeats,
                settle: std::time::Duration::from_secs(settle_s),
            };
            let report = idle::run(&cli.dir, params).await?;
            print_report(output, &report, idle::IdleReport::table)
        }
        Some(Command::Disk { rounds }) => {
            if rounds == 0 {
                bail!("--rounds must be at least 1");
            }
            std::fs::create_dir_all(&cli.dir)
                .with_context(|| format!("creating {}", cli.dir.display()))?;
            let report = disk::run(&cli.dir, rounds)?;
            print_report(output, &report, disk::DiskReport::table)
        }
        Some(Command::Workers(args)) => {
            run_workers(&cli.dir, cli.store.as_deref(), cli.quick, args, output).await
        }
        Some(Command::WorkersChild(args)) => workers::child(args).await,
        Some(Command::Load {
            runs,
            time_scale,
            kills,
            downtime_ms,
            capacity,
            throttle,
            learn_after,
            fixed_rate,
            seed,
            keep,
        }) => {
            let knobs = load::LoadKnobs {
                runs,
                time_scale,
                kills,
                downtime_ms,
                capacity,
                throttle,
                learn_after,
                fixed_rate,
                seed,
                keep,
            };
            run_load(&cli.dir, &knobs, output).await
        }
        Some(Command::Waits {
            seed,
            resources,
            warm_up,
            outlier_rate,
            cpi,
        }) => {
            if cpi {
                let reports: Vec<_> = waits::CPI
                    .iter()
                    .map(|p| waits::simulate_published(p, seed, resources, warm_up))
                    .collect();
                print_report(output, &reports, |reports| {
                    let tables: Vec<String> =
                        reports.iter().map(waits::WaitsReport::table).collect();
                    tables.join("\n")
                })
            } else {
                run_waits(seed, resources, warm_up, outlier_rate, output)
            }
        }
        None => {
            let sizes = if cli.quick { Sizes::QUICK } else { Sizes::FULL };
            let report = bench(&cli.dir, sizes).await?;
            print_report(output, &report, Report::table)
        }
    }
}

/// Prints a report as the user asked: its table, or one JSON object.
fn print_report<R: serde::Serialize>(
    output: Output,
    report: &R,
    table: impl FnOnce(&R) -> String,
) -> anyhow::Result<()> {
    match output {
        Output::Table => print!("{}", table(report)),
        Output::Json => println!("{}", serde_json::to_string_pretty(report)?),
    }
    Ok(())
}

/// `keel-bench fleet`: checks the throttle fraction, onboards the fleet under `dir` and
/// prints the report.
async fn run_fleet(dir: &Path, params: fleet::FleetParams, output: Output) -> anyhow::Result<()> {
    let throttle = params.throttle;
    if !(0.0..=1.0).contains(&throttle) {
        bail!("--throttle must be between 0 and 1, not {throttle}");
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let report = fleet::run(dir, params).await?;
    print_report(output, &report, fleet::FleetReport::table)
}

/// `keel-bench load`: checks the knobs, runs the load under `dir`, prints the report and
/// says where the store and logs were kept, if they were.
async fn run_load(dir: &Path, knobs: &load::LoadKnobs, output: Output) -> anyhow::Result<()> {
    let throttle = knobs.throttle;
    if !(0.0..=1.0).contains(&throttle) {
        bail!("--throttle must be between 0 and 1, not {throttle}");
    }
    if knobs.runs == 0 || knobs.time_scale <= 0.0 || knobs.capacity <= 0.0 {
        bail!("--runs, --time-scale and --capacity must be positive");
    }
    let (report, kept) = load::run(dir, knobs).await?;
    print_report(output, &report, keel_testkit::simcloud::LoadReport::table)?;
    if let Some(dir) = kept {
        eprintln!("store and logs kept in {}", dir.display());
    }
    Ok(())
}

/// `keel-bench workers`: refuses to run without a PostgreSQL server, or with fewer runs than
/// workers (exit 2, as clap does for bad usage), measures and prints the report.
async fn run_workers(
    dir: &Path,
    store: Option<&str>,
    quick: bool,
    args: workers::WorkersArgs,
    output: Output,
) -> anyhow::Result<()> {
    let Some(server) = store else {
        Cli::command()
            .error(
                clap::error::ErrorKind::MissingRequiredArgument,
                "`workers` measures engines sharing a PostgreSQL database: give its server \
                 with --store postgres://user@host:port/db (or KEEL_BENCH_STORE)",
            )
            .exit();
    };
    let runs = args.runs.unwrap_or(if quick {
        workers::RUNS_QUICK
    } else {
        workers::RUNS_DEFAULT
    });
    let most = args.workers.iter().copied().max().unwrap_or(1);
    if runs < most {
        Cli::command()
            .error(
                clap::error::ErrorKind::ValueValidation,
                format!("--runs {runs}: fewer runs than the {most} workers to share them"),
            )
            .exit();
    }
    let params = workers::WorkersParams {
        counts: args.workers,
        runs,
        keep_logs: args.keep_logs,
    };
    let report = workers::run(dir, server, &params).await?;
    print_report(output, &report, workers::WorkersReport::table)
}

/// `keel-bench waits`: checks the outlier rate, simulates the wait strategies and prints the
/// report.
fn run_waits(
    seed: u64,
    resources: u32,
    warm_up: u32,
    outlier_rate: f64,
    output: Output,
) -> anyhow::Result<()> {
    if !(0.0..=1.0).contains(&outlier_rate) {
        bail!("--outlier-rate must be between 0 and 1, not {outlier_rate}");
    }
    let readiness = waits::Readiness::with_outlier_rate(outlier_rate);
    let report = waits::simulate(readiness, seed, resources, warm_up);
    print_report(output, &report, waits::WaitsReport::table)
}

/// Runs every measurement in a fresh directory under `parent` (removed at the end) and builds
/// the report.
async fn bench(parent: &Path, sizes: Sizes) -> anyhow::Result<Report> {
    if Durability::default() != Durability::PowerLoss {
        bail!("the engine's default durability is no longer PowerLoss: the targets assume it");
    }
    let data = system::fresh_data_dir(parent, "run-")?;
    let dir = data.path().canonicalize()?;
    let filesystem = system::filesystem(&dir)?;
    eprintln!("keel-bench: data in {} on {filesystem}", dir.display());
    if filesystem.in_memory() {
        eprintln!("warning: {filesystem} is in memory: no figure says anything about a disk");
    }
    let measured = measure_all(&dir, sizes).await?;
    Ok(Report {
        dir: dir.display().to_string(),
        filesystem,
        store: match workload::postgres_server() {
            Some(server) => workload::postgres_store_name(&server),
            None => "sled (embedded)".into(),
        },
        durability: match workload::postgres_server() {
            Some(_) => workload::POSTGRES_DURABILITY,
            None => "PowerLoss (default)",
        },
        quick: sizes.quick,
        baseline: measured.baseline,
        figures: figures(
            &measured,
            sizes,
            match workload::postgres_server() {
                Some(_) => Targets::POSTGRES,
                None => Targets::SLED,
            },
        ),
        machine_cpu: measured.machine_cpu,
    })
}

/// Everything measured in one run.
struct Measured {
    baseline: Baseline,
    memory_per_run_bytes: f64,
    sequential_steps_per_s: f64,
    fan_out_steps_per_s: f64,
    concurrent_steps_per_s: f64,
    concurrent_cpu_us_per_step: f64,
    starts_per_s: f64,
    events_per_s: f64,
    resumed: resume::Resume,
    peak_rss_bytes: u64,
    /// How the machine's CPU was shared during each phase that CPU bounds.
    machine_cpu: Vec<PhaseCpu>,
}

/// Runs the measurements in order (see the crate docs for why this order), logging progress.
async fn measure_all(dir: &Path, sizes: Sizes) -> anyhow::Result<Measured> {
    eprintln!("[1/9] baseline, before...");
    let before = baseline(dir, "baseline-before").await?;

    let n = sizes.sleeping_runs;
    eprintln!("[2/9] memory of {n} runs asleep on a 1-hour timer...");
    let memory_per_run_bytes = measure::memory(dir, n).await?;
    eprintln!("  {memory_per_run_bytes:.0} bytes per run");

    let n = sizes.sequential_steps;
    eprintln!("[3/9] one run of {n} no-op steps...");
    let sequential = measure::sequential(dir, n).await?;
    let sequential_steps_per_s = sequential.per_s;
    eprintln!("  {sequential_steps_per_s:.0} steps/s");

    let n = sizes.fan_out_branches;
    eprintln!("[4/9] one run fanning out {n} parallel no-op steps...");
    let fan_out = measure::fan_out(dir, n).await?;
    let fan_out_steps_per_s = fan_out.per_s;
    eprintln!("  {fan_out_steps_per_s:.0} steps/s");

    let n = sizes.concurrent_runs;
    eprintln!("[5/9] {n} concurrent runs of 10 no-op steps...");
    let concurrent = measure::concurrent(dir, n).await?;
    let concurrent_steps_per_s = concurrent.steps.per_s;
    eprintln!(
        "  {concurrent_steps_per_s:.0} steps/s, {:.1} us of CPU per step",
        concurrent.cpu_us_per_step
    );

    let n = sizes.starts;
    eprintln!("[6/9] {n} durable starts from 100 callers...");
    let starts = measure::starts(dir, n).await?;
    let starts_per_s = starts.per_s;
    eprintln!("  {starts_per_s:.0} starts/s");

    let (runs, per_run) = (sizes.event_runs, sizes.events_per_run);
    eprintln!("[7/9] {per_run} events to each of {runs} runs, from 100 callers...");
    let events = measure::events(dir, runs, per_run).await?;
    let events_per_s = events.per_s;
    eprintln!("  {events_per_s:.0} events/s");

    let n = sizes.resume_runs;
    eprintln!("[8/9] resume of {n} sleeping runs after SIGKILL...");
    let resumed = resume::resume(dir, n, starts_per_s).await?;
    eprintln!(
        "  open() {:.3} s, all completed {:.3} s",
        resumed.opened.as_secs_f64(),
        resumed.completed.as_secs_f64()
    );

    eprintln!("[9/9] baseline, after...");
    let after = baseline(dir, "baseline-after").await?;
    let baseline = match workload::postgres_server() {
        Some(_) => Baseline::database(before, after),
        None => Baseline::new(before, after),
    };

    Ok(Measured {
        baseline,
        memory_per_run_bytes,
        sequential_steps_per_s,
        fan_out_steps_per_s,
        concurrent_steps_per_s,
        concurrent_cpu_us_per_step: concurrent.cpu_us_per_step,
        starts_per_s,
        events_per_s,
        resumed,
        peak_rss_bytes: system::peak_rss_bytes()?,
        machine_cpu: [
            ("sequential", sequential),
            ("fan-out", fan_out),
            ("concurrent", concurrent.steps),
            ("starts", starts),
            ("events", events),
        ]
        .into_iter()
        .map(|(phase, rate)| PhaseCpu {
            phase,
            shares: rate.machine_cpu,
        })
        .collect(),
    })
}

/// The baseline of the store measured: the disk's append rate, or the database's commit rate.
async fn baseline(dir: &Path, name: &'static str) -> anyhow::Result<f64> {
    let rate = match workload::postgres_server() {
        Some(server) => {
            let rate = measure::baseline_postgres(&server, dir, name).await?;
            eprintln!("  {rate:.0} commits/s");
            rate
        }
        None => {
            let rate = blocking_baseline(dir, name).await?;
            eprintln!("  {rate:.0} appends/s");
            rate
        }
    };
    Ok(rate)
}

/// Runs [`measure::baseline`] off the async workers: it blocks in `fdatasync`.
async fn blocking_baseline(dir: &Path, name: &'static str) -> anyhow::Result<f64> {
    let dir = dir.to_owned();
    tokio::task::spawn_blocking(move || measure::baseline(&dir, name))
        .await
        .context("the baseline thread panicked")?
}
