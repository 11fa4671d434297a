//! The executor: drives one run from its journal to a settled status. It runs the workflow
//! body (forward path) or the saga (compensation), and performs the run-level transitions.
//!
//! Run transitions made here (each one atomic write of an entry plus the record):
//!
//! | status    | event                                   | next status   |
//! |-----------|-----------------------------------------|---------------|
//! | Running   | body returned output, journal consumed  | Completed     |
//! | Running   | body failed, nothing took effect        | Failed        |
//! | Running   | body failed, or cancelled               | Compensating  |
//! | Running   | replay mismatch, a defect of the code   | Suspended (Compensating if a cancel stands) |
//! | Running   | paused (operator, or retries exhausted) | Paused (Compensating if a cancel stands) |
//! | Suspended, Paused | cancelled (operator call)       | Compensating  |
//! | Suspended, Paused | resumed (operator call)         | Running       |
//! | Running   | shutdown, storage error                 | (unchanged; resumes at next open) |
//! | Running   | parked (a long wait, `engine/parking.rs`) | (unchanged; loaded at its wake) |
//!
//! Compensating runs are handed to `saga.rs`.

use std::sync::Arc;

use serde_json::Value;

use crate::cell::{RunCell, Stop};
use crate::ctx::Ctx;
use crate::env::{RunEnv, Runs};
use crate::error::{EngineError, Result};
use crate::interrupt::Interrupt;
use crate::journal::{Event, RunRecord, RunStatus};
use crate::limits::OUTPUT_BYTES_MAX;
use crate::replay::RunState;
use crate::saga;
use crate::step::truncate;
use crate::transition::{refuse_if_cancelled, settle, suspend, Next};
use crate::workflow::{BodyError, OnRetriesExhausted, Workflows};

/// Drives `cell` until it settles or the engine shuts down, then unloads it. `runs` is the
/// engine, held for as long as the run is driven.
pub(crate) async fn drive(
    env: Arc<RunEnv>,
    workflows: Arc<Workflows>,
    runs: Arc<dyn Runs>,
    cell: Arc<RunCell>,
) {
    let permit = tokio::select! {
        permit = Arc::clone(&env.permits).acquire_owned() => permit.ok(),
        _ = wait_shutdown(&env) => None,
    };
    let Some(permit) = permit else {
        runs.unload(&cell, Stop::ShutDown);
        return;
    };
    // Held in the cell, so that the run can give it up while it awaits a child run
    // (`run_slot.rs`); released whichever way this driver stops.
    cell.slot.hold(permit);
    let _slot = ReleaseSlot(&cell);
    if let Err(error) = crate::poison::count_load(&env, &cell).await {
        tracing::error!(run_id = %cell.id, %error, "run not driven: its load could not be counted");
        runs.unload(
            &cell,
            Stop::Error(format!("its load could not be counted: {error}")),
        );
        return;
    }
    loop {
        // Each turn counts against the task's budget, so that a run whose phases keep ending
        // at once (a defect) yields its thread now and then instead of holding it for ever.
        tokio::task::coop::consume_budget().await;
        let result = match cell.status() {
            RunStatus::Running | RunStatus::Suspended
                if cell.with_state(|s| s.cancel_requested) =>
            {
                saga::begin(&env, &cell, "cancelled by operator".into()).await
            }
            RunStatus::Running => run_forward(&env, &workflows, &cell).await,
            RunStatus::Compensating => saga::compensate(&env, &cell).await,
            RunStatus::Suspended
            | RunStatus::Paused
            | RunStatus::CompensationFailed
            | RunStatus::Completed
            | RunStatus::Failed
            | RunStatus::Compensated
            | RunStatus::Resolved => Ok(Next::Stop),
        };
        match result {
            Ok(Next::Continue) => continue,
            Ok(Next::Parked) => return,
            // An operator call may have made the run drivable again since the phase
            // ended; then this driver goes on.
            Ok(Next::Stop) if runs.unload_if_settled(&cell) => return,
            Ok(Next::Stop) => continue,
            Err(EngineError::Fenced { .. }) => {
                tracing::warn!(run_id = %cell.id, "run taken over by another worker: no longer driven here");
                runs.unload(&cell, Stop::Moved);
                return;
            }
            Err(error) => {
                tracing::error!(run_id = %cell.id, %error, "run stopped on an engine error; it resumes at the next open");
                runs.unload(&cell, Stop::Error(format!("its driver stopped on an engine error (it resumes at the next open): {error}")));
                return;
            }
        }
    }
}

