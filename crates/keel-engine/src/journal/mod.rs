//! The journal's data model: run records and journal entries, exactly as they are stored.
//!
//! A run has one [`RunRecord`] (what it is and where it stands) and an ordered list of
//! [`Entry`]s (what happened). The journal is also the saga log: compensation reads nothing
//! else. Entries are JSON, so journals can be read by people and kept as test fixtures
//! (`tests/fixtures/*.jsonl`, one entry per line).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ids::{Attempt, OperationIndex, RunId};

mod wait;

pub use wait::{WaitOutcome, WaitPolls, WaitSchedule};

/// Where a run stands.
///
/// | status               | terminal | next                                              |
/// |----------------------|----------|---------------------------------------------------|
/// | `Running`            | no       | Completed, Failed, Compensating, Suspended, Paused |
/// | `Suspended`          | no       | Running (operator resume), Compensating (cancel)  |
/// | `Paused`             | no       | Running (operator resume), Compensating (cancel)  |
/// | `Compensating`       | no       | Compensated, CompensationFailed                   |
/// | `CompensationFailed` | no       | Compensating (operator retry), Resolved (operator) |
/// | `Completed`          | yes      | Compensating, only for a child run whose parent compensates |
/// | `Failed`             | yes      | (failed with nothing to undo)                     |
/// | `Compensated`        | yes      |                                                   |
/// | `Resolved`           | yes      | (an operator settled a failed compensation)       |
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// The workflow code is being run (or waits to be).
    Running,
    /// Replay found the code and the journal disagree; an operator must act.
    Suspended,
    /// An operator paused the run (or a step ran out of retries in a workflow that pauses
    /// then): no step starts until an operator resumes it. Survives restarts.
    Paused,
    /// Completed and in-doubt steps are being undone, newest first.
    Compensating,
    /// A compensation failed permanently; an operator must retry it or resolve the run.
    CompensationFailed,
    /// The workflow returned its output.
    Completed,
    /// The workflow failed before any step took effect: nothing to undo.
    Failed,
    /// The workflow failed or was cancelled, and every step was undone.
    Compensated,
    /// An operator marked a failed compensation as settled.
    Resolved,
}

impl RunStatus {
    /// Every status, in the order they are declared (the order the console and `/metrics`
    /// list them in).
    pub const ALL: [RunStatus; 9] = [
        RunStatus::Running,
        RunStatus::Suspended,
        RunStatus::Paused,
        RunStatus::Compensating,
        RunStatus::CompensationFailed,
        RunStatus::Completed,
        RunStatus::Failed,
        RunStatus::Compensated,
        RunStatus::Resolved,
    ];

    /// Whether the run can never change again (except by garbage collection).
    pub fn is_terminal(self) -> bool {
        match self {
            RunStatus::Completed
            | RunStatus::Failed
            | RunStatus::Compensated
            | RunStatus::Resolved => true,
            RunStatus::Running
            | RunStatus::Suspended
            | RunStatus::Paused
            | RunStatus::Compensating
            | RunStatus::CompensationFailed => false,
        }
    }

    /// Whether a driver takes the run on (runs its body or its saga).
    pub fn is_drivable(self) -> bool {
        matches!(self, RunStatus::Running | RunStatus::Compensating)
    }

    /// The status as a lowercase word.
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Suspended => "suspended",
            RunStatus::Paused => "paused",
            RunStatus::Compensating => "compensating",
            RunStatus::CompensationFailed => "compensation_failed",
            RunStatus::Completed => "completed",
            RunStatus::Failed => "failed",
            RunStatus::Compensated => "compensated",
            RunStatus::Resolved => "resolved",
        }
    }
}

impl std::fmt::Display for RunStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The stored description of one run. Changed only by status transitions, each one atomic
/// write (on sled: the record itself for a transition that settles the run, else the
/// journal entry, carrying the record's new state, after which the record is rewritten,
/// and repaired from the journal at open; docs/guarantees.md).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// Where the run stands. The first field, so that its JSON begins with it: the sled
    /// store reads a stored record's status from its first bytes (`counts::status_of`).
    pub status: RunStatus,
    /// The run id (the caller's idempotency key).
    pub id: RunId,
    /// The workflow name.
    pub workflow: String,
    /// The workflow version that started the run.
    pub version: u32,
    /// The input, as given to `start`.
    pub input: Value,
    /// When the run was started (ms since the Unix epoch).
    pub created_at_ms: u64,
    /// When the status last changed.
    pub updated_at_ms: u64,
    /// When the run reached a terminal status.
    pub finished_at_ms: Option<u64>,
    /// The workflow's output, once `Completed`.
    pub output: Option<Value>,
    /// Why the run failed, was compensated, suspended, paused or cancelled.
    pub error: Option<String>,
    /// The run that started this one as a child, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<RunId>,
    /// The finished run this one reruns ([`crate::Engine::rerun`]), if any; that run's
    /// journal names this one in a `rerun_started` entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rerun_of: Option<RunId>,
}

