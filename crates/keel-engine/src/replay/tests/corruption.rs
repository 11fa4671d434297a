//! Corrupt journals: entries out of order, about an operation that is not there, not of
//! their kind or not next, or ending what already ended, are rejected at the offending
//! entry with what broke. Most cases damage a well-formed fixture by one entry.

use super::{completed, journal, started};
use crate::replay::RunState;

// A step retried once, then one cut off twice whose output was rejected.
const STEPS: &str = include_str!("../fixtures/steps.jsonl");
// A join of three branches, cut with branches waiting, completed and in flight.
const JOIN: &str = include_str!("../fixtures/fork_join.jsonl");
// A select whose losers were undone, then a step and the run's completion.
const SELECT: &str = include_str!("../fixtures/fork_select.jsonl");
// A completed child, a fan-out of two children, cancellation and compensation.
const CHILDREN: &str = include_str!("../fixtures/children.jsonl");
// Waits timed out, ready and failed, with a resource undone and created again.
const WAITS: &str = include_str!("../fixtures/waits.jsonl");
// A wait whose run parked twice between polls, then ended ready.
const WAIT_PARKED: &str = include_str!("../fixtures/wait_parked.jsonl");
// A fired timer, a step and a timer not fired yet.
const TIMERS: &str = include_str!("../fixtures/timers.jsonl");
// A compensation through every undo outcome.
const COMPENSATION: &str = include_str!("../fixtures/compensation.jsonl");

