//! Unit tests of the sled store: transitions, repair, deletion, bounds.

use std::ops::ControlFlow;

use super::journal::{is_group, RecordState, StoredRecordState, GROUP_BYTES_MAX};
use super::scan::visit_runs;
use super::*;
use crate::ids::{Attempt, OperationIndex};
use crate::journal::Event;

const PROCESS_CRASH: SledOptions = SledOptions {
    durability: Durability::ProcessCrash,
    lost_data: LostData::Refuse,
    cache_bytes: None,
};

fn running(id: &str) -> RunRecord {
    RunRecord {
        id: RunId::new(id).unwrap(),
        workflow: "test.flow".into(),
        version: 1,
        input: serde_json::json!({"n": 1}),
        status: RunStatus::Running,
        created_at_ms: 10,
        updated_at_ms: 10,
        finished_at_ms: None,
        output: None,
        error: None,
        parent: None,
        rerun_of: None,
    }
}

fn completed(id: &str) -> RunRecord {
    RunRecord {
        status: RunStatus::Completed,
        updated_at_ms: 20,
        finished_at_ms: Some(20),
        output: Some(serde_json::json!({"sum": 3})),
        ..running(id)
    }
}

fn entries() -> [Entry; 2] {
    [
        Entry {
            at_ms: 11,
            event: Event::StepStarted {
                step: OperationIndex(0),
                kind: "test.add".into(),
                argument: serde_json::json!({"n": 1}),
                attempt: Attempt(1),
                compensable: true,
            },
        },
        Entry {
            at_ms: 20,
            event: Event::RunCompleted {
                output: serde_json::json!({"sum": 3}),
            },
        },
    ]
}

/// Writes run `id` with a step entry and a completing transition.
fn write_completed_run(store: &SledStore, id: &str) {
    let [started, done] = entries();
    let run = RunId::new(id).unwrap();
    assert_eq!(store.insert_run(&running(id)).unwrap(), None);
    store
        .append(
            &run,
            JournalIndex(0),
            std::slice::from_ref(&started),
            None,
            Token::CREATED,
        )
        .unwrap();
    store
        .append(
            &run,
            JournalIndex(1),
            std::slice::from_ref(&done),
            Some(&completed(id)),
            Token::CREATED,
        )
        .unwrap();
}

/// A transition is one key: the journal entry carries the record's new state, reads give
/// back the entry as written, and the record view matches.
#[test]
fn a_transition_is_one_entry_carrying_the_record_state() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path(), PROCESS_CRASH).unwrap();
    write_completed_run(&store, "a");
    let id = RunId::new("a").unwrap();
    assert_eq!(store.read_journal(&id).unwrap(), entries().to_vec());
    assert_eq!(store.read_run(&id).unwrap(), Some(completed("a")));
    let raw = store
        .db
        .get(journal_key(&id, JournalIndex(1)))
        .unwrap()
        .unwrap();
    let stored: StoredRecordState = serde_json::from_slice(&raw).unwrap();
    assert_eq!(stored.record, Some(RecordState::of(&completed("a"))));
}

/// Entries appended together share one value (a step's completion and the next entry), keyed
/// by the first's index: reads give back each entry, the journal stays dense, and a transition
/// last in a group is what an open repairs a record from.
#[test]
fn entries_appended_together_are_one_value_and_read_back_one_by_one() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path(), PROCESS_CRASH).unwrap();
    let run = running("grouped");
    assert_eq!(store.insert_run(&run).unwrap(), None);
    let [started, done] = entries();
    let completion = Entry {
        at_ms: 12,
        event: Event::StepCompleted {
            step: OperationIndex(0),
            attempt: Attempt(1),
            output: serde_json::json!(3),
        },
    };
    let token = Token::CREATED;
    store
        .append(
            &run.id,
            JournalIndex(0),
            std::slice::from_ref(&started),
            None,
            token,
        )
        .unwrap();
    store
        .append(
            &run.id,
            JournalIndex(1),
            &[completion.clone(), done.clone()],
            Some(&completed("grouped")),
            token,
        )
        .unwrap();
    let keys: Vec<_> = store
        .db
        .scan_prefix(journal_prefix(&run.id))
        .keys()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        keys,
        [0, 1].map(|i| journal_key(&run.id, JournalIndex(i))),
        "two keys for three entries"
    );
    let journal = vec![started.clone(), completion.clone(), done.clone()];
    assert_eq!(store.read_journal(&run.id).unwrap(), journal);
    assert_eq!(store.read_run(&run.id).unwrap(), Some(completed("grouped")));

    // A crash before the record's rewrite: the open repairs it from the group's last entry.
    store
        .db
        .insert(run_key(&run.id), serde_json::to_vec(&run).unwrap())
        .unwrap();
    store.db.flush().unwrap();
    drop(store);
    let store = SledStore::open(dir.path(), PROCESS_CRASH).unwrap();
    assert_eq!(store.read_run(&run.id).unwrap(), Some(completed("grouped")));
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
            token,
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
        .db
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
        .db
        .insert(journal_key(&run.id, JournalIndex(3)), one.as_bytes())
        .unwrap();
    let error = store.read_journal(&run.id).unwrap_err().to_string();
    assert!(error.contains("a group of 1 journal entries"), "{error}");
}

