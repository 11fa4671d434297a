//! `keel-bench workers`: throughput of several engines (workers) sharing one PostgreSQL
//! database, each in a process of its own (this binary's hidden `workers-child`).
//!
//! For each worker count, in a fresh database: the parent starts that many children, each
//! with its own data directory (so its own worker name and lease) and its share of the runs.
//! Each child opens its engine on the database and prints `ready`; once every child is ready
//! the parent writes `go` to each and starts the clock. Each child then starts its runs
//! ([`workload::CONCURRENT_RUN_STEPS`] no-op steps each, from [`workload::CALLERS`] tasks,
//! as the concurrent-runs figure does), waits until every one of them completed, prints
//! `done <steps>`, shuts its engine down and exits. The clock stops at the last `done`: what
//! is timed is the work, not process start, engine open or shutdown.
//!
//! Every rate is set against the server's single-row INSERT + COMMIT rate from one
//! connection, measured once, first, in the same invocation; and against the rate of one
//! worker, when one worker is among the counts measured.

mod children;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;

use crate::measure;
use crate::report::markdown_table;
use crate::workload::{self, start_concurrently, wait_all_completed, Steps, StepsInput};

use children::ChildPlan;

/// The most workers one measurement starts: each is a process with an engine and three
/// connections to the server.
pub(crate) const WORKERS_MAX: u32 = 16;

/// The most runs one measurement shares out.
const RUNS_MAX: u32 = 1_000_000;

/// The runs each count shares out unless `--runs` says otherwise.
pub(crate) const RUNS_DEFAULT: u32 = 600;

/// The runs each count shares out with `--quick`.
pub(crate) const RUNS_QUICK: u32 = 200;

/// The variable that gives a child the URL of the database every worker shares (not an
/// argument, so that a password in it stays out of the process list).
const DATABASE_ENV: &str = "KEEL_BENCH_WORKERS_DATABASE";

/// The options of `keel-bench workers` (their doc comments are the help).
#[derive(clap::Args)]
pub(crate) struct WorkersArgs {
    /// Worker counts to measure, in this order, each in a fresh database.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1,2,3",
        value_parser = clap::value_parser!(u32).range(1..=i64::from(WORKERS_MAX)),
    )]
    pub workers: Vec<u32>,
    /// Runs of 10 no-op steps per count, shared evenly among its workers; at least the
    /// largest count [default: 600, or 200 with --quick].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=i64::from(RUNS_MAX)))]
    pub runs: Option<u32>,
    /// Keep the children's logs (each child's timings, the engine's warnings) and print
    /// where; they are kept anyway when a measurement fails.
    #[arg(long)]
    pub keep_logs: bool,
}

/// The options of the hidden `workers-child` (set by the parent).
#[derive(clap::Args)]
pub(crate) struct ChildArgs {
    /// The URL of the database every worker shares.
    #[arg(long, env = DATABASE_ENV, hide_env_values = true)]
    database: String,
    /// The engine's own data directory.
    #[arg(long)]
    dir: PathBuf,
    /// The ids of this child's runs start with this (distinct across the children).
    #[arg(long)]
    prefix: String,
    /// How many runs this child starts.
    #[arg(long)]
    runs: u32,
    /// How many no-op steps each run takes.
    #[arg(long)]
    steps: u32,
}

/// What `keel-bench workers` measures: the worker counts, in order, and the runs each count
/// shares out; and whether the children's logs are kept after a success.
#[derive(Clone, Debug)]
pub(crate) struct WorkersParams {
    pub counts: Vec<u32>,
    pub runs: u32,
    pub keep_logs: bool,
}

/// One worker count's measurement.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct WorkersFigure {
    /// How many workers (processes, each with its engine) shared the database.
    pub workers: u32,
    /// Runs started, across the workers.
    pub runs: u32,
    /// No-op steps the runs took, across the workers (as the children reported them).
    pub steps: u64,
    /// From `go` until the last worker said `done`.
    pub wall_s: f64,
    /// `steps / wall_s`.
    pub steps_per_s: f64,
    /// `steps_per_s` / the baseline's commits/s.
    pub ratio_to_baseline: f64,
    /// `steps_per_s` / that of the first measurement with one worker, if there is one.
    pub speedup_over_one: Option<f64>,
}

/// Everything `keel-bench workers` found.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct WorkersReport {
    /// The server measured, without credentials.
    pub store: String,
    /// What a durable write means there.
    pub durability: &'static str,
    /// What one baseline operation is.
    pub baseline_what: &'static str,
    /// The baseline's rate, measured once before the workers.
    pub baseline_commits_per_s: f64,
    /// No-op steps per run.
    pub steps_per_run: u32,
    /// One figure per worker count, in the order measured.
    pub figures: Vec<WorkersFigure>,
}

