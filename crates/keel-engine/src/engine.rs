//! The engine: the cell map of loaded runs and their drivers, and starting runs idempotently.
//! Its other parts: `builder.rs` (configuring and opening), `resume.rs` (resuming at open,
//! with the registration check), `reads.rs` (records, journals, waits), `operator.rs`
//! (operator calls), `gc.rs` (garbage collection), `metrics.rs` (counters, limiters,
//! statistics), `schedules.rs` (schedules and their firing loop).

use std::collections::HashMap;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use serde_json::Value;
use tokio::sync::watch;

use crate::cell::{RunCell, Stop};
use crate::contain::contained;
use crate::env::{RunEnv, Runs};
use crate::error::{EngineError, Result};
use crate::executor;
use crate::ids::RunId;
use crate::journal::{digest, RunRecord, RunStatus};
use crate::limits::INPUT_BYTES_MAX;
use crate::notice::Outbox;
use crate::replay::RunState;
use crate::store::{Takeover, Token};
use crate::workflow::{Workflow, Workflows};

mod batch;
mod builder;
mod events;
mod gc;
mod metrics;
mod notices;
mod operator;
mod parking;
mod reads;
mod rerun;
mod resume;
mod schedules;

pub use batch::{
    Batch, BatchAction, BatchOutcome, BatchReport, BatchRun, RunFilter, BATCH_RUNS_MAX,
};
pub use builder::EngineBuilder;
pub use events::{Delivered, EventIn};
pub use parking::{Resident, PARK_AFTER_DEFAULT};
pub use reads::{RunsPage, RunsQuery, LIST_SCAN_RECORDS_MAX, RUNS_PAGE_MAX};
pub use rerun::Rerun;
pub use schedules::CreatedSchedule;

/// Where a run being started comes from, stored in its record.
#[derive(Clone, Debug, Default)]
pub(crate) struct Lineage {
    /// The run that starts it as a child.
    pub(crate) parent: Option<RunId>,
    /// The finished run it reruns.
    pub(crate) rerun_of: Option<RunId>,
}

/// How long finished runs are kept by default.
pub const RETENTION_DEFAULT: Duration = Duration::from_secs(7 * 24 * 3600);

pub(crate) struct Inner {
    /// What the runs' code is given (`env.rs`).
    pub(crate) env: Arc<RunEnv>,
    pub(crate) workflows: Arc<Workflows>,
    path: PathBuf,
    /// The runs loaded and the runs parked (`parking.rs`).
    cells: Mutex<parking::Cells>,
    /// Wakes the parked runs' wake loop when a run parks with a wake time before its next.
    wakes: Arc<tokio::sync::Notify>,
    /// Held while a run is loaded from the store (`Engine::load_cell`).
    loading: tokio::sync::Mutex<()>,
    /// Drivers running, told to its receivers only when it reaches 0 (`Engine::shutdown`).
    drivers: watch::Sender<usize>,
    retention: Duration,
    /// Retentions an operator set per workflow, over the engine's and the workflow's own.
    retention_for: HashMap<String, Duration>,
    /// Unfinished runs left undriven at open for want of registered types, with the reason.
    undriven: Mutex<HashMap<RunId, String>>,
    /// The schedules' firing loop: its wake-up and its pass (`schedules.rs`).
    schedules: schedules::Firing,
    /// Which transitions write notices, shared with every cell (`notice.rs`).
    pub(crate) outbox: Arc<Outbox>,
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
    pub(crate) fn new(engine: Engine, id: RunId) -> RunHandle<W> {
        RunHandle {
            engine,
            id,
            workflow: PhantomData,
        }
    }

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

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

impl<W: Workflow> std::fmt::Debug for RunHandle<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunHandle")
            .field("id", &self.id)
            .field("workflow", &W::NAME)
            .finish()
    }
}

struct DriverGuard(watch::Sender<usize>);

impl Drop for DriverGuard {
    fn drop(&mut self) {
        // Only the count's reaching 0 is waited for (`Engine::shutdown`): the waiter is told
        // of that change alone, not of every driver's end.
        self.0.send_if_modified(|n| {
            *n -= 1;
            *n == 0
        });
    }
}

impl Engine {
    /// The data directory.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Loads `record` into a cell and spawns its driver, unless it is loaded already or
    /// another engine sharing the store holds it (then it drives it).
    async fn load(&self, record: RunRecord) -> Result<()> {
        let Some(loaded) = self.load_cell(record, Takeover::IfFree).await? else {
            return Ok(());
        };
        // A fresh cell whose run settled meanwhile goes again, decided under its lock: an
        // operator call that found it loaded may make it drivable at any moment until then.
        if let Loaded::Fresh(cell) = loaded {
            if !self.inner.unload_if_settled(&cell) {
                self.spawn_driver(cell);
            }
        }
        Ok(())
    }

