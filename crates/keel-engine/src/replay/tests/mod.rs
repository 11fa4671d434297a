//! Tests of the fold: journals folded into a run state, and the decisions taken on it. The
//! journals are JSONL fixtures under `../fixtures/` (one entry per line, as the store writes
//! them), cut where a test needs a crash; the oldest tests build small journals in code.

mod children;
mod compensation;
mod corruption;
mod events;
mod forks;
mod steps;
mod timers;
mod waits;

use serde_json::json;

use super::*;
use crate::ids::Attempt;
use crate::journal::{ErrorClass, ErrorRecord};

/// Parses a JSONL fixture, checking that each line is exactly what the store writes for the
/// entry it holds (so a fixture cannot drift from the stored form).
fn journal(jsonl: &str) -> Vec<Entry> {
    jsonl
        .lines()
        .enumerate()
        .map(|(i, line)| {
            let entry: Entry = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("line {}: {e}: {line}", i + 1));
            let stored = serde_json::to_string(&entry).expect("entries serialise");
            assert_eq!(stored, line, "line {} is not in the stored form", i + 1);
            entry
        })
        .collect()
}

/// The state of a run whose journal holds `entries`, which must fold.
fn fold(entries: &[Entry]) -> RunState {
    RunState::from_entries(entries).unwrap_or_else(|e| panic!("{e}"))
}

/// Undo attempt `attempt` of step `step`, as compensation decides it.
fn undo(
    step: u32,
    attempt: u32,
    round_attempts: u32,
    not_before_ms: Option<u64>,
) -> CompensationAction {
    CompensationAction::Compensate {
        step: OperationIndex(step),
        attempt: Attempt(attempt),
        round_attempts,
        not_before_ms,
    }
}

/// Folds `entries` one by one and returns what compensation decided before each entry that
/// carries a decision out, having checked that the entry does: an undo attempt's start is
/// the attempt decided for its step (and, once the run compensates, for the newest step
/// left), a failed compensation names the stuck step, and the end comes when nothing is left.
fn undo_decisions(entries: &[Entry]) -> Vec<CompensationAction> {
    let mut state = RunState::default();
    let mut decisions = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        let decided = match &entry.event {
            Event::StepCompensationStarted { step, attempt } => {
                let decided = step_undo_action(&state, *step);
                match &decided {
                    Some(CompensationAction::Compensate {
                        step: s,
                        attempt: a,
                        ..
                    }) => assert_eq!((s, a), (step, attempt), "entry {i}"),
                    other => panic!("entry {i}: undo of {step} started, {other:?} decided"),
                }
                if state.compensating {
                    assert_eq!(Some(undo_action(&state)), decided, "entry {i}");
                }
                decided
            }
            Event::RunCompensationFailed { step, .. } => {
                let decided = undo_action(&state);
                assert!(
                    matches!(decided, CompensationAction::Stuck { step: s, .. } if s == *step),
                    "entry {i}: {decided:?}"
                );
                Some(decided)
            }
            Event::RunCompensated => {
                assert_eq!(
                    undo_action(&state),
                    CompensationAction::Finished,
                    "entry {i}"
                );
                Some(CompensationAction::Finished)
            }
            _ => None,
        };
        decisions.extend(decided);
        state.apply(entry).unwrap_or_else(|e| panic!("{e}"));
    }
    decisions
}

/// The operations compensation undoes from `state`, in order, when every undo succeeds at
/// its first attempt.
fn undo_order(state: &RunState) -> Vec<u32> {
    let mut state = state.clone();
    let mut order = Vec::new();
    // Each operation is undone at most once, so more turns than operations is a loop.
    for _ in 0..=state.ops.len() {
        let step = match undo_action(&state) {
            CompensationAction::Finished => return order,
            CompensationAction::Compensate { step, attempt, .. } => {
                let started = Event::StepCompensationStarted { step, attempt };
                state.apply(&e(started)).unwrap();
                state.apply(&e(Event::StepCompensated { step })).unwrap();
                step
            }
            stuck => panic!("{stuck:?}"),
        };
        order.push(step.0);
    }
    panic!("compensation never finishes: {order:?}")
}

// Entries built in code, for the oldest tests' small journals and for `undo_order`: one
// step kind `k`, all written at 10 ms.
fn e(event: Event) -> Entry {
    Entry { at_ms: 10, event }
}
fn started(step: u32, attempt: u32) -> Entry {
    e(Event::StepStarted {
        step: OperationIndex(step),
        kind: "k".into(),
        argument: json!(step),
        attempt: Attempt(attempt),
        compensable: true,
    })
}
fn completed(step: u32, attempt: u32) -> Entry {
    e(Event::StepCompleted {
        step: OperationIndex(step),
        attempt: Attempt(attempt),
        output: json!(step * 10),
    })
}
fn failed(step: u32, attempt: u32, class: ErrorClass, retry_at_ms: Option<u64>) -> Entry {
    e(Event::StepFailed {
        step: OperationIndex(step),
        attempt: Attempt(attempt),
        error: ErrorRecord {
            class,
            message: "boom".into(),
        },
        retry_at_ms,
    })
}
