//! The engine: opening a store, registering types, starting runs idempotently, resuming
//! unfinished runs, waiting for results, operator calls, and garbage collection.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::{watch, Semaphore};

use crate::cell::{RunCell, Stop};
use crate::clock::Clock;
use crate::contain::contained;
use crate::error::{EngineError, Result};
use crate::executor;
use crate::ids::RunId;
use crate::journal::{digest, RunHistory, RunRecord, RunStatus};
use crate::limiter::{RateLimit, RateLimiter};
use crate::limits::{CONCURRENT_RUNS_MAX, INPUT_BYTES_MAX, STATS_FLUSH_INTERVAL};
use crate::registry::{Registry, StepType};
use crate::replay::RunState;
use crate::resources::Resources;
use crate::stats::{OperationStats, StatsBook};
use crate::step::Step;
use crate::store::sled::{LostData, SledOptions, SledStore};
use crate::store::{Durability, JournalStore};
use crate::workflow::Workflow;

mod operator;
mod resume;

/// How long finished runs are kept by default.
pub const RETENTION_DEFAULT: Duration = Duration::from_secs(7 * 24 * 3600);

/// Options and registrations for [`Engine::open`].
pub struct EngineBuilder {
    path: PathBuf,
    durability: Durability,
    runs_concurrent_max: usize,
    poison_after_loads: u32,
    retention: Duration,
    gc_interval: Duration,
    registry: Registry,
    registry_error: Option<EngineError>,
    allow_unregistered: bool,
    lost_data: LostData,
    rate_limits: HashMap<String, RateLimit>,
    resources: Resources,
    clock: Clock,
}

