//! Durable waits: the journaled start (time, schedule, deadline) every resumption follows,
//! and the recorded result; a resource that timed out is undone and created again.

use std::collections::BTreeMap;

use serde_json::json;

use super::{fold, journal, undo, undo_decisions, undo_order};
use crate::ids::OperationIndex;
use crate::journal::{ErrorClass, ErrorRecord};
use crate::journal::{WaitOutcome, WaitPolls, WaitSchedule};
use crate::replay::{undo_input, CompensationState, Op, ParkedWait, RunState, WaitOp};

/// The wait at operation `index` of `state`.
fn wait(state: &RunState, index: usize) -> &WaitOp {
    match &state.ops[index] {
        Op::Wait(op) => op,
        other => panic!("operation {index} is {other:?}"),
    }
}

/// A wait keeps its journaled start, schedule (confirmations, deadline) and result, whether
/// ready, timed out or failed; the resource whose wait timed out was undone while the run
/// went on, and waits themselves have nothing to undo.
#[test]
fn waits_keep_their_schedule_deadline_and_result() {
    // A resource created and waited for, timed out after 12 polls, undone and created again,
    // ready after 5 polls (3 confirmations needed); then a DNS wait that failed.
    let entries = journal(include_str!("../fixtures/waits.jsonl"));

    // Cut while the second wait polls: no outcome, and polls resume under this schedule.
    let polling = fold(&entries[..9]);
    let second = wait(&polling, 3);
    assert_eq!(second.outcome, None);
    assert_eq!(
        (second.kind.as_str(), &second.argument, second.started_at_ms),
        ("fixture.ready", &json!({"id": "res-1"}), 1_700_000_561_151)
    );
    assert_eq!(
        second.schedule,
        WaitSchedule {
            initial_delay_ms: 0,
            dense_interval_ms: 1_000,
            dense_until_ms: 0,
            growth: 1.5,
            interval_max_ms: 30_000,
            jitter: 0.2,
            confirmations: 3,
            deadline_ms: 1_700_000_621_151,
            learned: false,
        }
    );

    let s = fold(&entries);
    assert_eq!(
        wait(&s, 1).outcome,
        Some(WaitOutcome::TimedOut { polls: 12 })
    );
    assert_eq!(
        wait(&s, 3).outcome,
        Some(WaitOutcome::Ready {
            output: json!({"state": "active"}),
            polls: 5
        })
    );
    let dns = wait(&s, 4);
    assert_eq!(
        (dns.schedule.initial_delay_ms, dns.schedule.deadline_ms),
        (500, 1_700_000_596_001)
    );
    assert_eq!(
        dns.outcome,
        Some(WaitOutcome::Failed {
            error: ErrorRecord {
                class: ErrorClass::Permanent,
                message: "zone not found".into(),
            },
            polls: 2
        })
    );
    assert_eq!(s.ops[4].describe(), r#"wait "fixture.dns""#);

    assert_eq!(undo_decisions(&entries), vec![undo(0, 1, 0, None)]);
    assert!(!s.compensating);
    assert_eq!(
        s.undo,
        BTreeMap::from([(OperationIndex(0), CompensationState::Done)])
    );
    assert_eq!(undo_input(&s, OperationIndex(3)), None);
    assert_eq!(undo_order(&s), vec![2]);
}

/// A wait whose run parked between polls keeps the polls of its latest park, which a load
/// from that park goes on from; its end is recorded as any wait's.
#[test]
fn a_parked_wait_keeps_the_polls_of_its_latest_park() {
    let entries = journal(include_str!("../fixtures/wait_parked.jsonl"));
    assert_eq!(wait(&fold(&entries[..1]), 0).parked, None, "not parked yet");

    let first = ParkedWait {
        polls: WaitPolls {
            sent: 1,
            answers: 1,
            last_sent_ms: 1_700_000_100_001,
            interval_ms: 20_000,
            next_at_ms: 1_700_000_120_000,
            ..WaitPolls::default()
        },
        here: true,
    };
    assert_eq!(wait(&fold(&entries[..2]), 0).parked, Some(first));

    let second = ParkedWait {
        polls: WaitPolls {
            sent: 2,
            answers: 2,
            streak: 1,
            streak_started_ms: 1_700_000_120_001,
            last_sent_ms: 1_700_000_120_001,
            first_ready_gap_ms: 20_000,
            interval_ms: 20_000,
            next_at_ms: 1_700_000_140_000,
            ..WaitPolls::default()
        },
        here: true,
    };
    let polling = fold(&entries[..3]);
    assert_eq!(wait(&polling, 0).parked, Some(second.clone()));
    assert_eq!(wait(&polling, 0).outcome, None);

    let ended = fold(&entries);
    assert_eq!(
        wait(&ended, 0).outcome,
        Some(WaitOutcome::Ready {
            output: json!({"state": "active"}),
            polls: 3
        })
    );
    assert_eq!(wait(&ended, 0).parked, Some(second));
}
