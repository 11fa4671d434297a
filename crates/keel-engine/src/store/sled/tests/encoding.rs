//! Unit tests of the journal's encoding (`journal.rs`): transitions, groups, bounds.

use super::super::journal::{group, is_group, RecordState, StoredRecordState, GROUP_BYTES_MAX};
use super::*;

/// A transition that is not terminal is one key: the journal entry carries the record's new
/// state, reads give back the entry as written, and the record view matches.
#[test]
fn a_transition_is_one_entry_carrying_the_record_state() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path(), PROCESS_CRASH).unwrap();
    write_compensating_run(&store, "a");
    let id = RunId::new("a").unwrap();
    let [started, _] = entries();
    assert_eq!(
        store.read_journal(&id).unwrap(),
        vec![started, compensation_started()]
    );
    assert_eq!(store.read_run(&id).unwrap(), Some(compensating("a")));
    let raw = store
        .kv
        .get(journal_key(&id, JournalIndex(1)))
        .unwrap()
        .unwrap();
    let stored: StoredRecordState = serde_json::from_slice(&raw).unwrap();
    assert_eq!(stored.record, Some(RecordState::of(&compensating("a"))));
}

/// Creates `run`, appends the step's start from [`entries`], then its [`completion`] with
/// `next`, the transition to `record`; returns the keys of the run's journal.
fn start_then_transition(
    store: &SledStore,
    run: &RunRecord,
    next: &Entry,
    record: &RunRecord,
) -> Vec<sled::IVec> {
    assert_eq!(store.insert_run(run).unwrap(), None);
    let [started, _] = entries();
    let token = Token::CREATED;
    store
        .append(&run.id, JournalIndex(0), &[started], None, token)
        .unwrap();
    store
        .append(
            &run.id,
            JournalIndex(1),
            &[completion(), next.clone()],
            Some(record),
            token,
        )
        .unwrap();
    store
        .kv
        .keys_with_prefix(journal_prefix(&run.id))
        .map(Result::unwrap)
        .collect()
}

/// A terminal transition is one write, of the record: it holds the entries written with it
/// (a step's completion and the run's end) as the journal's last, no journal key holds them,
/// and reads give back the journal whole and the record as written.
#[test]
fn a_settling_transition_is_one_write_of_the_record_holding_the_last_entries() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path(), PROCESS_CRASH).unwrap();
    let run = running("settles");
    let [started, done] = entries();
    let completion = completion();
    let begun = store.writes.begun();
    let keys = start_then_transition(&store, &run, &done, &completed("settles"));
    assert_eq!(
        store.writes.begun() - begun,
        4,
        "the new run's index entry and record, then one write per append"
    );
    assert_eq!(keys, [journal_key(&run.id, JournalIndex(0))]);
    let raw = store.kv.get(run_key(&run.id)).unwrap().unwrap();
    let stored: serde_json::Value = serde_json::from_slice(&raw).unwrap();
    assert_eq!(
        stored["journal_tail"],
        serde_json::json!({"from": 1, "entries": [completion, done]})
    );
    assert_eq!(store.read_run(&run.id).unwrap(), Some(completed("settles")));
    assert_eq!(
        store.read_journal(&run.id).unwrap(),
        vec![started, completion, done]
    );
    assert_eq!(store.transitions_open.load(Ordering::SeqCst), 0);
}

/// A record's last entries that do not follow its journal's keys (a gap, or an overlap that
/// the keys do not cover whole, as a move to keys would) are refused as corrupt, naming the
/// record.
#[test]
fn a_records_last_entries_out_of_place_are_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path(), PROCESS_CRASH).unwrap();
    write_completed_run(&store, "a");
    let id = RunId::new("a").unwrap();
    let raw = store.kv.get(run_key(&id)).unwrap().unwrap();
    let mut stored: serde_json::Value = serde_json::from_slice(&raw).unwrap();
    let [_, done] = entries();
    let two = serde_json::json!([done, done]);
    for (from, held) in [(0, two), (2, stored["journal_tail"]["entries"].clone())] {
        stored["journal_tail"]["from"] = serde_json::json!(from);
        stored["journal_tail"]["entries"] = held;
        store
            .kv
            .insert(run_key(&id), serde_json::to_vec(&stored).unwrap())
            .unwrap();
        let error = store.read_journal(&id).unwrap_err().to_string();
        assert!(
            error.contains("ra") && error.contains(&format!("begin at index {from}")),
            "{error}"
        );
    }
}

