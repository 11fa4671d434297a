//! Parallel fan-outs: a join cut by a crash with branches in every state, and a select
//! whose losers were undone while the run went on.

use std::collections::BTreeMap;

use serde_json::json;

use super::{fold, journal, undo, undo_decisions, undo_order};
use crate::ids::{Attempt, OperationIndex};
use crate::journal::{Entry, Event};
use crate::replay::{
    effect_by_ms, step_action, step_undo_action, undo_input, CompensationState, Op, StepAction,
};

/// A fork reserves its branches' numbers, so the operation after it comes past them; at a
/// crash, a branch not yet started runs its first attempt, one in flight its next, one
/// waiting for its retry its next at the journaled time, and one that completed replays.
#[test]
fn join_cut_with_branches_in_every_state() {
    // A join of three branches two at a time, cut with branch 0 waiting for its retry,
    // branch 1 completed and branch 2 in flight.
    let entries = journal(include_str!("../fixtures/fork_join.jsonl"));

    // Cut right after the fork: its branches are reserved, none has started.
    let forked = fold(&entries[..3]);
    assert_eq!(
        forked.ops[1..],
        [
            Op::Fork {
                branches: 3,
                selected: None
            },
            Op::Branch,
            Op::Branch,
            Op::Branch
        ]
    );
    assert_eq!(forked.step(OperationIndex(2)), None);
    assert_eq!(forked.ops[2].describe(), "a branch of a parallel fan-out");

    let s = fold(&entries);
    assert_eq!(s.ops.len(), 5);
    assert_eq!(
        step_action(s.step(OperationIndex(2))),
        StepAction::Run {
            attempt: Attempt(2),
            not_before_ms: Some(1_700_000_200_250)
        }
    );
    assert_eq!(
        step_action(s.step(OperationIndex(3))),
        StepAction::Replay(json!(30))
    );
    assert_eq!(
        step_action(s.step(OperationIndex(4))),
        StepAction::Run {
            attempt: Attempt(2),
            not_before_ms: None
        }
    );
    assert_eq!(s.step(OperationIndex(4)).unwrap().cut_off, 1);

    // The next operation is numbered past the branches, whatever it is.
    let mut next = s.clone();
    let timer = |step| Entry {
        at_ms: 1_700_000_200_300,
        event: Event::TimerSet {
            step: OperationIndex(step),
            wake_at_ms: 1_700_000_300_000,
        },
    };
    assert_eq!(
        next.apply(&timer(4)),
        Err("entry 8: timer #4 set out of order (next is #5)".into())
    );
    assert_eq!(next.apply(&timer(5)), Ok(()));
}

/// Compensating the join cut by a crash undoes its branches newest first, the one waiting
/// for its retry and the one in flight in doubt, and passes the fork itself over.
#[test]
fn join_branches_are_undone_newest_first() {
    // The join fixture: branch 0 waiting for its retry, branch 1 completed, branch 2 in
    // flight.
    let s = fold(&journal(include_str!("../fixtures/fork_join.jsonl")));

    assert_eq!(undo_input(&s, OperationIndex(1)), None);
    assert_eq!(undo_input(&s, OperationIndex(2)), Some(None));
    assert_eq!(undo_input(&s, OperationIndex(3)), Some(Some(&json!(30))));
    assert_eq!(undo_input(&s, OperationIndex(4)), Some(None));
    assert_eq!(undo_order(&s), vec![4, 3, 2, 0]);

    // In doubt, the branch in flight's effect was made by its undo round's start at latest;
    // a completed branch's by its completion.
    let mut compensating = s.clone();
    for (at_ms, event) in [
        (
            1_700_000_200_400,
            Event::CompensationStarted {
                reason: "cancelled by operator".into(),
            },
        ),
        (
            1_700_000_200_401,
            Event::StepCompensationStarted {
                step: OperationIndex(4),
                attempt: Attempt(1),
            },
        ),
    ] {
        compensating.apply(&Entry { at_ms, event }).unwrap();
    }
    assert_eq!(
        effect_by_ms(&compensating, OperationIndex(4)),
        Some(1_700_000_200_401)
    );
    assert_eq!(
        effect_by_ms(&compensating, OperationIndex(3)),
        Some(1_700_000_200_030)
    );
    assert_eq!(
        step_undo_action(&compensating, OperationIndex(4)),
        Some(undo(4, 2, 1, None))
    );
}

/// A select journals its winner once; the losers that took effect were undone while the
/// run went on (a loser that failed permanently at its first attempt had no effect), so
/// only the winner is left for a later compensation.
#[test]
fn select_keeps_its_winner_and_undoes_the_losers() {
    // A select over three regions: "us" won, "eu" completed too and was undone, "ap" failed
    // permanently; then a notification without compensation, and the run completed.
    let entries = journal(include_str!("../fixtures/fork_select.jsonl"));

    assert_eq!(undo_decisions(&entries), vec![undo(1, 1, 0, None)]);
    let s = fold(&entries);
    assert_eq!(
        s.ops[0],
        Op::Fork {
            branches: 3,
            selected: Some(1)
        }
    );
    assert!(!s.compensating);
    assert_eq!(
        s.undo,
        BTreeMap::from([(OperationIndex(1), CompensationState::Done)])
    );
    assert_eq!(step_undo_action(&s, OperationIndex(3)), None);
    assert_eq!(
        step_action(s.step(OperationIndex(2))),
        StepAction::Replay(json!("us-1"))
    );
    assert_eq!(undo_order(&s), vec![2]);
}
