//! Crash loops. A run whose driving kills the whole process (an abort, a stack overflow, an
//! out-of-memory kill: nothing a panic handler sees) would be loaded and driven into the same
//! death at every start, taking every other run down with it each time.
//!
//! So every load of a run to be driven is counted durably before any of its code runs (a
//! start writes the first count with the run), and the count is forgotten as soon as the run
//! shows that it survives being driven: one of its calls of user code (a step attempt, a
//! compensation, a probe) returns, or it parks (sleeps on a timer or a backoff, waits for a
//! child), or its driver stops (settled, paused, suspended, shut down). A run found at its
//! load with [`crate::EngineBuilder::poison_after_loads`] counted loads (default
//! [`crate::limits::POISON_LOADS_DEFAULT`]) is not driven again: a running run is suspended
//! as poisoned, a compensating one goes to `compensation_failed`, each with a reason naming
//! the count. Operators find it with `keel list --status suspended`; `resume` (or cancel, or
//! retry-compensation) forgets the count.
//!
//! What it cannot tell apart: a process killed for another reason (an operator's SIGKILL, a
//! crash of another run) while this run was between its load and its first survival counts
//! too. Five such deaths in a row, each inside that window (usually milliseconds), are needed
//! to suspend an innocent run.
//!
//! | load count at load | status       | what happens                                  |
//! |--------------------|--------------|-----------------------------------------------|
//! | below the bound    | any drivable | count + 1 written and synced, then driven     |
//! | at the bound       | Running      | Suspended ("poisoned: ...")                   |
//! | at the bound       | Compensating | CompensationFailed ("poisoned: ...")          |

use std::sync::Arc;

use crate::cell::RunCell;
use crate::engine::Inner;
use crate::error::Result;
use crate::journal::RunStatus;
use crate::replay::{undo_action, UndoAction};

/// Counts this load of `cell`'s run before it is driven, or, at the bound, parks the run as
/// poisoned (its status then says so, and the driver stops on it).
pub(crate) async fn count_load(inner: &Arc<Inner>, cell: &Arc<RunCell>) -> Result<()> {
    if cell.load_counted() {
        return Ok(());
    }
    let loads = inner.store.load_count(&cell.id)?;
    if loads >= inner.poison_after_loads {
        return poisoned(inner, cell, loads).await;
    }
    inner.store.set_load_count(&cell.id, loads + 1)?;
    // Durable before any of the run's code runs: a death from here on counts.
    inner.store.sync().wait().await?;
    cell.mark_load_counted();
    Ok(())
}

async fn poisoned(inner: &Arc<Inner>, cell: &Arc<RunCell>, loads: u32) -> Result<()> {
    let reason = format!(
        "poisoned: the process died while driving this run after each of its last {loads} loads (an abort, a stack overflow or an out-of-memory kill in its code); fix the cause, then resume it"
    );
    tracing::error!(run_id = %cell.id, loads, "run poisoned: not driven again");
    match cell.record().status {
        RunStatus::Running => {
            crate::executor::suspend(inner, cell, reason).await?;
        }
        RunStatus::Compensating => match cell.with_state(undo_action) {
            UndoAction::Undo { step, .. } | UndoAction::Stuck { step, .. } => {
                crate::saga::stuck(inner, cell, step, reason).await?;
            }
            // Nothing left to undo: the run only has to write its end, which is no crash loop
            // of user code; drive it.
            UndoAction::Finished => {}
        },
        RunStatus::Suspended
        | RunStatus::Paused
        | RunStatus::CompensationFailed
        | RunStatus::Completed
        | RunStatus::Failed
        | RunStatus::Compensated
        | RunStatus::Resolved => {}
    }
    Ok(())
}
