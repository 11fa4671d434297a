//! The run-level transitions more than one phase makes: settling (durable, then told), and
//! parking a run for an operator (suspended, or compensation failed). The executor, the saga
//! and the poison check share them here rather than calling into each other.

use std::sync::Arc;

use crate::cell::RunCell;
use crate::env::RunEnv;
use crate::error::{EngineError, Result};
use crate::ids::OperationIndex;
use crate::journal::{Event, RunRecord, RunStatus};
use crate::replay::RunState;
use crate::step::truncate;

/// What the drive loop does after one phase.
pub(crate) enum Next {
    /// Look at the status again (a phase moved the run on).
    Continue,
    /// Stop driving: the run is settled, or must wait for the next open.
    Stop,
    /// Stop driving: the run parked (its cell is detached and out of the map already).
    Parked,
}

/// The guard of a write that a standing cancel must win over (a completion, a pause, a
/// suspension): refuses `operation` as "cancelled" while the run's cancel request stands.
pub(crate) fn refuse_if_cancelled(
    record: &RunRecord,
    state: &RunState,
    operation: &'static str,
) -> Result<()> {
    if state.cancel_requested {
        return Err(EngineError::InvalidState {
            id: record.id.clone(),
            status: "cancelled".into(),
            operation,
        });
    }
    Ok(())
}

/// Parks a running run for an operator: suspended, with `reason` as its error. Unless a
/// cancel stands: then the run compensates instead (the drive loop's next turn), as the
/// operator asked, rather than waiting suspended with the cancel taken as done.
pub(crate) async fn suspend(env: &RunEnv, cell: &Arc<RunCell>, reason: String) -> Result<Next> {
    let reason = truncate(reason);
    let error = reason.clone();
    let not_cancelled =
        |record: &RunRecord, state: &RunState| refuse_if_cancelled(record, state, "suspend");
    let suspended = cell.transition_if(
        &*env.store,
        Event::RunSuspended {
            reason: reason.clone(),
        },
        not_cancelled,
        RunStatus::Suspended,
        |r| r.error = Some(error),
    );
    match suspended {
        Ok(()) => {
            tracing::error!(run_id = %cell.id, %reason, "run suspended");
            settle(env, cell, RunStatus::Suspended).await
        }
        Err(EngineError::InvalidState { .. }) => {
            tracing::error!(run_id = %cell.id, %reason, "run cancelled before it was suspended: it compensates");
            Ok(Next::Continue)
        }
        Err(error) => Err(error),
    }
}

/// Parks a compensating run for an operator: the compensation of `step` failed for good.
pub(crate) async fn stuck(
    env: &RunEnv,
    cell: &Arc<RunCell>,
    step: OperationIndex,
    message: String,
) -> Result<Next> {
    tracing::error!(run_id = %cell.id, step = step.0, error = %message, "compensation failed; an operator must retry or resolve");
    let error = truncate(format!("compensation of step {step} failed: {message}"));
    let stored = error.clone();
    cell.transition(
        &*env.store,
        Event::RunCompensationFailed { step, error },
        RunStatus::CompensationFailed,
        |r| r.error = Some(stored),
    )?;
    settle(env, cell, RunStatus::CompensationFailed).await
}

/// Makes a transition durable, then tells waiters: nobody hears of a status before it is
/// durable.
pub(crate) async fn settle(env: &RunEnv, cell: &RunCell, status: RunStatus) -> Result<Next> {
    cell.durable(&*env.store).await?;
    crate::crash::point("run.after_terminal");
    tracing::info!(run_id = %cell.id, %status, "run settled");
    cell.publish();
    Ok(Next::Stop)
}
