//! Compensation: the saga's undo state per step, and what it must undo next.
//!
//! Compensation state machine (per step or child run), driven by journal entries:
//!
//! | state          | event                                      | next state     |
//! |----------------|--------------------------------------------|----------------|
//! | (none)         | `StepCompensationStarted{attempt: 1}`      | InFlight       |
//! | (none)         | `StepCompensationSkipped`                  | Skipped        |
//! | InFlight       | `StepCompensated`                          | Done           |
//! | InFlight       | `StepCompensationSkipped`                  | Skipped        |
//! | InFlight       | `StepCompensationFailed{retry_at: Some}`   | RetryScheduled |
//! | InFlight       | `StepCompensationFailed{retry_at: None}`   | Failed         |
//! | InFlight       | `StepCompensationStarted{attempt: n+1}`    | InFlight (the attempt was cut off by a crash) |
//! | RetryScheduled | `StepCompensationStarted{attempt: n+1}`    | InFlight       |
//! | Failed         | `CompensationRetried`                      | RetryScheduled |
//!
//! Any other (state, event) pair is a corrupt journal.

use serde_json::Value;

use super::step::StepOutcome;
use super::{Op, RunState};
use crate::ids::{Attempt, OperationIndex};
use crate::journal::{ErrorRecord, RunStatus};

/// The compensation state of one step.
#[derive(Clone, Debug, PartialEq)]
pub enum CompensationState {
    /// An undo attempt started, no outcome recorded.
    InFlight {
        /// The last attempt.
        attempt: Attempt,
        /// Attempts since compensation (re)started.
        round_attempts: u32,
    },
    /// An undo attempt failed; the next may start at `at_ms`.
    RetryScheduled {
        /// The last attempt.
        attempt: Attempt,
        /// Attempts since compensation (re)started.
        round_attempts: u32,
        /// When.
        at_ms: u64,
    },
    /// The undo failed for good (until an operator retries).
    Failed {
        /// The last attempt.
        attempt: Attempt,
        /// The error.
        error: ErrorRecord,
    },
    /// Undone.
    Done,
    /// Nothing to undo (the step has no compensation).
    Skipped,
}

/// What compensation must do next.
#[derive(Clone, Debug, PartialEq)]
pub enum CompensationAction {
    /// Compensate step `step` (with its recorded output, or `None` when in doubt).
    Compensate {
        /// The step.
        step: OperationIndex,
        /// The attempt to run.
        attempt: Attempt,
        /// Attempts since compensation (re)started, this one excluded.
        round_attempts: u32,
        /// The journaled earliest start, if any.
        not_before_ms: Option<u64>,
    },
    /// Every step that needs undoing is undone (or skipped).
    Finished,
    /// A compensation failed for good.
    Stuck {
        /// The step.
        step: OperationIndex,
        /// The error.
        error: ErrorRecord,
    },
}

impl RunState {
    /// `CompensationStarted`: the run starts undoing its steps.
    pub(super) fn compensation_started(&mut self) -> Result<(), String> {
        self.compensating = true;
        Ok(())
    }

    /// `StepCompensationStarted`: an undo attempt of a step or child run begins.
    pub(super) fn step_compensation_started(
        &mut self,
        step: OperationIndex,
        attempt: Attempt,
        at_ms: u64,
    ) -> Result<(), String> {
        let cut_off = match self.undo.get(&step) {
            Some(CompensationState::InFlight { .. }) => {
                self.undo_cut_off.get(&step).map_or(1, |n| n + 1)
            }
            _ => 1,
        };
        self.undo_started(step, attempt)?;
        self.undo_cut_off.insert(step, cut_off);
        if let Some(CompensationState::InFlight {
            round_attempts: 1, ..
        }) = self.undo.get(&step)
        {
            self.undo_round_started_at_ms.insert(step, at_ms);
        }
        Ok(())
    }

    /// `StepCompensated`: the undo attempt in flight undid the step.
    pub(super) fn step_compensated(&mut self, step: OperationIndex) -> Result<(), String> {
        self.undo_cut_off.remove(&step);
        self.undo_finished(step, CompensationState::Done)
    }

    /// `StepCompensationSkipped`: the step had nothing to undo.
    pub(super) fn step_compensation_skipped(&mut self, step: OperationIndex) -> Result<(), String> {
        self.undo_cut_off.remove(&step);
        self.undo_finished(step, CompensationState::Skipped)
    }

    /// `StepCompensationFailed`: the undo attempt in flight failed, with a retry scheduled or
    /// for good.
    pub(super) fn step_compensation_failed(
        &mut self,
        step: OperationIndex,
        attempt: Attempt,
        error: &ErrorRecord,
        retry_at_ms: Option<u64>,
    ) -> Result<(), String> {
        let next = match self.undo.get(&step) {
            Some(CompensationState::InFlight {
                attempt: a,
                round_attempts,
            }) if *a == attempt => match retry_at_ms {
                Some(at_ms) => CompensationState::RetryScheduled {
                    attempt: *a,
                    round_attempts: *round_attempts,
                    at_ms,
                },
                None => CompensationState::Failed {
                    attempt: *a,
                    error: error.clone(),
                },
            },
            other => return Err(format!("compensation of {step} failed in state {other:?}")),
        };
        self.undo.insert(step, next);
        self.undo_cut_off.remove(&step);
        Ok(())
    }

