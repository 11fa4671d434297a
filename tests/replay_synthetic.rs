//! Synthetic journals, built from a compact description, for the cases no fixture under
//! `tests/fixtures/` covers: they fold into the run state their description says.

use std::collections::BTreeMap;

use keel::{Attempt, Entry, ErrorClass, ErrorRecord, Event, OperationIndex};
use keel_engine::test_utilities::replay::{
    step_action, undo_action, undo_input, CompensationAction, CompensationState, RunState,
    StepAction, StepOutcome,
};
use serde_json::json;

/// The step kind of synthetic journals.
const SYNTHETIC_KIND: &str = "synthetic.step";

/// Builds a journal from a compact description: whitespace-separated tokens, each a letter
/// followed, for step events, by the operation number. Attempt numbers, outputs (`n * 10`),
/// arguments (`{"n": n}`), timestamps (10 ms apart from 1000) and retry times (100 ms after
/// the entry) are filled in.
///
/// | token | entry                                  |
/// |-------|----------------------------------------|
/// | `sN`  | step N started (its next attempt)      |
/// | `cN`  | step N completed                       |
/// | `rN`  | step N failed retryably, retry later   |
/// | `gN`  | step N failed retryably, gave up       |
/// | `pN`  | step N failed permanently              |
/// | `tN`  | timer N set (wakes 50 ms later)        |
/// | `fN`  | timer N fired                          |
/// | `uN`  | undo of step N started (next attempt)  |
/// | `dN`  | step N undone                          |
/// | `kN`  | undo of step N skipped                 |
/// | `qN`  | undo of step N failed, retry later     |
/// | `eN`  | undo of step N failed for good         |
/// | `X`   | compensation started                   |
/// | `~`   | cancel requested                       |
/// | `!`   | run completed (output: the step count) |
/// | `$`   | run compensated                        |
fn journal(description: &str) -> Vec<Entry> {
    let mut attempts: BTreeMap<u32, u32> = BTreeMap::new();
    let mut undo_attempts: BTreeMap<u32, u32> = BTreeMap::new();
    let mut entries = Vec::new();
    for token in description.split_whitespace() {
        let at_ms = 1000 + 10 * entries.len() as u64;
        let (letter, number) = token.split_at(1);
        let n: u32 = match number {
            "" => 0,
            digits => digits
                .parse()
                .unwrap_or_else(|_| panic!("token {token:?}: bad step number")),
        };
        let step = OperationIndex(n);
        let attempt = Attempt(attempts.get(&n).copied().unwrap_or(0));
        let undo_attempt = Attempt(undo_attempts.get(&n).copied().unwrap_or(0));
        let error = |class, message: &str| ErrorRecord {
            class,
            message: message.into(),
        };
        let event = match letter {
            "s" => {
                let next = attempts.entry(n).or_insert(0);
                *next += 1;
                Event::StepStarted {
                    step,
                    kind: SYNTHETIC_KIND.into(),
                    argument: json!({"n": n}),
                    attempt: Attempt(*next),
                    compensable: true,
                }
            }
            "c" => Event::StepCompleted {
                step,
                attempt,
                output: json!(n * 10),
            },
            "r" => Event::StepFailed {
                step,
                attempt,
                error: error(ErrorClass::Retryable, "busy"),
                retry_at_ms: Some(at_ms + 100),
            },
            "g" => Event::StepFailed {
                step,
                attempt,
                error: error(ErrorClass::Retryable, "still busy"),
                retry_at_ms: None,
            },
            "p" => Event::StepFailed {
                step,
                attempt,
                error: error(ErrorClass::Permanent, "refused"),
                retry_at_ms: None,
            },
            "t" => Event::TimerSet {
                step,
                wake_at_ms: at_ms + 50,
            },
            "f" => Event::TimerFired { step },
            "u" => {
                let next = undo_attempts.entry(n).or_insert(0);
                *next += 1;
                Event::StepCompensationStarted {
                    step,
                    attempt: Attempt(*next),
                }
            }
            "d" => Event::StepCompensated { step },
            "k" => Event::StepCompensationSkipped {
                step,
                reason: "step has no compensation".into(),
            },
            "q" => Event::StepCompensationFailed {
                step,
                attempt: undo_attempt,
                error: error(ErrorClass::Retryable, "undo busy"),
                retry_at_ms: Some(at_ms + 100),
            },
            "e" => Event::StepCompensationFailed {
                step,
                attempt: undo_attempt,
                error: error(ErrorClass::Permanent, "undo refused"),
                retry_at_ms: None,
            },
            "X" => Event::CompensationStarted {
                reason: "synthetic failure".into(),
            },
            "~" => Event::CancelRequested,
            "!" => Event::RunCompleted {
                output: json!(attempts.len()),
            },
            "$" => Event::RunCompensated,
            _ => panic!("unknown token {token:?}"),
        };
        entries.push(Entry { at_ms, event });
    }
    entries
}

