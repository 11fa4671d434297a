//! `keel-bench console`: what the web console asks of a worker whose store holds many runs.
//!
//! A store is filled in this process with `runs` runs of every kind the console lists (most
//! completed; 1% compensated, failed and asleep each; 0.1% paused; a parent with ten children
//! per 110 runs), then a real `keel worker` (the binary beside this one) is started on it and
//! every request the console makes is timed over HTTP: the first page, a page deep in the
//! list, each filter, the counts per status, one run's history, each `repeats` times. The
//! worker's CPU time per request is read from `/proc`, so the cost of a console left open
//! (the list every second, the counts every 5 s) can be read as a share of a core.
//!
//! Durations are also given in baseline appends (the disk's 200-byte append + fdatasync,
//! measured before and after), like every other figure of the benchmark.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use keel_engine::{Ctx, Engine, RunStatus, Workflow, WorkflowError};
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;

use crate::measure;
use crate::report::{markdown_table, Baseline};
use crate::system;
use crate::workload::{self, Noop, Steps, StepsInput, CALLERS};

/// The workflow of every run but the plain completed ones: what it does is its input.
pub(crate) struct Listed;

/// What a [`Listed`] run does.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub(crate) enum Mode {
    /// A step, then fails: compensated.
    Undo,
    /// Fails before any step: failed.
    Fail,
    /// A step, then sleeps a day: running (or paused, once paused).
    Sleep,
    /// Ten children that each take a step: completed, with children.
    Parent,
    /// A step: completed (a parent's child).
    Child,
}

/// Children of each parent run.
const CHILDREN: u32 = 10;

impl Workflow for Listed {
    const NAME: &'static str = "bench.listed";
    type Input = Mode;
    type Output = ();
    async fn run(ctx: &mut Ctx, mode: Mode) -> Result<(), WorkflowError> {
        match mode {
            Mode::Undo => {
                ctx.step(Noop(0)).await?;
                Err(WorkflowError::failed("the benchmark's compensated run"))
            }
            Mode::Fail => Err(WorkflowError::failed("the benchmark's failed run")),
            Mode::Sleep => {
                ctx.step(Noop(0)).await?;
                ctx.sleep(Duration::from_secs(86_400)).await
            }
            Mode::Parent => {
                let children = vec![Mode::Child; CHILDREN as usize];
                for child in ctx.children::<Listed>(children, CHILDREN as usize).await? {
                    child?;
                }
                Ok(())
            }
            Mode::Child => ctx.step(Noop(0)).await.map(|_| ()),
        }
    }
}

/// What to measure.
#[derive(Clone, Copy, Debug, Serialize)]
pub(crate) struct ConsoleParams {
    /// Runs in the store, children included.
    pub runs: u32,
    /// Times each request is made.
    pub repeats: u32,
}

/// The kind of top-level run number `n`, and whether it is paused once asleep.
fn mode_of(n: u32) -> Option<(Mode, bool)> {
    match n % 100 {
        0 => Some((Mode::Parent, false)),
        1 => Some((Mode::Undo, false)),
        2 => Some((Mode::Fail, false)),
        3 => Some((Mode::Sleep, false)),
        4 if n % 1000 == 4 => Some((Mode::Sleep, true)),
        _ => None,
    }
}

/// The id of top-level run number `n` (zero-padded, so that id order is number order).
fn id_of(n: u32) -> String {
    format!("c-{n:07}")
}

/// Runs in all, children included, of `top` top-level runs: every hundredth is a parent.
fn with_children(top: u32) -> u32 {
    top + top.div_ceil(100) * CHILDREN
}

/// How many top-level runs make at most `runs` runs with their children.
fn top_level(runs: u32) -> u32 {
    let mut n = runs;
    while with_children(n) > runs {
        n -= 1;
    }
    n
}

/// One request's timings.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Timed {
    /// What the console asks, in words.
    pub what: String,
    /// The request's path and query.
    pub path: String,
    /// Runs in the answer (a page's, or the total of the counts).
    pub answered: u64,
    /// Median wall time, ms.
    pub median_ms: f64,
    /// Slowest, ms.
    pub max_ms: f64,
    /// The worker's CPU time per request (user + system), ms.
    pub cpu_ms: f64,
    /// The median in baseline appends.
    pub median_in_baseline_appends: f64,
}

/// The measurement.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct ConsoleReport {
    /// What ran.
    pub params: ConsoleParams,
    /// Runs in the store by status, as the worker counted them.
    pub counts: serde_json::Value,
    /// Filling the store, s.
    pub populate_s: f64,
    /// From starting `keel worker` until its API answered, s.
    pub worker_ready_s: f64,
    /// The worker's resident memory after every request, bytes.
    pub worker_rss_bytes: u64,
    /// Every request.
    pub requests: Vec<Timed>,
    /// The disk's raw append+fdatasync rate, before and after.
    pub baseline: Baseline,
}

