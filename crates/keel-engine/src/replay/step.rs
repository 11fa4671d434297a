//! Steps: their attempts and outcomes, and what a workflow's request for a step must do.
//!
//! Step state machine (per operation number), driven by journal entries:
//!
//! | state          | event                         | next state      |
//! |----------------|-------------------------------|-----------------|
//! | (none)         | `StepStarted{attempt: 1}`     | InFlight        |
//! | InFlight       | `StepCompleted`               | Completed       |
//! | InFlight       | `StepFailed{retry_at: Some}`  | RetryScheduled  |
//! | InFlight       | `StepFailed{retry_at: None}`  | GaveUp / FailedPermanently |
//! | InFlight       | `StepOutputRejected`          | OutputRejected  |
//! | InFlight       | `StepStarted{attempt: n+1}`   | InFlight (the attempt was cut off by a crash) |
//! | RetryScheduled | `StepStarted{attempt: n+1}`   | InFlight        |
//!
//! Any other (state, event) pair is a corrupt journal.

use serde_json::Value;

use super::{Op, RunState};
use crate::ids::{Attempt, OperationIndex};
use crate::journal::{ErrorClass, ErrorRecord};

/// What is known of one step from the journal.
#[derive(Clone, Debug, PartialEq)]
pub struct StepOp {
    /// The step kind.
    pub kind: String,
    /// The step argument.
    pub argument: Value,
    /// The last attempt that started.
    pub attempt: Attempt,
    /// Whether the step's kind has a compensation (journaled with each start).
    pub compensable: bool,
    /// Attempts in a row, the latest included, that started and recorded no outcome: each
    /// but the latest was cut off by the process dying (a new attempt started instead), and
    /// the latest is in flight. 0 once an attempt records an outcome or an operator resumes
    /// the run. A run loaded with this at the crash-loop bound is poisoned (`poison.rs`).
    pub cut_off: u32,
    /// When the first attempt of the current round started (the origin of the retry
    /// policy's elapsed-time bound).
    pub first_started_at_ms: u64,
    /// Attempts made before the current round: a step that ran out of retries in a workflow
    /// that pauses then gets a new round when an operator resumes the run.
    pub round_base: u32,
    /// When its latest attempt started or recorded its outcome, whichever came last: with
    /// an outcome recorded, the latest time its effect can have been made.
    pub last_at_ms: u64,
    /// Where it stands.
    pub outcome: StepOutcome,
}

/// Where a step stands.
#[derive(Clone, Debug, PartialEq)]
pub enum StepOutcome {
    /// Started, no outcome recorded: whether it took effect is unknown.
    InFlight,
    /// The last attempt failed; the next may start at `at_ms`.
    RetryScheduled {
        /// When.
        at_ms: u64,
    },
    /// Succeeded with this output.
    Completed {
        /// The output.
        output: Value,
    },
    /// Attempts or elapsed time ran out on retryable errors: whether some attempt took effect
    /// is unknown, so the saga treats the step as in doubt.
    GaveUp {
        /// The last error.
        error: ErrorRecord,
    },
    /// A permanent error: by the step's contract that attempt had no effect. Earlier
    /// attempts may have had one (a crash or a lost response cut them off), so a step that
    /// failed permanently after its first attempt is in doubt for the saga.
    FailedPermanently {
        /// The error.
        error: ErrorRecord,
    },
    /// An attempt succeeded but its output could not be kept (too large, not serialisable):
    /// the effect exists without a recorded output, so the saga undoes it in doubt.
    OutputRejected {
        /// Why the output was rejected.
        error: ErrorRecord,
    },
}

/// What a workflow's request for step `n` must do.
#[derive(Clone, Debug, PartialEq)]
pub enum StepAction {
    /// Return the recorded output without running the step.
    Replay(Value),
    /// Return the recorded failure without running the step.
    Fail(ErrorRecord),
    /// Run `attempt`, not before `not_before_ms` if set.
    Run {
        /// The attempt to run.
        attempt: Attempt,
        /// The journaled earliest start, if any.
        not_before_ms: Option<u64>,
    },
}

impl StepOp {
    /// Whether `attempt` of `kind` may start now: the next attempt of the same step, whose
    /// last attempt is in flight (cut off by a crash) or waits for its retry.
    fn takes_next(&self, attempt: Attempt, kind: &str) -> bool {
        matches!(
            self.outcome,
            StepOutcome::InFlight | StepOutcome::RetryScheduled { .. }
        ) && attempt == self.attempt.next()
            && self.kind == kind
    }
}

