//! keel-bench's command line: the options and the subcommands, as clap parses them.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use keel_engine::Durability;

use crate::workers;

/// Measures Keel's engine (journaled steps/s, durable starts/s, resume after SIGKILL, memory
/// per sleeping run) at the default durability, each figure next to the disk's raw
/// append+fdatasync rate measured in the same run.
#[derive(Parser)]
#[command(
    name = "keel-bench",
    version,
    after_help = "Exit codes: 0 measured (whether or not targets are met), 1 failure, 2 bad usage."
)]
pub(crate) struct Cli {
    /// Directory in which a fresh data directory is created (and removed at the end). It
    /// decides which disk is measured: pick one on that disk, not a tmpfs.
    #[arg(long, env = "KEEL_BENCH_DIR", default_value = "target/bench-data")]
    pub(crate) dir: PathBuf,

    /// Smaller sizes for a quick look (the targets are set for the full sizes).
    #[arg(long)]
    pub(crate) quick: bool,

    /// Print the report as one JSON object instead of a table.
    #[arg(long, global = true)]
    pub(crate) json: bool,

    /// Measure the PostgreSQL store on this server instead of sled
    /// (`postgres://user:password@host:port/db`; the benchmark creates databases of its own
    /// on it): every figure is then a ratio to the server's rate of single-row INSERT + COMMIT
    /// from one connection, measured in the same run.
    #[arg(long, global = true, env = "KEEL_BENCH_STORE", hide_env_values = true)]
    pub(crate) store: Option<String>,

    #[command(subcommand)]
    pub(crate) command: Option<Command>,
}

