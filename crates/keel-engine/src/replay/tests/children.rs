//! Child runs: started and ended in the parent's journal, alone or as a fan-out's branches,
//! and undone through their own sagas when the parent compensates.

use std::collections::BTreeMap;

use serde_json::json;

use super::{fold, journal, undo, undo_decisions};
use crate::ids::{OperationIndex, RunId};
use crate::journal::RunStatus;
use crate::replay::{undo_input, ChildEnd, ChildOp, CompensationAction, CompensationState, Op};

/// Child runs take operation numbers as steps do, also as a fork's branches; a cancelled
/// parent undoes, newest first, the child never seen to end (in doubt) and the one that
/// completed (with its output), and leaves the one that compensated itself.
#[test]
fn children_started_ended_and_compensated() {
    // A completed child, then a fan-out of two children, one of which compensated itself,
    // cancelled with the other still running; the parent then compensated.
    let entries = journal(include_str!("../fixtures/children.jsonl"));

    // Cut when compensation begins.
    let cancelled = fold(&entries[..10]);
    assert!(cancelled.cancel_requested);
    assert!(cancelled.compensating);
    assert_eq!(cancelled.children, 3);
    assert_eq!(
        cancelled.ops[1],
        Op::Child(ChildOp {
            workflow: "fixture.ship".into(),
            child: RunId::existing("order-7/1").unwrap(),
            input: json!({"parcel": 1}),
            end: Some(ChildEnd {
                status: RunStatus::Completed,
                output: Some(json!({"tracking": "T1"})),
                error: None,
            }),
        })
    );
    assert_eq!(
        cancelled.ops[2],
        Op::Fork {
            branches: 2,
            selected: None
        }
    );
    match &cancelled.ops[3] {
        Op::Child(op) => assert_eq!((op.child.as_str(), &op.end), ("order-7/3", &None)),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        cancelled.ops[4].describe(),
        r#"child run "order-7/4" of workflow "fixture.ship""#
    );
    assert_eq!(
        cancelled.step(OperationIndex(1)),
        None,
        "a child is no step"
    );
    assert_eq!(undo_input(&cancelled, OperationIndex(4)), None);
    assert_eq!(undo_input(&cancelled, OperationIndex(3)), Some(None));
    assert_eq!(
        undo_input(&cancelled, OperationIndex(1)),
        Some(Some(&json!({"tracking": "T1"})))
    );

    assert_eq!(
        undo_decisions(&entries),
        vec![
            undo(3, 1, 0, None),
            undo(1, 1, 0, None),
            undo(0, 1, 0, None),
            CompensationAction::Finished
        ]
    );
    let done = fold(&entries);
    assert_eq!(
        done.undo,
        BTreeMap::from([
            (OperationIndex(0), CompensationState::Done),
            (OperationIndex(1), CompensationState::Done),
            (OperationIndex(3), CompensationState::Done),
        ])
    );
}
