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
//! | Running   | replay mismatch                         | Suspended     |
//! | Running   | paused (operator, or retries exhausted) | Paused        |
//! | Suspended, Paused | cancelled (operator call)       | Compensating  |
//! | Suspended, Paused | resumed (operator call)         | Running       |
//! | Running   | shutdown, storage error                 | (unchanged; resumes at next open) |
//!
//! Compensating runs are handed to `saga.rs`.

use std::sync::Arc;

use serde_json::Value;

use crate::cell::{RunCell, Stop};
use crate::ctx::{Ctx, Interrupt};
use crate::engine::Inner;
use crate::error::{EngineError, Result};
use crate::journal::{Event, RunRecord, RunStatus};
use crate::limits::OUTPUT_BYTES_MAX;
use crate::registry::BodyError;
use crate::replay::RunState;
use crate::saga;
use crate::step::truncate;

/// What the drive loop does after one phase.
pub(crate) enum Next {
    /// Look at the status again (a phase moved the run on).
    Continue,
    /// Stop driving: the run is settled, or must wait for the next open.
    Stop,
}

/// Drives `cell` until it settles or the engine shuts down, then unloads it.
pub(crate) async fn drive(inner: Arc<Inner>, cell: Arc<RunCell>) {
    let _permit = tokio::select! {
        permit = Arc::clone(&inner.permits).acquire_owned() => permit.ok(),
        _ = wait_shutdown(&inner) => None,
    };
    if _permit.is_none() {
        inner.unload(&cell, Stop::ShutDown);
        return;
    }
    if let Err(error) = crate::poison::count_load(&inner, &cell).await {
        tracing::error!(run_id = %cell.id, %error, "run not driven: its load could not be counted");
        inner.unload(
            &cell,
            Stop::Error(format!("its load could not be counted: {error}")),
        );
        return;
    }
    loop {
        let result = match cell.record().status {
            RunStatus::Running | RunStatus::Suspended
                if cell.with_state(|s| s.cancel_requested) =>
            {
                saga::begin(&inner, &cell, "cancelled by operator".into()).await
            }
            RunStatus::Running => run_forward(&inner, &cell).await,
            RunStatus::Compensating => saga::compensate(&inner, &cell).await,
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
            // An operator call may have made the run drivable again since the phase
            // ended; then this driver goes on.
            Ok(Next::Stop) if inner.unload_if_settled(&cell) => return,
            Ok(Next::Stop) => continue,
            Err(error) => {
                tracing::error!(run_id = %cell.id, %error, "run stopped on an engine error; it resumes at the next open");
                inner.unload(&cell, Stop::Error(format!("its driver stopped on an engine error (it resumes at the next open): {error}")));
                return;
            }
        }
    }
}

async fn wait_shutdown(inner: &Inner) {
    let mut shutdown = inner.shutdown.subscribe();
    let _ = shutdown.wait_for(|down| *down).await;
}

async fn run_forward(inner: &Arc<Inner>, cell: &Arc<RunCell>) -> Result<Next> {
    let record = cell.record();
    let Some(workflow) = inner.registry.workflow(&record.workflow) else {
        // Only an engine opened with `allow_unregistered` holds such runs, and it does not
        // drive them; reaching here is a run an operator call made drivable.
        return Err(EngineError::UnknownWorkflow {
            name: record.workflow,
            registered: inner.registry.workflow_names(),
        });
    };
    if workflow.version != record.version {
        tracing::info!(run_id = %cell.id, from = record.version, to = workflow.version, "resuming run under another workflow version");
    }
    let ctx = Ctx::new(Arc::clone(cell), Arc::clone(inner));
    let (mut ctx, result) = (workflow.run)(ctx, record.input.clone()).await;
    // The engine's reason to stop the body comes first, whatever the body returned (a body
    // that panics on the `Interrupted` error it was given is still just interrupted).
    if let Some(interrupt) = ctx.interrupt.take() {
        return interrupted(inner, cell, interrupt).await;
    }
    let journaled_ops = cell.with_state(|s| s.ops.len() as u32);
    match result {
        Ok(_) if ctx.operations() < journaled_ops => {
            let detail = format!(
                "workflow returned after {} operations but the journal holds {journaled_ops}",
                ctx.operations()
            );
            suspend(inner, cell, format!("non-determinism: {detail}")).await
        }
        Ok(output) => complete(inner, cell, output).await,
        Err(BodyError::Workflow(error)) => fail(inner, cell, error.to_string()).await,
        Err(BodyError::Output(error)) => {
            let reason = format!("workflow output does not serialise: {error}");
            fail(inner, cell, reason).await
        }
        Err(BodyError::Panicked(message)) => {
            suspend(inner, cell, format!("workflow body panicked: {message}")).await
        }
        Err(BodyError::Input(error)) => {
            let reason =
                format!("stored input does not decode as the workflow's input type: {error}");
            suspend(inner, cell, reason).await
        }
    }
}