/// Fills a store under `dir`, starts `keel worker` on it and times the console's requests.
pub(crate) async fn run(dir: &Path, params: ConsoleParams) -> anyhow::Result<ConsoleReport> {
    let keel = keel_binary()?;
    let before = measure::baseline(dir, "console-baseline-before")?;
    let data = tempfile::Builder::new()
        .prefix("console-")
        .tempdir_in(dir)
        .with_context(|| format!("creating a data directory in {}", dir.display()))?;
    // The worker keeps its store in `journal` under its data directory.
    let worker_dir = data.path().join("worker");
    let store = worker_dir.join("journal");

    let started = Instant::now();
    populate(&store, params.runs).await?;
    let populate_s = started.elapsed().as_secs_f64();
    eprintln!("  filled in {populate_s:.1} s");

    let started = Instant::now();
    let worker = Worker::start(&keel, &worker_dir)?;
    let worker_ready_s = started.elapsed().as_secs_f64();
    eprintln!("  keel worker answering after {worker_ready_s:.2} s");

    let top = top_level(params.runs);
    let middle = id_of(top / 2);
    let parent = id_of(0);
    let day_ms = 86_400_000;
    let counts: serde_json::Value = worker.get("/v1/runs:counts")?;
    let created = worker.get::<serde_json::Value>(&format!("/v1/runs/{middle}"))?;
    let created_ms = created["created_at_ms"]
        .as_u64()
        .context("the middle run's created_at_ms")?;
    let requests = [
        ("first page", "/v1/runs?limit=50".to_string()),
        (
            "a page from the middle",
            format!("/v1/runs?limit=50&after={middle}"),
        ),
        (
            "status: completed (most)",
            "/v1/runs?limit=50&status=completed".into(),
        ),
        (
            "status: failed (1%)",
            "/v1/runs?limit=50&status=failed".into(),
        ),
        (
            "status: paused (0.1%)",
            "/v1/runs?limit=50&status=paused".into(),
        ),
        (
            "status: suspended (none)",
            "/v1/runs?limit=50&status=suspended".into(),
        ),
        (
            "workflow: bench.listed (5%)",
            "/v1/runs?limit=50&workflow=bench.listed".into(),
        ),
        (
            "workflow: none such",
            "/v1/runs?limit=50&workflow=none.such".into(),
        ),
        (
            "id prefix (100 runs)",
            format!("/v1/runs?limit=50&prefix={}", &middle[..7]),
        ),
        (
            "parent (10 children)",
            format!("/v1/runs?limit=50&parent={parent}"),
        ),
        (
            "created in the last second before the middle",
            format!(
                "/v1/runs?limit=50&created_after={}&created_before={}",
                rfc3339(created_ms.saturating_sub(1000)),
                rfc3339(created_ms + 1)
            ),
        ),
        (
            "created more than a day ago (none)",
            format!(
                "/v1/runs?limit=50&created_before={}",
                rfc3339(created_ms - day_ms)
            ),
        ),
        ("counts per status", "/v1/runs:counts".into()),
        ("a parent's history", format!("/v1/runs/{parent}/history")),
        ("the console's page", "/ui/".into()),
    ];
    let mut timed = Vec::new();
    for (what, path) in requests {
        let t = worker.time(what, &path, params.repeats)?;
        eprintln!(
            "  {what:<46} median {:>8.1} ms  max {:>8.1} ms  cpu {:>7.1} ms  ({} runs)",
            t.median_ms, t.max_ms, t.cpu_ms, t.answered
        );
        timed.push(t);
    }
    let worker_rss_bytes = worker.rss_bytes()?;
    drop(worker);

    let after = measure::baseline(dir, "console-baseline-after")?;
    let baseline = Baseline::new(before, after);
    for t in &mut timed {
        t.median_in_baseline_appends = t.median_ms / 1000.0 * baseline.mean_per_s;
    }
    Ok(ConsoleReport {
        params,
        counts,
        populate_s,
        worker_ready_s,
        worker_rss_bytes,
        requests: timed,
        baseline,
    })
}

/// `ms` since the Unix epoch as the API takes times: RFC 3339, UTC.
fn rfc3339(ms: u64) -> String {
    let at = std::time::UNIX_EPOCH + Duration::from_millis(ms);
    humantime::format_rfc3339_millis(at).to_string()
}

