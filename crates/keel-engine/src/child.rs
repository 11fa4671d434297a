//! Child runs: a workflow starts another registered workflow as a run of its own and awaits
//! its end.
//!
//! The parent journals `ChildStarted` (with the child's deterministic id and input) durably
//! before the child is created, then creates it idempotently (a replay finds the child
//! already there), awaits it, and journals `ChildEnded`. The child has its own journal,
//! statuses and saga. When the parent compensates, the saga undoes a completed child by
//! starting the child's own compensation, and cancels a child it never saw end; a child
//! that failed or compensated itself is left alone (`saga.rs`).

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use crate::cell::RunCell;
use crate::ctx::Ctx;
use crate::env::Runs;
use crate::error::EngineError;
use crate::ids::{check_event_name, child_id, OperationIndex, RunId};
use crate::interrupt::Interrupt;
use crate::journal::{Event, RunRecord, RunStatus};
use crate::lane::Lane;
use crate::limits::{CHILDREN_PER_RUN_MAX, EVENT_PAYLOAD_BYTES_MAX};
use crate::parallel::run_all_observed;
use crate::replay::{ChildEnd, Op};
use crate::store::JournalStore;
use crate::workflow::{Workflow, WorkflowError};

/// How often a parent looks again at a child parked for an operator (suspended, paused, or
/// with a failed compensation); a child being driven is awaited, not polled.
const PARKED_CHILD_POLL: Duration = Duration::from_secs(1);

/// How far a fan-out of child runs is ([`Ctx::children_reporting`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FanOutProgress {
    /// Children that ended, however they ended.
    pub ended: usize,
    /// Children that completed.
    pub completed: usize,
    /// Children of the fan-out.
    pub total: usize,
}

impl FanOutProgress {
    fn count(&mut self, end: &ChildEnd) {
        self.ended += 1;
        if end.status == RunStatus::Completed {
            self.completed += 1;
        }
    }
}

/// A fan-out's report, as [`Ctx::children_reporting`] was given it, serialised.
type Report<'a> = dyn FnMut(&FanOutProgress) -> serde_json::Result<Value> + Send + 'a;

/// Publishes a fan-out's progress report `value` under `name` in `cell` (advisory: a report
/// that cannot be kept is logged and left out).
fn publish_progress(
    cell: &RunCell,
    store: &dyn JournalStore,
    name: &str,
    value: serde_json::Result<Value>,
) {
    let value = match value {
        Ok(value) if crate::limits::json_bytes(&value) <= EVENT_PAYLOAD_BYTES_MAX => value,
        Ok(_) => {
            tracing::warn!(run_id = %cell.id, name, "a progress report over the size bound is left out");
            return;
        }
        Err(error) => {
            tracing::warn!(run_id = %cell.id, name, %error, "a progress report that does not serialise is left out");
            return;
        }
    };
    let event = Event::ProgressPublished {
        name: name.into(),
        value,
    };
    match cell.append(store, event) {
        Ok(()) => cell.news.notify_waiters(),
        Err(error) => tracing::warn!(run_id = %cell.id, name, %error, "progress not published"),
    }
}

/// What one child of a fan-out needs to do, decided from the journal.
enum Plan {
    Done(ChildEnd),
    Run { input: Value, started: bool },
}

impl Ctx {
    /// Starts a child run of `W` with `input` and waits for it to end: its output, or
    /// [`WorkflowError::Child`] when it failed, compensated itself or was resolved by an
    /// operator (its own saga undid its steps). The child's id is `<run id>/<operation>`
    /// (see [`child_id`]), the same on every replay.
    ///
    /// A child parked for an operator (suspended, paused, compensation failed) is waited for
    /// until an operator settles it. While the parent waits, cancelling, pausing or shutting
    /// down the parent stops the wait, not the child. On the sled store a parent that has
    /// waited [`crate::EngineBuilder::park_after`] on its main lane (not in a branch of
    /// [`Ctx::children`]) parks until the child settles: its memory is freed, and it is
    /// loaded again and replays when the child settles (ends, or stops for an operator; then
    /// it waits loaded, looking again every second). While it waits for the child, loaded or
    /// parked, it holds no slot of [`crate::EngineBuilder::runs_concurrent_max`].
    pub async fn child<W: Workflow>(
        &mut self,
        input: W::Input,
    ) -> Result<W::Output, WorkflowError> {
        self.check()?;
        let index = self.next_index()?;
        let input = self.child_input::<W>(index, &input)?;
        let plan = self.child_plan::<W>(index, None, input)?;
        let end = match plan {
            Plan::Done(end) => end,
            Plan::Run { input, started } => {
                run_child(&mut self.lane, index, W::NAME, input, started)
                    .await
                    .map_err(|cause| self.interrupt(cause))?
            }
        };
        self.child_result::<W>(index, end)
    }