/// Acts on why the engine stopped the body.
async fn interrupted(
    inner: &Arc<Inner>,
    cell: &Arc<RunCell>,
    interrupt: Interrupt,
) -> Result<Next> {
    match interrupt {
        Interrupt::ShutDown => Ok(Next::Stop),
        // A bound the code went past, or a meaningless request: a defect of the workflow
        // code, which an operator fixes as for non-determinism.
        Interrupt::Engine(
            error @ (EngineError::LimitReached { .. }
            | EngineError::InvalidRequest(_)
            | EngineError::DuplicateWorkflow { .. }
            | EngineError::DuplicateStepKind { .. }),
        ) => suspend(inner, cell, error.to_string()).await,
        Interrupt::Engine(error) => Err(error),
        Interrupt::Cancelled => saga::begin(inner, cell, "cancelled by operator".into()).await,
        Interrupt::Paused { reason, exhausted } => pause(inner, cell, reason, exhausted).await,
        Interrupt::Stopped => unreachable!("only select branches stop, and select absorbs it"),
        Interrupt::NonDeterminism { index, detail } => {
            let reason = format!("non-determinism at step {index}: {detail}");
            suspend(inner, cell, reason).await
        }
    }
}

/// The body returned its output: the run completes, unless the output is too large (the
/// run fails) or a cancel became durable meanwhile (the run compensates).
async fn complete(inner: &Arc<Inner>, cell: &Arc<RunCell>, output: Value) -> Result<Next> {
    let bytes = output.to_string().len();
    if bytes > OUTPUT_BYTES_MAX {
        let reason =
            format!("workflow output is {bytes} bytes, over the limit of {OUTPUT_BYTES_MAX} bytes");
        return fail(inner, cell, reason).await;
    }
    crate::crash::point("run.before_terminal");
    let not_cancelled = |_: &RunRecord, state: &RunState| {
        if state.cancel_requested {
            Err(EngineError::InvalidState {
                id: cell.id.clone(),
                status: "cancelled".into(),
                operation: "complete",
            })
        } else {
            Ok(())
        }
    };
    let event = Event::RunCompleted {
        output: output.clone(),
    };
    let completed = cell.transition_if(
        &*inner.store,
        event,
        not_cancelled,
        RunStatus::Completed,
        |r| r.output = Some(output),
    );
    match completed {
        Ok(()) => settle(inner, cell, RunStatus::Completed).await,
        // A cancel became durable while the body finished: the run must not complete.
        Err(EngineError::InvalidState { .. }) => {
            saga::begin(inner, cell, "cancelled by operator".into()).await
        }
        Err(error) => Err(error),
    }
}

/// The body failed: compensate what took effect, or fail outright if nothing did.
async fn fail(inner: &Arc<Inner>, cell: &Arc<RunCell>, reason: String) -> Result<Next> {
    let reason = truncate(reason);
    if cell.with_state(|s| s.has_effects()) {
        return saga::begin(inner, cell, reason).await;
    }
    crate::crash::point("run.before_terminal");
    let error = reason.clone();
    cell.transition(
        &*inner.store,
        Event::RunFailed { error: reason },
        RunStatus::Failed,
        |r| r.error = Some(error),
    )?;
    settle(inner, cell, RunStatus::Failed).await
}

pub(crate) async fn suspend(
    inner: &Arc<Inner>,
    cell: &Arc<RunCell>,
    reason: String,
) -> Result<Next> {
    let reason = truncate(reason);
    tracing::error!(run_id = %cell.id, %reason, "run suspended");
    let error = reason.clone();
    cell.transition(
        &*inner.store,
        Event::RunSuspended { reason },
        RunStatus::Suspended,
        |r| r.error = Some(error),
    )?;
    settle(inner, cell, RunStatus::Suspended).await
}

/// Stops the run for an operator. An operator's pause must still stand (a resume may have
/// withdrawn it while in-flight steps ended); then the run goes on instead.
async fn pause(
    inner: &Arc<Inner>,
    cell: &Arc<RunCell>,
    reason: String,
    exhausted: bool,
) -> Result<Next> {
    let reason = truncate(reason);
    let still_wanted = |_: &RunRecord, state: &RunState| {
        if exhausted || state.pause_requested {
            Ok(())
        } else {
            Err(EngineError::InvalidState {
                id: cell.id.clone(),
                status: "resumed".into(),
                operation: "pause",
            })
        }
    };
    let error = reason.clone();
    match cell.transition_if(
        &*inner.store,
        Event::RunPaused { reason, exhausted },
        still_wanted,
        RunStatus::Paused,
        |r| r.error = Some(error),
    ) {
        Ok(()) => {
            tracing::warn!(run_id = %cell.id, reason = %cell.record().error.unwrap_or_default(), "run paused");
            settle(inner, cell, RunStatus::Paused).await
        }
        Err(EngineError::InvalidState { .. }) => Ok(Next::Continue),
        Err(error) => Err(error),
    }
}

/// Makes a transition durable, then tells waiters: nobody hears of a status before it is
/// durable.
pub(crate) async fn settle(inner: &Inner, cell: &RunCell, status: RunStatus) -> Result<Next> {
    inner.store.sync().wait().await?;
    crate::crash::point("run.after_terminal");
    tracing::info!(run_id = %cell.id, %status, "run settled");
    cell.publish();
    Ok(Next::Stop)
}