    /// `CompensationRetried`: an operator retries the undos that failed for good, in a new
    /// round of attempts; deaths before count no more.
    pub(super) fn compensation_retried(&mut self) -> Result<(), String> {
        self.undo_cut_off.clear();
        for state in self.undo.values_mut() {
            if let CompensationState::Failed { attempt, .. } = state {
                *state = CompensationState::RetryScheduled {
                    attempt: *attempt,
                    round_attempts: 0,
                    at_ms: 0,
                };
            }
        }
        Ok(())
    }

    /// Records undo attempt `attempt` of `step` as in flight: the first, or the one after an
    /// attempt in flight (cut off by a crash) or waiting for its retry.
    fn undo_started(&mut self, step: OperationIndex, attempt: Attempt) -> Result<(), String> {
        if !matches!(
            self.ops.get(step.0 as usize),
            Some(Op::Step(_) | Op::Child(_))
        ) {
            return Err(format!(
                "compensation of {step}, which is neither a step nor a child run"
            ));
        }
        let round_attempts = match self.undo.get(&step) {
            None if attempt == Attempt::FIRST => 1,
            Some(CompensationState::InFlight {
                attempt: a,
                round_attempts,
            })
            | Some(CompensationState::RetryScheduled {
                attempt: a,
                round_attempts,
                ..
            }) if attempt == a.next() => round_attempts + 1,
            other => {
                return Err(format!(
                    "compensation of {step} attempt {attempt} started in state {other:?}"
                ))
            }
        };
        self.undo.insert(
            step,
            CompensationState::InFlight {
                attempt,
                round_attempts,
            },
        );
        Ok(())
    }

    /// Records how the undo of `step` ended: from an attempt in flight, or skipped without
    /// one.
    fn undo_finished(
        &mut self,
        step: OperationIndex,
        end: CompensationState,
    ) -> Result<(), String> {
        match self.undo.get(&step) {
            Some(CompensationState::InFlight { .. }) => {
                self.undo.insert(step, end);
                Ok(())
            }
            // A step without compensation is skipped without an attempt.
            None if end == CompensationState::Skipped => {
                self.undo.insert(step, end);
                Ok(())
            }
            other => Err(format!(
                "compensation of {step} finished in state {other:?}"
            )),
        }
    }
}

/// The latest time step `index`'s effect can have been made, for its compensation
/// (`StepContext::effect_by_ms`): when its last attempt recorded an outcome, that record's
/// time; in doubt (no outcome), when the current round of its undo attempts began.
pub fn effect_by_ms(state: &RunState, index: OperationIndex) -> Option<u64> {
    let op = state.step(index)?;
    match op.outcome {
        StepOutcome::InFlight => state.undo_round_started_at_ms.get(&index).copied(),
        _ => Some(op.last_at_ms),
    }
}

/// How step `index` is to be undone: `Some(Some(output))` for a completed step,
/// `Some(None)` for a step in doubt, `None` for nothing to undo (not a step, a step without
/// compensation, or a permanent failure of the first attempt, which by contract had no
/// effect).
///
/// A child run is undone by its own saga: when it completed (`Some(Some(output))`) or may
/// still be running (`Some(None)`); a child that failed or compensated itself left nothing.
pub fn undo_input(state: &RunState, index: OperationIndex) -> Option<Option<&Value>> {
    static NULL: Value = Value::Null;
    if let Some(Op::Child(child)) = state.ops.get(index.0 as usize) {
        return match &child.end {
            None => Some(None),
            Some(end) if end.status == RunStatus::Completed => {
                Some(Some(end.output.as_ref().unwrap_or(&NULL)))
            }
            Some(_) => None,
        };
    }
    let op = state.step(index)?;
    if !op.compensable {
        // Nothing to undo, whatever happened.
        return None;
    }
    match &op.outcome {
        StepOutcome::Completed { output } => Some(Some(output)),
        StepOutcome::InFlight
        | StepOutcome::RetryScheduled { .. }
        | StepOutcome::GaveUp { .. }
        | StepOutcome::OutputRejected { .. } => Some(None),
        StepOutcome::FailedPermanently { .. } if op.attempt == Attempt::FIRST => None,
        StepOutcome::FailedPermanently { .. } => Some(None),
    }
}

/// The next compensation action: the newest step that still needs undoing.
pub fn undo_action(state: &RunState) -> CompensationAction {
    (0..state.ops.len())
        .rev()
        .find_map(|i| step_undo_action(state, OperationIndex(i as u32)))
        .unwrap_or(CompensationAction::Finished)
}

/// What undoing step `step` needs next: `None` when nothing (not a step, nothing took effect,
/// or already undone or skipped).
pub fn step_undo_action(state: &RunState, step: OperationIndex) -> Option<CompensationAction> {
    undo_input(state, step)?;
    match state.undo.get(&step) {
        None => Some(CompensationAction::Compensate {
            step,
            attempt: Attempt::FIRST,
            round_attempts: 0,
            not_before_ms: None,
        }),
        Some(CompensationState::InFlight {
            attempt,
            round_attempts,
        }) => Some(CompensationAction::Compensate {
            step,
            attempt: attempt.next(),
            round_attempts: *round_attempts,
            not_before_ms: None,
        }),
        Some(CompensationState::RetryScheduled {
            attempt,
            round_attempts,
            at_ms,
        }) => Some(CompensationAction::Compensate {
            step,
            attempt: attempt.next(),
            round_attempts: *round_attempts,
            not_before_ms: Some(*at_ms),
        }),
        Some(CompensationState::Failed { error, .. }) => Some(CompensationAction::Stuck {
            step,
            error: error.clone(),
        }),
        Some(CompensationState::Done) | Some(CompensationState::Skipped) => None,
    }
}