/// A crash between a transition's entry and the record's rewrite leaves the record behind;
/// the next open brings it up to the journal, and leaves other runs as they are.
#[test]
fn open_repairs_a_record_left_behind_its_journal() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path(), PROCESS_CRASH).unwrap();
    write_completed_run(&store, "behind");
    write_completed_run(&store, "current");
    let running_only = running("running");
    assert_eq!(store.insert_run(&running_only).unwrap(), None);
    let [started, _] = entries();
    store
        .append(
            &running_only.id,
            JournalIndex(0),
            std::slice::from_ref(&started),
            None,
            Token::CREATED,
        )
        .unwrap();
    // What a crash before the record's rewrite leaves: the old record.
    let behind = RunId::new("behind").unwrap();
    store
        .db
        .insert(
            run_key(&behind),
            serde_json::to_vec(&running("behind")).unwrap(),
        )
        .unwrap();
    assert_eq!(store.read_run(&behind).unwrap(), Some(running("behind")));
    store.db.flush().unwrap();
    drop(store);

    let store = SledStore::open(dir.path(), PROCESS_CRASH).unwrap();
    assert_eq!(store.read_run(&behind).unwrap(), Some(completed("behind")));
    let current = RunId::new("current").unwrap();
    assert_eq!(
        store.read_run(&current).unwrap(),
        Some(completed("current"))
    );
    assert_eq!(
        store.read_run(&running_only.id).unwrap(),
        Some(running_only)
    );
    assert_eq!(store.read_journal(&behind).unwrap(), entries().to_vec());
}

/// `delete_runs` removes the given runs' records and every journal entry, and nothing of
/// any other run.
#[test]
fn delete_runs_removes_records_and_journals_of_those_runs_only() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path(), PROCESS_CRASH).unwrap();
    for id in ["a", "b", "c"] {
        write_completed_run(&store, id);
    }
    let ids = ["a", "c"].map(|id| RunId::new(id).unwrap());
    remove_runs(
        &store.path,
        &store.db,
        &store.written,
        &store.counts,
        &store.closed,
        &ids,
    )
    .unwrap();
    for id in &ids {
        assert_eq!(store.read_run(id).unwrap(), None);
        assert_eq!(store.read_journal(id).unwrap(), Vec::<Entry>::new());
    }
    let b = RunId::new("b").unwrap();
    assert_eq!(store.read_run(&b).unwrap(), Some(completed("b")));
    assert_eq!(store.read_journal(&b).unwrap(), entries().to_vec());
    assert_eq!(
        store.db.len(),
        3,
        "b's record and two entries are all that is left"
    );
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