    /// Starts a child run of `W` per input, at most `width` running at once, and returns
    /// each one's result in input order (see [`Ctx::child`]). One child failing does not
    /// stop or undo the others: the body decides what a failure means. The children are the
    /// branches of a fan-out, so they count against [`crate::limits::FAN_OUT_MAX`] as well
    /// as [`CHILDREN_PER_RUN_MAX`].
    pub async fn children<W: Workflow>(
        &mut self,
        inputs: Vec<W::Input>,
        width: usize,
    ) -> Result<Vec<Result<W::Output, WorkflowError>>, WorkflowError> {
        self.fan_out_children::<W>(inputs, width, None).await
    }

    /// [`Ctx::children`], publishing `report(progress)` under `name` each time a child ends
    /// (readers get it with [`crate::Engine::published`], as a value of [`Ctx::publish`]):
    /// "12 of 200 devices onboarded" while the fan-out goes on. The reports are no operations
    /// of the body: replay neither checks nor repeats them, and a fan-out taken up again after
    /// a restart reports again, counting the children that had ended before. A report that
    /// does not serialise or is past [`EVENT_PAYLOAD_BYTES_MAX`] is left out (and logged).
    pub async fn children_reporting<W, T>(
        &mut self,
        inputs: Vec<W::Input>,
        width: usize,
        name: &str,
        mut report: impl FnMut(&FanOutProgress) -> T + Send,
    ) -> Result<Vec<Result<W::Output, WorkflowError>>, WorkflowError>
    where
        W: Workflow,
        T: Serialize,
    {
        if let Err(detail) = check_event_name("progress value name", name) {
            let e = EngineError::InvalidRequest(detail);
            return Err(self.interrupt(Interrupt::Engine(e)));
        }
        let mut report = |progress: &FanOutProgress| serde_json::to_value(report(progress));
        self.fan_out_children::<W>(inputs, width, Some((name, &mut report)))
            .await
    }