/// Measures the baseline, then every worker count of `params`, each in a fresh database on
/// `server`, with the children's data under a fresh directory in `parent` (removed at the
/// end). The children's logs are kept, and their directory named on stderr, if a
/// measurement fails or `params` asks; the databases are dropped once measured, except a
/// failed one.
pub(crate) async fn run(
    parent: &Path,
    server: &str,
    params: &WorkersParams,
) -> anyhow::Result<WorkersReport> {
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let data = tempfile::Builder::new()
        .prefix("workers-")
        .tempdir_in(parent)
        .with_context(|| format!("creating a data directory in {}", parent.display()))?;
    let dir = data.path().canonicalize()?;
    let logs = tempfile::Builder::new()
        .prefix("keel-bench-workers-logs-")
        .tempdir()
        .context("creating a directory for the children's logs")?;
    eprintln!(
        "keel-bench workers: data in {}, children's logs in {}",
        dir.display(),
        logs.path().display()
    );
    let steps = workload::CONCURRENT_RUN_STEPS;
    let total = params.counts.len() + 1;
    eprintln!("[1/{total}] baseline...");
    let baseline_per_s = measure::baseline_postgres(server, &dir, "baseline").await?;
    eprintln!("  {baseline_per_s:.0} commits/s");
    let mut databases = vec![workload::database_name(&dir.join("baseline"))];
    let mut measured = Vec::new();
    for (n, &workers) in params.counts.iter().enumerate() {
        let runs = params.runs;
        eprintln!(
            "[{}/{total}] {workers} worker{}, {runs} runs x {steps} no-op steps...",
            n + 2,
            if workers == 1 { "" } else { "s" }
        );
        let label = format!("measurement-{}", n + 1);
        let database_dir = dir.join(&label);
        databases.push(workload::database_name(&database_dir));
        let plans = children::plans(&database_dir, logs.path(), &label, workers, runs, steps);
        match measure_workers(server, &database_dir, plans).await {
            Ok((taken, wall)) => {
                eprintln!(
                    "  {taken} steps in {:.3} s: {:.0} steps/s",
                    wall.as_secs_f64(),
                    taken as f64 / wall.as_secs_f64()
                );
                measured.push((workers, taken, wall));
            }
            Err(error) => {
                // The failed measurement's database and logs stay, to be looked into.
                let failed = databases.pop().unwrap_or_default();
                drop_databases(server, &databases).await;
                let kept = logs.keep();
                eprintln!(
                    "keel-bench workers: children's logs kept in {}; database {failed} kept",
                    kept.display(),
                );
                return Err(error);
            }
        }
    }
    drop_databases(server, &databases).await;
    if params.keep_logs {
        eprintln!("children's logs kept in {}", logs.keep().display());
    }
    Ok(report(server, baseline_per_s, params.runs, &measured))
}

/// Drops the databases `names` on `server`, warning of any that could not be dropped: they
/// were measured and are of no further use.
async fn drop_databases(server: &str, names: &[String]) {
    for name in names {
        if let Err(error) = workload::drop_database(server, name).await {
            eprintln!("warning: {error:#}");
        }
    }
}

/// Creates the database of `dir`, runs the children of `plans` on it and returns the steps
/// they took and the time from `go` until the last `done`.
async fn measure_workers(
    server: &str,
    dir: &Path,
    plans: Vec<ChildPlan>,
) -> anyhow::Result<(u64, Duration)> {
    let database = workload::database_of(server, dir).await;
    tokio::task::spawn_blocking(move || children::drive(&database, &plans))
        .await
        .context("the thread driving the workers panicked")?
}

/// The report from the baseline and each count's `(workers, steps, wall time)`.
fn report(
    server: &str,
    baseline_per_s: f64,
    runs: u32,
    measured: &[(u32, u64, Duration)],
) -> WorkersReport {
    let rate = |steps: u64, wall: Duration| steps as f64 / wall.as_secs_f64();
    let one = measured
        .iter()
        .find(|(workers, _, _)| *workers == 1)
        .map(|&(_, steps, wall)| rate(steps, wall));
    let figures = measured
        .iter()
        .map(|&(workers, steps, wall)| {
            let steps_per_s = rate(steps, wall);
            WorkersFigure {
                workers,
                runs,
                steps,
                wall_s: wall.as_secs_f64(),
                steps_per_s,
                ratio_to_baseline: steps_per_s / baseline_per_s,
                speedup_over_one: one.map(|one| steps_per_s / one),
            }
        })
        .collect();
    WorkersReport {
        store: workload::postgres_store_name(server),
        durability: workload::POSTGRES_DURABILITY,
        baseline_what: crate::report::DATABASE_BASELINE,
        baseline_commits_per_s: baseline_per_s,
        steps_per_run: workload::CONCURRENT_RUN_STEPS,
        figures,
    }
}

