//! Replay: folding a journal into the state of a run, and deciding, as pure functions of that
//! state, what the run must do next. The executor (`executor.rs`, `saga.rs`) performs the
//! decided action and appends its result; nothing here does I/O.
//!
//! This module holds the run's state and hands each entry to the one function that folds its
//! event. The state and those functions are kept per operation kind: `step.rs` (attempts and
//! outcomes, with the step state machine), `fork.rs` (parallel fan-outs), `child.rs` (child
//! runs), `wait.rs` (durable waits), `timer.rs` (durable timers), `run.rs` (operator
//! requests and pauses) and `compensation.rs` (the saga's undo state and what it undoes
//! next). Every function rejects an event its state does not allow: the journal is corrupt
//! or foreign.
// Public items, reached through `crate::test_utilities` by the workspace's tests.
#![cfg_attr(not(feature = "test-utilities"), allow(unreachable_pub))]

mod child;
mod compensation;
mod event;
mod fork;
mod run;
mod step;
mod timer;
mod wait;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

use crate::ids::OperationIndex;
use crate::journal::{Entry, Event, Published};

pub use child::{ChildEnd, ChildOp};
pub use compensation::{
    effect_by_ms, step_undo_action, undo_action, undo_input, CompensationAction, CompensationState,
};
pub use event::{latest_published, receive_action, Mailbox, ReceiveAction, ReceiveOp};
#[cfg(any(test, feature = "test-utilities"))]
pub use step::StepOutcome;
pub use step::{step_action, StepAction, StepOp};
pub use wait::WaitOp;
// Named by tests and the `test-utilities` re-export; the engine reaches it through `WaitOp`.
#[cfg(any(test, feature = "test-utilities"))]
pub use wait::ParkedWait;

/// A journaled operation: a step, a wait, a fan-out and its branches, a child run or a timer.
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
    /// A receive of one event.
    Receive(ReceiveOp),
    /// A published value.
    Publish {
        /// Its name.
        name: String,
        /// A digest of the value, which replay compares with what the code publishes.
        digest: String,
    },
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
    pub undo: BTreeMap<OperationIndex, CompensationState>,
    /// When the current round of undo attempts of a step began (its first attempt, or the
    /// first after an operator retry): the origin of the compensation's elapsed-time bound.
    pub undo_round_started_at_ms: BTreeMap<OperationIndex, u64>,
    /// Per step, undo attempts in a row that started and recorded no outcome (as
    /// [`StepOp::cut_off`]); cleared by an outcome and by an operator's retry.
    pub undo_cut_off: BTreeMap<OperationIndex, u32>,
    /// Events delivered to the run, consumed or not.
    pub mailbox: Mailbox,
    /// The latest value published under each name.
    pub published: BTreeMap<String, Published>,
}

/// The journaled call (a step attempt or an undo attempt) that the process died during most
/// often in a row, as the journal tells it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CutOff {
    /// The operation.
    pub step: OperationIndex,
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
            Op::Receive(op) => format!("a receive of {:?}", op.names),
            Op::Publish { name, .. } => format!("a publish of {name:?}"),
        }
    }
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

    /// Hands `event`, written at `at_ms`, to the function that folds it. Records of a status
    /// change (`RunCompleted`, ...) change nothing here: what led to each is folded already.
    fn apply_event(&mut self, event: &Event, at_ms: u64) -> Result<(), String> {
        match event {
            Event::StepStarted {
                step,
                kind,
                argument,
                attempt,
                compensable,
            } => self.step_started(*step, kind, argument, *attempt, *compensable, at_ms),
            Event::StepCompleted {
                step,
                attempt,
                output,
            } => self.step_completed(*step, *attempt, output, at_ms),
            Event::StepFailed {
                step,
                attempt,
                error,
                retry_at_ms,
            } => self.step_failed(*step, *attempt, error, *retry_at_ms, at_ms),
            Event::StepOutputRejected {
                step,
                attempt,
                error,
            } => self.step_output_rejected(*step, *attempt, error, at_ms),
            Event::ForkStarted { step, branches } => self.fork_started(*step, *branches),
            Event::ForkSelected { step, branch } => self.fork_selected(*step, *branch),
            Event::ChildStarted {
                step,
                workflow,
                child,
                input,
            } => self.child_started(*step, workflow, child, input),
            Event::ChildEnded {
                step,
                status,
                output,
                error,
            } => self.child_ended(*step, *status, output, error),
            Event::TimerSet { step, wake_at_ms } => self.timer_set(*step, *wake_at_ms),
            Event::TimerFired { step } => self.timer_fired(*step),
            Event::WaitStarted {
                step,
                kind,
                argument,
                schedule,
            } => self.wait_started(*step, kind, argument, schedule, at_ms),
            Event::WaitParked { step, polls, here } => self.wait_parked(*step, polls, *here),
            Event::WaitEnded { step, outcome } => self.wait_ended(*step, outcome),
            Event::EventDelivered {
                name,
                event_id,
                payload,
            } => self.event_delivered(name, event_id, payload, at_ms),
            Event::ReceiveStarted {
                step,
                names,
                deadline_ms,
            } => self.receive_started(*step, names, *deadline_ms),
            Event::EventReceived { step, event_id } => self.event_received(*step, event_id),
            Event::ReceiveTimedOut { step } => self.receive_timed_out(*step),
            Event::ValuePublished { step, name, value } => {
                self.value_published(*step, name, value, at_ms)
            }
            Event::ProgressPublished { name, value } => {
                self.progress_published(name, value, at_ms);
                Ok(())
            }
            // A note for operators: the run's state is unchanged.
            Event::RerunStarted { .. } => Ok(()),
            Event::CancelRequested => self.request_cancel(),
            Event::PauseRequested => self.request_pause(),
            Event::RunPaused { exhausted, .. } => self.run_paused(*exhausted),
            Event::RunResumed => self.run_resumed(at_ms),
            Event::CompensationStarted { .. } => self.compensation_started(),
            Event::StepCompensationStarted { step, attempt } => {
                self.step_compensation_started(*step, *attempt, at_ms)
            }
            Event::StepCompensated { step } => self.step_compensated(*step),
            Event::StepCompensationSkipped { step, .. } => self.step_compensation_skipped(*step),
            Event::StepCompensationFailed {
                step,
                attempt,
                error,
                retry_at_ms,
            } => self.step_compensation_failed(*step, *attempt, error, *retry_at_ms),
            Event::CompensationRetried => self.compensation_retried(),
            Event::RunCompleted { .. }
            | Event::RunFailed { .. }
            | Event::RunSuspended { .. }
            | Event::RunCompensated
            | Event::RunCompensationFailed { .. }
            | Event::RunResolved { .. } => Ok(()),
        }
    }

    /// Whether any step took effect or may have: if not, a failing run has nothing to undo.
    pub fn has_effects(&self) -> bool {
        (0..self.ops.len()).any(|i| undo_input(self, OperationIndex(i as u32)).is_some())
    }
}

/// The journaled call the process died during most often in a row (see
/// [`StepOp::cut_off`]), if any attempt is in flight.
pub fn most_cut_off(state: &RunState) -> Option<CutOff> {
    let steps = state.ops.iter().enumerate().filter_map(|(i, op)| match op {
        Op::Step(op) if op.cut_off > 0 => Some(CutOff {
            step: OperationIndex(i as u32),
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
