//! Events and published values: the mailbox in arrival order, receives that take one event
//! each (or time out), what a receive takes next, and the latest value per name.

use serde_json::json;

use super::{fold, journal, undo_order};
use crate::ids::OperationIndex;
use crate::journal::Entry;
use crate::replay::{latest_published, receive_action, undo_input, Op, ReceiveAction, RunState};

// An approval taken, a step, a progress value, a check-in receive that timed out, three
// events arriving after it (two check-ins and another name), a second progress value, and a
// receive of check-ins open at the cut.
const EVENTS: &str = include_str!("../fixtures/events.jsonl");

/// The fold keeps every delivery in arrival order, counts the ones not taken, records what
/// each receive took (its payload moved to the receive) and the latest value per name; no
/// receive or publish is undone by the saga.
#[test]
fn the_mailbox_keeps_arrival_order_and_receives_record_what_they_took() {
    let s = fold(&journal(EVENTS));
    let ids: Vec<&str> = s
        .mailbox
        .deliveries
        .iter()
        .map(|d| d.event_id.as_str())
        .collect();
    assert_eq!(ids, ["a-1", "c-1", "o-1", "c-2"]);
    assert_eq!(s.mailbox.pending, 3);
    assert_eq!(s.mailbox.get("a-1").unwrap().payload, None, "taken");
    let Op::Receive(approval) = &s.ops[0] else {
        panic!("{:?}", s.ops[0])
    };
    let taken = approval.outcome.clone().unwrap().unwrap();
    assert_eq!(
        (taken.name.as_str(), taken.event_id.as_str()),
        ("approve", "a-1")
    );
    assert_eq!(taken.payload, json!({"by": "ops"}));
    assert_eq!(
        receive_action(&s, OperationIndex(0), 0),
        Some(ReceiveAction::Received(taken))
    );
    assert_eq!(
        receive_action(&s, OperationIndex(3), 0),
        Some(ReceiveAction::TimedOut)
    );
    assert_eq!(receive_action(&s, OperationIndex(1), 0), None, "a step");
    assert_eq!(s.published["progress"].value, json!("2 of 2"));
    assert_eq!(s.published["progress"].version, 11);
    assert_eq!(s.ops[2].describe(), "a publish of \"progress\"");
    assert_eq!(s.ops[5].describe(), "a receive of [\"check-in\"]");
    for op in [0, 2, 3, 5] {
        assert_eq!(undo_input(&s, OperationIndex(op)), None, "op {op}");
    }
    assert_eq!(undo_order(&s), vec![1]);
}

/// The open receive takes the earliest pending event of its names, passing over other
/// names; after taking it, the next; versions of published values read from a stored journal
/// are those of the fold.
#[test]
fn a_receive_takes_the_earliest_pending_event_of_its_names() {
    let mut entries = journal(EVENTS);
    let s = fold(&entries);
    assert_eq!(
        receive_action(&s, OperationIndex(5), 0),
        Some(ReceiveAction::Take("c-1".into()))
    );
    entries.push(entry(
        r#"{"at_ms":1700000610006,"type":"event_received","step":5,"event_id":"c-1"}"#,
    ));
    entries.push(entry(
        r#"{"at_ms":1700000610007,"type":"receive_started","step":6,"names":["check-in","other"]}"#,
    ));
    let s = fold(&entries);
    assert_eq!(
        receive_action(&s, OperationIndex(6), 0),
        Some(ReceiveAction::Take("o-1".into())),
        "the earliest of either name"
    );
    assert_eq!(s.mailbox.pending, 2);
    assert_eq!(
        latest_published(&entries, "progress"),
        Some(s.published["progress"].clone())
    );
    assert_eq!(latest_published(&entries, "none"), None);
}

