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
use crate::journal::{RunRecord, RunStatus};
use crate::notice::Outbox;
use crate::replay::RunState;
use crate::store::Takeover;
use crate::workflow::{Workflow, Workflows};

mod batch;
mod builder;
mod cells;
mod events;
mod gc;
mod metrics;
mod notices;
mod operator;
mod parking;
mod purge;
mod reads;
mod rerun;
mod resume;
mod schedules;
mod start;

pub use batch::{
    Batch, BatchAction, BatchOutcome, BatchReport, BatchRun, RunFilter, BATCH_RUNS_MAX,
};
pub use builder::EngineBuilder;
pub use cells::Resident;
pub use events::{Delivered, EventIn};
pub use gc::GC_RUNS_PER_WRITE;
pub use parking::PARK_AFTER_DEFAULT;
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
    /// The runs loaded and the runs parked (`cells.rs`).
    cells: Mutex<cells::Cells>,
    /// Wakes the parked runs' wake loop when a run parks with a wake time before its next.
    wakes: Arc<tokio::sync::Notify>,
    /// Held while a run is loaded from the store (`Engine::load_cell`), and while a purge or
    /// garbage collection checks and deletes runs (`engine/purge.rs`, `engine/gc.rs`), so
    /// that no run is loaded between the check and the delete.
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
        // from before its record until then, and `loaded_settled_out` waits for that.) A
        // purge and garbage collection delete under this lock too: the run read below is
        // not deleted before its cell is in the map, where their checks see it.
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