impl EngineBuilder {
    /// Registers a resource steps read with [`crate::StepContext::resource`] (an SDK client,
    /// say); one per type, a later one replacing an earlier.
    pub fn resource<T: Send + Sync + 'static>(mut self, value: T) -> Self {
        self.resources.insert(value);
        self
    }

    /// Sets the rate limit of the service `name` (steps name it in [`Step::rate_limit`]).
    /// Services without one get [`RateLimit::default`].
    pub fn rate_limit(mut self, name: &str, limit: RateLimit) -> Self {
        self.rate_limits.insert(name.to_string(), limit);
        self
    }

    /// Registers a workflow type, so its unfinished runs resume at open. A second type with
    /// the same name makes [`EngineBuilder::open`] fail.
    pub fn workflow<W: Workflow>(mut self) -> Self {
        if let Err(e) = self.registry.add_workflow::<W>() {
            self.registry_error.get_or_insert(e);
        }
        self
    }

    /// Registers a step type, so compensation can undo it from the journal even when no run
    /// has executed it since the engine opened. A second type with the same kind makes
    /// [`EngineBuilder::open`] fail.
    pub fn step<S: Step>(mut self) -> Self {
        if let Err(e) = self.registry.add_step::<S>() {
            self.registry_error.get_or_insert(e);
        }
        self
    }

    /// Registers every step type of a set (a step library's `STEPS`).
    pub fn steps(mut self, set: &[StepType]) -> Self {
        for step in set {
            if let Err(e) = step.register(&self.registry) {
                self.registry_error.get_or_insert(e);
            }
        }
        self
    }

    /// Opens a store whose unfinished runs need workflows or step kinds that are not
    /// registered, instead of refusing it ([`EngineError::Unregistered`]): those runs are
    /// left as they are, undriven (their waiters hear why), until an engine that registers
    /// the types opens the store.
    pub fn allow_unregistered(self) -> Self {
        EngineBuilder {
            allow_unregistered: true,
            ..self
        }
    }

    /// The clock every journaled time comes from and every timer sleeps on (default: the
    /// system's wall clock). Tests pass a [`crate::testing::TestClock`].
    pub fn clock(self, clock: impl Into<Clock>) -> Self {
        EngineBuilder {
            clock: clock.into(),
            ..self
        }
    }

    /// Opens a store that lost data it had acknowledged ([`EngineError::LostData`]: sled's
    /// log holds less than the store's high-water mark) with what is left, instead of
    /// refusing it. Runs that finished or moved on after the loss point may be gone or rolled
    /// back; rolled-back runs run their lost steps again, with the same idempotency keys.
    /// For an operator who knows of the loss and accepts it.
    pub fn accept_data_loss(self) -> Self {
        EngineBuilder {
            lost_data: LostData::Accept,
            ..self
        }
    }

    /// What a durable write survives (default: power loss).
    pub fn durability(self, durability: Durability) -> Self {
        EngineBuilder { durability, ..self }
    }

    /// How many runs are driven at once (default 10,000); more wait for a slot.
    pub fn runs_concurrent_max(self, runs: usize) -> Self {
        EngineBuilder {
            runs_concurrent_max: runs.clamp(1, CONCURRENT_RUNS_MAX),
            ..self
        }
    }

    /// How many loads in a row, each ended by the process dying before the run showed that
    /// it survives being driven, make a run poisoned: not driven again until an operator
    /// resumes it (see the crate docs on crash loops). Default
    /// [`crate::limits::POISON_LOADS_DEFAULT`]; at least 1.
    pub fn poison_after_loads(self, loads: u32) -> Self {
        EngineBuilder {
            poison_after_loads: loads.max(1),
            ..self
        }
    }

    /// How long finished runs are kept before garbage collection (default 7 days).
    pub fn retention(self, retention: Duration) -> Self {
        EngineBuilder { retention, ..self }
    }

    /// How often garbage collection runs in the background (default 10 minutes).
    pub fn gc_interval(self, interval: Duration) -> Self {
        EngineBuilder {
            gc_interval: interval.max(Duration::from_secs(1)),
            ..self
        }
    }

    /// Opens the store and resumes every unfinished run of a registered workflow. Must be
    /// called inside a tokio runtime.
    pub async fn open(self) -> Result<Engine> {
        if let Some(e) = self.registry_error {
            return Err(e);
        }
        let path = self.path.clone();
        let options = SledOptions {
            durability: self.durability,
            lost_data: self.lost_data,
        };
        let store = tokio::task::spawn_blocking(move || SledStore::open(&path, options))
            .await
            .map_err(|e| EngineError::Storage {
                path: self.path.clone(),
                source: sled::Error::ReportableBug(e.to_string()),
            })??;
        let stats = StatsBook::load(&store)?;
        let (shutdown, _) = watch::channel(false);
        let (drivers, _) = watch::channel(0usize);
        let inner = Arc::new(Inner {
            stats,
            counters: Default::default(),
            path: self.path,
            store: Arc::new(store),
            registry: self.registry,
            limiters: Mutex::new(HashMap::new()),
            rate_limits: self.rate_limits,
            resources: Arc::new(self.resources),
            cells: Mutex::new(HashMap::new()),
            permits: Arc::new(Semaphore::new(self.runs_concurrent_max)),
            shutdown,
            drivers,
            retention: self.retention,
            poison_after_loads: self.poison_after_loads,
            clock: self.clock,
            undriven: Mutex::new(HashMap::new()),
        });
        let engine = Engine { inner };
        engine.resume_all(self.allow_unregistered)?;
        engine.spawn_gc(self.gc_interval);
        engine.spawn_stats_flush();
        Ok(engine)
    }
}

pub(crate) struct Inner {
    path: PathBuf,
    pub(crate) stats: StatsBook,
    pub(crate) counters: crate::stats::EventCounters,
    limiters: Mutex<HashMap<String, Arc<RateLimiter>>>,
    rate_limits: HashMap<String, RateLimit>,
    pub(crate) resources: Arc<Resources>,
    pub(crate) store: Arc<dyn JournalStore>,
    pub(crate) registry: Registry,
    cells: Mutex<HashMap<RunId, Arc<RunCell>>>,
    pub(crate) permits: Arc<Semaphore>,
    pub(crate) shutdown: watch::Sender<bool>,
    drivers: watch::Sender<usize>,
    retention: Duration,
    /// Loads without survival after which a run is poisoned (`poison.rs`).
    pub(crate) poison_after_loads: u32,
    pub(crate) clock: Clock,
    /// Unfinished runs left undriven at open for want of registered types, with the reason.
    undriven: Mutex<HashMap<RunId, String>>,
}

