//! Replay: folding a journal into the state of a run, and deciding, as pure functions of that
//! state, what the run must do next. The executor (`executor.rs`, `saga.rs`) performs the
//! decided action and appends its result; nothing here does I/O.
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

use std::collections::BTreeMap;

use serde_json::Value;

use crate::ids::{Attempt, RunId, StepIndex};
use crate::journal::{Entry, ErrorClass, ErrorRecord, Event, RunStatus};

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

/// A journaled operation: a step or a timer.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// A step.
    Step(StepOp),
    /// A durable wait.
    Wait(WaitOp),
    /// A parallel fan-out of `branches` operations, the ones right after it.
    Fork {
        /// How many.
        branches: u32,
        /// For a `select`, the winning branch once chosen.
        selected: Option<u32>,
    },
    /// A child run.
    Child(ChildOp),
    /// A branch of a fan-out whose step has not started yet.
    Branch,
    /// A durable timer.
    Timer {
        /// When it fires.
        wake_at_ms: u64,
        /// Whether the workflow went past it.
        fired: bool,
    },
}

/// A wait as the journal tells it.
#[derive(Clone, Debug, PartialEq)]
pub struct WaitOp {
    /// The wait kind.
    pub kind: String,
    /// The probe's argument.
    pub argument: Value,
    /// When it started.
    pub started_at_ms: u64,
    /// Its schedule.
    pub schedule: crate::journal::WaitSchedule,
    /// How it ended, if it did.
    pub outcome: Option<crate::journal::WaitOutcome>,
}

/// A child run as the parent's journal tells it.
#[derive(Clone, Debug, PartialEq)]
pub struct ChildOp {
    /// The child's workflow.
    pub workflow: String,
    /// The child's run id.
    pub child: RunId,
    /// The child's input.
    pub input: Value,
    /// How the child settled, once it did.
    pub end: Option<ChildEnd>,
}

/// How a child run settled.
#[derive(Clone, Debug, PartialEq)]
pub struct ChildEnd {
    /// Completed, failed, compensated or resolved.
    pub status: RunStatus,
    /// Its output, if it completed.
    pub output: Option<Value>,
    /// Why it did not complete.
    pub error: Option<String>,
}

/// The compensation state of one step.
#[derive(Clone, Debug, PartialEq)]
pub enum UndoState {
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

/// What a `StepStarted` entry says of an attempt.
struct StepStart<'a> {
    kind: &'a str,
    argument: &'a Value,
    attempt: Attempt,
    compensable: bool,
}

/// Everything replay knows of a run.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RunState {
    /// Operations by number; numbers are dense from 0.
    pub ops: Vec<Op>,
    /// Journal length (the index the next entry gets).
    pub len: u32,
    /// Whether an operator asked to cancel.
    pub cancel_requested: bool,
    /// Whether an operator asked to pause (cleared by a resume).
    pub pause_requested: bool,
    /// Whether the run paused because a step ran out of retries (cleared by a resume, which
    /// gives such steps a new round).
    pub paused_exhausted: bool,
    /// How many child runs the run started.
    pub children: u32,
    /// Whether compensation has begun.
    pub compensating: bool,
    /// Per-step compensation state.
    pub undo: BTreeMap<StepIndex, UndoState>,
    /// When the current round of undo attempts of a step began (its first attempt, or the
    /// first after an operator retry): the origin of the compensation's elapsed-time bound.
    pub undo_round_started_at_ms: BTreeMap<StepIndex, u64>,
    /// Per step, undo attempts in a row that started and recorded no outcome (as
    /// [`StepOp::cut_off`]); cleared by an outcome and by an operator's retry.
    pub undo_cut_off: BTreeMap<StepIndex, u32>,
}

/// The journaled call (a step attempt or an undo attempt) that the process died during most
/// often in a row, as the journal tells it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CutOff {
    /// The operation.
    pub step: StepIndex,
    /// Its step kind.
    pub kind: String,
    /// Whether it was the step's undo, not the step.
    pub undo: bool,
    /// Attempts in a row without an outcome.
    pub attempts: u32,
}