/// A transition's stored bytes hold the same fields as the entry's own with the record's
/// state added as `"record"` (the shape stores written by earlier versions hold, there built
/// through a `serde_json::Value`), for a completion and for a failure with its error.
#[test]
fn a_transition_entry_is_the_entry_with_the_record_state_added() {
    let failed = RunRecord {
        status: RunStatus::Failed,
        output: None,
        error: Some("a \"quoted\" reason".into()),
        ..completed("b")
    };
    let failure = Entry {
        at_ms: 21,
        event: Event::RunFailed {
            error: "a \"quoted\" reason".into(),
        },
    };
    for (entry, record) in [(&entries()[1], &completed("a")), (&failure, &failed)] {
        let bytes = super::super::journal::encode_transition(entry, record).unwrap();
        let mut expected = serde_json::to_value(entry).unwrap();
        expected.as_object_mut().unwrap().insert(
            "record".into(),
            serde_json::to_value(RecordState::of(record)).unwrap(),
        );
        let stored: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(stored, expected);
        assert_eq!(serde_json::from_slice::<Entry>(&bytes).unwrap(), *entry);
    }
}

/// Entries appended together share one value (a step's completion and the next entry), keyed
/// by the first's index: reads give back each entry, the journal stays dense, and a transition
/// last in a group is what an open repairs a record from.
#[test]
fn entries_appended_together_are_one_value_and_read_back_one_by_one() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path(), PROCESS_CRASH).unwrap();
    let run = running("grouped");
    let [started, _] = entries();
    let completion = completion();
    let compensation = compensation_started();
    let keys = start_then_transition(&store, &run, &compensation, &compensating("grouped"));
    assert_eq!(
        keys,
        [0, 1].map(|i| journal_key(&run.id, JournalIndex(i))),
        "two keys for three entries"
    );
    let journal = vec![started.clone(), completion.clone(), compensation.clone()];
    assert_eq!(store.read_journal(&run.id).unwrap(), journal);
    assert_eq!(
        store.read_run(&run.id).unwrap(),
        Some(compensating("grouped"))
    );

    // A crash before the record's rewrite: the open repairs it from the group's last entry.
    store
        .kv
        .insert(run_key(&run.id), serde_json::to_vec(&run).unwrap())
        .unwrap();
    store.kv.flush().unwrap();
    drop(store);
    let store = SledStore::open(dir.path(), PROCESS_CRASH).unwrap();
    assert_eq!(
        store.read_run(&run.id).unwrap(),
        Some(compensating("grouped"))
    );
    assert_eq!(store.read_journal(&run.id).unwrap(), journal);

    // The next entry's key follows the group's last index; a gap is still refused.
    let next = Entry {
        at_ms: 30,
        event: Event::RunCompleted {
            output: serde_json::json!(null),
        },
    };
    store
        .append(
            &run.id,
            JournalIndex(4),
            std::slice::from_ref(&next),
            None,
            Token::CREATED,
        )
        .unwrap();
    let error = store.read_journal(&run.id).unwrap_err().to_string();
    assert!(
        error.contains("journal index 4 follows 3 entries: gap"),
        "{error}"
    );
}

/// A group ends before it would pass a transition entry's bound (so that grouping moves no
/// value into a blob file); the entries after it start a value of their own. A stored group
/// of fewer than two entries is refused as corrupt.
#[test]
fn a_group_ends_at_its_bound_and_a_group_of_one_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path(), PROCESS_CRASH).unwrap();
    let run = running("large");
    assert_eq!(store.insert_run(&run).unwrap(), None);
    let large = |step: u32| Entry {
        at_ms: 1,
        event: Event::StepCompleted {
            step: OperationIndex(step),
            attempt: Attempt(1),
            output: serde_json::json!("x".repeat(crate::limits::STEP_OUTPUT_BYTES_MAX - 2)),
        },
    };
    let three = [large(0), large(1), large(2)];
    store
        .append(&run.id, JournalIndex(0), &three, None, Token::CREATED)
        .unwrap();
    let values: Vec<_> = store
        .kv
        .scan_prefix(journal_prefix(&run.id))
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        values.len(),
        2,
        "two entries fit in a group, the third does not"
    );
    assert!(is_group(&values[0].1) && !is_group(&values[1].1));
    assert!(
        values[0].1.len() <= GROUP_BYTES_MAX,
        "{}",
        values[0].1.len()
    );
    assert_eq!(values[1].0, journal_key(&run.id, JournalIndex(2)));
    assert_eq!(store.read_journal(&run.id).unwrap(), three.to_vec());

    let [started, _] = entries();
    let one = format!("[{}]", serde_json::to_string(&started).unwrap());
    store
        .kv
        .insert(journal_key(&run.id, JournalIndex(3)), one.as_bytes())
        .unwrap();
    let error = store.read_journal(&run.id).unwrap_err().to_string();
    assert!(error.contains("a group of 1 journal entries"), "{error}");
}