impl Inner {
    /// The limiter of the service `name`, created on first use.
    pub(crate) fn limiter(&self, name: &str) -> Arc<RateLimiter> {
        let mut limiters = self.limiters.lock().expect("limiters lock");
        Arc::clone(limiters.entry(name.to_string()).or_insert_with(|| {
            let limit = self.rate_limits.get(name).cloned().unwrap_or_default();
            Arc::new(RateLimiter::new(name, limit))
        }))
    }

    /// Unloads `cell` unless it must still be driven: its status is running or compensating
    /// (an operator call may have just made it so), the engine is up and no storage error
    /// poisoned it. Returns whether it was unloaded. Decided under the map lock, so an operator
    /// call either sees the cell loaded (and its driver goes on) or loads it afresh.
    pub(crate) fn unload_if_settled(&self, cell: &Arc<RunCell>) -> bool {
        let mut cells = self.cells.lock().expect("cells lock");
        let shutting_down = *self.shutdown.borrow();
        cell.survived(&*self.store);
        let detached = cell.detach_if(|record, poisoned| {
            if shutting_down {
                Some(Some(Stop::ShutDown))
            } else if poisoned {
                Some(Some(Stop::Error("a write to its journal failed".into())))
            } else if !record.status.is_drivable() {
                Some(None)
            } else {
                None
            }
        });
        if detached && cells.get(&cell.id).is_some_and(|c| Arc::ptr_eq(c, cell)) {
            cells.remove(&cell.id);
        }
        detached
    }

    /// Unloads `cell` whatever its status; if the run has not settled, its waiters are told
    /// `stop`.
    pub(crate) fn unload(&self, cell: &Arc<RunCell>, stop: Stop) {
        cell.survived(&*self.store);
        let mut cells = self.cells.lock().expect("cells lock");
        cell.detach_if(|_, _| Some(Some(stop)));
        if cells.get(&cell.id).is_some_and(|c| Arc::ptr_eq(c, cell)) {
            cells.remove(&cell.id);
        }
    }
}

/// Whether a cell was loaded by the call that asked, or was loaded already.
enum Loaded {
    Fresh(Arc<RunCell>),
    Existing(Arc<RunCell>),
}

/// A handle on a durable workflow engine. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

/// A typed handle on one run.
pub struct RunHandle<W: Workflow> {
    engine: Engine,
    id: RunId,
    workflow: PhantomData<fn() -> W>,
}

impl<W: Workflow> RunHandle<W> {
    /// The run id.
    pub fn id(&self) -> &RunId {
        &self.id
    }

    /// Waits until the run settles; its output if it completed, else an error naming the
    /// status and the reason.
    pub async fn result(&self) -> Result<W::Output> {
        let record = self.engine.wait(self.id.as_str()).await?;
        match (record.status, record.output) {
            // A stored `null` output (say, of a workflow returning `()`) reads back as `None`.
            (RunStatus::Completed, output) => serde_json::from_value(output.unwrap_or(Value::Null))
                .map_err(|e| EngineError::Corrupt {
                    key: format!("run {}", self.id),
                    detail: format!("stored output does not decode as {}'s output: {e}", W::NAME),
                }),
            (status, _) => Err(EngineError::RunEnded {
                id: self.id.clone(),
                status,
                error: record.error.unwrap_or_default(),
            }),
        }
    }
}

struct DriverGuard(watch::Sender<usize>);

impl Drop for DriverGuard {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

impl Engine {
    /// Starts configuring an engine whose data lives in `path` (created if missing, with
    /// owner-only permissions).
    pub fn builder(path: impl AsRef<Path>) -> EngineBuilder {
        EngineBuilder {
            path: path.as_ref().to_owned(),
            durability: Durability::default(),
            runs_concurrent_max: 10_000,
            poison_after_loads: crate::limits::POISON_LOADS_DEFAULT,
            retention: RETENTION_DEFAULT,
            gc_interval: Duration::from_secs(600),
            registry: Registry::default(),
            registry_error: None,
            allow_unregistered: false,
            lost_data: LostData::Refuse,
            rate_limits: HashMap::new(),
            resources: Resources::default(),
            clock: Clock::system(),
        }
    }