impl Op {
    /// What the operation is, for error messages: `step "kind"`, `a timer`, ...
    pub fn describe(&self) -> String {
        match self {
            Op::Step(op) => format!("step {:?}", op.kind),
            Op::Wait(op) => format!("wait {:?}", op.kind),
            Op::Timer { .. } => "a timer".into(),
            Op::Fork { branches, .. } => format!("a parallel fan-out of {branches} branches"),
            Op::Child(op) => format!(
                "child run {:?} of workflow {:?}",
                op.child.as_str(),
                op.workflow
            ),
            Op::Branch => "a branch of a parallel fan-out".into(),
        }
    }
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

/// What compensation must do next.
#[derive(Clone, Debug, PartialEq)]
pub enum UndoAction {
    /// Undo step `step` (with its recorded output, or `None` when in doubt).
    Undo {
        /// The step.
        step: StepIndex,
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
        step: StepIndex,
        /// The error.
        error: ErrorRecord,
    },
}

impl RunState {
    /// Folds a journal into a run state. `Err` names the first entry that breaks the state
    /// machine (a corrupt or foreign journal).
    pub fn from_entries(entries: &[Entry]) -> Result<RunState, String> {
        let mut state = RunState::default();
        for entry in entries {
            state.apply(entry)?;
        }
        Ok(state)
    }

    /// Applies one entry. Called for entries read back and, by the executor, for entries it
    /// writes, so the same checks guard both directions.
    pub fn apply(&mut self, entry: &Entry) -> Result<(), String> {
        let at = self.len;
        self.apply_event(&entry.event, entry.at_ms)
            .map_err(|e| format!("entry {at}: {e}"))?;
        self.len += 1;
        Ok(())
    }