    /// Run `id`'s loaded cell, if any, once the run is not settling out of the map (see
    /// `Inner::take_out`) nor being started (`StartMark`): both looked at under one hold of
    /// the map lock, so that a cell that leaves the map after the look is not missed while it
    /// removes its entry, and one a start is putting in is found.
    async fn loaded_settled_out(&self, id: &RunId) -> Option<Arc<RunCell>> {
        loop {
            let ends = {
                let cells = self.inner.cells.lock().expect("cells lock");
                // A loaded cell first: a start of a run that is loaded finds its record and
                // puts no cell in, so its mark is not waited for.
                if let Some(cell) = cells.get(id) {
                    return Some(Arc::clone(cell));
                }
                match cells.settling_ends(id) {
                    Some(ends) => ends,
                    None => return None,
                }
            };
            ends.await;
        }
    }

    /// Loads `record` and its journal into a cell in the map, unless one is there already;
    /// on a shared store, takes the run first as `takeover` allows (`None`: another engine
    /// keeps it).
    async fn load_cell(&self, record: RunRecord, takeover: Takeover) -> Result<Option<Loaded>> {
        // One load at a time: while no cell of the run is in the map and no other load can
        // put one there, nothing in this engine writes the run, so what is read below stays
        // current until the cell is in the map. (A new run's first cell is put in by the
        // start that created its record, without this lock: the run is marked being started
        // from before its record until then, and `loaded_settled_out` waits for that.)
        let _loading = self.inner.loading.lock().await;
        // A cell of the run that left the map settled may still be removing its wake index
        // entry (`Inner::take_out`): this load writes the entry after that removal. No other
        // cell of the run enters the map while `loading` is held, so none settles after.
        while let Some(cell) = self.loaded_settled_out(&record.id).await {
            let (id, token) = cell.token();
            if !self.inner.env.store.fenced(id, token) {
                return Ok(Some(Loaded::Existing(cell)));
            }
            // Another engine took the run over since this cell was loaded: it is stale.
            // (Its driver may be taking it out too: the loop waits for that as well.)
            self.inner.unload(&cell, Stop::Moved);
        }
        let id = record.id;
        let Some(token) = self.inner.env.store.take(&id, takeover).await? else {
            return Ok(None);
        };
        // The caller's copy may be stale (the run may have settled and been unloaded since it
        // was read, or moved on at another engine): the stored record is read again, after
        // the run was taken.
        let record = self
            .inner
            .env
            .store
            .run(&id)
            .await?
            .ok_or(EngineError::RunNotFound { id })?;
        let state = self.read_state(&record.id).await?;
        // Loaded from now on, whatever its wake index entry said (a parked run's wake time):
        // if the process dies while the run is loaded, the next open drives it. Written
        // before anything the run's cell writes.
        self.inner.env.store.set_wake(&record.id, 0)?;
        crate::crash::point("wake.after_index");
        let clock = self.inner.env.clock.clone();
        let outbox = Arc::clone(&self.inner.outbox);
        let cell = Arc::new(RunCell::new(record, state, clock, token, outbox));
        let mut cells = self.inner.cells.lock().expect("cells lock");
        if let Some(existing) = cells.insert(&cell) {
            return Ok(Some(Loaded::Existing(existing)));
        }
        Ok(Some(Loaded::Fresh(cell)))
    }

