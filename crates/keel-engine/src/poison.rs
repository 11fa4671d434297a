//! Crash loops. A run whose driving kills the whole process (an abort, a stack overflow, an
//! out-of-memory kill: nothing a panic handler sees) would be loaded and driven into the same
//! death at every start, taking every other run down with it each time. Two records tell
//! which run it is, and at its next load a run found at
//! [`crate::EngineBuilder::poison_after_loads`] (default
//! [`crate::limits::POISON_LOADS_DEFAULT`]) by either is not driven again:
//!
//! - **Deaths inside a journaled call.** Every step attempt and undo attempt is journaled,
//!   durably, before its code runs, and its outcome after. An attempt followed by the next
//!   attempt's start without an outcome of its own was cut off by the process dying; the
//!   journal folds into each step's run of such attempts (`StepOp::cut_off`,
//!   `RunState::undo_cut_off`), so a fan-out's branches are judged each by its own, and a
//!   rate limiter's queue (waited in before the start record) never counts.
//! - **Deaths outside one** (replaying the body, the body's own code, a wait's polls, which
//!   are not journaled). Every load of a run to be driven is counted durably before any of
//!   its code runs, and the count is forgotten once the run gets past that code: it reaches
//!   a step or undo attempt (whose start record takes over), a poll returns, it parks (a
//!   timer, a backoff, a child), or its driver stops with the run unsettled. A run's first
//!   load, by its start, writes nothing: a run found with no count and an empty journal died
//!   in it. (A settled run's count is left; only an operator call, which clears it, drives
//!   such a run again.) Opening a store counts every resumed run in one write and sync.
//!
//! A poisoned running run is suspended, a compensating one goes to `compensation_failed`,
//! each with a reason starting `poisoned:` that names the step (or the loads). Operators find
//! it with `keel list --status suspended`; `resume` (or cancel, or retry-compensation) clears
//! both records.
//!
//! What it cannot tell apart: a process that dies for another reason (an operator's
//! SIGKILL, another run's crash) while this run's step is in flight, or while this run
//! replays, counts too. An innocent run is poisoned only if that happens at each of 5 loads
//! in a row; `resume` takes it up again.
//!
//! | at load                                   | status       | what happens                  |
//! |-------------------------------------------|--------------|-------------------------------|
//! | a step's attempts cut off at the bound    | Running      | Suspended ("poisoned: ...")   |
//! | an undo's attempts cut off at the bound   | Compensating | CompensationFailed            |
//! | the load count at the bound               | Running      | Suspended                     |
//! | the load count at the bound               | Compensating | CompensationFailed            |
//! | neither                                   | drivable     | load count + 1, synced, driven |
//!
//! A running run with a cancel standing is not suspended: it compensates, as the cancel asked
//! (`transition::suspend`), its load count started again from this load, so that an undo
//! that dies at every load then fails as above, and only then.

use std::sync::Arc;

use crate::cell::RunCell;
use crate::env::RunEnv;
use crate::error::Result;
use crate::ids::OperationIndex;
use crate::journal::RunStatus;
use crate::replay::{most_cut_off, undo_action, CompensationAction};

/// Counts this load of `cell`'s run before it is driven, or, when either record is at the
/// bound, parks the run as poisoned (its status then says so, and the driver stops on it).
pub(crate) async fn count_load(env: &Arc<RunEnv>, cell: &Arc<RunCell>) -> Result<()> {
    let bound = env.poison_after_loads;
    let status = cell.status();
    let cut_off = cell
        .with_state(most_cut_off)
        .filter(|cut| cut.undo == (status == RunStatus::Compensating) && cut.attempts >= bound);
    if let Some(cut) = cut_off {
        let what = if cut.undo { "to undo step" } else { "of step" };
        let reason = format!(
            "poisoned: the process died during (or right after) each of the last {} attempts {what} {} ({}): an abort, a stack overflow or an out-of-memory kill in its code; fix the cause, then {}",
            cut.attempts,
            cut.step,
            cut.kind,
            if cut.undo { "retry the compensation" } else { "resume the run" },
        );
        return poisoned_unless_cancelled(env, cell, Some(cut.step), reason).await;
    }
    if cell.load_counted() {
        return Ok(());
    }
    let loads = loads_before(env, cell).await?;
    if loads >= bound {
        let reason = format!(
            "poisoned: the process died while driving this run's code outside its steps (replaying its workflow, its body's own code, or a wait's polls) after each of its last {loads} loads: an abort, a stack overflow or an out-of-memory kill; fix the cause, then resume the run"
        );
        return poisoned_unless_cancelled(env, cell, None, reason).await;
    }
    count(env, cell, loads).await
}

/// Counts this load as the one after `loads` that died.
async fn count(env: &RunEnv, cell: &RunCell, loads: u32) -> Result<()> {
    env.store.set_load_count(&cell.id, loads + 1)?;
    // Durable before any of the run's code runs: a death from here on counts.
    cell.durable(&*env.store).await?;
    cell.mark_load_counted();
    Ok(())
}

/// [`poisoned`]; a running run with a cancel standing compensates instead, and then the
/// deaths of its compensation count from this load, as after an operator's call (the body's
/// code, which died, does not run again).
async fn poisoned_unless_cancelled(
    env: &Arc<RunEnv>,
    cell: &Arc<RunCell>,
    step: Option<OperationIndex>,
    reason: String,
) -> Result<()> {
    if poisoned(env, cell, step, reason).await? {
        count(env, cell, 0).await?;
    }
    Ok(())
}

/// How many loads of the run died before this one: the stored count, or, with none stored
/// and nothing journaled yet but events sent to it, 1 (its start's load wrote nothing and died before the run's
/// first entry; `start` writes no count, to keep a start at one write and one sync).
pub(crate) async fn loads_before(env: &RunEnv, cell: &RunCell) -> Result<u32> {
    let stored = env.store.load_count(&cell.id).await?;
    // Events sent to the run (one by a start with an event) are no sign that it ran.
    let fresh = cell.with_state(|s| s.len as usize == s.mailbox.deliveries.len());
    Ok(if stored == 0 && fresh { 1 } else { stored })
}

/// Parks the run for an operator: a running one suspended, a compensating one failed at
/// `step` (or at the undo it stands at). Returns whether the run is left drivable: a running
/// run compensates instead when a cancel stands (`transition::suspend`); an operator's call
/// may also have taken it up while its suspension was made durable.
async fn poisoned(
    env: &Arc<RunEnv>,
    cell: &Arc<RunCell>,
    step: Option<OperationIndex>,
    reason: String,
) -> Result<bool> {
    tracing::error!(run_id = %cell.id, %reason, "run poisoned: its code is not driven again");
    match cell.status() {
        RunStatus::Running => {
            crate::transition::suspend(env, cell, reason).await?;
            return Ok(cell.status().is_drivable());
        }
        RunStatus::Compensating => {
            let step = step.or_else(|| match cell.with_state(undo_action) {
                CompensationAction::Compensate { step, .. }
                | CompensationAction::Stuck { step, .. } => Some(step),
                CompensationAction::Finished => None,
            });
            // With nothing left to undo, the run only has to write its end, which is no
            // crash loop of its code: it is driven.
            if let Some(step) = step {
                crate::transition::stuck(env, cell, step, reason).await?;
            }
        }
        RunStatus::Suspended
        | RunStatus::Paused
        | RunStatus::CompensationFailed
        | RunStatus::Completed
        | RunStatus::Failed
        | RunStatus::Compensated
        | RunStatus::Resolved => {}
    }
    Ok(false)
}
