//! The saga: undoing a run's completed and in-doubt steps, newest first, driven by the
//! journal alone (registered step kinds, no workflow code).
//!
//! | status             | event                                     | next status        |
//! |--------------------|-------------------------------------------|--------------------|
//! | Running/Suspended  | failure or cancellation (`begin`)         | Compensating       |
//! | Compensating       | every step undone or skipped              | Compensated        |
//! | Compensating       | an undo failed for good, or kind unknown  | CompensationFailed |
//! | CompensationFailed | operator retry                            | Compensating       |
//! | CompensationFailed | operator resolve                          | Resolved           |
//!
//! Per step: `StepCompensationStarted` is durable before the undo runs; `StepCompensated`
//! (or `StepCompensationSkipped`) records the end. A crash between the two runs the undo again
//! (undos are idempotent); a recorded undo is never run again.

use std::sync::Arc;

use rand::Rng;

use crate::cell::RunCell;
use crate::contain::{contained, contained_sync};
use crate::env::RunEnv;
use crate::error::{EngineError, Result};
use crate::ids::{Attempt, IdempotencyKey, OperationIndex, RunId};
use crate::journal::{ErrorClass, Event, RunStatus};
use crate::limiter::{Priority, Slot};
use crate::registry::StepEntry;
use crate::replay::{effect_by_ms, undo_action, undo_input, CompensationAction, Op};
use crate::retry::RetryPolicy;
use crate::step::{Compensation, StepContext, StepError};
use crate::store::while_leased;
use crate::transition::{settle, stuck, Next};

/// Moves a failed or cancelled run into compensation.
pub(crate) async fn begin(env: &Arc<RunEnv>, cell: &Arc<RunCell>, reason: String) -> Result<Next> {
    let reason = crate::step::truncate(reason);
    tracing::info!(run_id = %cell.id, %reason, "compensation begins");
    let error = reason.clone();
    cell.transition(
        &*env.store,
        Event::CompensationStarted { reason },
        RunStatus::Compensating,
        |r| r.error = Some(error),
    )?;
    crate::crash::point("saga.after_compensation_started");
    // Waiters of a cancelled run hear "compensating" only once it is durable.
    cell.durable(&*env.store).await?;
    cell.publish();
    Ok(Next::Continue)
}

/// Undoes steps until none is left, one fails for good, or the engine shuts down.
pub(crate) async fn compensate(env: &Arc<RunEnv>, cell: &Arc<RunCell>) -> Result<Next> {
    let mut shutdown = env.shutdown.subscribe();
    loop {
        if *shutdown.borrow() {
            return Ok(Next::Stop);
        }
        match cell.with_state(undo_action) {
            CompensationAction::Finished => {
                crate::crash::point("run.before_terminal");
                cell.transition(
                    &*env.store,
                    Event::RunCompensated,
                    RunStatus::Compensated,
                    |_| {},
                )?;
                return settle(env, cell, RunStatus::Compensated).await;
            }
            CompensationAction::Stuck { step, error } => {
                return stuck(env, cell, step, error.message).await
            }
            CompensationAction::Compensate {
                step,
                attempt,
                round_attempts,
                not_before_ms,
            } => {
                if let Some(at_ms) = not_before_ms {
                    if at_ms > env.clock.now_ms() {
                        cell.survived(&*env.store);
                        tokio::select! {
                            _ = env.clock.sleep_until(at_ms) => {}
                            _ = shutdown.changed() => {}
                        }
                        continue;
                    }
                }
                let child = cell.with_state(|s| match s.ops.get(step.0 as usize) {
                    Some(Op::Child(op)) => Some(op.child.clone()),
                    _ => None,
                });
                if let Some(child) = child {
                    undo_child(env, cell, step, &child, attempt, round_attempts).await?;
                    continue;
                }
                let kind = cell.with_state(|s| {
                    s.step(step)
                        .expect("undo_action names steps and children only")
                        .kind
                        .clone()
                });
                match env.registry.step(&kind) {
                    Some(entry) => {
                        undo_attempt(env, cell, &entry, step, attempt, round_attempts).await?
                    }
                    None => return unregistered(env, cell, step, &kind).await,
                }
            }
        }
    }
}