/// Keyed records: one space never shows another's, a put replaces, a delete removes, an
/// oversized record or a bad key is refused with nothing written, and what was synced
/// survives a reopen.
#[test]
fn keyed_records_are_kept_per_space_and_survive_a_reopen() {
    let block = |read: Read<'_, Vec<(String, String)>>| {
        futures_util::FutureExt::now_or_never(read)
            .unwrap()
            .unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path(), PROCESS_CRASH).unwrap();
    store
        .put_keyed(Space::Schedule, "nightly", "{\"a\":1}")
        .unwrap();
    store
        .put_keyed(Space::Schedule, "nightly", "{\"a\":2}")
        .unwrap();
    store.put_keyed(Space::Schedule, "yearly", "{}").unwrap();
    store
        .put_keyed(Space::ScheduleFired, "nightly", "{\"at\":5}")
        .unwrap();
    store.put_keyed(Space::Notice, "gone", "{}").unwrap();
    store.delete_keyed(Space::Notice, "gone").unwrap();
    let too_large = "x".repeat(crate::limits::KEYED_RECORD_BYTES_MAX + 1);
    assert!(matches!(
        store.put_keyed(Space::Notice, "big", &too_large),
        Err(EngineError::TooLarge { .. })
    ));
    assert!(store.put_keyed(Space::Notice, "", "{}").is_err());
    assert!(store.put_keyed(Space::Notice, "a\0b", "{}").is_err());
    store.db.flush().unwrap();
    drop(store);

    let store = SledStore::open(dir.path(), PROCESS_CRASH).unwrap();
    assert_eq!(
        block(store.keyed(Space::Schedule)),
        vec![
            ("nightly".to_string(), "{\"a\":2}".to_string()),
            ("yearly".to_string(), "{}".to_string())
        ]
    );
    assert_eq!(
        block(store.keyed(Space::ScheduleFired)),
        vec![("nightly".to_string(), "{\"at\":5}".to_string())]
    );
    assert_eq!(block(store.keyed(Space::Notice)), vec![]);
}

/// The counts a scan of every record gives.
fn scanned_counts(store: &SledStore) -> BTreeMap<RunStatus, u64> {
    let mut counts = BTreeMap::new();
    visit_runs(&store.path, &store.db, None, None, &mut |record| {
        if let Ok(record) = record {
            *counts.entry(record.status).or_default() += 1;
        }
        ControlFlow::Continue(())
    })
    .unwrap();
    counts
}

/// The kept counts per status are what a scan of every record says: after creations,
/// transitions, deletions, an unreadable record, and a reopen that repairs a record a crash
/// left behind its journal.
#[test]
fn kept_counts_match_a_scan_of_every_record() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path(), PROCESS_CRASH).unwrap();
    assert!(store.counts.now().is_empty());
    for id in ["a", "b", "c", "d"] {
        write_completed_run(&store, id);
    }
    for id in ["r1", "r2"] {
        assert_eq!(store.insert_run(&running(id)).unwrap(), None);
    }
    // Creating an existing run changes nothing.
    assert!(store.insert_run(&running("a")).unwrap().is_some());
    let expected = BTreeMap::from([(RunStatus::Completed, 4), (RunStatus::Running, 2)]);
    assert_eq!(store.counts.now(), expected);
    assert_eq!(scanned_counts(&store), expected);

    let ids = ["b", "r2", "gone"].map(|id| RunId::new(id).unwrap());
    remove_runs(
        &store.path,
        &store.db,
        &store.written,
        &store.counts,
        &store.closed,
        &ids,
    )
    .unwrap();
    let expected = BTreeMap::from([(RunStatus::Completed, 3), (RunStatus::Running, 1)]);
    assert_eq!(store.counts.now(), expected);
    assert_eq!(scanned_counts(&store), expected);

    // A crash between "c"'s completing entry and its record's rewrite, and a record that no
    // longer decodes: the reopen repairs the one and leaves the other out.
    let c = RunId::new("c").unwrap();
    store
        .db
        .insert(run_key(&c), serde_json::to_vec(&running("c")).unwrap())
        .unwrap();
    let d = RunId::new("d").unwrap();
    store.db.insert(run_key(&d), b"{not json".to_vec()).unwrap();
    store.db.flush().unwrap();
    drop(store);
    let store = SledStore::open(dir.path(), PROCESS_CRASH).unwrap();
    let expected = BTreeMap::from([(RunStatus::Completed, 2), (RunStatus::Running, 1)]);
    assert_eq!(store.counts.now(), expected);
    assert_eq!(scanned_counts(&store), expected);

    // A transition moves one run from its status to the next.
    let [started, done] = entries();
    let r1 = RunId::new("r1").unwrap();
    store
        .append(
            &r1,
            JournalIndex(0),
            std::slice::from_ref(&started),
            None,
            Token::CREATED,
        )
        .unwrap();
    store
        .append(
            &r1,
            JournalIndex(1),
            std::slice::from_ref(&done),
            Some(&completed("r1")),
            Token::CREATED,
        )
        .unwrap();
    let expected = BTreeMap::from([(RunStatus::Completed, 3)]);
    assert_eq!(store.counts.now(), expected);
    assert_eq!(scanned_counts(&store), expected);
}