    fn spawn_driver(&self, cell: Arc<RunCell>) {
        self.inner
            .undriven
            .lock()
            .expect("undriven lock")
            .remove(&cell.id);
        // A count that grows is not waited for (see `DriverGuard`'s drop): nobody is told.
        self.inner.drivers.send_if_modified(|n| {
            *n += 1;
            false
        });
        let guard = DriverGuard(self.inner.drivers.clone());
        let inner = Arc::clone(&self.inner);
        let env = Arc::clone(&inner.env);
        let workflows = Arc::clone(&inner.workflows);
        let runs: Arc<dyn Runs> = Arc::clone(&inner) as Arc<dyn Runs>;
        // Every log line of the run (steps, waits, compensation) carries its id and workflow.
        // The span is a root: each run is a trace of its own whoever drives it (a parent's
        // `child` operation, an API call, the resume at open), and the span current here,
        // if any, is only linked to it.
        let span = tracing::info_span!(
            parent: None,
            "run",
            run_id = cell.id.as_str(),
            workflow = %cell.with_record(|r| r.workflow.clone())
        );
        span.follows_from(tracing::Span::current());
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                let _guard = guard;
                let driven = contained(executor::drive(env, workflows, runs, Arc::clone(&cell)));
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
    /// The id must obey [`RunId::new_top_level`]: no `/` (child runs' ids), no leading `-` or
    /// `.`, no `..`.
    pub async fn start<W: Workflow>(&self, id: &str, input: W::Input) -> Result<RunHandle<W>> {
        let id = RunId::new_top_level(id)?;
        self.inner.workflows.add::<W>()?;
        let input = serde_json::to_value(input).map_err(|source| EngineError::Serialise {
            what: format!("input of {}", W::NAME),
            source,
        })?;
        let record = self
            .start_value(W::NAME, id, input, Lineage::default(), None)
            .await?;
        Ok(RunHandle::new(self.clone(), record.id))
    }

    /// Starts a run of the registered workflow `workflow` with a JSON input (for the CLI and
    /// the HTTP API). The id is checked as [`Engine::start`]'s, and the input against the
    /// workflow's input type: a field of the wrong type is [`EngineError::MalformedInput`], a
    /// field the type does not know (where it refuses unknown fields) or a value its checks
    /// refuse is [`EngineError::InvalidInput`], each naming the field's path.
    pub async fn start_json(&self, workflow: &str, id: &str, input: Value) -> Result<RunRecord> {
        let (id, input) = self.checked_json_start(workflow, id, input)?;
        self.start_value(workflow, id, input, Lineage::default(), None)
            .await
    }

    /// The id and the normalised input of a JSON start of `workflow`, checked.
    fn checked_json_start(&self, workflow: &str, id: &str, input: Value) -> Result<(RunId, Value)> {
        let id = RunId::new_top_level(id)?;
        let entry =
            self.inner
                .workflows
                .get(workflow)
                .ok_or_else(|| EngineError::UnknownWorkflow {
                    name: workflow.into(),
                    registered: self.inner.workflows.names(),
                })?;
        // Stored in its typed form, so that a later typed `start` of the same value (which
        // writes omitted optional fields as null, say) is recognised as the same input.
        let input = (entry.normalise_input)(&input).map_err(|e| e.into_engine_error(workflow))?;
        Ok((id, input))
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
        self.start_value(
            workflow,
            child.clone(),
            input,
            Lineage {
                parent: Some(parent.clone()),
                rerun_of: None,
            },
            None,
        )
        .await
        .map(|_| ())
    }

    /// Starts (or finds) run `id`, checked by the caller: a caller's id as
    /// [`RunId::new_top_level`], a child's made by [`crate::child_id`]. With `event`, the run
    /// is started with that event in its mailbox (durable with it), or a run found is sent it.
    ///
    /// The start runs on a task of its own, which goes on if the caller goes away (a client
    /// that hung up, a timeout around `Engine::start`): stopped between its record and its
    /// driver, it would leave the run written and driven by nobody until the next open.
    async fn start_value(
        &self,
        workflow: &str,
        id: RunId,
        input: Value,
        lineage: Lineage,
        event: Option<&EventIn>,
    ) -> Result<RunRecord> {
        let engine = self.clone();
        let workflow = workflow.to_owned();
        let event = event.cloned();
        let start = async move {
            engine
                .start_here(&workflow, id, input, lineage, event.as_ref())
                .await
        };
        match tokio::spawn(tracing::Instrument::in_current_span(start)).await {
            Ok(started) => started,
            Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
            // The runtime is shutting down.
            Err(_) => Err(EngineError::ShutDown),
        }
    }

    /// [`Engine::start_value`], on its task.
    async fn start_here(
        &self,
        workflow: &str,
        id: RunId,
        input: Value,
        lineage: Lineage,
        event: Option<&EventIn>,
    ) -> Result<RunRecord> {
        if *self.inner.env.shutdown.borrow() {
            return Err(EngineError::ShutDown);
        }
        let bytes = crate::limits::json_bytes(&input);
        if bytes > INPUT_BYTES_MAX {
            return Err(EngineError::TooLarge {
                what: format!("input of run {id}"),
                bytes,
                limit: INPUT_BYTES_MAX,
            });
        }
        let entry =
            self.inner
                .workflows
                .get(workflow)
                .ok_or_else(|| EngineError::UnknownWorkflow {
                    name: workflow.into(),
                    registered: self.inner.workflows.names(),
                })?;
        (entry.validate)(&input).map_err(|e| EngineError::InvalidInput {
            workflow: workflow.into(),
            field: e.field,
            reason: e.reason,
        })?;
        let now = self.inner.env.clock.now_ms();
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
            parent: lineage.parent,
            rerun_of: lineage.rerun_of,
        };
        // From before its record until its cell is in the map (or the start ends without
        // one), the run is marked being started: a load of it (a send's, an operator's)
        // waits for that and then takes the cell it finds. So no load puts in a cell made
        // from a journal read before this start's cell ran, and none comes between the
        // record and an event's first entry.
        let starting = StartMark::new(&self.inner, &id);
        // Before a new record, in the store's write order (on PostgreSQL, committed before
        // it): the workflow among the types the runs use (the run's wake index entry comes
        // with its record, from `create_run`). The record is read first only when that would
        // write: a start that finds the run (or a record it cannot read) writes no type.
        // When the type is listed already, a new run costs no read.
        let types = &self.inner.env.types;
        if types.would_note_workflow(workflow) && self.inner.env.store.run(&id).await?.is_none() {
            types.workflow(&*self.inner.env.store, workflow).await?;
        }
        match self.inner.env.store.create_run(&record).await? {
            None => {
                crate::crash::point("start.after_create");
                let state = match event {
                    Some(event) => self.deliver_first(&record, event)?,
                    None => RunState::default(),
                };
                // The first cell goes in before the start is durable, so that a waiter finds
                // the run loaded meanwhile; its driver starts once the start is durable.
                let fresh = starting.insert(record.clone(), state);
                if let Err((error, stop)) = self.start_durable(&id).await {
                    if let Some(cell) = fresh {
                        self.inner.unload(&cell, stop);
                    }
                    return Err(error);
                }
                tracing::info!(run_id = %id, workflow, "run started");
                if let Some(cell) = fresh {
                    self.spawn_driver(cell);
                }
                Ok(record)
            }
            Some(existing) => {
                drop(starting);
                let record = self.found_existing(existing, &record).await?;
                if let Some(event) = event {
                    self.send_checked(&record.id, event).await?;
                }
                Ok(record)
            }
        }
    }

