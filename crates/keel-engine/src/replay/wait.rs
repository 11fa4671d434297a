//! Durable waits as the journal tells them: the start, with the schedule and deadline every
//! resumption follows, the polls so far each time the run parked between two of them, and
//! the end. Polls themselves are not journaled, so the fold sees none.

use serde_json::Value;

use super::{Op, RunState};
use crate::ids::OperationIndex;
use crate::journal::{WaitOutcome, WaitPolls, WaitSchedule};

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
    pub schedule: WaitSchedule,
    /// What its polls had seen when the run last parked between two of them, if it did
    /// (`WaitParked`).
    pub parked: Option<ParkedWait>,
    /// How it ended, if it did.
    pub outcome: Option<WaitOutcome>,
}

/// A wait's polls when its run parked between two of them.
#[derive(Clone, Debug, PartialEq)]
pub struct ParkedWait {
    /// The polls so far, and when the next is due.
    pub polls: WaitPolls,
    /// Whether the wait started in the drive of the run that parked it.
    pub here: bool,
}

impl RunState {
    /// `WaitStarted`: a wait takes the next operation number.
    pub(super) fn wait_started(
        &mut self,
        step: OperationIndex,
        kind: &str,
        argument: &Value,
        schedule: &WaitSchedule,
        at_ms: u64,
    ) -> Result<(), String> {
        if step.0 as usize != self.ops.len() {
            return Err(format!(
                "wait {step} started out of order (next is #{})",
                self.ops.len()
            ));
        }
        self.ops.push(Op::Wait(WaitOp {
            kind: kind.to_owned(),
            argument: argument.clone(),
            started_at_ms: at_ms,
            schedule: schedule.clone(),
            parked: None,
            outcome: None,
        }));
        Ok(())
    }

    /// `WaitParked`: the run of a wait under way parked between two polls; the latest such
    /// entry is what the wait goes on from.
    pub(super) fn wait_parked(
        &mut self,
        step: OperationIndex,
        polls: &WaitPolls,
        here: bool,
    ) -> Result<(), String> {
        if polls.streak > polls.answers || polls.answers > polls.sent {
            return Err(format!(
                "wait_parked for {step} counts {} ready in a row of {} answers to {} polls",
                polls.streak, polls.answers, polls.sent
            ));
        }
        match self.ops.get_mut(step.0 as usize) {
            Some(Op::Wait(op)) if op.outcome.is_none() => {
                op.parked = Some(ParkedWait {
                    polls: polls.clone(),
                    here,
                });
                Ok(())
            }
            other => Err(format!("wait_parked for {step} in state {other:?}")),
        }
    }

    /// `WaitEnded`: a started wait ended, once.
    pub(super) fn wait_ended(
        &mut self,
        step: OperationIndex,
        outcome: &WaitOutcome,
    ) -> Result<(), String> {
        match self.ops.get_mut(step.0 as usize) {
            Some(Op::Wait(op)) if op.outcome.is_none() => {
                op.outcome = Some(outcome.clone());
                Ok(())
            }
            other => Err(format!("wait_ended for {step} in state {other:?}")),
        }
    }
}