/// A page by status reads at most `examine_max` records, matching or not: a status no run is
/// in costs a bounded read, and the page says where the next one goes on.
#[test]
fn a_page_by_status_reads_at_most_its_bound() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path(), PROCESS_CRASH).unwrap();
    for n in 0..10 {
        let id = format!("r{n}");
        if n == 7 {
            write_completed_run(&store, &id);
        } else {
            assert_eq!(store.insert_run(&running(&id)).unwrap(), None);
        }
    }
    let page = |after: Option<&str>, limit, examine_max| {
        let scan = RunsScan {
            after: after.map(|a| RunId::new(a).unwrap()),
            status: Some(RunStatus::Completed),
            prefix: None,
            limit,
            examine_max,
        };
        let page = runs_page(&store.path, &store.db, &scan).unwrap();
        let ids: Vec<String> = page
            .records
            .into_iter()
            .map(|r| r.unwrap().id.to_string())
            .collect();
        (ids, page.more, page.resume_after.map(|id| id.to_string()))
    };
    // Four records read, none completed: an empty page that goes on after the fourth.
    assert_eq!(page(None, 5, Some(4)), (vec![], true, Some("r3".into())));
    assert_eq!(
        page(Some("r3"), 5, Some(4)),
        (vec!["r7".into()], true, None)
    );
    // The last records: nothing more.
    assert_eq!(page(Some("r7"), 5, Some(4)), (vec![], false, None));
    // Unbounded, the page reads on to the match.
    assert_eq!(page(None, 5, None), (vec!["r7".into()], false, None));
}

/// The shape of a sled tree, level by level from the root: how many children each index
/// node has, and how many leaves the lowest level holds. Read from sled's own `Debug` walk of
/// the tree, which also asserts that every node a level refers to is found on it.
struct Shape {
    index_levels: Vec<Vec<usize>>,
    leaves: usize,
}

fn shape(tree: &sled::Tree) -> Shape {
    let text = format!("{tree:?}");
    let mut levels: Vec<Vec<Option<usize>>> = Vec::new();
    for line in text.lines() {
        if line.trim_start().starts_with("level ") {
            levels.push(Vec::new());
        } else if line.contains(": Node {") {
            let children = line.split_once("pointers: [").map(|(_, rest)| {
                let list = &rest[..rest.find(']').unwrap()];
                list.split(',').filter(|p| !p.trim().is_empty()).count()
            });
            levels
                .last_mut()
                .expect("a node before any level")
                .push(children);
        }
    }
    let leaves = levels.pop().expect("a tree has a level");
    assert!(
        leaves.iter().all(Option::is_none),
        "the lowest level holds leaves only"
    );
    Shape {
        index_levels: levels
            .into_iter()
            .map(|level| {
                level
                    .into_iter()
                    .map(|n| n.expect("an index node"))
                    .collect()
            })
            .collect(),
        leaves: leaves.len(),
    }
}

impl Shape {
    fn index_nodes(&self) -> usize {
        self.index_levels.iter().map(Vec::len).sum()
    }

    fn widest_index(&self) -> usize {
        self.index_levels
            .iter()
            .flatten()
            .copied()
            .max()
            .unwrap_or(0)
    }
}