    /// Waits until new run `id`'s start is durable; if it cannot be, the error and why the
    /// run's cell stops.
    async fn start_durable(&self, id: &RunId) -> std::result::Result<(), (EngineError, Stop)> {
        match self.inner.env.store.sync().wait().await {
            Ok(()) if self.inner.env.store.fenced(id, Token::CREATED) => {
                Err((EngineError::Fenced { id: id.clone() }, Stop::Moved))
            }
            Ok(()) => {
                crate::crash::point("start.after_sync");
                Ok(())
            }
            Err(error) => {
                let stop = Stop::Error(format!("its start failed: {error}"));
                Err((error, stop))
            }
        }
    }

    /// A start found run `existing` under the id of `requested`: the same run if workflow,
    /// input and parent agree (made durable and driven before it is returned), else a
    /// mismatch.
    async fn found_existing(
        &self,
        existing: RunRecord,
        requested: &RunRecord,
    ) -> Result<RunRecord> {
        if existing.workflow != requested.workflow
            || existing.input != requested.input
            || existing.parent != requested.parent
            || existing.rerun_of != requested.rerun_of
        {
            let describe = |r: &RunRecord| {
                let parent = match &r.parent {
                    Some(parent) => format!(" as a child of run {parent}"),
                    None => String::new(),
                };
                let rerun = match &r.rerun_of {
                    Some(rerun) => format!(" as a rerun of run {rerun}"),
                    None => String::new(),
                };
                format!(
                    "workflow {:?} and input {}{parent}{rerun}",
                    r.workflow,
                    digest(&r.input)
                )
            };
            return Err(EngineError::IdempotencyMismatch {
                id: existing.id.clone(),
                existing: describe(&existing),
                requested: describe(requested),
            });
        }
        // The run may have been created by a concurrent call whose sync is still in flight:
        // nobody learns of a run before it is durable.
        self.inner.env.store.sync().wait().await?;
        // That call may not have loaded it yet either; whoever loads first drives it (the
        // cell map admits one), so a caller never waits on an undriven run. A run left
        // undriven at open for want of registered types stays so (its waiters hear why).
        let undriven = self
            .inner
            .undriven
            .lock()
            .expect("undriven lock")
            .contains_key(&existing.id);
        if existing.status.is_drivable() && !undriven {
            self.load(existing.clone()).await?;
        }
        Ok(existing)
    }

