//! Compensation: which steps are undone, in what order, and how undo attempts that fail,
//! are cut off by crashes, or are retried by an operator are folded.

use std::collections::BTreeMap;

use super::{completed, e, failed, fold, journal, started, undo, undo_decisions};
use crate::ids::{Attempt, OperationIndex};
use crate::journal::{Entry, ErrorClass, ErrorRecord, Event};
use crate::replay::{
    effect_by_ms, most_cut_off, undo_action, undo_input, CompensationAction, CompensationState,
    CutOff, RunState,
};

/// The journal of the two tests below: a completed step, a timer, a completed step, a step
/// that failed permanently at its first attempt, and a step in flight.
fn steps_and_a_timer() -> Vec<Entry> {
    vec![
        started(0, 1),
        completed(0, 1),
        e(Event::TimerSet {
            step: OperationIndex(1),
            wake_at_ms: 5,
        }),
        e(Event::TimerFired {
            step: OperationIndex(1),
        }),
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
    assert_eq!(undo_input(&s, OperationIndex(4)), Some(None), "in doubt");
    assert_eq!(
        undo_input(&s, OperationIndex(3)),
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
        undo_input(&retried, OperationIndex(0)),
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
        step: OperationIndex(step),
        attempt: Attempt(attempt),
    };
    let undone = |step| Event::StepCompensated {
        step: OperationIndex(step),
    };
    let next = |s: &RunState| match undo_action(s) {
        CompensationAction::Compensate { step, .. } => Some(step.0),
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
        step: OperationIndex(2),
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
        step: OperationIndex(0),
        attempt: Attempt(1),
        error: error.clone(),
        retry_at_ms: None,
    }))
    .unwrap();
    assert_eq!(
        undo_action(&s),
        CompensationAction::Stuck {
            step: OperationIndex(0),
            error
        }
    );
    s.apply(&e(Event::CompensationRetried)).unwrap();
    assert_eq!(undo_action(&s), undo(0, 2, 0, Some(0)));
    s.apply(&e(undo_started(0, 2))).unwrap();
    s.apply(&e(undone(0))).unwrap();
    assert_eq!(undo_action(&s), CompensationAction::Finished);
    // An undo recorded as done is never started again.
    assert!(s.apply(&e(undo_started(0, 3))).is_err());
}

/// A failed run is undone newest first: the step that gave up, in doubt, whose first undo
/// a crash cut off; the charge, whose undo failed, then failed for good, and was retried by
/// an operator in a new round; the audit, skipped; the step without compensation passed
/// over; and the reservation.
#[test]
fn compensation_goes_newest_first_through_every_undo_outcome() {
    // A run whose last step gave up after a crash, compensated through every undo outcome.
    let entries = journal(include_str!("../fixtures/compensation.jsonl"));
    let refund = ErrorRecord {
        class: ErrorClass::Permanent,
        message: "refund window closed".into(),
    };
    assert_eq!(
        undo_decisions(&entries),
        vec![
            undo(4, 1, 0, None),
            undo(4, 2, 1, None),
            undo(3, 1, 0, None),
            undo(3, 2, 1, Some(1_700_000_708_700)),
            CompensationAction::Stuck {
                step: OperationIndex(3),
                error: refund
            },
            undo(3, 3, 0, Some(0)),
            undo(2, 1, 0, None),
            undo(0, 1, 0, None),
            CompensationAction::Finished,
        ]
    );
    let done = fold(&entries);
    assert_eq!(
        done.undo,
        BTreeMap::from([
            (OperationIndex(0), CompensationState::Done),
            (OperationIndex(2), CompensationState::Skipped),
            (OperationIndex(3), CompensationState::Done),
            (OperationIndex(4), CompensationState::Done),
        ])
    );
    assert!(done.undo_cut_off.is_empty());
    assert_eq!(most_cut_off(&done), None);
}

/// Folded up to a crash, compensation knows the undo cut off (for the crash-loop bound) and
/// its round's start; stuck, the undo that failed for good; retried by an operator, a new
/// round of attempts timed from its first.
#[test]
fn compensation_cut_stuck_and_retried() {
    // The compensation fixture, cut at three points.
    let entries = journal(include_str!("../fixtures/compensation.jsonl"));

    // Cut with the ship's first undo cut off and its second in flight.
    let cut = fold(&entries[..14]);
    assert_eq!(
        most_cut_off(&cut),
        Some(CutOff {
            step: OperationIndex(4),
            kind: "fixture.ship".into(),
            undo: true,
            attempts: 2,
        })
    );
    assert_eq!(
        cut.undo_round_started_at_ms.get(&OperationIndex(4)),
        Some(&1_700_000_705_402)
    );
    // It gave up: its effect was made by its last outcome at latest.
    assert_eq!(
        effect_by_ms(&cut, OperationIndex(4)),
        Some(1_700_000_705_400)
    );
    assert_eq!(undo_input(&cut, OperationIndex(1)), None, "no compensation");

    // Stuck on the charge until an operator acts.
    let stuck = fold(&entries[..20]);
    assert_eq!(
        stuck.undo.get(&OperationIndex(3)),
        Some(&CompensationState::Failed {
            attempt: Attempt(2),
            error: ErrorRecord {
                class: ErrorClass::Permanent,
                message: "refund window closed".into(),
            }
        })
    );
    assert!(stuck.undo_cut_off.is_empty());

    // The operator's retry begins a new round, timed from its first attempt.
    let retried = fold(&entries[..22]);
    assert_eq!(
        retried.undo.get(&OperationIndex(3)),
        Some(&CompensationState::InFlight {
            attempt: Attempt(3),
            round_attempts: 1
        })
    );
    assert_eq!(
        retried.undo_round_started_at_ms.get(&OperationIndex(3)),
        Some(&1_700_000_900_001)
    );
}
