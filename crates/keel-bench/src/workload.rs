//! What the benchmark runs: a no-op step, two workflows built from it, and the helpers that
//! start many runs and wait for them. The step does nothing, so every figure measures the
//! engine (journal, group commit, scheduling), not a side effect.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use keel_engine::{
    Ctx, Engine, EngineBuilder, Event, Probe, RunStatus, Step, StepContext, StepError, WaitPolicy,
    Workflow, WorkflowError,
};
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;

/// How many tokio tasks start runs at once wherever the benchmark starts many runs.
pub(crate) const CALLERS: u32 = 100;

/// How many no-op steps each run takes where the benchmark measures many concurrent runs.
pub(crate) const CONCURRENT_RUN_STEPS: u32 = 10;

/// A step with no side effect; its argument is its operation number, so that every journal
/// entry is small and distinct.
#[derive(Serialize, Deserialize)]
pub(crate) struct Noop(pub u32);

impl Step for Noop {
    const KIND: &'static str = "bench.noop";
    type Output = ();
    async fn execute(&self, _ctx: &StepContext) -> Result<(), StepError> {
        Ok(())
    }
}

/// A step with no side effect whose output is `bytes` bytes long (a JSON string of that
/// many bytes with its quotes, so 2 at least): journal entries as large as a step's output
/// may be.
#[derive(Serialize, Deserialize)]
pub(crate) struct Filler {
    /// Its operation number, so that every argument is distinct.
    pub n: u32,
    pub bytes: u32,
}

impl Step for Filler {
    const KIND: &'static str = "bench.filler";
    type Output = String;
    async fn execute(&self, _ctx: &StepContext) -> Result<String, StepError> {
        let len = usize::try_from(self.bytes).unwrap_or(usize::MAX);
        Ok("x".repeat(len.saturating_sub(2)))
    }
}

/// `steps` no-op steps, one after the other. With zero steps, a run that starts and
/// completes at once.
pub(crate) struct Steps;

/// The input of [`Steps`].
#[derive(Clone, Serialize, Deserialize)]
pub(crate) struct StepsInput {
    /// How many no-op steps the run takes.
    pub steps: u32,
    /// With more than 0, each step's output is this many bytes ([`Filler`]) instead of
    /// nothing ([`Noop`]).
    #[serde(default)]
    pub output_bytes: u32,
}

impl StepsInput {
    /// `steps` no-op steps.
    pub(crate) fn noop(steps: u32) -> Self {
        Self {
            steps,
            output_bytes: 0,
        }
    }
}

impl Workflow for Steps {
    const NAME: &'static str = "bench.steps";
    type Input = StepsInput;
    type Output = ();
    async fn run(ctx: &mut Ctx, input: StepsInput) -> Result<(), WorkflowError> {
        for n in 0..input.steps {
            match input.output_bytes {
                0 => ctx.step(Noop(n)).await?,
                bytes => drop(ctx.step(Filler { n, bytes }).await?),
            }
        }
        Ok(())
    }
}

/// One parallel fan-out of `branches` no-op steps, `width` at a time (`Ctx::join`).
pub(crate) struct FanOut;

/// The input of [`FanOut`].
#[derive(Clone, Serialize, Deserialize)]
pub(crate) struct FanOutInput {
    /// How many branches.
    pub branches: u32,
    /// How many run at once.
    pub width: u32,
}

impl Workflow for FanOut {
    const NAME: &'static str = "bench.fan-out";
    type Input = FanOutInput;
    type Output = ();
    async fn run(ctx: &mut Ctx, input: FanOutInput) -> Result<(), WorkflowError> {
        let steps = (0..input.branches).map(Noop).collect();
        for result in ctx.join(steps, input.width as usize).await? {
            result?;
        }
        Ok(())
    }
}

/// `steps` no-op steps, then a durable sleep until the wall-clock time `wake_at_ms`.
///
/// The wake time is absolute so that runs started over several seconds all wake at the same
/// moment. Reading the clock in a workflow body is safe here: the duration only matters the
/// first time the sleep is reached, when the engine journals it as an absolute wake time; on
/// replay the journaled time is used and the duration is ignored.
pub(crate) struct StepsThenSleep;

/// The input of [`StepsThenSleep`].
#[derive(Clone, Serialize, Deserialize)]
pub(crate) struct SleepInput {
    /// How many no-op steps come before the sleep.
    pub steps: u32,
    /// When the sleep ends, in ms since the Unix epoch.
    pub wake_at_ms: u64,
}

impl Workflow for StepsThenSleep {
    const NAME: &'static str = "bench.steps-then-sleep";
    type Input = SleepInput;
    type Output = ();
    async fn run(ctx: &mut Ctx, input: SleepInput) -> Result<(), WorkflowError> {
        for n in 0..input.steps {
            ctx.step(Noop(n)).await?;
        }
        let duration = Duration::from_millis(input.wake_at_ms.saturating_sub(now_ms()));
        ctx.sleep(duration).await?;
        Ok(())
    }
}

/// Takes `events` events named `item`, one after the other, and nothing else: each costs
/// the engine a delivery (durable before its send returns) and a receive.
pub(crate) struct Inbox;