    async fn fan_out_children<W: Workflow>(
        &mut self,
        inputs: Vec<W::Input>,
        width: usize,
        mut report: Option<(&str, &mut Report<'_>)>,
    ) -> Result<Vec<Result<W::Output, WorkflowError>>, WorkflowError> {
        let count = inputs.len();
        let fork = self.fork(count, width, &format!("{} child runs", W::NAME))?;
        let mut ends: Vec<Option<ChildEnd>> = (0..count).map(|_| None).collect();
        let mut tasks = Vec::new();
        for (i, input) in inputs.iter().enumerate() {
            let index = fork.branch(i);
            let input = self.child_input::<W>(index, input)?;
            match self.child_plan::<W>(index, Some(fork.index), input)? {
                Plan::Done(end) => ends[i] = Some(end),
                Plan::Run { input, started } => {
                    let task = move |mut lane: Lane| async move {
                        run_child(&mut lane, index, W::NAME, input, started).await
                    };
                    tasks.push((i, task));
                }
            }
        }
        let mut progress = FanOutProgress {
            ended: 0,
            completed: 0,
            total: count,
        };
        for end in ends.iter().flatten() {
            progress.count(end);
        }
        let cell = Arc::clone(&self.lane.cell);
        let store = Arc::clone(&self.lane.env.store);
        if let Some((name, report)) = report.as_mut() {
            if progress.ended > 0 {
                // Taken up again: the last report before may not have been kept.
                publish_progress(&cell, &*store, name, report(&progress));
            }
        }
        let observe = |end: &ChildEnd| {
            if let Some((name, report)) = report.as_mut() {
                progress.count(end);
                publish_progress(&cell, &*store, name, report(&progress));
            }
        };
        let ran = run_all_observed(&mut self.lane, width, tasks, observe);
        match tracing::Instrument::instrument(ran, fork.span.clone()).await {
            Ok(done) => done.into_iter().for_each(|(i, end)| ends[i] = Some(end)),
            Err(cause) => return Err(self.interrupt(cause)),
        }
        Ok(ends
            .into_iter()
            .enumerate()
            .map(|(i, end)| {
                let end = end.expect("every child ran or was replayed");
                self.child_result::<W>(fork.branch(i), end)
            })
            .collect())
    }

    fn child_input<W: Workflow>(
        &mut self,
        index: OperationIndex,
        input: &W::Input,
    ) -> Result<Value, WorkflowError> {
        if let Err(e) = self.workflows.add::<W>() {
            return Err(self.interrupt(Interrupt::Engine(e)));
        }
        self.argument(index, "child run", W::NAME, input)
    }

    /// What the child at `index` must do, from the journal (`fork`: the fan-out it is a
    /// branch of, if any).
    fn child_plan<W: Workflow>(
        &mut self,
        index: OperationIndex,
        fork: Option<OperationIndex>,
        input: Value,
    ) -> Result<Plan, WorkflowError> {
        let plan = self
            .lane
            .cell
            .with_state(|state| match state.ops.get(index.0 as usize) {
                None if fork.is_none() => Ok(Plan::Run {
                    input,
                    started: false,
                }),
                Some(Op::Branch) if fork.is_some() => Ok(Plan::Run {
                    input,
                    started: false,
                }),
                Some(Op::Child(op)) if op.workflow == W::NAME && op.input == input => {
                    Ok(match &op.end {
                        Some(end) => Plan::Done(end.clone()),
                        None => Plan::Run {
                            input,
                            started: true,
                        },
                    })
                }
                Some(other) => Err(format!(
                    "journal holds {}, code asks for a child run of {:?} with input {input}",
                    other.describe(),
                    W::NAME
                )),
                None => Err(format!(
                    "child {index} of a fan-out is missing from the journal"
                )),
            });
        plan.map_err(|detail| self.interrupt(Interrupt::NonDeterminism { index, detail }))
    }

    fn child_result<W: Workflow>(
        &mut self,
        index: OperationIndex,
        end: ChildEnd,
    ) -> Result<W::Output, WorkflowError> {
        if end.status != RunStatus::Completed {
            let child = self
                .lane
                .cell
                .with_state(|s| match s.ops.get(index.0 as usize) {
                    Some(Op::Child(op)) => op.child.clone(),
                    _ => child_id(&self.lane.cell.id, index),
                });
            return Err(WorkflowError::Child {
                step: index,
                workflow: W::NAME.into(),
                child,
                status: end.status,
                error: end.error.unwrap_or_default(),
            });
        }
        serde_json::from_value(end.output.unwrap_or(Value::Null)).map_err(|e| {
            let detail = format!(
                "recorded output of child run ({}) does not decode: {e}",
                W::NAME
            );
            self.interrupt(Interrupt::NonDeterminism { index, detail })
        })
    }
}

/// Starts (unless `started`, journaled) and awaits the child run at operation `index`, and
/// journals its end.
async fn run_child(
    lane: &mut Lane,
    index: OperationIndex,
    workflow: &'static str,
    input: Value,
    started: bool,
) -> Result<ChildEnd, Interrupt> {
    // The child run has a trace of its own (its driver's `run` span, linked to this one);
    // this span is the parent's operation: starting the child and waiting for its end.
    let span = tracing::info_span!(
        "child",
        run_id = lane.cell.id.as_str(),
        step = index.0,
        kind = workflow,
        child = %child_id(&lane.cell.id, index),
    );
    tracing::Instrument::instrument(start_and_await(lane, index, workflow, input, started), span)
        .await
}

/// [`run_child`] in its span.
async fn start_and_await(
    lane: &mut Lane,
    index: OperationIndex,
    workflow: &'static str,
    input: Value,
    started: bool,
) -> Result<ChildEnd, Interrupt> {
    let parent = lane.cell.id.clone();
    let child = child_id(&parent, index);
    if !started {
        lane.check()?;
        let children = lane.cell.with_state(|s| s.children);
        if children >= CHILDREN_PER_RUN_MAX {
            return Err(Interrupt::Engine(EngineError::LimitReached {
                what: format!("child runs of run {parent}"),
                limit: u64::from(CHILDREN_PER_RUN_MAX),
            }));
        }
        lane.journal_start(Event::ChildStarted {
            step: index,
            workflow: workflow.into(),
            child: child.clone(),
            input: input.clone(),
        })?;
        // Durable before the child exists: a crash leaves a journaled child that a replay
        // creates (or finds), never a child the parent does not know of.
        lane.durable().await?;
        crate::crash::point("child.after_started");
    }
    let runs = lane.env.runs().map_err(|_| Interrupt::ShutDown)?;
    let started = Arc::clone(&runs)
        .start_child(workflow.into(), child.clone(), input, parent.clone())
        .await;
    match started {
        Ok(()) => {}
        // The child's own checks refuse its input: it fails without ever existing, and only
        // it (the parent's other children go on).
        Err(e @ EngineError::InvalidInput { .. }) => {
            let end = ChildEnd {
                status: RunStatus::Failed,
                output: None,
                error: Some(e.to_string()),
            };
            return end_child(lane, index, end);
        }
        Err(EngineError::ShutDown) => return Err(Interrupt::ShutDown),
        Err(e @ EngineError::IdempotencyMismatch { .. }) => {
            // Someone else's run holds the id: the parent cannot go on without an operator.
            return Err(Interrupt::Engine(EngineError::InvalidRequest(format!(
                "child run of operation {index}: {e}"
            ))));
        }
        Err(e) => return Err(Interrupt::Engine(e)),
    }
    crate::crash::point("child.after_created");
    // Parked while the child runs.
    lane.cell.survived(&*lane.env.store);
    // The run's slot goes to the children while it waits (`run_slot.rs`): parents filling
    // every slot would otherwise wait for ever for children that never get one.
    lane.cell.slot.give_up();
    let awaited = await_child(lane, &runs, &child).await;
    let driven_on = !matches!(awaited, Err(Interrupt::Parked | Interrupt::ShutDown));
    if driven_on
        && !lane
            .cell
            .slot
            .take_back(&lane.env.permits, &lane.env.shutdown)
            .await
    {
        return Err(Interrupt::ShutDown);
    }
    let record = awaited?;
    let end = ChildEnd {
        status: record.status,
        output: record.output,
        error: record.error,
    };
    end_child(lane, index, end)
}

/// Waits until child run `child` ends (a terminal status), looking again now and then at a
/// child parked for an operator or not driven for now; an interrupt of the parent stops the
/// wait, not the child.
async fn await_child(
    lane: &mut Lane,
    runs: &Arc<dyn Runs>,
    child: &RunId,
) -> Result<RunRecord, Interrupt> {
    // After `park_after` of waiting the parent parks until the child settles
    // (`engine/parking.rs`), on a store with a wake index that no other engine shares: a
    // child settling at another engine could not wake it.
    let store = &lane.env.store;
    let parks_after = lane
        .env
        .park_after
        .filter(|_| store.keeps_wakes() && store.claim_every().is_none());
    let mut park_after = parks_after;
    loop {
        let clock = lane.env.clock.clone();
        let parking = async {
            match park_after {
                Some(after) => {
                    let at_ms = clock.now_ms().saturating_add(after.as_millis() as u64);
                    clock.sleep_until(at_ms).await
                }
                None => std::future::pending().await,
            }
        };
        let waited = tokio::select! {
            waited = Arc::clone(runs).wait(child.clone()) => Some(waited),
            () = parking => None,
            cause = lane.interrupted() => return Err(cause),
        };
        let Some(waited) = waited else {
            if lane.park(None, &|_| true, Some(child)).await? {
                return Err(Interrupt::Parked);
            }
            // The child settled meanwhile, or is not driven here: waited for in memory.
            park_after = None;
            continue;
        };
        let parent = &lane.cell.id;
        match waited {
            Ok(record) if record.status.is_terminal() => return Ok(record),
            Ok(record) => {
                tracing::debug!(run_id = %parent, child = %child, status = %record.status, "child parked for an operator");
                // Taken up again later, the child may be parked or loaded: a park is tried
                // again then.
                park_after = parks_after;
            }
            // The child's driver stopped (it resumes at the next open): look again later.
            Err(EngineError::RunStopped { reason, .. }) => {
                tracing::warn!(run_id = %parent, child = %child, %reason, "child not driven");
            }
            Err(EngineError::ShutDown) => return Err(Interrupt::ShutDown),
            Err(e) => return Err(Interrupt::Engine(e)),
        }
        tokio::select! {
            _ = tokio::time::sleep(PARKED_CHILD_POLL) => {}
            cause = lane.interrupted() => return Err(cause),
        }
    }
}

/// Journals how the child at `index` ended.
fn end_child(lane: &mut Lane, index: OperationIndex, end: ChildEnd) -> Result<ChildEnd, Interrupt> {
    lane.journal(Event::ChildEnded {
        step: index,
        status: end.status,
        output: end.output.clone(),
        error: end.error.clone(),
    })?;
    // Not synced here: the next operation's start record, or the run's terminal record,
    // shares this entry's sync.
    crate::crash::point("child.after_ended");
    Ok(end)
}