#[derive(Subcommand)]
pub(crate) enum Command {
    /// Simulates (virtual time, no network, no disk) waiting for resources with a heavy-tailed
    /// readiness time: fixed sleep, fixed polling, exponential backoff and the learned policy,
    /// each waiting it out and recreating on its deadline.
    Waits {
        /// Seed of the readiness draws.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Resources waited for.
        #[arg(long, default_value_t = 1000)]
        resources: u32,
        /// Samples the learned policy learns from first.
        #[arg(long, default_value_t = 200)]
        warm_up: u32,
        /// Fraction of resources that are outliers (3-12x the mean readiness time), in the
        /// synthetic distribution.
        #[arg(long, default_value_t = 0.01)]
        outlier_rate: f64,
        /// Instead of the synthetic distribution, each operation the BOSH AWS CPI's operators
        /// published (create instance, delete instance, create volume, attach volume), fitted
        /// as a heavy-tailed distribution with the published outliers.
        #[arg(long, conflicts_with = "outlier_rate")]
        cpi: bool,
    },
    /// Onboards a fleet (`iot.onboard-fleet`) against moto's server through the fault proxy,
    /// which throttles a fraction of every call; reports duration and API calls. Needs
    /// Python 3 with `moto[server]` (see docs/testing.md).
    Fleet {
        /// Devices in the fleet.
        #[arg(long, default_value_t = 200)]
        devices: usize,
        /// Devices onboarded at once.
        #[arg(long, default_value_t = 16)]
        concurrency: u32,
        /// Fraction of calls throttled (0 to 1).
        #[arg(long, default_value_t = 0.2)]
        throttle: f64,
        /// Seed of the proxy's draws.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Provisions machines with disks (`ec2.machine-with-disk`) against moto's server through
    /// the fault proxy, which plays the BOSH AWS CPI's published latencies (scaled) for
    /// instances and volumes; reports the engine's statistics in the CPI's table, time to a
    /// usable machine and recreations, and checks moto. Needs Python 3 with `moto[server]`.
    Machines {
        /// Machines in all.
        #[arg(long, default_value_t = 100)]
        machines: usize,
        /// Waves they start in (later waves wait by the schedule learned from earlier ones).
        #[arg(long, default_value_t = 5)]
        waves: usize,
        /// The CPI's durations times this (at least 0.1).
        #[arg(long, default_value_t = 0.1)]
        scale: f64,
        /// Fraction of EC2 calls throttled.
        #[arg(long, default_value_t = 0.05)]
        throttle: f64,
        /// Fraction of EC2 calls whose answer is lost after they took effect.
        #[arg(long, default_value_t = 0.05)]
        lost: f64,
        /// Seed of the draws.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Runs many concurrent BOSH-like runs (create an instance, wait until it runs, create a
    /// volume, wait until it is available, attach) against a simulated EC2-like cloud
    /// (heavy-tailed readiness with a median of 2 s, lying reads, random throttling, a
    /// capacity), with the engine in a child process SIGKILLed at random moments and
    /// restarted until every run settles. Reports healthy resources recreated, healthy runs
    /// compensated, the cloud's accepted calls/s while busy against its capacity, time to a
    /// usable machine and probes per resource.
    Load {
        /// Concurrent runs.
        #[arg(long, default_value_t = 100)]
        runs: u32,
        /// Multiplies every time constant (readiness, polling, deadlines, lives and downtime
        /// of the engine's process); 1.0 is EC2-like.
        #[arg(long, default_value_t = 1.0)]
        time_scale: f64,
        /// SIGKILLs of the engine's process, each after 5-20 s (scaled) of life.
        #[arg(long, default_value_t = 3)]
        kills: u32,
        /// How long the engine stays down after each kill [default: 5000 x time-scale].
        #[arg(long)]
        downtime_ms: Option<u64>,
        /// The cloud's capacity in calls/s (a token bucket of as many calls).
        #[arg(long, default_value_t = 25.0)]
        capacity: f64,
        /// Fraction of every call the cloud throttles at random (0 to 1).
        #[arg(long, default_value_t = 0.05)]
        throttle: f64,
        /// Samples of a wait kind before its waits learn their schedule (0: never)
        /// [default: half the runs].
        #[arg(long)]
        learn_after: Option<u64>,
        /// Fix the engine's limiter at this many calls/s instead of its AIMD defaults (to
        /// tell the waits' defects from the limiter's).
        #[arg(long)]
        fixed_rate: Option<f64>,
        /// Seed of the cloud's draws and of the kill moments.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Keep the engine's store and the children's logs, and print where.
        #[arg(long)]
        keep: bool,
    },
    /// What the web console asks of a worker whose store holds many runs: fills a sled store
    /// (most runs completed; compensated, failed, asleep, paused and parents with children
    /// among them), starts `keel worker` on it (the binary beside this one) and times each
    /// request the console makes: pages, every filter, the counts per status, a history.
    Console {
        /// Runs in the store, children included.
        #[arg(long, default_value_t = 100_000)]
        runs: u32,
        /// Times each request is made.
        #[arg(long, default_value_t = 10)]
        repeats: u32,
    },
    /// The resident memory of an idle `keel worker` (the binary beside this one): started on
    /// an empty store, then on a store of `--runs` runs filled as `console` fills it (most
    /// settled, some asleep and parked, some paused), each `--repeats` times; measured
    /// `--settle-s` after its API first answers.
    Idle {
        /// Runs in the second store, children included (0: the empty store only).
        #[arg(long, default_value_t = 10_000)]
        runs: u32,
        /// Workers started on each store.
        #[arg(long, default_value_t = 3)]
        repeats: u32,
        /// Seconds between the API's first answer and the measurement.
        #[arg(long, default_value_t = 10)]
        settle_s: u64,
    },
    /// What a commit could cost if its log never grew: 200-byte appends + `fdatasync` (the
    /// baseline) against 200-byte writes into space written beforehand + `fdatasync`,
    /// alternating, `--rounds` times on the same disk (issue 28, item 4's ceiling).
    Disk {
        /// Rounds, each measuring both.
        #[arg(long, default_value_t = 3)]
        rounds: u32,
    },
    /// Where a step's CPU goes: the concurrent phase of the main benchmark (runs of 10 no-op
    /// steps started from 100 callers), repeated in one process on fresh stores, with the CPU
    /// per step of the whole process and of each group of threads (tokio workers, committer,
    /// sled's IO threads, the rest). `--durability process-crash` takes the device's waits out.
    Cpu {
        /// Concurrent runs in each repeat.
        #[arg(long, default_value_t = 1000)]
        runs: u32,
        /// No-op steps of each run. With 0 the runs only start and settle, and every figure
        /// is per run (what a durable start costs) instead of per step.
        #[arg(long, default_value_t = 10)]
        steps: u32,
        /// Repeats, each on a fresh store.
        #[arg(long, default_value_t = 5)]
        repeats: u32,
        /// `power-loss` (the default durability) or `process-crash`.
        #[arg(long, default_value = "power-loss", value_parser = parse_durability)]
        durability: Durability,
        /// Each step's output this many bytes long (as JSON, up to the engine's limit on a
        /// step's output; 2 at least, a string's quotes) instead of none: journal entries as
        /// large as a step's may be.
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=STEP_OUTPUT_BYTES_MAX))]
        output_bytes: u32,
        /// Bound sled's cache to this many MiB; the engine's default (32 MiB) otherwise. At
        /// least 8, the engine's least.
        #[arg(long, value_name = "MIB", value_parser = cache_mib())]
        cache_mib: Option<u64>,
    },
    /// What runs that wait cost in memory: RSS before open, open and idle, and with every
    /// run waiting (on a 1-day timer, for an event never sent, for a child run that waits
    /// for one, or between two hourly polls of a resource), with the runs loaded and parked.
    /// The runs start in two halves: the report also has what each run of the second half
    /// added, on top of the first half waiting.
    /// Measures the sled store, or PostgreSQL with `--store` (then a reopened engine must
    /// hold none of the runs: they wait in the database until due).
    Memory {
        /// Runs that wait.
        #[arg(long, default_value_t = 10_000)]
        runs: u32,
        /// What they wait for.
        #[arg(long, value_enum, default_value = "timer")]
        wait: crate::memory::WaitKind,
        /// Runs never park (every waiting run keeps its cell and driver).
        #[arg(long)]
        no_park: bool,
        /// Then shut the engine down, open it again on the same store and time it until
        /// every run waits again.
        #[arg(long)]
        reopen: bool,
        /// Keep the store (its path is in the report), to be opened again with
        /// `--reopen-only`.
        #[arg(long)]
        keep: bool,
        /// Bound sled's cache to this many MiB (`EngineBuilder::sled_cache_bytes`); the
        /// engine's default (32 MiB) otherwise, `--cache-mib 1024` for sled's own. At least
        /// 8, the engine's least.
        #[arg(long, value_name = "MIB", value_parser = cache_mib())]
        cache_mib: Option<u64>,
        /// Start nothing: open the store a `--keep` run left in this directory (of `--runs`
        /// waiting runs) and time it until every run waits again.
        #[arg(long, value_name = "DIR", conflicts_with_all = ["keep", "reopen", "no_park"])]
        reopen_only: Option<std::path::PathBuf>,
        /// With `--reopen-only`: open the store as after a crash (without the run counts a
        /// clean close leaves), so that the open counts every run.
        #[arg(long, requires = "reopen_only")]
        after_crash: bool,
        /// After a reopen, keep the engine open this many seconds more (its garbage
        /// collection reads every record at open) and report RSS then.
        #[arg(long, value_name = "SECS", default_value_t = 0)]
        linger: u64,
    },
    /// The engine's process of `load`, configured by its environment.
    #[command(hide = true)]
    LoadChild,
    /// Throughput of 1, 2, 3... engines (workers), each in a process of its own, sharing one
    /// fresh PostgreSQL database per count: concurrent runs of 10 no-op steps shared among
    /// them, timed from a common start after every engine opened until the last run
    /// completed. Reports steps/s, its ratio to the server's INSERT + COMMIT rate from one
    /// connection (measured once, first) and the speed-up over one worker. Needs --store.
    Workers(workers::WorkersArgs),
    /// One worker of `workers`: opens an engine on the shared database, says `ready`, waits
    /// for `go` on stdin, runs its share and says `done <steps>`.
    #[command(hide = true)]
    WorkersChild(workers::ChildArgs),
    /// The child of the resume measurement: fills a store with sleeping runs, prints `ready`
    /// and waits to be killed.
    #[command(hide = true)]
    Populate {
        /// The engine's data directory.
        #[arg(long)]
        dir: PathBuf,
        /// How many runs to start.
        #[arg(long)]
        runs: u32,
        /// When every run's timer expires, in ms since the Unix epoch.
        #[arg(long)]
        wake_at_ms: u64,
    },
}