impl Workflow for Inbox {
    const NAME: &'static str = "bench.inbox";
    type Input = u32;
    type Output = ();
    async fn run(ctx: &mut Ctx, events: u32) -> Result<(), WorkflowError> {
        for _ in 0..events {
            ctx.receive::<u32>("item").await?;
        }
        Ok(())
    }
}

/// Awaits one child [`Inbox`] run taking `events` events: a parent that waits for its child.
pub(crate) struct AwaitsInbox;

impl Workflow for AwaitsInbox {
    const NAME: &'static str = "bench.awaits-inbox";
    type Input = u32;
    type Output = ();
    async fn run(ctx: &mut Ctx, events: u32) -> Result<(), WorkflowError> {
        ctx.child::<Inbox>(events).await
    }
}

/// A resource that is never ready: what a wait polls in `keel-bench memory --wait poll`.
#[derive(Serialize, Deserialize)]
pub(crate) struct NeverReady;

impl Probe for NeverReady {
    const KIND: &'static str = "bench.never-ready";
    type Output = ();
    async fn probe(&self, _ctx: &StepContext) -> Result<Option<()>, StepError> {
        Ok(None)
    }
}

/// Waits a day for [`NeverReady`], polling every hour: after its first poll, a run waits an
/// hour for the next.
pub(crate) struct Polls;

impl Workflow for Polls {
    const NAME: &'static str = "bench.polls";
    type Input = ();
    type Output = ();
    async fn run(ctx: &mut Ctx, (): ()) -> Result<(), WorkflowError> {
        let hour = Duration::from_secs(3_600);
        let policy = WaitPolicy::every(hour, 24 * hour).growth(1.0).jitter(0.0);
        ctx.wait(NeverReady, policy).await
    }
}

/// Milliseconds since the Unix epoch: the engine's time base for durable timers.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The environment variable that names the PostgreSQL server the benchmark measures instead
/// of sled (`--store`; children inherit it).
pub(crate) const STORE_ENV: &str = "KEEL_BENCH_STORE";

/// The PostgreSQL server this run measures, if any.
pub(crate) fn postgres_server() -> Option<String> {
    std::env::var(STORE_ENV).ok().filter(|url| !url.is_empty())
}

/// The database that stands for the data directory `path` on `server`, created when
/// missing: named after the run's directory and `path`'s own name, so that a child process
/// opening the same path meets the same runs, and each benchmark run has fresh databases.
pub(crate) async fn database_of(server: &str, path: &Path) -> String {
    keel_testkit::postgres::create_database(server, &database_name(path)).await
}

/// The name of the database that stands for the data directory `path` (see [`database_of`]).
pub(crate) fn database_name(path: &Path) -> String {
    let leaf = |p: Option<&Path>| {
        p.and_then(Path::file_name)
            .map(|n| n.to_string_lossy().to_lowercase())
            .unwrap_or_default()
    };
    let raw = format!("keel_bench_{}_{}", leaf(path.parent()), leaf(Some(path)));
    raw.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .take(63)
        .collect()
}

/// Drops the database `name` on `server`, closing its connections: for measurements whose
/// databases are of no use once measured.
pub(crate) async fn drop_database(server: &str, name: &str) -> anyhow::Result<()> {
    let (client, connection) = tokio_postgres::connect(server, tokio_postgres::NoTls)
        .await
        .context("connecting to drop a database")?;
    let connection = tokio::spawn(connection);
    client
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await
        .with_context(|| format!("dropping database {name}"))?;
    drop(client);
    let _ = connection.await;
    Ok(())
}

/// How the report names a PostgreSQL server: its host, port and database, without the
/// credentials its URL may hold.
pub(crate) fn postgres_store_name(server: &str) -> String {
    format!(
        "PostgreSQL at {}",
        server
            .rsplit_once('@')
            .map_or("the given server", |(_, host)| host)
    )
}

/// What a durable write means on the PostgreSQL store.
pub(crate) const POSTGRES_DURABILITY: &str =
    "a committed transaction (the server's synchronous_commit, on by default)";

/// The engine builder for the data directory `path`, with the benchmark's workflows and step
/// registered (so that unfinished runs resume at open).
pub(crate) fn registered(path: &Path) -> EngineBuilder {
    Engine::builder(path)
        .workflow::<Steps>()
        .workflow::<StepsThenSleep>()
        .workflow::<FanOut>()
        .workflow::<Inbox>()
        .workflow::<AwaitsInbox>()
        .workflow::<Polls>()
        .workflow::<crate::console::Listed>()
        .step::<Noop>()
        .step::<Filler>()
}

/// Opens an engine on `path` at the default durability (or on its PostgreSQL database, with
/// `--store`), with the benchmark's workflows and step registered.
pub(crate) async fn open(path: &Path) -> anyhow::Result<Engine> {
    let mut builder = registered(path);
    if let Some(server) = postgres_server() {
        builder = builder.postgres(database_of(&server, path).await);
    }
    builder
        .open()
        .await
        .with_context(|| format!("opening an engine in {}", path.display()))
}

