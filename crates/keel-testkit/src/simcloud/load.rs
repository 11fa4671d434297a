//! The load scenario: many concurrent [`ProvisionMachine`] runs against the simulated cloud,
//! with the engine in a child process that is killed (SIGKILL) at seeded random moments, left
//! down for a while, and restarted, until every run settles. The cloud lives in the calling
//! (parent) process, so its ground truth survives every kill; after the last child the parent
//! reads the store and compares what the runs say with what the cloud saw ([`LoadReport`]).
//!
//! The child is either the current test binary filtered to one test (which checks
//! [`crate::crash::is_child`] and calls [`child_main`]) or any program that calls
//! [`run_child`] (`keel-bench load-child`); it reads its configuration from
//! [`CHILD_CONFIG_ENV`].

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use keel_engine::{Engine, EngineError, Event, RateLimit, WaitOutcome};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::client::SimClient;
use super::machine::{Machine, MachineSpec, ProvisionMachine, STEPS};
use super::model::CloudConfig;
use super::report::{Life, LimiterSample, LoadReport, RunFacts};
use super::server::{now_ms, CloudServer};
use super::SERVICE;

/// The environment variable that carries a child's [`ChildConfig`] (JSON).
pub const CHILD_CONFIG_ENV: &str = "KEEL_SIMCLOUD_LOAD";

/// How often a child records its limiter's rate.
const SAMPLE_INTERVAL: Duration = Duration::from_millis(250);

/// The scenario's knobs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoadParams {
    /// Concurrent runs, all started at once.
    pub runs: u32,
    /// The cloud.
    pub cloud: CloudConfig,
    /// How each run waits.
    pub machine: MachineSpec,
    /// SIGKILLs of the engine's process (fewer if the runs settle first).
    pub kills: u32,
    /// Each killed child lives a time drawn uniformly from `[life_min_ms, life_max_ms)`.
    pub life_min_ms: u64,
    /// See `life_min_ms`.
    pub life_max_ms: u64,
    /// The engine stays down this long after each kill.
    pub downtime_ms: u64,
    /// Seeds the kill moments.
    pub seed: u64,
    /// The last child must settle every run within this.
    pub settle_timeout_ms: u64,
    /// The engine's limiter settings for the cloud's service; `None`: the engine's defaults.
    /// (A limiter fixed near the capacity shows what the waits do when the limiter is right.)
    pub engine_rate_limit: Option<RateLimit>,
}

impl LoadParams {
    /// The scenario with `runs` runs, every time constant multiplied by `time_scale`
    /// (1.0: EC2-like times): the [`CloudConfig::EC2`] cloud (readiness median 2 s, 25 calls/s,
    /// 5% random throttling); waits polling every second with 2 confirmations and a 15 s
    /// deadline, learned (deadline twice p90) once half the runs have given a sample, 3
    /// generations; 3 kills after 5-20 s of life each, 5 s down after each (a supervisor's
    /// restart).
    pub fn scenario(runs: u32, time_scale: f64) -> LoadParams {
        let ms = |v: u64| ((v as f64) * time_scale).round().max(1.0) as u64;
        LoadParams {
            runs,
            cloud: CloudConfig::EC2.time_scaled(time_scale),
            machine: MachineSpec {
                generations: 3,
                confirmations: 2,
                poll_interval_ms: ms(1_000),
                wait_timeout_ms: ms(15_000),
                learn_after: Some(u64::from(runs / 2).max(1)),
            },
            kills: 3,
            life_min_ms: ms(5_000),
            life_max_ms: ms(20_000),
            downtime_ms: ms(5_000),
            seed: 1,
            settle_timeout_ms: 900_000,
            engine_rate_limit: None,
        }
    }
}

/// A limiter that never changes its rate: what a limiter that knew the capacity would do.
pub fn fixed_rate_limit(per_s: f64) -> RateLimit {
    RateLimit {
        initial_per_s: per_s,
        min_per_s: per_s,
        max_per_s: per_s,
        ..RateLimit::default()
    }
}

/// What a child needs: where the store is, where the cloud is, what to run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ChildConfig {
    /// The engine's data directory.
    pub data_dir: PathBuf,
    /// The cloud's loopback address.
    pub cloud: SocketAddr,
    /// Runs `machine-000` ... to start (idempotently) and wait for.
    pub runs: u32,
    /// The runs' input.
    pub spec: MachineSpec,
    /// Where to append the limiter's rate samples (JSON lines).
    pub samples: PathBuf,
    /// The limiter settings of [`SERVICE`]; `None`: the engine's defaults.
    pub rate_limit: Option<RateLimit>,
}