/// `--durability`'s value.
pub(crate) fn parse_durability(value: &str) -> Result<Durability, String> {
    match value {
        "power-loss" => Ok(Durability::PowerLoss),
        "process-crash" => Ok(Durability::ProcessCrash),
        _ => Err(format!(
            "{value:?} is not a durability: say power-loss or process-crash"
        )),
    }
}

/// A step's output may be this many bytes, as JSON (`limits::STEP_OUTPUT_BYTES_MAX`).
const STEP_OUTPUT_BYTES_MAX: i64 = keel_engine::limits::STEP_OUTPUT_BYTES_MAX as i64;

/// `--cache-mib`'s parser: from the engine's least bound on sled's cache to 1 TiB.
fn cache_mib() -> clap::builder::RangedU64ValueParser<u64> {
    clap::value_parser!(u64).range((keel_engine::limits::SLED_CACHE_BYTES_MIN >> 20)..=1_048_576)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::{Cli, Command};

    #[test]
    fn a_cache_under_the_engines_least_is_refused_by_name() {
        let refused = match Cli::try_parse_from(["keel-bench", "memory", "--cache-mib", "4"]) {
            Ok(_) => panic!("--cache-mib 4 was taken"),
            Err(error) => error.to_string(),
        };
        assert!(refused.contains("--cache-mib"), "{refused}");
        assert!(refused.contains("8.."), "{refused}");
        let taken = Cli::try_parse_from(["keel-bench", "memory", "--cache-mib", "8"]).unwrap();
        assert!(matches!(
            taken.command,
            Some(Command::Memory {
                cache_mib: Some(8),
                ..
            })
        ));
        let refused = match Cli::try_parse_from(["keel-bench", "cpu", "--cache-mib", "4"]) {
            Ok(_) => panic!("cpu --cache-mib 4 was taken"),
            Err(error) => error.to_string(),
        };
        assert!(refused.contains("--cache-mib"), "{refused}");
    }

    #[test]
    fn an_output_over_a_steps_limit_is_refused_by_name() {
        let over = (keel_engine::limits::STEP_OUTPUT_BYTES_MAX + 1).to_string();
        let refused = match Cli::try_parse_from(["keel-bench", "cpu", "--output-bytes", &over]) {
            Ok(_) => panic!("--output-bytes {over} was taken"),
            Err(error) => error.to_string(),
        };
        assert!(refused.contains("--output-bytes"), "{refused}");
    }
}