impl WorkersReport {
    /// The report as an aligned Markdown table, preceded by what it was measured on.
    pub(crate) fn table(&self) -> String {
        let mut out = format!("store: {}\n", self.store);
        out.push_str(&format!("durability: {}\n", self.durability));
        out.push_str(&format!(
            "baseline: {:.0} commits/s, {} (measured once, before the workers)\n",
            self.baseline_commits_per_s, self.baseline_what
        ));
        out.push_str(&format!(
            "work: runs of {} no-op steps, shared evenly among the workers (one process and \
             engine each); timed from a common start, after every engine opened, until the \
             last worker's runs all completed\n\n",
            self.steps_per_run
        ));
        let header = [
            "workers",
            "runs",
            "steps",
            "wall time (s)",
            "steps/s",
            "ratio to baseline",
            "speed-up over 1 worker",
        ];
        let rows: Vec<[String; 7]> = self
            .figures
            .iter()
            .map(|f| {
                [
                    f.workers.to_string(),
                    f.runs.to_string(),
                    f.steps.to_string(),
                    format!("{:.3}", f.wall_s),
                    format!("{:.0}", f.steps_per_s),
                    format!("{:.2}x", f.ratio_to_baseline),
                    f.speedup_over_one
                        .map(|s| format!("{s:.2}x"))
                        .unwrap_or_default(),
                ]
            })
            .collect();
        out.push_str(&markdown_table(header, &rows, &[0, 1, 2, 3, 4, 5, 6]));
        out
    }
}

/// The child's side (`keel-bench workers-child`): opens an engine on the shared database,
/// prints `ready`, waits for `go` on stdin, starts its runs and waits until all of them
/// completed, prints `done <steps>`, and shuts the engine down. Progress and the engine's
/// warnings go to stderr, which the parent keeps in a log.
pub(crate) async fn child(args: ChildArgs) -> anyhow::Result<()> {
    keel_testkit::simcloud::load::init_child_tracing();
    let who = &args.prefix;
    let opening = Instant::now();
    let engine = workload::open_shared(&args.dir, &args.database).await?;
    eprintln!(
        "{who}: engine open in {:.3} s",
        opening.elapsed().as_secs_f64()
    );
    say("ready")?;
    let go = tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).map(|_| line)
    })
    .await??;
    if go.trim() != "go" {
        bail!("{who}: expected `go` from the parent, read {go:?} (did the parent go away?)");
    }
    let started = Instant::now();
    let input = StepsInput::noop(args.steps);
    start_concurrently::<Steps>(&engine, &args.prefix, args.runs, &input).await?;
    let all_started = started.elapsed();
    wait_all_completed(&engine, &args.prefix, args.runs).await?;
    let steps = u64::from(args.runs) * u64::from(args.steps);
    eprintln!(
        "{who}: {} runs started in {:.3} s, all completed ({steps} steps) in {:.3} s",
        args.runs,
        all_started.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    say(&format!("done {steps}"))?;
    let stopping = Instant::now();
    engine.shutdown().await;
    eprintln!(
        "{who}: shut down in {:.3} s",
        stopping.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Writes one line of the protocol to the parent.
fn say(line: &str) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout();
    writeln!(stdout, "{line}")?;
    stdout.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Speed-ups are relative to the one-worker measurement, ratios to the baseline.
    #[test]
    fn speedups_and_ratios() {
        let second = Duration::from_secs(1);
        let measured = [(1, 1000, second), (2, 1500, second), (3, 3000, 2 * second)];
        let report = report("postgres://u:secret@db:5432/x", 500.0, 100, &measured);
        let ratios: Vec<f64> = report.figures.iter().map(|f| f.ratio_to_baseline).collect();
        assert_eq!(ratios, [2.0, 3.0, 3.0]);
        let speedups: Vec<Option<f64>> =
            report.figures.iter().map(|f| f.speedup_over_one).collect();
        assert_eq!(speedups, [Some(1.0), Some(1.5), Some(1.5)]);
        let table = report.table();
        assert!(table.contains("PostgreSQL at db:5432/x"), "{table}");
        assert!(!table.contains("secret"), "{table}");
        assert!(table.contains("1.50x"), "{table}");
    }

    /// Without a one-worker measurement there is no speed-up to report.
    #[test]
    fn no_speedup_without_one_worker() {
        let measured = [(2, 1000, Duration::from_secs(1))];
        let report = report("postgres://db/x", 500.0, 100, &measured);
        assert_eq!(report.figures[0].speedup_over_one, None);
    }
}