/// Keel's sled splits index nodes above 64 children and merges them below 16, not 256 and 64
/// (vendor/sled/KEEL-PATCHES.md, patch 7); sled's own tests never merge index nodes. A store
/// written the way concurrent runs write (every run's entries interleaved with the
/// others'), then mostly deleted, then written again, goes through index splits, a root
/// hoist and merges of leaves and index nodes, and reads back exactly what it holds, before
/// and after a reopen.
#[test]
fn a_store_through_many_index_splits_and_merges_reads_back_what_it_holds() {
    const RUNS: usize = 4_000;
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path(), PROCESS_CRASH).unwrap();
    let id = |n: usize| RunId::new(format!("run-{n:05}")).unwrap();
    let write_interleaved = |store: &SledStore, runs: std::ops::Range<usize>| {
        let [started, done] = entries();
        for n in runs.clone() {
            assert_eq!(store.insert_run(&running(id(n).as_str())).unwrap(), None);
        }
        for n in runs.clone() {
            store
                .append(
                    &id(n),
                    JournalIndex(0),
                    std::slice::from_ref(&started),
                    None,
                    Token::CREATED,
                )
                .unwrap();
        }
        for n in runs {
            let record = completed(id(n).as_str());
            store
                .append(
                    &id(n),
                    JournalIndex(1),
                    std::slice::from_ref(&done),
                    Some(&record),
                    Token::CREATED,
                )
                .unwrap();
        }
    };
    let check = |store: &SledStore, kept: &dyn Fn(usize) -> bool, upto: usize| {
        let journal = entries().to_vec();
        for n in 0..upto {
            let (record, entries) = (store.read_run(&id(n)).unwrap(), store.read_journal(&id(n)));
            if kept(n) {
                assert_eq!(record, Some(completed(id(n).as_str())), "run {n}");
                assert_eq!(entries.unwrap(), journal, "run {n}");
            } else {
                assert_eq!(record, None, "run {n}");
                assert_eq!(entries.unwrap(), Vec::<Entry>::new(), "run {n}");
            }
        }
        let count = (0..upto).filter(|n| kept(*n)).count() as u64;
        let expected = BTreeMap::from([(RunStatus::Completed, count)]);
        assert_eq!(scanned_counts(store), expected);
        assert_eq!(store.counts.now(), expected);
    };

    write_interleaved(&store, 0..RUNS);
    check(&store, &|_| true, RUNS);
    let grown = shape(&store.db);
    // 12,000 keys in leaves of 8 to 16: index nodes split (more than one below the root)
    // and none is much over 64 children (a split happens on the next lookup through it).
    assert!(
        grown.index_levels.len() >= 2,
        "no index level below the root: {:?}",
        grown.index_levels
    );
    assert!(grown.index_levels[1].len() >= 2, "{:?}", grown.index_levels);
    assert!(grown.widest_index() <= 66, "{:?}", grown.index_levels);

    let deleted: Vec<RunId> = (0..RUNS)
        .filter(|n| !n.is_multiple_of(10))
        .map(id)
        .collect();
    remove_runs(
        &store.path,
        &store.db,
        &store.written,
        &store.counts,
        &store.closed,
        &deleted,
    )
    .unwrap();
    let kept = |n: usize| n.is_multiple_of(10) || n >= RUNS;
    // Lookups merge what deletions emptied: read twice, so that merges started by the first
    // pass have completed.
    check(&store, &kept, RUNS);
    check(&store, &kept, RUNS);
    let shrunk = shape(&store.db);
    assert!(
        shrunk.leaves < grown.leaves / 2,
        "leaves {} -> {}",
        grown.leaves,
        shrunk.leaves
    );
    assert!(
        shrunk.index_nodes() < grown.index_nodes(),
        "index nodes did not merge: {:?} -> {:?}",
        grown.index_levels,
        shrunk.index_levels
    );

    write_interleaved(&store, RUNS..RUNS + RUNS / 2);
    check(&store, &kept, RUNS + RUNS / 2);
    store.db.flush().unwrap();
    drop(store);

    let store = SledStore::open(dir.path(), PROCESS_CRASH).unwrap();
    check(&store, &kept, RUNS + RUNS / 2);
    let reopened = shape(&store.db);
    assert!(reopened.widest_index() <= 66, "{:?}", reopened.index_levels);
}

/// Releases `store` as the engine's clean shutdown does, then drops it.
fn close_cleanly(store: SledStore) {
    futures_util::FutureExt::now_or_never(store.release())
        .unwrap()
        .unwrap();
    drop(store);
}

/// Makes run `id`'s record what a crash between its completing entry and the record's
/// rewrite leaves (the record still running), behind the store's counts.
fn leave_behind(store: &SledStore, id: &str) {
    let id = RunId::new(id).unwrap();
    store
        .db
        .insert(
            run_key(&id),
            serde_json::to_vec(&running(id.as_str())).unwrap(),
        )
        .unwrap();
    store.db.flush().unwrap();
}