/// How a step error is classified; the class drives retries and the saga.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    /// Trying again may succeed.
    Retryable,
    /// Trying again will fail the same way; the step had no effect.
    Permanent,
}

/// A step error as journaled.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorRecord {
    /// Retryable or permanent.
    pub class: ErrorClass,
    /// The error message, cut to `ERROR_MESSAGE_BYTES_MAX`.
    pub message: String,
}

/// One journal entry: when it was written and what happened.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// Wall-clock time of the write (ms since the Unix epoch).
    pub at_ms: u64,
    /// What happened.
    #[serde(flatten)]
    pub event: Event,
}

/// Everything a journal records. Entries about step `n` carry `step: n`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// An attempt of a step begins. Durable before the step's side effect starts.
    StepStarted {
        /// The operation number.
        step: OperationIndex,
        /// The step kind.
        kind: String,
        /// The step's argument (the step value itself).
        argument: Value,
        /// The attempt number.
        attempt: Attempt,
        /// Whether the step's kind has a compensation ([`crate::Step::COMPENSABLE`]). A step
        /// without one is passed over by the saga, which then needs no registration of its
        /// kind. Journals written before this field existed read as `true`.
        #[serde(
            default = "compensable_default",
            skip_serializing_if = "is_compensable"
        )]
        compensable: bool,
    },
    /// A parallel fan-out begins: operation `step` is the fork, and the `branches` operations
    /// after it are its branches, one step each, numbered in the order the code listed them.
    ForkStarted {
        /// The fork's operation number.
        step: OperationIndex,
        /// How many branches follow it.
        branches: u32,
    },
    /// The first branch of a `select` fan-out to succeed: the winner, whose output the body
    /// gets. Journaled before the losers are undone.
    ForkSelected {
        /// The fork's operation number.
        step: OperationIndex,
        /// The winning branch (0-based, in list order).
        branch: u32,
    },
    /// A child run is about to be created with this id. Durable before the child exists.
    ChildStarted {
        /// The operation number.
        step: OperationIndex,
        /// The child's workflow.
        workflow: String,
        /// The child's run id.
        child: RunId,
        /// The child's input.
        input: Value,
    },
    /// The child run settled.
    ChildEnded {
        /// The operation number.
        step: OperationIndex,
        /// Its status: completed, failed, compensated or resolved.
        status: RunStatus,
        /// Its output, if it completed.
        output: Option<Value>,
        /// Why it did not complete, if it did not.
        error: Option<String>,
    },
    /// The step succeeded; its output is final.
    StepCompleted {
        /// The operation number.
        step: OperationIndex,
        /// The attempt that succeeded.
        attempt: Attempt,
        /// The step's output.
        output: Value,
    },
    /// An attempt failed. With `retry_at_ms` the step will run again then; without, it failed
    /// for good (permanent error, or attempts or elapsed time exhausted).
    StepFailed {
        /// The operation number.
        step: OperationIndex,
        /// The attempt that failed.
        attempt: Attempt,
        /// The error.
        error: ErrorRecord,
        /// When the next attempt may start (absolute), if there is one.
        retry_at_ms: Option<u64>,
    },
    /// An attempt succeeded but its output cannot be kept: over the output bound, or not
    /// serialisable. The effect exists, so the step failed for good in doubt: the saga
    /// undoes it without an output (the compensation finds the effect by its key).
    StepOutputRejected {
        /// The operation number.
        step: OperationIndex,
        /// The attempt whose output was rejected.
        attempt: Attempt,
        /// Why the output cannot be kept (a permanent error: retrying makes the same output).
        error: ErrorRecord,
    },
    /// A durable timer was set.
    TimerSet {
        /// The operation number.
        step: OperationIndex,
        /// When it fires (absolute).
        wake_at_ms: u64,
    },
    /// A timer fired and the workflow went on.
    TimerFired {
        /// The operation number.
        step: OperationIndex,
    },
    /// A wait began, with its resolved schedule and absolute deadline. Polls are not
    /// journaled.
    WaitStarted {
        /// The operation number.
        step: OperationIndex,
        /// The wait kind.
        kind: String,
        /// The probe's argument (the probe value itself).
        argument: Value,
        /// The schedule every resumption follows.
        schedule: WaitSchedule,
    },
    /// A wait ended.
    WaitEnded {
        /// The operation number.
        step: OperationIndex,
        /// How.
        outcome: WaitOutcome,
    },
    /// The run parked between two polls of a wait: what the polls so far saw. When the run
    /// is loaded again from that park by the engine that parked it, the wait goes on from
    /// here, as if it had slept in memory; after a restart (or any other load), it starts over
    /// as a wait whose polls were not journaled does. Durable before the run parks.
    WaitParked {
        /// The operation number.
        step: OperationIndex,
        /// The polls so far, and when the next is due.
        polls: WaitPolls,
        /// Whether the wait started in the drive of the run that parked it (no restart since):
        /// only then does its time to readiness measure the resource.
        here: bool,
    },
    /// An event was sent to the run from outside ([`crate::Engine::send`]) and waits in its
    /// mailbox until a receive takes it. Durable before the send returns. Deliveries are
    /// kept in arrival order, which is the order receives take them in, per name.
    EventDelivered {
        /// The event's name.
        name: String,
        /// The sender's idempotency key: a second delivery with this id is the same event.
        event_id: String,
        /// The event's payload.
        payload: Value,
    },
    /// The body began to receive one event of `names`; with `deadline_ms`, it gives up then.
    ReceiveStarted {
        /// The operation number.
        step: OperationIndex,
        /// The names it takes an event of.
        names: Vec<String>,
        /// When it stops waiting (absolute), if it does.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        deadline_ms: Option<u64>,
    },
    /// The receive took event `event_id` out of the mailbox: it is consumed, and replay
    /// returns it again.
    EventReceived {
        /// The receive's operation number.
        step: OperationIndex,
        /// The event taken.
        event_id: String,
    },
    /// The receive's deadline passed with no event of its names delivered before it.
    ReceiveTimedOut {
        /// The receive's operation number.
        step: OperationIndex,
    },
    /// The body published a value under `name` (the latest one per name is what readers
    /// get, [`crate::Engine::published`]).
    ValuePublished {
        /// The operation number.
        step: OperationIndex,
        /// The value's name.
        name: String,
        /// The value.
        value: Value,
    },
    /// A fan-out of child runs reported its progress under `name` as a child ended
    /// ([`crate::Ctx::children_reporting`]): a published value that is no operation of the
    /// body, so replay neither checks nor repeats it (a replayed fan-out reports again as
    /// its remaining children end).
    ProgressPublished {
        /// The value's name.
        name: String,
        /// The value.
        value: Value,
    },
    /// An operator reran this finished run as run `run` ([`crate::Engine::rerun`]): a note
    /// in the journal of the run rerun, which the new run's record names in `rerun_of`. No
    /// operation of the body, and no change of state.
    RerunStarted {
        /// The new run.
        run: RunId,
    },
    /// The workflow returned its output. Written with the `Completed` status.
    RunCompleted {
        /// The output.
        output: Value,
    },
    /// The workflow failed with nothing to undo. Written with the `Failed` status.
    RunFailed {
        /// Why.
        error: String,
    },
    /// Replay found a mismatch. Written with the `Suspended` status.
    RunSuspended {
        /// What the journal holds and what the code asked for.
        reason: String,
    },
    /// A suspended or paused run was taken up again (or a pause request withdrawn).
    RunResumed,
    /// An operator asked for the run to be paused; it pauses once its in-flight steps end.
    PauseRequested,
    /// The run stopped for an operator. Written with the `Paused` status.
    RunPaused {
        /// Why (operator request, or the step that ran out of retries).
        reason: String,
        /// Whether a step ran out of retries: resuming then gives such steps a new round of
        /// attempts.
        #[serde(default)]
        exhausted: bool,
    },
    /// An operator asked for the run to be cancelled.
    CancelRequested,
    /// The run starts undoing its steps. Written with the `Compensating` status.
    CompensationStarted {
        /// Why (the failure, or cancellation).
        reason: String,
    },
    /// An attempt to undo a step begins.
    StepCompensationStarted {
        /// The step being undone.
        step: OperationIndex,
        /// The compensation attempt.
        attempt: Attempt,
    },
    /// The step was undone.
    StepCompensated {
        /// The step.
        step: OperationIndex,
    },
    /// The step has no compensation, so nothing was undone.
    StepCompensationSkipped {
        /// The step.
        step: OperationIndex,
        /// Why.
        reason: String,
    },
    /// An attempt to undo a step failed; with `retry_at_ms` it runs again then.
    StepCompensationFailed {
        /// The step.
        step: OperationIndex,
        /// The compensation attempt.
        attempt: Attempt,
        /// The error.
        error: ErrorRecord,
        /// When the next attempt may start, if there is one.
        retry_at_ms: Option<u64>,
    },
    /// Every step was undone. Written with the `Compensated` status.
    RunCompensated,
    /// A compensation failed for good. Written with the `CompensationFailed` status.
    RunCompensationFailed {
        /// The step whose undo failed.
        step: OperationIndex,
        /// The error.
        error: String,
    },
    /// An operator asked to retry a failed compensation. Written with `Compensating`.
    CompensationRetried,
    /// An operator settled a failed compensation. Written with the `Resolved` status.
    RunResolved {
        /// The operator's note.
        note: String,
    },
}