    /// Resolves, with the reason, once the store can make nothing durable any more: a sync
    /// failed, or (on PostgreSQL) this engine's lease was lost and other engines may own its
    /// runs now. No run moves on in this engine after that; a worker exits so that its
    /// supervisor starts a fresh one.
    pub async fn broken(&self) -> String {
        let mut broken = self.inner.env.store.broken();
        let reason = match broken.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone().unwrap_or_default(),
            // The store outlives every engine handle: not reached while `self` lives.
            Err(_) => std::future::pending().await,
        };
        reason
    }

    /// Stops the engine: no new step or timer starts, in-flight steps finish and are
    /// recorded, then every driver ends. Unfinished runs resume at the next open. A
    /// PostgreSQL store then gives every run this engine owns up to the other engines sharing
    /// the database; reads go on, writes fail.
    pub async fn shutdown(&self) {
        self.inner.env.shutdown.send_replace(true);
        self.schedules_stopped().await;
        let mut drivers = self.inner.drivers.subscribe();
        let _ = drivers.wait_for(|n| *n == 0).await;
        if let Err(error) = self.inner.env.stats.flush(&*self.inner.env.store) {
            tracing::warn!(%error, "latency statistics could not be written");
        }
        if let Err(error) = self.inner.env.store.sync().wait().await {
            tracing::error!(%error, "the store's last sync failed");
            return;
        }
        if let Err(error) = self.inner.env.store.release().await {
            tracing::warn!(%error, "the store could not be released");
        }
    }
}

/// A run marked being started in the map ([`Cells::starting`]) until its start puts its cell
/// in ([`StartMark::insert`]) or ends without one (dropped).
struct StartMark<'a> {
    inner: &'a Inner,
    /// `None` once the mark is gone.
    id: Option<RunId>,
}

impl<'a> StartMark<'a> {
    fn new(inner: &'a Inner, id: &RunId) -> StartMark<'a> {
        inner.cells.lock().expect("cells lock").starting(id);
        StartMark {
            inner,
            id: Some(id.clone()),
        }
    }

    /// Puts the cell of the run just created, whose journal `state` folds (nothing to read),
    /// in the map, and ends the mark; returns the cell if it went in (no load put a cell of
    /// the run in first), to be driven once the run's start is durable.
    fn insert(mut self, record: RunRecord, state: RunState) -> Option<Arc<RunCell>> {
        let inner = self.inner;
        let cell = Arc::new(RunCell::new(
            record,
            state,
            inner.env.clock.clone(),
            Token::CREATED,
            Arc::clone(&inner.outbox),
        ));
        // The run's first load: `poison.rs` counts it without a write.
        cell.mark_started();
        let mut cells = inner.cells.lock().expect("cells lock");
        let fresh = cells.insert(&cell).is_none();
        if let Some(id) = self.id.take() {
            cells.started(&id);
        }
        fresh.then_some(cell)
    }
}

impl Drop for StartMark<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            // Not while unwinding a panic under the lock (poisoned): the mark stays, and the
            // run's loads wait; the engine is broken then in any case.
            if let Ok(mut cells) = self.inner.cells.lock() {
                cells.started(&id);
            }
        }
    }
}

/// The engine as the runs' code asks for it (`env.rs`).
impl Runs for Inner {
    fn start_child(
        self: Arc<Self>,
        workflow: String,
        child: RunId,
        input: Value,
        parent: RunId,
    ) -> BoxFuture<'static, Result<()>> {
        Box::pin(async move {
            Engine { inner: self }
                .start_child(&workflow, &child, input, &parent)
                .await
        })
    }

    fn wait(self: Arc<Self>, id: RunId) -> BoxFuture<'static, Result<RunRecord>> {
        Box::pin(async move { Engine { inner: self }.wait(id.as_str()).await })
    }

    fn compensate_child(
        self: Arc<Self>,
        child: RunId,
        parent: RunId,
    ) -> BoxFuture<'static, Result<Option<RunRecord>>> {
        Box::pin(async move {
            Engine { inner: self }
                .compensate_child(&child, &parent)
                .await
        })
    }

    fn unload_if_settled(&self, cell: &Arc<RunCell>) -> bool {
        Inner::unload_if_settled(self, cell)
    }

    fn unload(&self, cell: &Arc<RunCell>, stop: Stop) {
        Inner::unload(self, cell, stop)
    }

    fn park(
        &self,
        cell: &Arc<RunCell>,
        wake_at_ms: Option<u64>,
        ready: &(dyn Fn(&RunState) -> bool + Sync),
        awaiting: Option<&RunId>,
    ) -> bool {
        Inner::park(self, cell, wake_at_ms, ready, awaiting)
    }
}