/// A clean close leaves the counts per status, and the next open takes them (reading no
/// record: a record changed behind the store's back is not repaired) and removes them before
/// anything else is written; a store dropped without a release, or written after it, leaves
/// none, and its next open counts (and repairs) every record.
#[test]
fn a_clean_close_leaves_its_counts_for_the_next_open() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path(), PROCESS_CRASH).unwrap();
    for id in ["a", "b", "c"] {
        write_completed_run(&store, id);
    }
    assert_eq!(store.insert_run(&running("r")).unwrap(), None);
    let expected = BTreeMap::from([(RunStatus::Completed, 3), (RunStatus::Running, 1)]);
    // Changed behind the store's back (not through a write of its own): the counts a clean
    // close leaves are the store's, not this record's.
    leave_behind(&store, "a");
    close_cleanly(store);

    let (counts, repaired) = {
        let db = open_db(dir.path(), Durability::ProcessCrash, None).unwrap();
        assert!(db.contains_key(recovery::CLEAN_CLOSE_KEY).unwrap());
        let path = dir.path().to_owned();
        let held = held_commit(&path, &db.open_tree(mark::SEQUENCE_TREE).unwrap()).unwrap();
        let counts = repair_records(&path, &db, held).unwrap();
        assert!(
            !db.contains_key(recovery::CLEAN_CLOSE_KEY).unwrap(),
            "taken"
        );
        drop(db);
        counts
    };
    assert_eq!(repaired, recovery::Repaired::Clean);
    assert_eq!(counts, expected);

    // Taken once: this open (the clean close's key is gone) counts and repairs every record.
    let store = SledStore::open(dir.path(), PROCESS_CRASH).unwrap();
    assert_eq!(
        store.read_run(&RunId::new("a").unwrap()).unwrap(),
        Some(completed("a"))
    );
    assert_eq!(store.counts.now(), expected);
    drop(store);

    // A write after the release leaves no counts: they would be stale.
    let store = SledStore::open(dir.path(), PROCESS_CRASH).unwrap();
    futures_util::FutureExt::now_or_never(store.release())
        .unwrap()
        .unwrap();
    write_completed_run(&store, "late");
    drop(store);
    let db = open_db(dir.path(), Durability::ProcessCrash, None).unwrap();
    assert!(!db.contains_key(recovery::CLEAN_CLOSE_KEY).unwrap());
    drop(db);
    let store = SledStore::open(dir.path(), PROCESS_CRASH).unwrap();
    let expected = BTreeMap::from([(RunStatus::Completed, 4), (RunStatus::Running, 1)]);
    assert_eq!(store.counts.now(), expected);
    assert_eq!(scanned_counts(&store), expected);
}

/// With the wake index built, an open after a crash repairs the runs whose entry is 0 (the
/// loaded ones, the only ones that wrote since their last park) and counts every record.
#[test]
fn with_the_wake_index_an_open_repairs_the_loaded_runs() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path(), PROCESS_CRASH).unwrap();
    for id in ["loaded", "done"] {
        store.write_wake(&RunId::new(id).unwrap(), 0).unwrap();
        write_completed_run(&store, id);
    }
    store.remove_wake(&RunId::new("done").unwrap()).unwrap();
    assert_eq!(store.insert_run(&running("parked")).unwrap(), None);
    store
        .write_wake(&RunId::new("parked").unwrap(), 5_000)
        .unwrap();
    store.write_wakes_built().unwrap();
    leave_behind(&store, "loaded");
    drop(store);

    let db = open_db(dir.path(), Durability::ProcessCrash, None).unwrap();
    let held = held_commit(dir.path(), &db.open_tree(mark::SEQUENCE_TREE).unwrap()).unwrap();
    let (counts, repaired) = repair_records(dir.path(), &db, held).unwrap();
    assert_eq!(repaired, recovery::Repaired::Loaded(1));
    assert_eq!(
        counts,
        BTreeMap::from([(RunStatus::Completed, 2), (RunStatus::Running, 1)])
    );
    drop(db);
    let store = SledStore::open(dir.path(), PROCESS_CRASH).unwrap();
    assert_eq!(
        store.read_run(&RunId::new("loaded").unwrap()).unwrap(),
        Some(completed("loaded"))
    );
    assert_eq!(scanned_counts(&store), store.counts.now());
}