impl Event {
    /// The step this entry is about, if any.
    pub fn step(&self) -> Option<OperationIndex> {
        match self {
            Event::StepStarted { step, .. }
            | Event::ForkStarted { step, .. }
            | Event::ForkSelected { step, .. }
            | Event::ChildStarted { step, .. }
            | Event::ChildEnded { step, .. }
            | Event::StepCompleted { step, .. }
            | Event::StepFailed { step, .. }
            | Event::StepOutputRejected { step, .. }
            | Event::TimerSet { step, .. }
            | Event::TimerFired { step }
            | Event::WaitStarted { step, .. }
            | Event::WaitEnded { step, .. }
            | Event::WaitParked { step, .. }
            | Event::ReceiveStarted { step, .. }
            | Event::EventReceived { step, .. }
            | Event::ReceiveTimedOut { step }
            | Event::ValuePublished { step, .. }
            | Event::StepCompensationStarted { step, .. }
            | Event::StepCompensated { step }
            | Event::StepCompensationSkipped { step, .. }
            | Event::StepCompensationFailed { step, .. }
            | Event::RunCompensationFailed { step, .. } => Some(*step),
            Event::EventDelivered { .. }
            | Event::ProgressPublished { .. }
            | Event::RerunStarted { .. }
            | Event::RunCompleted { .. }
            | Event::RunFailed { .. }
            | Event::RunSuspended { .. }
            | Event::RunResumed
            | Event::PauseRequested
            | Event::RunPaused { .. }
            | Event::CancelRequested
            | Event::CompensationStarted { .. }
            | Event::RunCompensated
            | Event::CompensationRetried
            | Event::RunResolved { .. } => None,
        }
    }
}