async fn unregistered(
    env: &Arc<RunEnv>,
    cell: &Arc<RunCell>,
    step: OperationIndex,
    kind: &str,
) -> Result<Next> {
    // Without the step's code nothing can be undone; an operator registers the kind and
    // retries compensation.
    let error = format!("step kind {kind:?} is not registered with this engine (register it with EngineBuilder::step)");
    let message = error.clone();
    cell.transition(
        &*env.store,
        Event::RunCompensationFailed { step, error },
        RunStatus::CompensationFailed,
        |r| r.error = Some(message),
    )?;
    settle(env, cell, RunStatus::CompensationFailed).await
}

/// Runs one journaled undo attempt of `step`: `StepCompensationStarted` durable before the
/// undo, then its outcome. Used by the saga and by a run that recreates a stuck resource.
pub(crate) async fn undo_attempt(
    env: &Arc<RunEnv>,
    cell: &Arc<RunCell>,
    entry: &StepEntry,
    step: OperationIndex,
    attempt: Attempt,
    round_attempts: u32,
) -> Result<()> {
    let (kind, argument, output) = cell.with_state(|s| {
        let op = s.step(step).expect("undo_attempt names steps only");
        (
            op.kind.clone(),
            op.argument.clone(),
            undo_input(s, step).flatten().cloned(),
        )
    });
    // The service's limiter, ahead of its other calls; the slot comes before the start
    // record, so time queued never looks like an undo attempt. The step's `rate_limit` is
    // its code: a panic there means no limiter, not a stopped compensation.
    let limiter = contained_sync(|| (entry.rate_limit)(&argument))
        .ok()
        .flatten()
        .map(|name| env.limiters.get(&name));
    let slot = Slot::take(limiter.as_deref(), Priority::Compensation).await;
    begin_undo(env, cell, step, attempt).await?;
    let effect_by_ms = cell.with_state(|s| effect_by_ms(s, step));
    let ctx = StepContext {
        run_id: cell.id.clone(),
        step,
        key: IdempotencyKey::for_step(&cell.id, step),
        attempt,
        resources: Arc::clone(&env.resources),
        clock: env.clock.clone(),
        effect_by_ms,
    };
    let span = tracing::info_span!("compensation", run_id = %cell.id, step = step.0, kind = %kind, attempt = attempt.0);
    let undo = tracing::Instrument::instrument((entry.undo)(argument.clone(), output, ctx), span);
    // A panicking undo is a failed undo attempt, retried like any other.
    let Some(result) = while_leased(&*env.store, cell.token(), contained(undo)).await else {
        tracing::warn!(run_id = %cell.id, step = step.0, "compensation stopped: this worker's lease ended");
        return Err(EngineError::Fenced {
            id: cell.id.clone(),
        });
    };
    let result =
        result.unwrap_or_else(|panic| Err(StepError::retryable(format!("panicked: {panic}"))));
    slot.report(&result);
    crate::crash::point("saga.after_undo");
    // The compensation's retry policy is the step's code too: one that panics makes the
    // undo fail for good (an operator retries it once the step is fixed).
    let (policy, result) = match contained_sync(|| (entry.undo_policy)(&argument)) {
        Ok(policy) => (policy, result),
        Err(panic) => (
            RetryPolicy::no_retry(),
            Err(StepError::permanent(format!(
                "the step's compensation_retry_policy panicked: {panic}"
            ))),
        ),
    };
    let attempt = CompensationAttempt {
        step,
        attempt,
        round_attempts,
    };
    record_undo(env, cell, attempt, &kind, result, policy).await
}

