//! Compensation: which steps are undone, in what order, and how undo attempts that fail,
//! are cut off by crashes, or are retried by an operator are folded.

use super::{completed, e, failed, started, undo};
use crate::ids::{Attempt, StepIndex};
use crate::journal::{Entry, ErrorClass, ErrorRecord, Event};
use crate::replay::{undo_action, undo_input, RunState, UndoAction};

/// The journal of the two tests below: a completed step, a timer, a completed step, a step
/// that failed permanently at its first attempt, and a step in flight.
fn steps_and_a_timer() -> Vec<Entry> {
    vec![
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
    ]
}

/// A step in flight is undone in doubt; a permanent failure had no effect at a first
/// attempt, but after a retry an earlier attempt may have had one.
#[test]
fn undo_input_follows_what_may_have_taken_effect() {
    let s = RunState::from_entries(&steps_and_a_timer()).unwrap();
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
}

/// Compensation visits completed and in-doubt steps newest first, skips permanent
/// failures and timers, and resumes an undo that was cut off.
#[test]
fn undo_order_newest_first() {
    let mut s = RunState::from_entries(&steps_and_a_timer()).unwrap();
    let undo_started = |step, attempt| Event::StepCompensationStarted {
        step: StepIndex(step),
        attempt: Attempt(attempt),
    };
    let undone = |step| Event::StepCompensated {
        step: StepIndex(step),
    };
    let next = |s: &RunState| match undo_action(s) {
        UndoAction::Undo { step, .. } => Some(step.0),
        _ => None,
    };
    assert_eq!(next(&s), Some(4));
    s.apply(&e(undo_started(4, 1))).unwrap();
    assert_eq!(undo_action(&s), undo(4, 2, 1, None));
    s.apply(&e(undone(4))).unwrap();
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
    s.apply(&e(undo_started(0, 1))).unwrap();
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
    assert_eq!(undo_action(&s), undo(0, 2, 0, Some(0)));
    s.apply(&e(undo_started(0, 2))).unwrap();
    s.apply(&e(undone(0))).unwrap();
    assert_eq!(undo_action(&s), UndoAction::Finished);
    // An undo recorded as done is never started again.
    assert!(s.apply(&e(undo_started(0, 3))).is_err());
}