/// The `keel` binary built beside this one.
pub(crate) fn keel_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("finding this binary")?;
    let keel = exe.with_file_name("keel");
    if !keel.exists() {
        bail!(
            "{} is missing: build the worker in the same profile (cargo build --release -p keel-worker -p keel-bench)",
            keel.display()
        );
    }
    Ok(keel)
}

/// Starts the store's runs from [`CALLERS`] tasks, waits until each has settled (the asleep
/// ones asleep, the paused ones paused) and shuts the engine down.
pub(crate) async fn populate(store: &Path, runs: u32) -> anyhow::Result<()> {
    let engine = workload::open(store).await?;
    let top = top_level(runs);
    let runs = with_children(top);
    eprintln!("  filling the store: {top} top-level runs, {runs} in all...");
    let mut callers = JoinSet::new();
    for caller in 0..CALLERS.min(top) {
        let engine = engine.clone();
        callers.spawn(async move {
            for n in (caller..top).step_by(CALLERS as usize) {
                let id = id_of(n);
                match mode_of(n) {
                    Some((mode, _)) => engine.start::<Listed>(&id, mode).await.map(|_| ())?,
                    None => engine
                        .start::<Steps>(&id, StepsInput::noop(1))
                        .await
                        .map(|_| ())?,
                }
            }
            anyhow::Ok(())
        });
    }
    while let Some(caller) = callers.join_next().await {
        caller.context("a starting task panicked")??;
    }
    let asleep = (0..top)
        .filter(|&n| matches!(mode_of(n), Some((Mode::Sleep, _))))
        .count() as u64;
    settle(&engine, u64::from(runs), |c| {
        count(c, RunStatus::Running) == asleep && count(c, RunStatus::Compensating) == 0
    })
    .await?;
    let to_pause: Vec<u32> = (0..top)
        .filter(|&n| matches!(mode_of(n), Some((_, true))))
        .collect();
    for &n in &to_pause {
        engine.pause(&id_of(n)).await?;
    }
    let paused = to_pause.len() as u64;
    settle(&engine, u64::from(runs), |c| {
        count(c, RunStatus::Paused) == paused
    })
    .await?;
    workload::sync_barrier(&engine, "c-barrier").await?;
    engine.shutdown().await;
    Ok(())
}

fn count(counts: &std::collections::BTreeMap<RunStatus, u64>, status: RunStatus) -> u64 {
    counts.get(&status).copied().unwrap_or(0)
}