/// Gives the run's slot back when its driver stops.
struct ReleaseSlot<'a>(&'a RunCell);

impl Drop for ReleaseSlot<'_> {
    fn drop(&mut self) {
        self.0.slot.release();
    }
}

async fn wait_shutdown(env: &RunEnv) {
    let mut shutdown = env.shutdown.subscribe();
    let _ = shutdown.wait_for(|down| *down).await;
}

async fn run_forward(
    env: &Arc<RunEnv>,
    workflows: &Arc<Workflows>,
    cell: &Arc<RunCell>,
) -> Result<Next> {
    // What the run needs of its record, copied once (the input for the body).
    let (name, version, input) =
        cell.with_record(|r| (r.workflow.clone(), r.version, r.input.clone()));
    let Some(workflow) = workflows.get(&name) else {
        // Only an engine opened with `allow_unregistered` holds such runs, and it does not
        // drive them; reaching here is a run an operator call made drivable.
        return Err(EngineError::UnknownWorkflow {
            name,
            registered: workflows.names(),
        });
    };
    if workflow.version != version {
        tracing::info!(run_id = %cell.id, from = version, to = workflow.version, "resuming run under another workflow version");
    }
    let pause_on_exhausted = workflow.on_retries_exhausted == OnRetriesExhausted::Pause;
    let ctx = Ctx::new(
        Arc::clone(cell),
        Arc::clone(env),
        Arc::clone(workflows),
        pause_on_exhausted,
    );
    let body = (workflow.run)(ctx, input);
    let (mut ctx, result) = cell.flushing_when_idle(&*env.store, body).await;
    // The engine's reason to stop the body comes first, whatever the body returned (a body
    // that panics on the `Interrupted` error it was given is still just interrupted).
    if let Some(interrupt) = ctx.interrupt.take() {
        return interrupted(env, cell, interrupt).await;
    }
    let journaled_ops = cell.with_state(|s| s.ops.len() as u32);
    match result {
        Ok(_) if ctx.operations() < journaled_ops => {
            let detail = format!(
                "workflow returned after {} operations but the journal holds {journaled_ops}",
                ctx.operations()
            );
            suspend(env, cell, format!("non-determinism: {detail}")).await
        }
        Ok(output) => complete(env, cell, output).await,
        Err(BodyError::Workflow(error)) => fail(env, cell, error.to_string()).await,
        Err(BodyError::Output(error)) => {
            let reason = format!("workflow output does not serialise: {error}");
            fail(env, cell, reason).await
        }
        Err(BodyError::Panicked(message)) => {
            suspend(env, cell, format!("workflow body panicked: {message}")).await
        }
        Err(BodyError::Input(error)) => {
            let reason =
                format!("stored input does not decode as the workflow's input type: {error}");
            suspend(env, cell, reason).await
        }
    }
}

/// Acts on why the engine stopped the body.
async fn interrupted(env: &Arc<RunEnv>, cell: &Arc<RunCell>, interrupt: Interrupt) -> Result<Next> {
    match interrupt {
        Interrupt::ShutDown => Ok(Next::Stop),
        Interrupt::Parked => Ok(Next::Parked),
        // A bound the code went past (a value too large for the journal, one that does not
        // serialise), or a meaningless request: a defect of the workflow code, which an
        // operator fixes as for non-determinism. (The context checks values before it writes
        // anything, so the run's cell still takes the suspension.)
        Interrupt::Engine(
            error @ (EngineError::LimitReached { .. }
            | EngineError::TooLarge { .. }
            | EngineError::Serialise { .. }
            | EngineError::InvalidRequest(_)
            | EngineError::DuplicateWorkflow { .. }
            | EngineError::DuplicateStepKind { .. }),
        ) => suspend(env, cell, error.to_string()).await,
        Interrupt::Engine(error) => Err(error),
        Interrupt::Cancelled => saga::begin(env, cell, "cancelled by operator".into()).await,
        Interrupt::Paused { reason, exhausted } => pause(env, cell, reason, exhausted).await,
        Interrupt::Stopped => unreachable!("only select branches stop, and select absorbs it"),
        Interrupt::NonDeterminism { index, detail } => {
            let reason = format!("non-determinism at operation {index}: {detail}");
            suspend(env, cell, reason).await
        }
    }
}