/// A deadline: an event delivered before it is taken even when the receive looks only after
/// it (the worker was down); one delivered after it is not, and the receive times out; with
/// nothing pending, the receive waits until the deadline and times out at it.
#[test]
fn a_receive_takes_what_arrived_before_its_deadline_and_times_out_after() {
    let deadline = 1_000_000;
    let receive = format!(
        r#"{{"at_ms":10,"type":"receive_started","step":0,"names":["x"],"deadline_ms":{deadline}}}"#
    );
    let before =
        r#"{"at_ms":999999,"type":"event_delivered","name":"x","event_id":"early","payload":1}"#;
    let after =
        r#"{"at_ms":1000001,"type":"event_delivered","name":"x","event_id":"late","payload":2}"#;
    let s = fold(&[entry(&receive)]);
    assert_eq!(
        receive_action(&s, OperationIndex(0), deadline - 1),
        Some(ReceiveAction::Wait)
    );
    assert_eq!(
        receive_action(&s, OperationIndex(0), deadline),
        Some(ReceiveAction::TimeOut)
    );
    let s = fold(&[entry(&receive), entry(before)]);
    assert_eq!(
        receive_action(&s, OperationIndex(0), deadline + 60_000),
        Some(ReceiveAction::Take("early".into()))
    );
    let at_deadline =
        r#"{"at_ms":1000000,"type":"event_delivered","name":"x","event_id":"on-time","payload":3}"#;
    let s = fold(&[entry(&receive), entry(at_deadline)]);
    assert_eq!(
        receive_action(&s, OperationIndex(0), deadline),
        Some(ReceiveAction::TimeOut),
        "an event stamped with the deadline may come after the timeout: it is not taken"
    );
    let s = fold(&[entry(&receive), entry(after)]);
    assert_eq!(
        receive_action(&s, OperationIndex(0), deadline + 1),
        Some(ReceiveAction::TimeOut),
        "an event after the deadline is left for a later receive"
    );
}

/// Journals no writer makes are rejected at the entry: an event id delivered twice, an
/// event taken twice or by a receive of other names or never delivered, a receive ending
/// twice, a timeout of a receive without a deadline, receives and publishes out of order.
#[test]
fn corrupt_event_journals_are_rejected() {
    let base = journal(EVENTS);
    let cases: Vec<(Vec<Entry>, &str)> = vec![
        (
            with(
                &base,
                r#"{"at_ms":1,"type":"event_delivered","name":"x","event_id":"c-1","payload":1}"#,
            ),
            "event \"c-1\" delivered twice",
        ),
        (
            with(
                &base,
                r#"{"at_ms":1,"type":"event_received","step":5,"event_id":"a-1"}"#,
            ),
            "receive #5 of [\"check-in\"] took event \"a-1\" named \"approve\"",
        ),
        (
            with(
                &base,
                r#"{"at_ms":1,"type":"event_received","step":5,"event_id":"nope"}"#,
            ),
            "receive #5 took event \"nope\", never delivered",
        ),
        (
            with(
                &base,
                r#"{"at_ms":1,"type":"event_received","step":0,"event_id":"c-1"}"#,
            ),
            "receive #0 ended twice",
        ),
        (
            with(&base, r#"{"at_ms":1,"type":"receive_timed_out","step":5}"#),
            "receive_timed_out for #5, which is no open receive with a deadline",
        ),
        (
            with(
                &base,
                r#"{"at_ms":1,"type":"event_received","step":1,"event_id":"c-1"}"#,
            ),
            "event_received for #1, which is not a receive",
        ),
        (
            with(
                &base,
                r#"{"at_ms":1,"type":"receive_started","step":9,"names":["x"]}"#,
            ),
            "receive #9 started out of order (next is #6)",
        ),
        (
            with(
                &base,
                r#"{"at_ms":1,"type":"value_published","step":2,"name":"p","value":1}"#,
            ),
            "publish #2 out of order (next is #6)",
        ),
    ];
    for (entries, expected) in cases {
        let error = RunState::from_entries(&entries).unwrap_err();
        assert!(
            error.contains(expected),
            "got {error:?}, expected {expected:?}"
        );
    }
    // An event taken twice: a second receive naming an event the first took.
    let mut twice = base.clone();
    twice.push(entry(
        r#"{"at_ms":1,"type":"event_received","step":5,"event_id":"c-1"}"#,
    ));
    twice.push(entry(
        r#"{"at_ms":1,"type":"receive_started","step":6,"names":["check-in"]}"#,
    ));
    twice.push(entry(
        r#"{"at_ms":1,"type":"event_received","step":6,"event_id":"c-1"}"#,
    ));
    let error = RunState::from_entries(&twice).unwrap_err();
    assert!(error.contains("event \"c-1\" consumed twice"), "{error}");
}

fn entry(line: &str) -> Entry {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"))
}

fn with(base: &[Entry], line: &str) -> Vec<Entry> {
    let mut entries = base.to_vec();
    entries.push(entry(line));
    entries
}