fn compensable_default() -> bool {
    true
}

fn is_compensable(compensable: &bool) -> bool {
    *compensable
}

/// A run record with its journal, as loaded for inspection (`history`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunHistory {
    /// The run record.
    pub run: RunRecord,
    /// Every journal entry, in order.
    pub entries: Vec<Entry>,
}

/// A value a run published ([`crate::Ctx::publish`]), as readers get it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Published {
    /// The value.
    pub value: Value,
    /// Its version: larger for a later publish of the same run (the journal index of its
    /// entry), so a reader can wait for a value newer than the one it has.
    pub version: u64,
    /// When it was published (ms since the Unix epoch).
    pub at_ms: u64,
}

/// Helper for messages: a short, stable digest of a JSON value (FNV-1a over its canonical
/// text), so errors can say "input 3f2a..." without printing 64 KiB.
#[cfg_attr(not(feature = "test-utilities"), allow(unreachable_pub))]
pub fn digest(value: &Value) -> String {
    let text = value.to_string();
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.as_bytes() {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{hash:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Entries serialise to the flat, tagged JSON lines the fixtures use, and back.
    #[test]
    fn entry_json_shape_round_trips() {
        let entry = Entry {
            at_ms: 5,
            event: Event::StepStarted {
                step: OperationIndex(2),
                kind: "test.add".into(),
                argument: serde_json::json!({"n": 1}),
                attempt: Attempt(1),
                compensable: true,
            },
        };
        let text = serde_json::to_string(&entry).unwrap();
        assert_eq!(
            text,
            r#"{"at_ms":5,"type":"step_started","step":2,"kind":"test.add","argument":{"n":1},"attempt":1}"#
        );
        let back: Entry = serde_json::from_str(&text).unwrap();
        assert_eq!(back, entry);
        // A step without compensation says so; one that has one (the default, and every
        // step of journals written before the field existed) does not need to.
        let read_only = Entry {
            event: match entry.event {
                Event::StepStarted {
                    step,
                    kind,
                    argument,
                    attempt,
                    ..
                } => Event::StepStarted {
                    step,
                    kind,
                    argument,
                    attempt,
                    compensable: false,
                },
                _ => unreachable!(),
            },
            ..entry
        };
        let text = serde_json::to_string(&read_only).unwrap();
        assert!(
            text.ends_with(r#""attempt":1,"compensable":false}"#),
            "{text}"
        );
        assert_eq!(serde_json::from_str::<Entry>(&text).unwrap(), read_only);
    }
}