    /// The data directory.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Loads `record` into a cell and spawns its driver, unless it is loaded already.
    fn load(&self, record: RunRecord) -> Result<Arc<RunCell>> {
        match self.load_cell(record)? {
            Loaded::Fresh(cell)
                if matches!(
                    cell.record().status,
                    RunStatus::Running | RunStatus::Compensating
                ) =>
            {
                self.spawn_driver(Arc::clone(&cell));
                Ok(cell)
            }
            Loaded::Fresh(cell) => {
                // Settled meanwhile: nothing to drive (and no waiter to tell: the stop reason
                // is only announced for a run that has not settled).
                self.inner.unload(&cell, Stop::Error("settled".into()));
                Ok(cell)
            }
            Loaded::Existing(cell) => Ok(cell),
        }
    }

    /// Loads a run this engine just created (its journal is empty: nothing to read) and
    /// spawns its driver.
    fn load_new(&self, record: RunRecord) {
        let cell = Arc::new(RunCell::new(
            record,
            RunState::default(),
            self.inner.clock.clone(),
        ));
        // `start` wrote its first load count with the record.
        cell.mark_load_counted();
        let fresh = {
            let mut cells = self.inner.cells.lock().expect("cells lock");
            let fresh = !cells.contains_key(&cell.id);
            if fresh {
                cells.insert(cell.id.clone(), Arc::clone(&cell));
            }
            fresh
        };
        if fresh {
            self.spawn_driver(cell);
        }
    }

    /// Loads `record` and its journal into a cell in the map, unless one is there already.
    fn load_cell(&self, record: RunRecord) -> Result<Loaded> {
        let mut cells = self.inner.cells.lock().expect("cells lock");
        if let Some(cell) = cells.get(&record.id) {
            return Ok(Loaded::Existing(Arc::clone(cell)));
        }
        // The caller's copy may be stale (the run may have settled and been unloaded since it
        // was read); cells are unloaded only under this lock, so the stored record read here
        // is current.
        let id = record.id;
        let record = self
            .inner
            .store
            .run(&id)?
            .ok_or(EngineError::RunNotFound { id })?;
        let state = self.read_state(&record.id)?;
        let cell = Arc::new(RunCell::new(record, state, self.inner.clock.clone()));
        cells.insert(cell.id.clone(), Arc::clone(&cell));
        Ok(Loaded::Fresh(cell))
    }

