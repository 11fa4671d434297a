//! Durable timers: an absolute wake time, and whether the workflow went past it.

use super::{fold, journal, undo_order};
use crate::ids::OperationIndex;
use crate::replay::{undo_input, Op};

/// A timer keeps its journaled wake time and whether it fired; it is no step, and
/// compensation passes it over.
#[test]
fn timers_keep_their_wake_time_and_firing() {
    // A timer that fired, a step, and a second timer set but not fired at the cut.
    let s = fold(&journal(include_str!("../fixtures/timers.jsonl")));
    assert_eq!(
        s.ops[0],
        Op::Timer {
            wake_at_ms: 1_700_000_660_000,
            fired: true
        }
    );
    assert_eq!(
        s.ops[2],
        Op::Timer {
            wake_at_ms: 1_700_004_260_021,
            fired: false
        }
    );
    assert_eq!(s.ops[2].describe(), "a timer");
    assert_eq!(s.step(OperationIndex(0)), None);
    assert_eq!(undo_input(&s, OperationIndex(2)), None);
    assert_eq!(undo_order(&s), vec![1]);
}