/// Runs one journaled undo attempt of child run `child` (operation `step`): the child's
/// own saga, started and awaited by the engine (`Runs::compensate_child`).
async fn undo_child(
    env: &Arc<RunEnv>,
    cell: &Arc<RunCell>,
    step: OperationIndex,
    child: &RunId,
    attempt: Attempt,
    round_attempts: u32,
) -> Result<()> {
    begin_undo(env, cell, step, attempt).await?;
    // Parked while the child compensates, its run slot given to the child (`run_slot.rs`).
    cell.survived(&*env.store);
    cell.slot.give_up();
    let result = match env.runs() {
        Ok(runs) => runs.compensate_child(child.clone(), cell.id.clone()).await,
        Err(e) => Err(e),
    };
    if !cell.slot.take_back(&env.permits, &env.shutdown).await {
        // The undo stays in flight; the next open runs it again.
        return Ok(());
    }
    crate::crash::point("saga.after_undo");
    let result = match result {
        Ok(Some(record)) if record.status == RunStatus::CompensationFailed => {
            Err(StepError::permanent(format!(
                "compensation of child run {child} failed: {}",
                record.error.unwrap_or_default()
            )))
        }
        Ok(_) => Ok(Compensation::Done),
        // The undo stays in flight; the next open runs it again.
        Err(EngineError::ShutDown) => return Ok(()),
        Err(e) => Err(StepError::retryable(format!(
            "compensation of child run {child}: {e}"
        ))),
    };
    let attempt = CompensationAttempt {
        step,
        attempt,
        round_attempts,
    };
    let what = format!("child run {child}");
    record_undo(env, cell, attempt, &what, result, RetryPolicy::default()).await
}

/// Which undo attempt an outcome belongs to.
struct CompensationAttempt {
    step: OperationIndex,
    attempt: Attempt,
    /// Attempts since compensation (re)started, this one excluded.
    round_attempts: u32,
}

/// Journals the start of an undo attempt and makes it durable before the undo runs.
async fn begin_undo(
    env: &Arc<RunEnv>,
    cell: &Arc<RunCell>,
    step: OperationIndex,
    attempt: Attempt,
) -> Result<()> {
    cell.append(
        &*env.store,
        Event::StepCompensationStarted { step, attempt },
    )?;
    cell.durable(&*env.store).await?;
    // A death from here on belongs to this undo attempt, which its start record tells
    // (`poison.rs`).
    cell.survived(&*env.store);
    crate::crash::point("saga.after_undo_started");
    Ok(())
}

/// Journals how an undo attempt of `what` ended; a failure also gets its next attempt's
/// time under `policy` (elapsed time counted from the round's first undo attempt), synced.
async fn record_undo(
    env: &Arc<RunEnv>,
    cell: &Arc<RunCell>,
    undo: CompensationAttempt,
    what: &str,
    result: std::result::Result<Compensation, StepError>,
    policy: RetryPolicy,
) -> Result<()> {
    let step = undo.step;
    match result {
        Ok(Compensation::Done) => {
            // Not synced here: the next undo's start, or the terminal record, shares the sync.
            cell.append(&*env.store, Event::StepCompensated { step })?;
            crate::stats::EventCounters::bump(&env.counters.compensations);
        }
        Ok(Compensation::NotCompensable) => {
            cell.append(
                &*env.store,
                Event::StepCompensationSkipped {
                    step,
                    reason: "step has no compensation".into(),
                },
            )?;
        }
        Err(error) => {
            let record = error.to_record();
            let retry_at_ms = match error.class() {
                ErrorClass::Permanent => None,
                ErrorClass::Retryable => {
                    let round_started_at_ms = cell
                        .with_state(|s| s.undo_round_started_at_ms.get(&step).copied())
                        .unwrap_or_else(|| env.clock.now_ms());
                    policy.next_attempt_at_ms(
                        Attempt(undo.round_attempts + 1),
                        round_started_at_ms,
                        env.clock.now_ms(),
                        error.retry_after(),
                        rand::thread_rng().gen(),
                    )
                }
            };
            tracing::warn!(run_id = %cell.id, step = step.0, what, attempt = undo.attempt.0, error = %record.message, ?retry_at_ms, "compensation attempt failed");
            cell.append(
                &*env.store,
                Event::StepCompensationFailed {
                    step,
                    attempt: undo.attempt,
                    error: record,
                    retry_at_ms,
                },
            )?;
            cell.durable(&*env.store).await?;
        }
    }
    crate::crash::point("saga.after_undo_recorded");
    Ok(())
}
