use serde_json::json;

use super::*;
use crate::ids::Attempt;
use crate::journal::{ErrorClass, ErrorRecord};

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