/// How a test damages a well-formed journal.
#[derive(Debug)]
enum Damage {
    /// Entries `i` and `i + 1` change places.
    Swap(usize),
    /// Entry `i` is written twice.
    Duplicate(usize),
    /// Entry `i` is lost.
    Drop(usize),
    /// This entry (a JSON line) is written last.
    Append(&'static str),
}

/// Checks that each journal, damaged as given, is rejected with the error given (or, where
/// the rest is the debug form of a large state, with an error beginning so).
fn assert_rejected(cases: Vec<(&str, Damage, &str)>) {
    for (jsonl, damage, expected) in cases {
        let mut entries = journal(jsonl);
        match damage {
            Damage::Swap(i) => entries.swap(i, i + 1),
            Damage::Duplicate(i) => entries.insert(i + 1, entries[i].clone()),
            Damage::Drop(i) => drop(entries.remove(i)),
            Damage::Append(line) => entries.push(serde_json::from_str(line).unwrap()),
        }
        let error = RunState::from_entries(&entries).unwrap_err();
        assert!(
            error.starts_with(expected),
            "{damage:?} of the journal beginning {:?}: got {error:?}, expected {expected:?}",
            &jsonl[..60]
        );
    }
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

/// An entry before the one it follows from (an end before its start, an attempt before the
/// outcome of the one before it, an undo started again after it was done) is rejected.
#[test]
fn entries_out_of_order_are_rejected() {
    assert_rejected(vec![
        (JOIN, Damage::Swap(2), "entry 2: step #2 attempt 1 started in state None"),
        (
            STEPS,
            Damage::Swap(2),
            "entry 2: outcome of step #0 attempt 2 while attempt 1 is RetryScheduled { at_ms: 1700001000300 }",
        ),
        (WAITS, Damage::Swap(2), "entry 2: wait_ended for #1 in state None"),
        (WAIT_PARKED, Damage::Swap(0), "entry 0: wait_parked for #0 in state None"),
        (
            WAIT_PARKED,
            Damage::Swap(2),
            "entry 3: wait_parked for #0 in state Some(Wait(WaitOp {",
        ),
        (
            WAIT_PARKED,
            Damage::Append(
                r#"{"at_ms":1700000140003,"type":"wait_parked","step":0,"polls":{"sent":2,"answers":3,"last_sent_ms":1700000120001,"interval_ms":20000,"next_at_ms":1700000140000},"here":true}"#,
            ),
            "entry 4: wait_parked for #0 counts 0 ready in a row of 3 answers to 2 polls",
        ),
        (TIMERS, Damage::Swap(0), "entry 0: timer_fired for #0, which is not a timer"),
        (CHILDREN, Damage::Swap(2), "entry 2: child_ended for #1 in state None"),
        (
            COMPENSATION,
            Damage::Swap(13),
            "entry 14: compensation of #4 attempt 2 started in state Some(Done)",
        ),
    ]);
}

/// An entry about an operation that never started, that is not of the entry's kind, or
/// whose number is not the next free one, is rejected.
#[test]
fn entries_about_an_unknown_operation_are_rejected() {
    assert_rejected(vec![
        (
            STEPS,
            Damage::Drop(0),
            "entry 0: outcome of step #0, which never started",
        ),
        (
            JOIN,
            Damage::Drop(2),
            "entry 2: step #2 attempt 1 started in state None",
        ),
        (
            SELECT,
            Damage::Drop(1),
            "entry 5: step outcome for #1, which is a branch of a parallel fan-out",
        ),
        (
            CHILDREN,
            Damage::Drop(4),
            "entry 4: child #3 started where operation 2 was expected",
        ),
        (
            COMPENSATION,
            Damage::Drop(8),
            "entry 8: step #4 first seen at attempt 2",
        ),
        (
            TIMERS,
            Damage::Duplicate(0),
            "entry 1: timer #0 set out of order (next is #1)",
        ),
        (
            WAITS,
            Damage::Duplicate(8),
            "entry 9: wait #3 started out of order (next is #4)",
        ),
        (
            WAITS,
            Damage::Append(
                r#"{"at_ms":1700000567001,"type":"step_completed","step":1,"attempt":1,"output":null}"#,
            ),
            "entry 12: step outcome for #1, which is wait \"fixture.ready\"",
        ),
        (
            TIMERS,
            Damage::Append(
                r#"{"at_ms":1700000660022,"type":"step_compensation_started","step":0,"attempt":1}"#,
            ),
            "entry 5: compensation of #0, which is neither a step nor a child run",
        ),
        (
            JOIN,
            Damage::Append(r#"{"at_ms":1700000200051,"type":"fork_selected","step":1,"branch":3}"#),
            "entry 8: branch 3 of #1 selected, which is Some(Fork { branches: 3, selected: None })",
        ),
        (
            JOIN,
            Damage::Append(r#"{"at_ms":1700000200051,"type":"fork_selected","step":2,"branch":0}"#),
            "entry 8: branch 0 of #2 selected, which is Some(Step(StepOp {",
        ),
    ]);
}

/// A second end of what already ended (a step's outcome, a select's winner, a child's or a
/// wait's end, an undo's failure or end) is rejected.
#[test]
fn duplicate_ends_are_rejected() {
    assert_rejected(vec![
        (
            JOIN,
            Damage::Duplicate(5),
            "entry 6: outcome of step #3 attempt 1 while attempt 1 is Completed { output: Number(30) }",
        ),
        (
            SELECT,
            Damage::Duplicate(7),
            "entry 8: branch 1 of #0 selected, which is Some(Fork { branches: 3, selected: Some(1) })",
        ),
        (CHILDREN, Damage::Duplicate(3), "entry 4: child_ended for #1 in state Some(Child(ChildOp {"),
        (WAITS, Damage::Duplicate(3), "entry 4: wait_ended for #1 in state Some(Wait(WaitOp {"),
        (
            COMPENSATION,
            Damage::Duplicate(16),
            "entry 17: compensation of #3 failed in state Some(RetryScheduled { attempt: Attempt(1), round_attempts: 1, at_ms: 1700000708700 })",
        ),
        (
            COMPENSATION,
            Damage::Duplicate(24),
            "entry 25: compensation of #2 finished in state Some(Skipped)",
        ),
        (
            COMPENSATION,
            Damage::Duplicate(26),
            "entry 27: compensation of #0 finished in state Some(Done)",
        ),
    ]);
}