/// How the scenario failed to run (not what it measured).
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A file or process operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The engine refused something.
    #[error("{what}: {source}")]
    Engine {
        /// What was being done.
        what: String,
        /// The error (boxed: it is large).
        #[source]
        source: Box<EngineError>,
    },
    /// A child exited other than by success or our SIGKILL.
    #[error("engine child {life} ended with {status}; its log {log} ends with:\n{tail}")]
    Child {
        /// Which child (from 0).
        life: u32,
        /// How it ended.
        status: String,
        /// Its stderr.
        log: PathBuf,
        /// The end of it.
        tail: String,
    },
    /// The last child did not settle every run in time.
    #[error("engine child {life} did not settle every run within {waited:?}; its log {log} ends with:\n{tail}")]
    Unsettled {
        /// Which child.
        life: u32,
        /// How long it was given.
        waited: Duration,
        /// Its stderr.
        log: PathBuf,
        /// The end of it.
        tail: String,
    },
    /// The child's configuration is missing or malformed.
    #[error("{CHILD_CONFIG_ENV}: {0}")]
    Config(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LoadError {
    let what = what.into();
    move |source| LoadError::Io { what, source }
}

fn refused(what: impl Into<String>) -> impl FnOnce(EngineError) -> LoadError {
    let what = what.into();
    move |source| LoadError::Engine {
        what,
        source: Box::new(source),
    }
}

/// The id of run `i`.
pub fn run_id(i: u32) -> String {
    format!("machine-{i:03}")
}

/// What to run as the engine's process.
#[derive(Clone, Debug)]
pub enum ChildProgram {
    /// The current test binary, filtered to this test, which checks
    /// [`crate::crash::is_child`] and calls [`child_main`].
    TestBinary {
        /// The test's exact name.
        test_name: String,
    },
    /// A program with arguments that calls [`run_child`].
    Program {
        /// The executable.
        path: PathBuf,
        /// Its arguments.
        args: Vec<String>,
    },
}

impl ChildProgram {
    fn command(&self) -> Result<Command, LoadError> {
        Ok(match self {
            ChildProgram::TestBinary { test_name } => {
                let exe = std::env::current_exe().map_err(io("finding the test binary"))?;
                let mut command = Command::new(exe);
                command
                    .args([
                        test_name.as_str(),
                        "--exact",
                        "--nocapture",
                        "--test-threads=1",
                    ])
                    .env(crate::crash::CHILD_ENV, "1");
                command
            }
            ChildProgram::Program { path, args } => {
                let mut command = Command::new(path);
                command.args(args);
                command
            }
        })
    }
}

/// Runs the scenario in `dir` (the engine's store, the children's logs and samples go there)
/// and reports what the ground truth says. Must be called inside a tokio runtime with timers
/// and I/O, which serves the cloud.
pub async fn run(
    params: &LoadParams,
    program: &ChildProgram,
    dir: &Path,
) -> Result<LoadReport, LoadError> {
    let server = CloudServer::start(params.cloud.clone())
        .await
        .map_err(io("starting the simulated cloud"))?;
    let config = ChildConfig {
        data_dir: dir.join("data"),
        cloud: server.addr(),
        runs: params.runs,
        spec: params.machine.clone(),
        samples: dir.join("limiter.jsonl"),
        rate_limit: params.engine_rate_limit.clone(),
    };
    let lives = drive(params, program, &config, dir).await?;
    let runs = read_runs(&config.data_dir, params.runs).await?;
    let samples = read_samples(&config.samples);
    let truth = server.truth();
    let report = LoadReport::new(params, &truth, &runs, &lives, &samples);
    // For a post-mortem of a kept directory: what the cloud saw, and the figures.
    for (name, json) in [
        ("truth.json", serde_json::to_vec(&truth)),
        ("report.json", serde_json::to_vec_pretty(&report)),
    ] {
        let path = dir.join(name);
        let json = json.expect("the ground truth and the report serialise");
        std::fs::write(&path, json).map_err(io(format!("writing {}", path.display())))?;
    }
    Ok(report)
}

/// Spawns a child per life: the first `params.kills` are SIGKILLed after a seeded random
/// life and left down for `params.downtime_ms` (unless every run settles first); the last
/// must settle every run within `params.settle_timeout_ms`.
async fn drive(
    params: &LoadParams,
    program: &ChildProgram,
    config: &ChildConfig,
    dir: &Path,
) -> Result<Vec<Life>, LoadError> {
    let config = serde_json::to_string(config).expect("the child configuration serialises");
    let mut rng = StdRng::seed_from_u64(params.seed);
    let mut lives = Vec::new();
    for life in 0..=params.kills {
        let last = life == params.kills;
        let log = dir.join(format!("child-{life}.log"));
        let stderr = File::create(&log).map_err(io(format!("creating {}", log.display())))?;
        let spawned_at_ms = now_ms();
        let mut child = program
            .command()?
            .env(CHILD_CONFIG_ENV, &config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(io("spawning the engine child"))?;
        let allowed_ms = if last {
            params.settle_timeout_ms
        } else {
            rng.gen_range(params.life_min_ms..params.life_max_ms.max(params.life_min_ms + 1))
        };
        let allowed = Duration::from_millis(allowed_ms);
        match exited_within(&mut child, allowed).await? {
            Some(status) if status.success() => {
                lives.push(Life {
                    spawned_at_ms,
                    killed_at_ms: None,
                });
                return Ok(lives);
            }
            Some(status) => {
                let status = status.to_string();
                let tail = tail(&log);
                return Err(LoadError::Child {
                    life,
                    status,
                    log,
                    tail,
                });
            }
            None => {
                let _ = child.kill(); // SIGKILL
                let _ = child.wait();
                if last {
                    let tail = tail(&log);
                    let waited = allowed;
                    return Err(LoadError::Unsettled {
                        life,
                        waited,
                        log,
                        tail,
                    });
                }
                lives.push(Life {
                    spawned_at_ms,
                    killed_at_ms: Some(now_ms()),
                });
                tokio::time::sleep(Duration::from_millis(params.downtime_ms)).await;
            }
        }
    }
    unreachable!("the last life returns")
}

/// Waits up to `allowed` for `child` to exit; `None` if it is still running.
async fn exited_within(
    child: &mut Child,
    allowed: Duration,
) -> Result<Option<ExitStatus>, LoadError> {
    let deadline = Instant::now() + allowed;
    loop {
        if let Some(status) = child.try_wait().map_err(io("polling the engine child"))? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The last lines of a child's log.
fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// What the store says about each run, read by an engine that drives nothing.
async fn read_runs(data: &Path, runs: u32) -> Result<Vec<RunFacts>, LoadError> {
    let engine = Engine::builder(data)
        .allow_unregistered()
        .open()
        .await
        .map_err(refused("opening the store to read the runs"))?;
    let mut facts = Vec::new();
    for i in 0..runs {
        let id = run_id(i);
        let history = engine
            .history(&id)
            .await
            .map_err(refused(format!("reading run {id}")))?;
        let mut wait_timeouts = 0;
        for entry in &history.entries {
            if let Event::WaitEnded {
                outcome: WaitOutcome::TimedOut { .. },
                ..
            } = entry.event
            {
                wait_timeouts += 1;
            }
        }
        let machine: Option<Machine> = history
            .run
            .output
            .clone()
            .and_then(|v| serde_json::from_value(v).ok());
        facts.push(RunFacts {
            id,
            status: history.run.status,
            created_at_ms: history.run.created_at_ms,
            finished_at_ms: history.run.finished_at_ms,
            error: history.run.error.clone(),
            wait_timeouts,
            machine,
        });
    }
    engine.shutdown().await;
    Ok(facts)
}

fn read_samples(path: &Path) -> Vec<LimiterSample> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}

/// The child's configuration, from [`CHILD_CONFIG_ENV`].
pub fn child_config() -> Result<ChildConfig, LoadError> {
    let text = std::env::var(CHILD_CONFIG_ENV).map_err(|e| LoadError::Config(e.to_string()))?;
    serde_json::from_str(&text).map_err(|e| LoadError::Config(e.to_string()))
}

/// The child's whole life, for a test binary: reads its configuration, runs [`run_child`] on
/// the crash harness's runtime, and panics on failure (the parent reports the log).
pub fn child_main() {
    let config = child_config().expect("the child's configuration");
    init_child_tracing();
    crate::crash::runtime()
        .block_on(run_child(&config))
        .expect("the engine child");
}

/// Logs to stderr (the parent keeps it in `child-<n>.log`), at `RUST_LOG` or warn.
pub fn init_child_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
}

/// Opens the engine (its limiter settings for [`SERVICE`]), starts every run (a
/// restarted child starts the same ids: the same runs), records the limiter's rate every
/// 250 ms, and returns once every run has settled.
pub async fn run_child(config: &ChildConfig) -> Result<(), LoadError> {
    let engine = Engine::builder(&config.data_dir)
        .workflow::<ProvisionMachine>()
        .steps(STEPS)
        .resource(SimClient::new(config.cloud))
        .rate_limit(SERVICE, config.rate_limit.clone().unwrap_or_default())
        .open()
        .await
        .map_err(refused("opening the engine"))?;
    let sampler = tokio::spawn(sample_limiter(engine.clone(), config.samples.clone()));
    let mut handles = Vec::new();
    for i in 0..config.runs {
        let id = run_id(i);
        let handle = engine
            .start::<ProvisionMachine>(&id, config.spec.clone())
            .await
            .map_err(refused(format!("starting run {id}")))?;
        handles.push(handle);
    }
    for handle in handles {
        match handle.result().await {
            Ok(_) | Err(EngineError::RunEnded { .. }) => {}
            Err(e) => return Err(refused(format!("waiting for run {}", handle.id()))(e)),
        }
    }
    sampler.abort();
    engine.shutdown().await;
    Ok(())
}

/// Appends the limiter's rate to `path` every [`SAMPLE_INTERVAL`], until aborted.
async fn sample_limiter(engine: Engine, path: PathBuf) {
    let limiter = engine.rate_limiter(SERVICE);
    let Ok(mut file) = OpenOptions::new().create(true).append(true).open(&path) else {
        return;
    };
    loop {
        let sample = LimiterSample {
            at_ms: now_ms(),
            rate: limiter.rate(),
            throttles: limiter.throttles(),
        };
        let mut line = serde_json::to_vec(&sample).expect("samples serialise");
        line.push(b'\n');
        let _ = file.write_all(&line);
        tokio::time::sleep(SAMPLE_INTERVAL).await;
    }
}