/// The body returned its output: the run completes, unless the output is too large (the
/// run fails) or a cancel became durable meanwhile (the run compensates).
async fn complete(env: &Arc<RunEnv>, cell: &Arc<RunCell>, output: Value) -> Result<Next> {
    let bytes = crate::limits::json_bytes(&output);
    if bytes > OUTPUT_BYTES_MAX {
        let reason =
            format!("workflow output is {bytes} bytes, over the limit of {OUTPUT_BYTES_MAX} bytes");
        return fail(env, cell, reason).await;
    }
    crate::crash::point("run.before_terminal");
    let not_cancelled =
        |record: &RunRecord, state: &RunState| refuse_if_cancelled(record, state, "complete");
    let event = Event::RunCompleted {
        output: output.clone(),
    };
    let completed = cell.transition_if(
        &*env.store,
        event,
        not_cancelled,
        RunStatus::Completed,
        |r| r.output = Some(output),
    );
    match completed {
        Ok(()) => settle(env, cell, RunStatus::Completed).await,
        // A cancel became durable while the body finished: the run must not complete.
        Err(EngineError::InvalidState { .. }) => {
            saga::begin(env, cell, "cancelled by operator".into()).await
        }
        Err(error) => Err(error),
    }
}

/// The body failed: compensate what took effect, or fail outright if nothing did.
async fn fail(env: &Arc<RunEnv>, cell: &Arc<RunCell>, reason: String) -> Result<Next> {
    let reason = truncate(reason);
    if cell.with_state(|s| s.has_effects()) {
        return saga::begin(env, cell, reason).await;
    }
    crate::crash::point("run.before_terminal");
    let error = reason.clone();
    cell.transition(
        &*env.store,
        Event::RunFailed { error: reason },
        RunStatus::Failed,
        |r| r.error = Some(error),
    )?;
    settle(env, cell, RunStatus::Failed).await
}

/// Stops the run for an operator. An operator's pause must still stand (a resume may have
/// withdrawn it while in-flight steps ended), and no cancel: else the run goes on instead
/// (and compensates, if cancelled).
async fn pause(
    env: &Arc<RunEnv>,
    cell: &Arc<RunCell>,
    reason: String,
    exhausted: bool,
) -> Result<Next> {
    let reason = truncate(reason);
    // A cancel written since the run stopped to pause wins: the run compensates (the drive
    // loop's next turn) rather than settling as paused with a cancel standing, which a
    // second cancel would take as done.
    let still_wanted = |record: &RunRecord, state: &RunState| {
        refuse_if_cancelled(record, state, "pause")?;
        if exhausted || state.pause_requested {
            return Ok(());
        }
        Err(EngineError::InvalidState {
            id: record.id.clone(),
            status: "resumed".into(),
            operation: "pause",
        })
    };
    let error = reason.clone();
    match cell.transition_if(
        &*env.store,
        Event::RunPaused { reason, exhausted },
        still_wanted,
        RunStatus::Paused,
        |r| r.error = Some(error),
    ) {
        Ok(()) => {
            tracing::warn!(run_id = %cell.id, reason = %cell.record().error.unwrap_or_default(), "run paused");
            settle(env, cell, RunStatus::Paused).await
        }
        Err(EngineError::InvalidState { .. }) => Ok(Next::Continue),
        Err(error) => Err(error),
    }
}