/// Opens an engine with its own files in `path` and its runs in the PostgreSQL database at
/// `database`, which other engines (workers) may share; the benchmark's workflows and step
/// registered.
pub(crate) async fn open_shared(path: &Path, database: &str) -> anyhow::Result<Engine> {
    registered(path)
        .postgres(database)
        .open()
        .await
        .with_context(|| {
            format!(
                "opening an engine in {} on a shared database",
                path.display()
            )
        })
}

/// The id of run number `n` of a batch whose ids start with `prefix`.
pub(crate) fn run_id(prefix: &str, n: u32) -> String {
    format!("{prefix}-{n}")
}

/// Starts runs `prefix-0` .. `prefix-{runs-1}` of `W`, all with `input`, from [`CALLERS`]
/// concurrent tasks; returns once every `start` call has returned (every run is durable).
pub(crate) async fn start_concurrently<W>(
    engine: &Engine,
    prefix: &str,
    runs: u32,
    input: &W::Input,
) -> anyhow::Result<()>
where
    W: Workflow,
    W::Input: Clone + Sync,
{
    start_range_concurrently::<W>(engine, prefix, 0..runs, input).await
}

/// Starts runs `prefix-{numbers.start}` .. `prefix-{numbers.end-1}` of `W`, as
/// [`start_concurrently`] does.
pub(crate) async fn start_range_concurrently<W>(
    engine: &Engine,
    prefix: &str,
    numbers: std::ops::Range<u32>,
    input: &W::Input,
) -> anyhow::Result<()>
where
    W: Workflow,
    W::Input: Clone + Sync,
{
    let mut callers = JoinSet::new();
    let runs = numbers.len() as u32;
    for caller in 0..CALLERS.min(runs) {
        let engine = engine.clone();
        let prefix = prefix.to_owned();
        let input = input.clone();
        let numbers = numbers.clone();
        callers.spawn(async move {
            for n in (numbers.start + caller..numbers.end).step_by(CALLERS as usize) {
                let id = run_id(&prefix, n);
                engine
                    .start::<W>(&id, input.clone())
                    .await
                    .with_context(|| format!("starting run {id}"))?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(caller) = callers.join_next().await {
        caller.context("a starting task panicked")??;
    }
    Ok(())
}

/// Waits until every run `prefix-0` .. `prefix-{runs-1}` has settled, and checks that each
/// one completed.
pub(crate) async fn wait_all_completed(
    engine: &Engine,
    prefix: &str,
    runs: u32,
) -> anyhow::Result<()> {
    // All at once: `Engine::wait` syncs before it answers, so waiting for one run after
    // another would add a sync per run after they all finished, and time the observer.
    let mut waiters = tokio::task::JoinSet::new();
    for n in 0..runs {
        let id = run_id(prefix, n);
        let engine = engine.clone();
        waiters.spawn(async move { (engine.wait(&id).await, id) });
    }
    while let Some(joined) = waiters.join_next().await {
        let (record, id) = joined?;
        let record = record?;
        if record.status != RunStatus::Completed {
            bail!(
                "run {id} ended {} ({})",
                record.status,
                record.error.unwrap_or_default()
            );
        }
    }
    Ok(())
}

/// Waits until every run `prefix-0` .. `prefix-{runs-1}` has journaled its timer (that is,
/// has reached its sleep), polling each run's history.
///
/// A journaled entry seen through `history` is not necessarily durable yet; callers that need
/// durability follow this with [`sync_barrier`].
pub(crate) async fn wait_all_asleep(
    engine: &Engine,
    prefix: &str,
    runs: u32,
) -> anyhow::Result<()> {
    const PATIENCE: Duration = Duration::from_secs(300);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    for n in 0..runs {
        let id = run_id(prefix, n);
        loop {
            let history = engine.history(&id).await?;
            let asleep = history
                .entries
                .iter()
                .any(|entry| matches!(entry.event, Event::TimerSet { .. }));
            if asleep {
                break;
            }
            if history.run.status != RunStatus::Running {
                bail!("run {id} ended {} before its sleep", history.run.status);
            }
            if tokio::time::Instant::now() > deadline {
                bail!("run {id} did not reach its sleep within {PATIENCE:?}");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    Ok(())
}

/// Waits until the engine holds `runs` runs parked and none loaded (the runs asleep on
/// timers long enough to park, `EngineBuilder::park_after`).
pub(crate) async fn wait_all_parked(engine: &Engine, runs: u32) -> anyhow::Result<()> {
    const PATIENCE: Duration = Duration::from_secs(300);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let resident = engine.resident();
        if resident.loaded == 0 && resident.parked == runs as usize {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("{resident:?} after {PATIENCE:?}, not {runs} runs parked");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Makes every write made so far durable.
///
/// The engine has no public call for that, but `start` returns only after a sync issued after
/// its own write, and a sync covers every write made before it was issued: so starting one
/// run with no steps is a barrier.
pub(crate) async fn sync_barrier(engine: &Engine, id: &str) -> anyhow::Result<()> {
    engine
        .start::<Steps>(id, StepsInput::noop(0))
        .await
        .with_context(|| format!("starting the barrier run {id}"))?;
    Ok(())
}