    fn spawn_driver(&self, cell: Arc<RunCell>) {
        self.inner
            .undriven
            .lock()
            .expect("undriven lock")
            .remove(&cell.id);
        self.inner.drivers.send_modify(|n| *n += 1);
        let guard = DriverGuard(self.inner.drivers.clone());
        let inner = Arc::clone(&self.inner);
        // Every log line of the run (steps, waits, compensation) carries its id and workflow.
        let span =
            tracing::info_span!("run", run_id = %cell.id, workflow = %cell.record().workflow);
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                let _guard = guard;
                let driven = contained(executor::drive(Arc::clone(&inner), Arc::clone(&cell)));
                if let Err(panic) = driven.await {
                    // User code is contained where it is called: this is a bug of the engine.
                    // The run is left as its journal says and resumes at the next open.
                    tracing::error!(run_id = %cell.id, %panic, "the run's driver panicked");
                    inner.unload(&cell, Stop::Error(format!("its driver panicked: {panic}")));
                }
            },
            span,
        ));
    }

    /// Starts a run of `W` with id `id`, or returns the existing run if one with the same id,
    /// workflow and input exists (running or finished). The run is durable when this returns.
    pub async fn start<W: Workflow>(&self, id: &str, input: W::Input) -> Result<RunHandle<W>> {
        self.inner.registry.add_workflow::<W>()?;
        let input = serde_json::to_value(input).map_err(|source| EngineError::Serialise {
            what: format!("input of {}", W::NAME),
            source,
        })?;
        let record = self.start_value(W::NAME, id, input, None).await?;
        Ok(RunHandle {
            engine: self.clone(),
            id: record.id,
            workflow: PhantomData,
        })
    }

    /// Starts a run of the registered workflow `workflow` with a JSON input (for the CLI and
    /// the HTTP API). The input is checked against the workflow's input type first.
    pub async fn start_json(&self, workflow: &str, id: &str, input: Value) -> Result<RunRecord> {
        let entry =
            self.inner
                .registry
                .workflow(workflow)
                .ok_or_else(|| EngineError::UnknownWorkflow {
                    name: workflow.into(),
                    registered: self.inner.registry.workflow_names(),
                })?;
        // Stored in its typed form, so that a later typed `start` of the same value (which
        // writes omitted optional fields as null, say) is recognised as the same input.
        let input = (entry.normalise_input)(&input).map_err(|e| EngineError::MalformedInput {
            workflow: workflow.into(),
            field: e.field,
            source: e.source,
        })?;
        self.start_value(workflow, id, input, None).await
    }

    /// An engine handle on `inner`, for the engine's own parts (child runs).
    pub(crate) fn from_inner(inner: &Arc<Inner>) -> Engine {
        Engine {
            inner: Arc::clone(inner),
        }
    }

    /// Starts (or finds) child run `child` of run `parent`; the child is durable and driven
    /// when this returns.
    pub(crate) async fn start_child(
        &self,
        workflow: &str,
        child: &RunId,
        input: Value,
        parent: &RunId,
    ) -> Result<()> {
        self.start_value(workflow, child.as_str(), input, Some(parent.clone()))
            .await
            .map(|_| ())
    }

    async fn start_value(
        &self,
        workflow: &str,
        id: &str,
        input: Value,
        parent: Option<RunId>,
    ) -> Result<RunRecord> {
        if *self.inner.shutdown.borrow() {
            return Err(EngineError::ShutDown);
        }
        let id = RunId::new(id)?;
        let bytes = input.to_string().len();
        if bytes > INPUT_BYTES_MAX {
            return Err(EngineError::TooLarge {
                what: format!("input of run {id}"),
                bytes,
                limit: INPUT_BYTES_MAX,
            });
        }
        let entry =
            self.inner
                .registry
                .workflow(workflow)
                .ok_or_else(|| EngineError::UnknownWorkflow {
                    name: workflow.into(),
                    registered: self.inner.registry.workflow_names(),
                })?;
        (entry.validate)(&input).map_err(|e| EngineError::InvalidInput {
            workflow: workflow.into(),
            field: e.field,
            reason: e.reason,
        })?;
        let now = self.inner.clock.now_ms();
        let record = RunRecord {
            id: id.clone(),
            workflow: workflow.into(),
            version: entry.version,
            input,
            status: RunStatus::Running,
            created_at_ms: now,
            updated_at_ms: now,
            finished_at_ms: None,
            output: None,
            error: None,
            parent,
        };
        match self.inner.store.create_run(&record)? {
            None => {
                // Its first load, counted with the record (no sync of its own: `poison.rs`).
                self.inner.store.set_load_count(&id, 1)?;
                crate::crash::point("start.after_create");
                self.inner.store.sync().wait().await?;
                crate::crash::point("start.after_sync");
                tracing::info!(run_id = %id, workflow, "run started");
                self.load_new(record.clone());
                Ok(record)
            }
            Some(existing) => {
                if existing.workflow != record.workflow
                    || existing.input != record.input
                    || existing.parent != record.parent
                {
                    let describe = |r: &RunRecord| {
                        let parent = match &r.parent {
                            Some(parent) => format!(" as a child of run {parent}"),
                            None => String::new(),
                        };
                        format!(
                            "workflow {:?} and input {}{parent}",
                            r.workflow,
                            digest(&r.input)
                        )
                    };
                    return Err(EngineError::IdempotencyMismatch {
                        id,
                        existing: describe(&existing),
                        requested: describe(&record),
                    });
                }
                // The run may have been created by a concurrent call whose sync is still in
                // flight: nobody learns of a run before it is durable.
                self.inner.store.sync().wait().await?;
                // That call may not have loaded it yet either; whoever loads first drives it
                // (the cell map admits one), so a caller never waits on an undriven run.
                if matches!(
                    existing.status,
                    RunStatus::Running | RunStatus::Compensating
                ) {
                    self.load(existing.clone())?;
                }
                Ok(existing)
            }
        }
    }

    /// The run record of `id`.
    ///
    /// Durable when returned: the read is followed by a sync, so a status (say, `completed`)
    /// is never reported before it would survive a crash. Group commit makes that sync cheap.
    pub async fn status(&self, id: &str) -> Result<RunRecord> {
        let record = self.record(id)?;
        self.inner.store.sync().wait().await?;
        Ok(record)
    }

    /// The run record and every journal entry of `id`, durable when returned (see
    /// [`Engine::status`]).
    pub async fn history(&self, id: &str) -> Result<RunHistory> {
        let run = self.record(id)?;
        let entries = self.inner.store.journal(&run.id)?;
        self.inner.store.sync().wait().await?;
        Ok(RunHistory { run, entries })
    }

    /// Every readable run record (unreadable ones are logged and left out), durable when
    /// returned (see [`Engine::status`]).
    pub async fn list(&self) -> Result<Vec<RunRecord>> {
        let runs = self.records()?;
        self.inner.store.sync().wait().await?;
        Ok(runs)
    }

    /// The stored record of `id`, durable or not: for the engine's own decisions only.
    fn record(&self, id: &str) -> Result<RunRecord> {
        let id = RunId::new(id)?;
        self.inner
            .store
            .run(&id)?
            .ok_or(EngineError::RunNotFound { id })
    }

    /// Every readable stored record, durable or not: for the engine's own decisions only.
    fn records(&self) -> Result<Vec<RunRecord>> {
        let mut runs = Vec::new();
        for record in self.inner.store.runs()? {
            match record {
                Ok(record) => runs.push(record),
                Err(error) => tracing::error!(%error, "run record unreadable: not listed"),
            }
        }
        Ok(runs)
    }

    /// Waits until run `id` settles (any status but running or compensating) and returns its
    /// record. Every way a run can stop being driven answers: [`EngineError::ShutDown`] when
    /// the engine shuts down under the run, [`EngineError::RunStopped`] when its driver
    /// stopped on an engine error or nobody here drives it (its workflow is not registered).
    pub async fn wait(&self, id: &str) -> Result<RunRecord> {
        let run_id = RunId::new(id)?;
        loop {
            let cell = self.loaded(&run_id);
            if let Some(cell) = &cell {
                let mut status = cell.status.subscribe();
                let mut stopped = cell.stopped.subscribe();
                tokio::select! {
                    _ = status.wait_for(|s| !s.is_drivable()) => {}
                    stop = stopped.wait_for(Option::is_some) => {
                        if let Some(stop) = stop.ok().and_then(|stop| stop.clone()) {
                            return Err(stop.error(&run_id));
                        }
                    }
                }
            }
            let record = self.status(id).await?;
            if !record.status.is_drivable() {
                return Ok(record);
            }
            // Taken up again (an operator resumed it) by the same or a fresh cell: wait on.
            if self.loaded(&run_id).is_some() {
                continue;
            }
            if *self.inner.shutdown.borrow() {
                return Err(EngineError::ShutDown);
            }
            let reason = self.undriven_reason(&record);
            return Err(EngineError::RunStopped { id: run_id, reason });
        }
    }

    /// Why a running or compensating run that is not loaded is not driven here.
    fn undriven_reason(&self, record: &RunRecord) -> String {
        if let Some(reason) = self
            .inner
            .undriven
            .lock()
            .expect("undriven lock")
            .get(&record.id)
        {
            return reason.clone();
        }
        if record.status == RunStatus::Running
            && self.inner.registry.workflow(&record.workflow).is_none()
        {
            return format!(
                "its workflow {:?} is not registered with this engine",
                record.workflow
            );
        }
        match self.inner.store.journal(&record.id) {
            Err(error) => format!("its journal cannot be read: {error}"),
            Ok(entries) => match RunState::from_entries(&entries) {
                Err(detail) => format!("its journal is corrupt: {detail}"),
                Ok(_) => {
                    "its driver stopped on an engine error; it resumes at the next open".into()
                }
            },
        }
    }

    /// The loaded cell of `id`, if any.
    fn loaded(&self, id: &RunId) -> Option<Arc<RunCell>> {
        self.inner
            .cells
            .lock()
            .expect("cells lock")
            .get(id)
            .cloned()
    }

    /// Deletes runs that finished longer ago than the retention; returns how many.
    ///
    /// Blocking (it scans every record); the engine's own pass runs it off the runtime's
    /// threads. Runs are deleted `GC_RUNS_PER_WRITE` to one atomic write: sled 0.34's atomic
    /// multi-key write waits out any sync in progress (see `store/sled.rs`), so one per run
    /// would stall the store once per run.
    pub fn collect_garbage(&self) -> Result<usize> {
        const GC_RUNS_PER_WRITE: usize = 256;
        let horizon = self
            .inner
            .clock
            .now_ms()
            .saturating_sub(self.inner.retention.as_millis() as u64);
        let mut expired_ids = Vec::new();
        for record in self.records()? {
            let expired = record.status.is_terminal()
                && record.finished_at_ms.is_some_and(|at| at <= horizon);
            // A child is kept while its parent is, which may still compensate it.
            let parent_kept = match &record.parent {
                Some(parent) => self.inner.store.run(parent)?.is_some(),
                None => false,
            };
            let expired = expired && !parent_kept;
            let loaded = self
                .inner
                .cells
                .lock()
                .expect("cells lock")
                .contains_key(&record.id);
            if expired && !loaded {
                expired_ids.push(record.id);
            }
        }
        let mut collected = 0;
        for chunk in expired_ids.chunks(GC_RUNS_PER_WRITE) {
            self.inner.store.delete_runs(chunk)?;
            collected += chunk.len();
        }
        if collected > 0 {
            tracing::info!(collected, "finished runs collected");
        }
        Ok(collected)
    }

    fn spawn_gc(&self, interval: Duration) {
        let engine = Arc::downgrade(&self.inner);
        let mut shutdown = self.inner.shutdown.subscribe();
        tokio::spawn(async move {
            loop {
                let Some(inner) = engine.upgrade() else {
                    return;
                };
                let engine = Engine { inner };
                match tokio::task::spawn_blocking(move || engine.collect_garbage()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(error)) => tracing::warn!(%error, "garbage collection failed"),
                    Err(error) => tracing::error!(%error, "garbage collection panicked"),
                }
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    _ = shutdown.changed() => return,
                }
            }
        });
    }

    /// Stops the engine: no new step or timer starts, in-flight steps finish and are
    /// recorded, then every driver ends. Unfinished runs resume at the next open.
    pub async fn shutdown(&self) {
        self.inner.shutdown.send_replace(true);
        let mut drivers = self.inner.drivers.subscribe();
        let _ = drivers.wait_for(|n| *n == 0).await;
        if let Err(error) = self.inner.stats.flush(&*self.inner.store) {
            tracing::warn!(%error, "latency statistics could not be written");
        }
        let _ = self.inner.store.sync().wait().await;
    }

    /// Counts of retries, step compensations and ended waits since the engine opened.
    pub fn counters(&self) -> crate::stats::Counters {
        self.inner.counters.read()
    }

    /// The rate limiter of the service `name`, shared by every workflow of this engine
    /// (steps use it through [`Step::rate_limit`]; other code may too).
    pub fn rate_limiter(&self, name: &str) -> Arc<RateLimiter> {
        self.inner.limiter(name)
    }

    /// Latency statistics of every operation (`step:<kind>`, `wait:<kind>`) recorded in this
    /// data directory, sorted by operation.
    pub fn stats(&self) -> Vec<OperationStats> {
        self.inner.stats.all()
    }

    /// Latency statistics of one operation, if it has any.
    pub fn operation_stats(&self, operation: &str) -> Option<OperationStats> {
        self.inner.stats.summary(operation)
    }

    /// Records a duration for `operation` as if an execution had taken it: for importing
    /// history from elsewhere (or seeding a learned wait policy).
    pub fn record_duration(&self, operation: &str, duration: Duration) {
        self.inner
            .stats
            .record(operation, duration, "", self.inner.clock.now_ms());
    }

    /// Writes the statistics changed since the last write and waits until they are durable.
    /// The engine does this every second and at shutdown; a crash loses at most the last
    /// second's samples.
    pub async fn flush_stats(&self) -> Result<()> {
        self.inner.stats.flush(&*self.inner.store)?;
        self.inner.store.sync().wait().await
    }

    fn spawn_stats_flush(&self) {
        let engine = Arc::downgrade(&self.inner);
        let mut shutdown = self.inner.shutdown.subscribe();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(STATS_FLUSH_INTERVAL) => {}
                    _ = shutdown.changed() => return,
                }
                let Some(inner) = engine.upgrade() else {
                    return;
                };
                if let Err(error) = inner.stats.flush(&*inner.store) {
                    tracing::warn!(%error, "latency statistics could not be written");
                }
            }
        });
    }
}