    fn apply_event(&mut self, event: &Event, at_ms: u64) -> Result<(), String> {
        match event {
            Event::StepStarted {
                step,
                kind,
                argument,
                attempt,
                compensable,
            } => self.step_started(
                *step,
                StepStart {
                    kind,
                    argument,
                    attempt: *attempt,
                    compensable: *compensable,
                },
                at_ms,
            ),
            Event::ForkStarted { step, branches } => {
                if step.0 as usize != self.ops.len() {
                    return Err(format!(
                        "fork {step} started where operation {} was expected",
                        self.ops.len()
                    ));
                }
                self.ops.push(Op::Fork {
                    branches: *branches,
                    selected: None,
                });
                self.ops
                    .extend(std::iter::repeat_n(Op::Branch, *branches as usize));
                Ok(())
            }
            Event::ForkSelected { step, branch } => match self.ops.get_mut(step.0 as usize) {
                Some(Op::Fork {
                    branches,
                    selected: selected @ None,
                }) if branch < branches => {
                    *selected = Some(*branch);
                    Ok(())
                }
                other => Err(format!(
                    "branch {branch} of {step} selected, which is {other:?}"
                )),
            },
            Event::ChildStarted {
                step,
                workflow,
                child,
                input,
            } => {
                let op = Op::Child(ChildOp {
                    workflow: workflow.clone(),
                    child: child.clone(),
                    input: input.clone(),
                    end: None,
                });
                let index = step.0 as usize;
                if index == self.ops.len() {
                    self.ops.push(op);
                } else if let Some(slot @ Op::Branch) = self.ops.get_mut(index) {
                    *slot = op;
                } else {
                    return Err(format!(
                        "child {step} started where operation {} was expected",
                        self.ops.len()
                    ));
                }
                self.children += 1;
                Ok(())
            }
            Event::ChildEnded {
                step,
                status,
                output,
                error,
            } => match self.ops.get_mut(step.0 as usize) {
                Some(Op::Child(op)) if op.end.is_none() => {
                    op.end = Some(ChildEnd {
                        status: *status,
                        output: output.clone(),
                        error: error.clone(),
                    });
                    Ok(())
                }
                other => Err(format!("child_ended for {step} in state {other:?}")),
            },
            Event::StepCompleted {
                step,
                attempt,
                output,
            } => {
                let op = self.in_flight_step(*step, *attempt, at_ms)?;
                op.outcome = StepOutcome::Completed {
                    output: output.clone(),
                };
                Ok(())
            }
            Event::StepFailed {
                step,
                attempt,
                error,
                retry_at_ms,
            } => {
                let op = self.in_flight_step(*step, *attempt, at_ms)?;
                op.outcome = match (retry_at_ms, error.class) {
                    (Some(at_ms), _) => StepOutcome::RetryScheduled { at_ms: *at_ms },
                    (None, ErrorClass::Retryable) => StepOutcome::GaveUp {
                        error: error.clone(),
                    },
                    (None, ErrorClass::Permanent) => StepOutcome::FailedPermanently {
                        error: error.clone(),
                    },
                };
                Ok(())
            }
            Event::StepOutputRejected {
                step,
                attempt,
                error,
            } => {
                let op = self.in_flight_step(*step, *attempt, at_ms)?;
                op.outcome = StepOutcome::OutputRejected {
                    error: error.clone(),
                };
                Ok(())
            }
            Event::TimerSet { step, wake_at_ms } => {
                if step.0 as usize != self.ops.len() {
                    return Err(format!(
                        "timer {step} set out of order (next is #{})",
                        self.ops.len()
                    ));
                }
                self.ops.push(Op::Timer {
                    wake_at_ms: *wake_at_ms,
                    fired: false,
                });
                Ok(())
            }
            Event::TimerFired { step } => match self.ops.get_mut(step.0 as usize) {
                Some(Op::Timer { fired, .. }) => {
                    *fired = true;
                    Ok(())
                }
                _ => Err(format!("timer_fired for {step}, which is not a timer")),
            },
            Event::WaitStarted {
                step,
                kind,
                argument,
                schedule,
            } => {
                if step.0 as usize != self.ops.len() {
                    return Err(format!(
                        "wait {step} started out of order (next is #{})",
                        self.ops.len()
                    ));
                }
                self.ops.push(Op::Wait(WaitOp {
                    kind: kind.clone(),
                    argument: argument.clone(),
                    started_at_ms: at_ms,
                    schedule: schedule.clone(),
                    outcome: None,
                }));
                Ok(())
            }
            Event::WaitEnded { step, outcome } => match self.ops.get_mut(step.0 as usize) {
                Some(Op::Wait(op)) if op.outcome.is_none() => {
                    op.outcome = Some(outcome.clone());
                    Ok(())
                }
                other => Err(format!("wait_ended for {step} in state {other:?}")),
            },
            Event::CancelRequested => {
                self.cancel_requested = true;
                Ok(())
            }
            Event::PauseRequested => {
                self.pause_requested = true;
                Ok(())
            }
            Event::RunPaused { exhausted, .. } => {
                self.paused_exhausted = *exhausted;
                Ok(())
            }
            Event::RunResumed => {
                self.pause_requested = false;
                // An operator took the run up: deaths before count no more (`poison.rs`).
                for op in &mut self.ops {
                    if let Op::Step(op) = op {
                        op.cut_off = 0;
                    }
                }
                if std::mem::take(&mut self.paused_exhausted) {
                    // A new round of attempts, timed from the resume.
                    for op in &mut self.ops {
                        if let Op::Step(op) = op {
                            if let StepOutcome::GaveUp { .. } = op.outcome {
                                op.outcome = StepOutcome::RetryScheduled { at_ms: 0 };
                                op.round_base = op.attempt.0;
                                op.first_started_at_ms = at_ms;
                            }
                        }
                    }
                }
                Ok(())
            }
            Event::CompensationStarted { .. } => {
                self.compensating = true;
                Ok(())
            }
            Event::StepCompensationStarted { step, attempt } => {
                let cut_off = match self.undo.get(step) {
                    Some(UndoState::InFlight { .. }) => {
                        self.undo_cut_off.get(step).map_or(1, |n| n + 1)
                    }
                    _ => 1,
                };
                self.undo_started(*step, *attempt)?;
                self.undo_cut_off.insert(*step, cut_off);
                if let Some(UndoState::InFlight {
                    round_attempts: 1, ..
                }) = self.undo.get(step)
                {
                    self.undo_round_started_at_ms.insert(*step, at_ms);
                }
                Ok(())
            }
            Event::StepCompensated { step } => {
                self.undo_cut_off.remove(step);
                self.undo_finished(*step, UndoState::Done)
            }
            Event::StepCompensationSkipped { step, .. } => {
                self.undo_cut_off.remove(step);
                self.undo_finished(*step, UndoState::Skipped)
            }
            Event::StepCompensationFailed {
                step,
                attempt,
                error,
                retry_at_ms,
            } => {
                let next = match self.undo.get(step) {
                    Some(UndoState::InFlight {
                        attempt: a,
                        round_attempts,
                    }) if a == attempt => match retry_at_ms {
                        Some(at_ms) => UndoState::RetryScheduled {
                            attempt: *a,
                            round_attempts: *round_attempts,
                            at_ms: *at_ms,
                        },
                        None => UndoState::Failed {
                            attempt: *a,
                            error: error.clone(),
                        },
                    },
                    other => {
                        return Err(format!("compensation of {step} failed in state {other:?}"))
                    }
                };
                self.undo.insert(*step, next);
                self.undo_cut_off.remove(step);
                Ok(())
            }
            Event::CompensationRetried => {
                self.undo_cut_off.clear();
                for state in self.undo.values_mut() {
                    if let UndoState::Failed { attempt, .. } = state {
                        *state = UndoState::RetryScheduled {
                            attempt: *attempt,
                            round_attempts: 0,
                            at_ms: 0,
                        };
                    }
                }
                Ok(())
            }
            Event::RunCompleted { .. }
            | Event::RunFailed { .. }
            | Event::RunSuspended { .. }
            | Event::RunCompensated
            | Event::RunCompensationFailed { .. }
            | Event::RunResolved { .. } => Ok(()),
        }
    }