/// A transition whose record state would not fit is refused before anything is written.
#[test]
fn an_oversized_transition_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path(), PROCESS_CRASH).unwrap();
    let record = running("big");
    assert_eq!(store.insert_run(&record).unwrap(), None);
    let huge = "x".repeat(crate::limits::RUN_RECORD_BYTES_MAX);
    let failed = RunRecord {
        status: RunStatus::Failed,
        error: Some(huge.clone()),
        ..running("big")
    };
    let entry = Entry {
        at_ms: 30,
        event: Event::RunFailed { error: huge },
    };
    let err = store
        .append(
            &record.id,
            JournalIndex(0),
            std::slice::from_ref(&entry),
            Some(&failed),
            Token::CREATED,
        )
        .unwrap_err();
    assert!(matches!(err, EngineError::TooLarge { .. }), "{err}");
    assert_eq!(store.read_journal(&record.id).unwrap(), Vec::<Entry>::new());
    assert_eq!(store.read_run(&record.id).unwrap(), Some(record));
}

/// A settling transition whose record would pass the record's bound with the entries it
/// holds is written as the others are: its entry (with the record's state) as a key, then the
/// record without entries. Reads give back the same journal either way.
#[test]
fn a_settled_record_too_large_to_hold_its_entries_is_written_as_before() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path(), PROCESS_CRASH).unwrap();
    let large = "x".repeat(crate::limits::OUTPUT_BYTES_MAX - 2);
    let run = RunRecord {
        input: serde_json::json!(large),
        ..running("large")
    };
    assert_eq!(store.insert_run(&run).unwrap(), None);
    let done = Entry {
        at_ms: 20,
        event: Event::RunCompleted {
            output: serde_json::json!(large),
        },
    };
    let settled = RunRecord {
        status: RunStatus::Completed,
        updated_at_ms: 20,
        finished_at_ms: Some(20),
        output: Some(serde_json::json!(large)),
        ..run.clone()
    };
    store
        .append(
            &run.id,
            JournalIndex(0),
            std::slice::from_ref(&done),
            Some(&settled),
            Token::CREATED,
        )
        .unwrap();
    let raw = store.kv.get(run_key(&run.id)).unwrap().unwrap();
    assert!(
        raw.len() <= crate::limits::RUN_RECORD_BYTES_MAX,
        "{}",
        raw.len()
    );
    let stored: serde_json::Value = serde_json::from_slice(&raw).unwrap();
    assert!(stored.get("journal_tail").is_none());
    let entry = store
        .kv
        .get(journal_key(&run.id, JournalIndex(0)))
        .unwrap()
        .unwrap();
    let state: StoredRecordState = serde_json::from_slice(&entry).unwrap();
    assert_eq!(state.record, Some(RecordState::of(&settled)));
    assert_eq!(store.read_run(&run.id).unwrap(), Some(settled));
    assert_eq!(store.read_journal(&run.id).unwrap(), vec![done]);
}

/// `group`'s values byte for byte: consecutive values share an array while it fits in
/// `GROUP_BYTES_MAX` (exactly at the bound included), a lone value is itself, and each
/// value is keyed by its first entry's index.
#[test]
fn grouped_values_are_arrays_up_to_the_bound_and_lone_values_themselves() {
    let bytes = |s: &str| s.as_bytes().to_vec();
    assert_eq!(
        group(
            JournalIndex(4),
            vec![bytes("{\"a\":1}"), bytes("{\"b\":2}"), bytes("{}")]
        ),
        vec![(JournalIndex(4), bytes("[{\"a\":1},{\"b\":2},{}]"))]
    );
    assert_eq!(
        group(JournalIndex(0), vec![bytes("{}")]),
        vec![(JournalIndex(0), bytes("{}"))]
    );
    // Two values of n bytes make an array of 2n + 3: the largest n that fits, then one more.
    let n = (GROUP_BYTES_MAX - 3) / 2;
    let value = |len: usize| vec![b'x'; len];
    let fits = group(
        JournalIndex(1),
        vec![value(n), value(GROUP_BYTES_MAX - 3 - n)],
    );
    assert_eq!(fits.len(), 1);
    assert_eq!(fits[0].1.len(), GROUP_BYTES_MAX);
    let over = group(
        JournalIndex(1),
        vec![value(n), value(GROUP_BYTES_MAX - 2 - n), value(1), value(n)],
    );
    assert_eq!(
        over,
        vec![
            (JournalIndex(1), value(n)),
            (JournalIndex(2), {
                let mut array = vec![b'['];
                array.extend(value(GROUP_BYTES_MAX - 2 - n));
                array.push(b',');
                array.extend(value(1));
                array.push(b']');
                array
            }),
            (JournalIndex(4), value(n)),
        ]
    );
}
