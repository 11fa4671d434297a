//! Steps: attempts, retries, attempts cut off by crashes, outcomes, and the run-level events
//! that change them (an operator's pause and resume).

use serde_json::json;

use super::{completed, failed, fold, journal, started};
use crate::ids::{Attempt, OperationIndex};
use crate::journal::{Entry, ErrorClass, ErrorRecord, Event};
use crate::replay::{
    effect_by_ms, most_cut_off, step_action, undo_input, CutOff, RunState, StepAction, StepOutcome,
};

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
        step_action(s.step(OperationIndex(0))),
        StepAction::Replay(json!(0))
    );
    assert_eq!(
        step_action(s.step(OperationIndex(1))),
        StepAction::Run {
            attempt: Attempt(2),
            not_before_ms: Some(500)
        }
    );
    assert_eq!(
        step_action(s.step(OperationIndex(2))),
        StepAction::Run {
            attempt: Attempt(2),
            not_before_ms: None
        }
    );
    assert_eq!(
        step_action(s.step(OperationIndex(3))),
        StepAction::Run {
            attempt: Attempt(1),
            not_before_ms: None
        }
    );
}

/// A step that succeeded on its retry replays its output, keeping its first start as the
/// origin of its retries; one whose attempts crashes cut off twice, and whose third attempt's
/// output was too large, fails for good and is undone in doubt.
#[test]
fn retries_cut_offs_and_a_rejected_output() {
    // A step that succeeded on its retry, then one cut off twice whose output was rejected.
    let entries = journal(include_str!("../fixtures/steps.jsonl"));

    // Cut with the third attempt in flight: two deaths in a row, and a fourth attempt next.
    let cut = fold(&entries[..7]);
    let export = cut.step(OperationIndex(1)).unwrap();
    assert_eq!(export.outcome, StepOutcome::InFlight);
    assert_eq!(
        (
            export.attempt,
            export.cut_off,
            export.first_started_at_ms,
            export.last_at_ms
        ),
        (Attempt(3), 3, 1_700_001_000_321, 1_700_001_018_000)
    );
    assert_eq!(
        most_cut_off(&cut),
        Some(CutOff {
            step: OperationIndex(1),
            kind: "fixture.export".into(),
            undo: false,
            attempts: 3,
        })
    );
    assert_eq!(
        step_action(Some(export)),
        StepAction::Run {
            attempt: Attempt(4),
            not_before_ms: None
        }
    );

    let s = fold(&entries);
    assert_eq!(s.len, 8);
    let add = s.step(OperationIndex(0)).unwrap();
    assert_eq!(
        (
            add.attempt,
            add.cut_off,
            add.first_started_at_ms,
            add.last_at_ms
        ),
        (Attempt(2), 0, 1_700_001_000_000, 1_700_001_000_320)
    );
    assert_eq!(step_action(Some(add)), StepAction::Replay(json!(10)));
    let error = ErrorRecord {
        class: ErrorClass::Permanent,
        message: "output of fixture.export is 70000 bytes, over the limit of 49152 bytes".into(),
    };
    let export = s.step(OperationIndex(1)).unwrap();
    assert_eq!(
        export.outcome,
        StepOutcome::OutputRejected {
            error: error.clone()
        }
    );
    assert_eq!(export.cut_off, 0, "an outcome ends the run of deaths");
    assert_eq!(most_cut_off(&s), None);
    assert_eq!(step_action(Some(export)), StepAction::Fail(error));
    // The effect exists without its output: undone in doubt, made by the rejection at latest.
    assert_eq!(undo_input(&s, OperationIndex(1)), Some(None));
    assert_eq!(effect_by_ms(&s, OperationIndex(1)), Some(1_700_001_018_900));
    assert!(s.has_effects());
}

/// A step that ran out of retries in a workflow that pauses then fails until an operator
/// resumes the run, which gives it a new round of attempts timed from the resume.
#[test]
fn resume_after_exhausted_retries_starts_a_new_round() {
    // A step out of retries, the pause it caused, the operator's resume, and the new round.
    let entries = journal(include_str!("../fixtures/paused_exhausted.jsonl"));

    let paused = fold(&entries[..5]);
    assert!(paused.paused_exhausted);
    assert_eq!(
        step_action(paused.step(OperationIndex(0))),
        StepAction::Fail(ErrorRecord {
            class: ErrorClass::Retryable,
            message: "throttled".into(),
        })
    );

    let resumed = fold(&entries[..6]);
    assert!(!resumed.paused_exhausted);
    let op = resumed.step(OperationIndex(0)).unwrap();
    assert_eq!(op.outcome, StepOutcome::RetryScheduled { at_ms: 0 });
    assert_eq!(
        (op.round_base, op.first_started_at_ms),
        (2, 1_700_000_900_000)
    );
    assert_eq!(
        step_action(Some(op)),
        StepAction::Run {
            attempt: Attempt(3),
            not_before_ms: Some(0)
        }
    );

    let done = fold(&entries);
    let op = done.step(OperationIndex(0)).unwrap();
    assert_eq!((op.attempt, op.round_base), (Attempt(3), 2));
    assert_eq!(step_action(Some(op)), StepAction::Replay(json!(10)));
}

/// An operator's pause request is withdrawn by a resume, which also forgets the deaths of a
/// step cut off by crashes, so a resumed run is not poisoned by them.
#[test]
fn resume_withdraws_a_pause_and_forgets_cut_offs() {
    // The step cut off twice, from the steps fixture, then paused and resumed by an operator.
    let mut entries = journal(include_str!("../fixtures/steps.jsonl"));
    entries.truncate(7);
    let at = |at_ms, event| Entry { at_ms, event };
    entries.push(at(1_700_001_018_100, Event::PauseRequested));

    let requested = fold(&entries);
    assert!(requested.pause_requested);
    assert!(!requested.paused_exhausted);

    entries.push(at(
        1_700_001_018_200,
        Event::RunPaused {
            reason: "paused by operator".into(),
            exhausted: false,
        },
    ));
    entries.push(at(1_700_001_100_000, Event::RunResumed));
    let resumed = fold(&entries);
    assert!(!resumed.pause_requested);
    let export = resumed.step(OperationIndex(1)).unwrap();
    assert_eq!(
        (export.cut_off, export.outcome.clone()),
        (0, StepOutcome::InFlight)
    );
    assert_eq!(most_cut_off(&resumed), None);
    // Not exhausted: the attempt in flight runs again as it would have, in its own round.
    assert_eq!(export.round_base, 0);
    assert_eq!(
        step_action(Some(export)),
        StepAction::Run {
            attempt: Attempt(4),
            not_before_ms: None
        }
    );
}