    fn step_started(
        &mut self,
        step: StepIndex,
        start: StepStart<'_>,
        at_ms: u64,
    ) -> Result<(), String> {
        let StepStart {
            kind,
            argument,
            attempt,
            compensable,
        } = start;
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
            Some(Op::Step(op))
                if matches!(
                    op.outcome,
                    StepOutcome::InFlight | StepOutcome::RetryScheduled { .. }
                ) && attempt == op.attempt.next()
                    && op.kind == kind =>
            {
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

    /// The step whose attempt `attempt` is in flight, for its outcome (which ends its run of
    /// attempts cut off by crashes).
    fn in_flight_step(
        &mut self,
        step: StepIndex,
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

    fn undo_started(&mut self, step: StepIndex, attempt: Attempt) -> Result<(), String> {
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
            Some(UndoState::InFlight {
                attempt: a,
                round_attempts,
            })
            | Some(UndoState::RetryScheduled {
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
            UndoState::InFlight {
                attempt,
                round_attempts,
            },
        );
        Ok(())
    }

    fn undo_finished(&mut self, step: StepIndex, end: UndoState) -> Result<(), String> {
        match self.undo.get(&step) {
            Some(UndoState::InFlight { .. }) => {
                self.undo.insert(step, end);
                Ok(())
            }
            // A step without compensation is skipped without an attempt.
            None if end == UndoState::Skipped => {
                self.undo.insert(step, end);
                Ok(())
            }
            other => Err(format!(
                "compensation of {step} finished in state {other:?}"
            )),
        }
    }

    /// The step at `index`, if that operation is a step.
    pub fn step(&self, index: StepIndex) -> Option<&StepOp> {
        match self.ops.get(index.0 as usize) {
            Some(Op::Step(op)) => Some(op),
            Some(_) | None => None,
        }
    }

    /// Whether any step took effect or may have: if not, a failing run has nothing to undo.
    pub fn has_effects(&self) -> bool {
        (0..self.ops.len()).any(|i| undo_input(self, StepIndex(i as u32)).is_some())
    }
}

/// The journaled call the process died during most often in a row (see
/// [`StepOp::cut_off`]), if any attempt is in flight.
pub fn most_cut_off(state: &RunState) -> Option<CutOff> {
    let steps = state.ops.iter().enumerate().filter_map(|(i, op)| match op {
        Op::Step(op) if op.cut_off > 0 => Some(CutOff {
            step: StepIndex(i as u32),
            kind: op.kind.clone(),
            undo: false,
            attempts: op.cut_off,
        }),
        _ => None,
    });
    let undos = state.undo_cut_off.iter().filter_map(|(step, attempts)| {
        let op = state.step(*step)?;
        Some(CutOff {
            step: *step,
            kind: op.kind.clone(),
            undo: true,
            attempts: *attempts,
        })
    });
    steps.chain(undos).max_by_key(|cut| cut.attempts)
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

/// The latest time step `index`'s effect can have been made, for its compensation
/// (`StepContext::effect_by_ms`): when its last attempt recorded an outcome, that record's
/// time; in doubt (no outcome), when the current round of its undo attempts began.
pub fn effect_by_ms(state: &RunState, index: StepIndex) -> Option<u64> {
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
pub fn undo_input(state: &RunState, index: StepIndex) -> Option<Option<&Value>> {
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
pub fn undo_action(state: &RunState) -> UndoAction {
    (0..state.ops.len())
        .rev()
        .find_map(|i| step_undo_action(state, StepIndex(i as u32)))
        .unwrap_or(UndoAction::Finished)
}

/// What undoing step `step` needs next: `None` when nothing (not a step, nothing took effect,
/// or already undone or skipped).
pub fn step_undo_action(state: &RunState, step: StepIndex) -> Option<UndoAction> {
    undo_input(state, step)?;
    match state.undo.get(&step) {
        None => Some(UndoAction::Undo {
            step,
            attempt: Attempt::FIRST,
            round_attempts: 0,
            not_before_ms: None,
        }),
        Some(UndoState::InFlight {
            attempt,
            round_attempts,
        }) => Some(UndoAction::Undo {
            step,
            attempt: attempt.next(),
            round_attempts: *round_attempts,
            not_before_ms: None,
        }),
        Some(UndoState::RetryScheduled {
            attempt,
            round_attempts,
            at_ms,
        }) => Some(UndoAction::Undo {
            step,
            attempt: attempt.next(),
            round_attempts: *round_attempts,
            not_before_ms: Some(*at_ms),
        }),
        Some(UndoState::Failed { error, .. }) => Some(UndoAction::Stuck {
            step,
            error: error.clone(),
        }),
        Some(UndoState::Done) | Some(UndoState::Skipped) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn e(event: Event) -> Entry {
        Entry { at_ms: 10, event }
    }
    fn started(step: u32, attempt: u32) -> Entry {
        e(Event::StepStarted {
            step: StepIndex(step),
            kind: "k".into(),
            argument: json!(step),
            attempt: Attempt(attempt),
            compensable: true,
        })
    }
    fn completed(step: u32, attempt: u32) -> Entry {
        e(Event::StepCompleted {
            step: StepIndex(step),
            attempt: Attempt(attempt),
            output: json!(step * 10),
        })
    }
    fn failed(step: u32, attempt: u32, class: ErrorClass, retry_at_ms: Option<u64>) -> Entry {
        e(Event::StepFailed {
            step: StepIndex(step),
            attempt: Attempt(attempt),
            error: ErrorRecord {
                class,
                message: "boom".into(),
            },
            retry_at_ms,
        })
    }

    /// A completed step replays its output; an in-flight one runs again with the next attempt;
    /// a scheduled retry keeps its journaled time.
    #[test]
    fn step_actions_follow_the_journal() {
        let s = RunState::from_entries(&[
            started(0, 1),
            completed(0, 1),
            started(1, 1),
            failed(1, 1, ErrorClass::Retryable, Some(500)),
            started(2, 1),
        ]);
        // Step 2 cannot start before step 1 finished in sequential code, but the fold does not
        // assume sequential code (parallel branches will rely on that).
        let s = s.unwrap();
        assert_eq!(
            step_action(s.step(StepIndex(0))),
            StepAction::Replay(json!(0))
        );
        assert_eq!(
            step_action(s.step(StepIndex(1))),
            StepAction::Run {
                attempt: Attempt(2),
                not_before_ms: Some(500)
            }
        );
        assert_eq!(
            step_action(s.step(StepIndex(2))),
            StepAction::Run {
                attempt: Attempt(2),
                not_before_ms: None
            }
        );
        assert_eq!(
            step_action(s.step(StepIndex(3))),
            StepAction::Run {
                attempt: Attempt(1),
                not_before_ms: None
            }
        );
    }

    /// Entries that break the state machine are rejected with the entry's position.
    #[test]
    fn corrupt_journals_are_rejected() {
        let err = RunState::from_entries(&[started(0, 1), completed(0, 2)]).unwrap_err();
        assert!(err.starts_with("entry 1:"), "{err}");
        assert!(
            RunState::from_entries(&[started(1, 1)]).is_err(),
            "gap in step numbers"
        );
        assert!(RunState::from_entries(&[started(0, 1), completed(0, 1), started(0, 2)]).is_err());
        assert!(RunState::from_entries(&[started(0, 2)]).is_err());
    }

    /// Compensation visits completed and in-doubt steps newest first, skips permanent
    /// failures and timers, and resumes an undo that was cut off.
    #[test]
    fn undo_order_newest_first() {
        let entries = vec![
            started(0, 1),
            completed(0, 1),
            e(Event::TimerSet {
                step: StepIndex(1),
                wake_at_ms: 5,
            }),
            e(Event::TimerFired { step: StepIndex(1) }),
            started(2, 1),
            completed(2, 1),
            started(3, 1),
            failed(3, 1, ErrorClass::Permanent, None),
            started(4, 1),
        ];
        let mut s = RunState::from_entries(&entries).unwrap();
        assert_eq!(undo_input(&s, StepIndex(4)), Some(None), "in doubt");
        assert_eq!(
            undo_input(&s, StepIndex(3)),
            None,
            "permanent failure of a first attempt had no effect"
        );
        let retried = RunState::from_entries(&[
            started(0, 1),
            failed(0, 1, ErrorClass::Retryable, Some(1)),
            started(0, 2),
            failed(0, 2, ErrorClass::Permanent, None),
        ])
        .unwrap();
        assert_eq!(
            undo_input(&retried, StepIndex(0)),
            Some(None),
            "an earlier attempt may have taken effect"
        );
        let next = |s: &RunState| match undo_action(s) {
            UndoAction::Undo { step, .. } => Some(step.0),
            _ => None,
        };
        assert_eq!(next(&s), Some(4));
        s.apply(&e(Event::StepCompensationStarted {
            step: StepIndex(4),
            attempt: Attempt(1),
        }))
        .unwrap();
        assert_eq!(
            undo_action(&s),
            UndoAction::Undo {
                step: StepIndex(4),
                attempt: Attempt(2),
                round_attempts: 1,
                not_before_ms: None
            }
        );
        s.apply(&e(Event::StepCompensated { step: StepIndex(4) }))
            .unwrap();
        assert_eq!(
            next(&s),
            Some(2),
            "permanent failure of #3 and timer #1 are skipped"
        );
        s.apply(&e(Event::StepCompensationSkipped {
            step: StepIndex(2),
            reason: "none".into(),
        }))
        .unwrap();
        assert_eq!(next(&s), Some(0));
        s.apply(&e(Event::StepCompensationStarted {
            step: StepIndex(0),
            attempt: Attempt(1),
        }))
        .unwrap();
        let error = ErrorRecord {
            class: ErrorClass::Permanent,
            message: "no".into(),
        };
        s.apply(&e(Event::StepCompensationFailed {
            step: StepIndex(0),
            attempt: Attempt(1),
            error: error.clone(),
            retry_at_ms: None,
        }))
        .unwrap();
        assert_eq!(
            undo_action(&s),
            UndoAction::Stuck {
                step: StepIndex(0),
                error
            }
        );
        s.apply(&e(Event::CompensationRetried)).unwrap();
        assert_eq!(
            undo_action(&s),
            UndoAction::Undo {
                step: StepIndex(0),
                attempt: Attempt(2),
                round_attempts: 0,
                not_before_ms: Some(0)
            }
        );
        s.apply(&e(Event::StepCompensationStarted {
            step: StepIndex(0),
            attempt: Attempt(2),
        }))
        .unwrap();
        s.apply(&e(Event::StepCompensated { step: StepIndex(0) }))
            .unwrap();
        assert_eq!(undo_action(&s), UndoAction::Finished);
        // An undo recorded as done is never started again.
        assert!(s
            .apply(&e(Event::StepCompensationStarted {
                step: StepIndex(0),
                attempt: Attempt(3)
            }))
            .is_err());
    }
}
