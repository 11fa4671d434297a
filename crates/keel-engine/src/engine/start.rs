//! Starting runs: a caller's start (typed or JSON, with or without an event), a child's
//! and a rerun's all go through `Engine::start_value`, which finishes a start whose caller
//! went away on a task of its own (`FinishIfDropped`) and marks the run being started in the
//! map until its cell is in (`StartMark`).

use std::future::Future;
use std::sync::Arc;

use serde_json::Value;
use tracing::instrument::Instrumented;
use tracing::Instrument;

use crate::cell::{RunCell, Stop};
use crate::engine::{Engine, Inner, Lineage, RunHandle};
use crate::error::{EngineError, Result};
use crate::ids::RunId;
use crate::journal::{digest, RunRecord, RunStatus};
use crate::limits::INPUT_BYTES_MAX;
use crate::replay::RunState;
use crate::store::Token;
use crate::workflow::{Workflow, WorkflowEntry};

use super::events::EventIn;

impl Engine {
    /// Starts a run of `W` with id `id`, or returns the existing run if one with the same id,
    /// workflow and input exists (running or finished). The run is durable when this returns.
    /// The id must obey [`RunId::new_top_level`]: no `/` (child runs' ids), no leading `-` or
    /// `.`, no `..`.
    pub async fn start<W: Workflow>(&self, id: &str, input: W::Input) -> Result<RunHandle<W>> {
        let (id, input) = self.checked_typed_start::<W>(id, input)?;
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

    /// The id and the JSON input of a typed start of `W`, checked, with `W` registered.
    pub(super) fn checked_typed_start<W: Workflow>(
        &self,
        id: &str,
        input: W::Input,
    ) -> Result<(RunId, Value)> {
        let id = RunId::new_top_level(id)?;
        self.inner.workflows.add::<W>()?;
        let input = serde_json::to_value(input).map_err(|source| EngineError::Serialise {
            what: format!("input of {}", W::NAME),
            source,
        })?;
        Ok((id, input))
    }

    /// The registry's entry of `workflow`, or the error naming the workflows registered.
    fn registered(&self, workflow: &str) -> Result<Arc<WorkflowEntry>> {
        self.inner
            .workflows
            .get(workflow)
            .ok_or_else(|| EngineError::UnknownWorkflow {
                name: workflow.into(),
                registered: self.inner.workflows.names(),
            })
    }

    /// The id and the normalised input of a JSON start of `workflow`, checked.
    pub(super) fn checked_json_start(
        &self,
        workflow: &str,
        id: &str,
        input: Value,
    ) -> Result<(RunId, Value)> {
        let id = RunId::new_top_level(id)?;
        let entry = self.registered(workflow)?;
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
    /// The start runs in the caller's task, and goes on in a task of its own if the caller
    /// goes away once it began (a client that hung up, a timeout around `Engine::start`):
    /// stopped between its record and its driver, it would leave the run written and driven
    /// by nobody until the next open ([`FinishIfDropped`]).
    pub(super) async fn start_value(
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
        FinishIfDropped::new(start).await
    }

    /// [`Engine::start_value`]'s work.
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
        let entry = self.registered(workflow)?;
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
}

/// A future that, dropped after it was first polled and before it ended, is finished in a
/// task of its own on the runtime it was made on: a start goes on when its caller goes
/// away. A start spawned on a task every time cost about 4% more CPU per durable start (the
/// task and its wake-up; docs/benchmarks.md); this spawns only for a caller that went away.
/// Made and first polled in one poll of its caller (`start_value`), so a start dropped
/// before it began never made one. Made outside a runtime, it panics, as `tokio::spawn`
/// did. What it does not finish: a start whose poll panicked (the panic goes to the caller),
/// and one dropped while its runtime shuts down (tokio drops the task, as it drops every
/// task then). A start finished that way that fails has nobody to answer: its error is
/// logged in the caller's span (a warning; the engine's shutdown at `debug`).
struct FinishIfDropped<T: Send + 'static, F: Future<Output = Result<T>> + Send + 'static> {
    /// `None` once it ended, or when its poll panicked (it must not be polled again). In a
    /// mutex only so that the start's future stays `Sync`, as it was when it awaited a
    /// `JoinHandle`: it is reached through `&mut self` alone (`get_mut`, no locking).
    start: std::sync::Mutex<Option<std::pin::Pin<Box<Instrumented<F>>>>>,
    runtime: tokio::runtime::Handle,
}

impl<T: Send + 'static, F: Future<Output = Result<T>> + Send + 'static> FinishIfDropped<T, F> {
    fn new(start: F) -> Self {
        FinishIfDropped {
            start: std::sync::Mutex::new(Some(Box::pin(start.in_current_span()))),
            runtime: tokio::runtime::Handle::current(),
        }
    }

    fn start(&mut self) -> &mut Option<std::pin::Pin<Box<Instrumented<F>>>> {
        // Never poisoned: nothing locks it.
        self.start
            .get_mut()
            .unwrap_or_else(|poison| poison.into_inner())
    }
}

impl<T: Send + 'static, F: Future<Output = Result<T>> + Send + 'static> Future
    for FinishIfDropped<T, F>
{
    type Output = Result<T>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<T>> {
        // Out while it is polled: a poll that panics leaves nothing to finish.
        let mut start = self.start().take().expect("a start polled after it ended");
        let poll = start.as_mut().poll(cx);
        if poll.is_pending() {
            *self.start() = Some(start);
        }
        poll
    }
}

impl<T: Send + 'static, F: Future<Output = Result<T>> + Send + 'static> Drop
    for FinishIfDropped<T, F>
{
    fn drop(&mut self) {
        if let Some(start) = self.start().take() {
            let span = start.span().clone();
            let finish = async move {
                match start.await {
                    Ok(_) => {}
                    Err(EngineError::ShutDown) => {
                        tracing::debug!("a start whose caller went away stopped at shutdown");
                    }
                    Err(error) => tracing::warn!(%error, "a start whose caller went away failed"),
                }
            };
            drop(self.runtime.spawn(finish.instrument(span)));
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

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::task::Poll;

    use super::*;

    /// What a test's subscriber wrote.
    #[derive(Clone, Default)]
    struct Written(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Written {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A start that fails after its caller went away has its error logged (before, the
    /// task's output was dropped, and nothing said the start failed).
    #[test]
    fn a_start_finished_after_its_caller_went_away_logs_its_failure() {
        let written = Written::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer({
                let written = written.clone();
                move || written.clone()
            })
            .with_ansi(false)
            .finish();
        let _default = tracing::subscriber::set_default(subscriber);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(async {
            let (fail, failed) = tokio::sync::oneshot::channel::<()>();
            let mut start = Box::pin(FinishIfDropped::new(async move {
                let _ = failed.await;
                Err::<(), _>(EngineError::InvalidRequest(
                    "failed after its caller went away".into(),
                ))
            }));
            // Begun, then its caller goes away.
            let polled = std::future::poll_fn(|cx| Poll::Ready(start.as_mut().poll(cx))).await;
            assert!(polled.is_pending());
            drop(start);
            fail.send(()).unwrap();
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
        });
        let logged = String::from_utf8(written.0.lock().unwrap().clone()).unwrap();
        assert!(
            logged.contains("WARN") && logged.contains("a start whose caller went away failed"),
            "{logged}"
        );
        assert!(
            logged.contains("failed after its caller went away"),
            "{logged}"
        );
    }
}
