//! The run-level transitions more than one phase makes: settling (durable, then told), and
//! parking a run for an operator (suspended, or compensation failed). The executor, the saga
//! and the poison check share them here rather than calling into each other.

use std::sync::Arc;

use crate::cell::RunCell;
use crate::env::RunEnv;
use crate::error::Result;
use crate::ids::OperationIndex;
use crate::journal::{Event, RunStatus};
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

/// Parks a running run for an operator: suspended, with `reason` as its error.
pub(crate) async fn suspend(env: &RunEnv, cell: &Arc<RunCell>, reason: String) -> Result<Next> {
    let reason = truncate(reason);
    tracing::error!(run_id = %cell.id, %reason, "run suspended");
    let error = reason.clone();
    cell.transition(
        &*env.store,
        Event::RunSuspended { reason },
        RunStatus::Suspended,
        |r| r.error = Some(error),
    )?;
    settle(env, cell, RunStatus::Suspended).await
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