/// Synthetic journals fold as their descriptions say: a compensation cut off with an undo in
/// flight resumes that undo at its next attempt; a scheduled undo retry keeps its time; a
/// permanent first-attempt failure and a timer need no undo; a cancel with a step in flight
/// undoes that step; an entry that breaks the state machine is rejected with its position;
/// and built entries survive a JSON round trip.
#[test]
fn synthetic_journals_fold_as_described() {
    // Step 1 gave up after two attempts (in doubt); compensation undid it and was cut off
    // while undoing step 0.
    let cut_off = journal("s0 c0 s1 r1 s1 g1 X u1 d1 u0");
    let state = RunState::from_entries(&cut_off).unwrap();
    assert!(matches!(
        &state.step(OperationIndex(1)).unwrap().outcome,
        StepOutcome::GaveUp { .. }
    ));
    assert_eq!(state.step(OperationIndex(1)).unwrap().attempt, Attempt(2));
    assert_eq!(
        undo_input(&state, OperationIndex(1)),
        Some(None),
        "in doubt"
    );
    assert_eq!(
        undo_action(&state),
        CompensationAction::Compensate {
            step: OperationIndex(0),
            attempt: Attempt(2),
            round_attempts: 1,
            not_before_ms: None,
        }
    );
    let finished = journal("s0 c0 s1 r1 s1 g1 X u1 d1 u0 u0 d0 $");
    let state = RunState::from_entries(&finished).unwrap();
    assert_eq!(undo_action(&state), CompensationAction::Finished);
    assert_eq!(
        state.undo,
        BTreeMap::from([
            (OperationIndex(0), CompensationState::Done),
            (OperationIndex(1), CompensationState::Done)
        ])
    );

    // Step 2 failed permanently at its first attempt (no effect), step 1 is a timer: only
    // step 0 needs undoing, and its retry keeps its journaled time.
    let retrying = journal("s0 c0 t1 f1 s2 p2 X u0 q0");
    let state = RunState::from_entries(&retrying).unwrap();
    assert_eq!(undo_input(&state, OperationIndex(2)), None);
    assert_eq!(undo_input(&state, OperationIndex(1)), None);
    let Event::StepCompensationFailed {
        retry_at_ms: Some(retry_at_ms),
        ..
    } = retrying.last().unwrap().event
    else {
        unreachable!()
    };
    assert_eq!(
        undo_action(&state),
        CompensationAction::Compensate {
            step: OperationIndex(0),
            attempt: Attempt(2),
            round_attempts: 1,
            not_before_ms: Some(retry_at_ms),
        }
    );
    let stuck = RunState::from_entries(&journal("s0 c0 t1 f1 s2 p2 X u0 e0")).unwrap();
    assert!(matches!(
        undo_action(&stuck),
        CompensationAction::Stuck {
            step: OperationIndex(0),
            ..
        }
    ));

    // Cancelled with step 1 in flight: it is in doubt, and undone first.
    let cancelled = RunState::from_entries(&journal("s0 c0 s1 ~")).unwrap();
    assert!(cancelled.cancel_requested);
    assert!(cancelled.has_effects());
    assert_eq!(
        step_action(cancelled.step(OperationIndex(1))),
        StepAction::Run {
            attempt: Attempt(2),
            not_before_ms: None,
        }
    );
    assert!(matches!(
        undo_action(&cancelled),
        CompensationAction::Compensate {
            step: OperationIndex(1),
            attempt: Attempt(1),
            ..
        }
    ));

    // A step completed twice: rejected at the offending entry.
    let err = RunState::from_entries(&journal("s0 c0 c0")).unwrap_err();
    assert!(err.starts_with("entry 2:"), "{err}");
    // A step that skips an operation number.
    let err = RunState::from_entries(&journal("s0 c0 s2")).unwrap_err();
    assert!(err.starts_with("entry 2:"), "{err}");

    let completed = journal("s0 r0 s0 c0 t1 f1 s2 k2 !");
    for entry in &completed {
        let text = serde_json::to_string(entry).unwrap();
        assert_eq!(
            &serde_json::from_str::<Entry>(&text).unwrap(),
            entry,
            "{text}"
        );
    }
}