/// Polls the engine's counts until `settled` holds with `runs` runs (plus the barrier) in all.
async fn settle(
    engine: &Engine,
    runs: u64,
    settled: impl Fn(&std::collections::BTreeMap<RunStatus, u64>) -> bool,
) -> anyhow::Result<()> {
    const PATIENCE: Duration = Duration::from_secs(1800);
    let started = Instant::now();
    let mut said = Instant::now();
    loop {
        let counts = engine.run_counts().await?;
        let total: u64 = counts.values().sum();
        if total >= runs && settled(&counts) {
            return Ok(());
        }
        if started.elapsed() > PATIENCE {
            bail!("the store's runs did not settle within {PATIENCE:?}: {counts:?}");
        }
        if said.elapsed() > Duration::from_secs(5) {
            eprintln!("  {total} runs: {counts:?}");
            said = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A `keel worker` child on the store, killed on drop.
pub(crate) struct Worker {
    child: Child,
    base: String,
    token: String,
}

impl Worker {
    /// Starts the worker on its data directory `data` on a free loopback port and waits
    /// until its API answers.
    pub(crate) fn start(keel: &Path, data: &Path) -> anyhow::Result<Worker> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let listen = format!("127.0.0.1:{port}");
        let child = Command::new(keel)
            .args(["worker", "--allow-unregistered", "--listen", &listen])
            // Nothing listens there: the runs take no AWS step, and no traffic leaves loopback.
            .args(["--aws-endpoint", "http://127.0.0.1:9"])
            .arg("--data-dir")
            .arg(data)
            .env_remove("KEEL_API_TOKEN")
            .env_remove("KEEL_API_TOKEN_FILE")
            .env_remove("KEEL_NO_AUTH")
            .env_remove("KEEL_OTLP_ENDPOINT")
            .env("AWS_ACCESS_KEY_ID", "bench")
            .env("AWS_SECRET_ACCESS_KEY", "bench")
            // Not `warn`: each run of the benchmark's workflows, unregistered in the
            // worker, is named at warn when the worker opens.
            .env("RUST_LOG", "error")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {}", keel.display()))?;
        let mut worker = Worker {
            child,
            base: format!("http://{listen}"),
            token: String::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            if let Some(status) = worker.child.try_wait()? {
                bail!("keel worker exited with {status} before its API answered");
            }
            let token = std::fs::read_to_string(data.join("api-token")).unwrap_or_default();
            worker.token = token.trim().to_string();
            if !worker.token.is_empty() && worker.get::<serde_json::Value>("/v1/health").is_ok() {
                return Ok(worker);
            }
            if Instant::now() > deadline {
                bail!("keel worker did not answer within 600 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// GETs `path` and decodes its JSON.
    fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        Ok(self.request(path)?.into_json()?)
    }

    fn request(&self, path: &str) -> anyhow::Result<ureq::Response> {
        ureq::get(&format!("{}{path}", self.base))
            .set("Authorization", &format!("Bearer {}", self.token))
            .timeout(Duration::from_secs(600))
            .call()
            .with_context(|| format!("GET {path}"))
    }

    /// Makes the request `repeats` times and times it.
    fn time(&self, what: &str, path: &str, repeats: u32) -> anyhow::Result<Timed> {
        let mut walls = Vec::new();
        let mut answered = 0;
        let cpu_before = self.cpu()?;
        for _ in 0..repeats.max(1) {
            let started = Instant::now();
            let mut body = String::new();
            self.request(path)?
                .into_reader()
                .read_to_string(&mut body)?;
            walls.push(started.elapsed().as_secs_f64() * 1000.0);
            answered = answered_runs(&body);
        }
        let cpu_ms = (self.cpu()? - cpu_before).as_secs_f64() * 1000.0 / walls.len() as f64;
        walls.sort_by(f64::total_cmp);
        Ok(Timed {
            what: what.into(),
            path: path.into(),
            answered,
            median_ms: walls[walls.len() / 2],
            max_ms: walls[walls.len() - 1],
            cpu_ms,
            median_in_baseline_appends: 0.0,
        })
    }

    /// The worker's CPU time so far (user + system), from `/proc/PID/stat`.
    fn cpu(&self) -> anyhow::Result<Duration> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))?;
        // The fields after the command's closing parenthesis; utime and stime are the 14th
        // and 15th of the line, the 12th and 13th after it.
        let rest = stat.rsplit_once(')').context("/proc/PID/stat")?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
        Ok(Duration::from_secs_f64(
            ticks as f64 / system::clock_ticks_per_s() as f64,
        ))
    }

    /// The worker's resident memory, from `/proc/PID/status`.
    pub(crate) fn rss_bytes(&self) -> anyhow::Result<u64> {
        system::vm_kib(&self.status()?, "VmRSS:").map(|kib| kib * 1024)
    }

    /// The worker's `/proc/PID/status`.
    pub(crate) fn status(&self) -> anyhow::Result<String> {
        Ok(std::fs::read_to_string(format!(
            "/proc/{}/status",
            self.child.id()
        ))?)
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs in an answer: a page's runs, the counts' total, or one for anything else.
fn answered_runs(body: &str) -> u64 {
    let Ok(value) = serde_json::from_str::<serde_json::Value>(body) else {
        return 1;
    };
    if let Some(runs) = value["runs"].as_array() {
        return runs.len() as u64;
    }
    value["total"].as_u64().unwrap_or(1)
}

impl ConsoleReport {
    /// The report as a table.
    pub(crate) fn table(&self) -> String {
        let mut out = format!(
            "console requests against keel worker, {} runs in a sled store (PowerLoss), each request {} times\n\n",
            self.counts["total"], self.params.repeats
        );
        out += &format!(
            "baseline            {:.0} appends/s before, {:.0}/s after (200 bytes + fdatasync each)\n",
            self.baseline.before_per_s, self.baseline.after_per_s
        );
        out += &format!("store filled in     {:.1} s\n", self.populate_s);
        out += &format!(
            "worker answering    {:.2} s after it started\n",
            self.worker_ready_s
        );
        out += &format!(
            "worker RSS          {:.0} MiB after the requests\n",
            self.worker_rss_bytes as f64 / (1024.0 * 1024.0)
        );
        out += &format!("runs by status      {}\n\n", self.counts["counts"]);
        let rows: Vec<[String; 6]> = self
            .requests
            .iter()
            .map(|t| {
                [
                    t.what.clone(),
                    t.answered.to_string(),
                    format!("{:.1}", t.median_ms),
                    format!("{:.1}", t.max_ms),
                    format!("{:.1}", t.cpu_ms),
                    format!("{:.0}", t.median_in_baseline_appends),
                ]
            })
            .collect();
        out += &markdown_table(
            [
                "request",
                "runs answered",
                "median ms",
                "max ms",
                "worker CPU ms",
                "median in baseline appends",
            ],
            &rows,
            &[1, 2, 3, 4, 5],
        );
        out
    }
}