impl RunState {
    /// `StepStarted`: the first attempt of a new operation or of a fan-out's branch, or the
    /// next attempt of a step.
    pub(super) fn step_started(
        &mut self,
        step: OperationIndex,
        kind: &str,
        argument: &Value,
        attempt: Attempt,
        compensable: bool,
        at_ms: u64,
    ) -> Result<(), String> {
        let first = || {
            Op::Step(StepOp {
                kind: kind.to_owned(),
                argument: argument.clone(),
                attempt,
                compensable,
                cut_off: 1,
                first_started_at_ms: at_ms,
                round_base: 0,
                last_at_ms: at_ms,
                outcome: StepOutcome::InFlight,
            })
        };
        let index = step.0 as usize;
        if index == self.ops.len() {
            if attempt != Attempt::FIRST {
                return Err(format!("step {step} first seen at attempt {attempt}"));
            }
            self.ops.push(first());
            return Ok(());
        }
        match self.ops.get_mut(index) {
            Some(slot @ Op::Branch) if attempt == Attempt::FIRST => {
                *slot = first();
                Ok(())
            }
            Some(Op::Step(op)) if op.takes_next(attempt, kind) => {
                // The attempt before was cut off by a crash if it never recorded an outcome.
                op.cut_off = match op.outcome {
                    StepOutcome::InFlight => op.cut_off + 1,
                    _ => 1,
                };
                op.attempt = attempt;
                op.compensable = compensable;
                op.last_at_ms = at_ms;
                op.outcome = StepOutcome::InFlight;
                Ok(())
            }
            other => Err(format!(
                "step {step} attempt {attempt} started in state {other:?}"
            )),
        }
    }

    /// `StepCompleted`: the attempt in flight succeeded.
    pub(super) fn step_completed(
        &mut self,
        step: OperationIndex,
        attempt: Attempt,
        output: &Value,
        at_ms: u64,
    ) -> Result<(), String> {
        let op = self.in_flight_step(step, attempt, at_ms)?;
        op.outcome = StepOutcome::Completed {
            output: output.clone(),
        };
        Ok(())
    }

    /// `StepFailed`: the attempt in flight failed, with a retry scheduled or for good.
    pub(super) fn step_failed(
        &mut self,
        step: OperationIndex,
        attempt: Attempt,
        error: &ErrorRecord,
        retry_at_ms: Option<u64>,
        at_ms: u64,
    ) -> Result<(), String> {
        let op = self.in_flight_step(step, attempt, at_ms)?;
        op.outcome = match (retry_at_ms, error.class) {
            (Some(at_ms), _) => StepOutcome::RetryScheduled { at_ms },
            (None, ErrorClass::Retryable) => StepOutcome::GaveUp {
                error: error.clone(),
            },
            (None, ErrorClass::Permanent) => StepOutcome::FailedPermanently {
                error: error.clone(),
            },
        };
        Ok(())
    }

    /// `StepOutputRejected`: the attempt in flight succeeded with an output that cannot be
    /// kept.
    pub(super) fn step_output_rejected(
        &mut self,
        step: OperationIndex,
        attempt: Attempt,
        error: &ErrorRecord,
        at_ms: u64,
    ) -> Result<(), String> {
        let op = self.in_flight_step(step, attempt, at_ms)?;
        op.outcome = StepOutcome::OutputRejected {
            error: error.clone(),
        };
        Ok(())
    }

    /// The step whose attempt `attempt` is in flight, for its outcome (which ends its run of
    /// attempts cut off by crashes).
    fn in_flight_step(
        &mut self,
        step: OperationIndex,
        attempt: Attempt,
        at_ms: u64,
    ) -> Result<&mut StepOp, String> {
        match self.ops.get_mut(step.0 as usize) {
            Some(Op::Step(op)) => {
                if op.outcome == StepOutcome::InFlight && op.attempt == attempt {
                    op.cut_off = 0;
                    op.last_at_ms = at_ms;
                    Ok(op)
                } else {
                    Err(format!(
                        "outcome of step {step} attempt {attempt} while attempt {} is {:?}",
                        op.attempt, op.outcome
                    ))
                }
            }
            Some(other) => Err(format!(
                "step outcome for {step}, which is {}",
                other.describe()
            )),
            None => Err(format!("outcome of step {step}, which never started")),
        }
    }

    /// The step at `index`, if that operation is a step.
    pub fn step(&self, index: OperationIndex) -> Option<&StepOp> {
        match self.ops.get(index.0 as usize) {
            Some(Op::Step(op)) => Some(op),
            Some(_) | None => None,
        }
    }
}

/// What a request for step `index` must do, given what the journal holds for it.
pub fn step_action(op: Option<&StepOp>) -> StepAction {
    let Some(op) = op else {
        return StepAction::Run {
            attempt: Attempt::FIRST,
            not_before_ms: None,
        };
    };
    match &op.outcome {
        StepOutcome::InFlight => StepAction::Run {
            attempt: op.attempt.next(),
            not_before_ms: None,
        },
        StepOutcome::RetryScheduled { at_ms } => StepAction::Run {
            attempt: op.attempt.next(),
            not_before_ms: Some(*at_ms),
        },
        StepOutcome::Completed { output } => StepAction::Replay(output.clone()),
        StepOutcome::GaveUp { error }
        | StepOutcome::FailedPermanently { error }
        | StepOutcome::OutputRejected { error } => StepAction::Fail(error.clone()),
    }
}
