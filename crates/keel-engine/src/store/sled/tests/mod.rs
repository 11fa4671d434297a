//! Unit tests of the sled store: deletion, keyed records, pages by status, the tree's shape;
//! the journal's encoding in `encoding.rs`, the open's repair and the counts in `repair.rs`, how
//! the counts read a record's status in `status.rs`.

use std::ops::ControlFlow;

use super::scan::visit_runs;
use super::*;
use crate::ids::{Attempt, OperationIndex};
use crate::journal::Event;

mod encoding;
mod repair;
mod status;

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

/// Run `id` after a step failed: undoing its steps (a transition that is not terminal).
fn compensating(id: &str) -> RunRecord {
    RunRecord {
        status: RunStatus::Compensating,
        updated_at_ms: 20,
        error: Some("step failed".into()),
        ..running(id)
    }
}

/// The entry of [`compensating`]'s transition.
fn compensation_started() -> Entry {
    Entry {
        at_ms: 20,
        event: Event::CompensationStarted {
            reason: "step failed".into(),
        },
    }
}

/// The completion of the step [`entries`] starts.
fn completion() -> Entry {
    Entry {
        at_ms: 12,
        event: Event::StepCompleted {
            step: OperationIndex(0),
            attempt: Attempt(1),
            output: serde_json::json!(3),
        },
    }
}

/// Completed run `id` moved into compensation by its parent, and that transition's entry.
fn undone_by_parent(id: &str) -> (RunRecord, Entry) {
    let reason = "parent compensates";
    let record = RunRecord {
        status: RunStatus::Compensating,
        updated_at_ms: 30,
        error: Some(reason.into()),
        ..completed(id)
    };
    let entry = Entry {
        at_ms: 30,
        event: Event::CompensationStarted {
            reason: reason.into(),
        },
    };
    (record, entry)
}

/// A rerun's note in the journal of run `id`, at `at_ms`.
fn rerun_note(id: &str, at_ms: u64) -> Entry {
    Entry {
        at_ms,
        event: Event::RerunStarted {
            run: RunId::new(format!("{id}.rerun-1")).unwrap(),
        },
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

/// Deletes runs `ids` as `JournalStore::delete_runs` does, on the calling thread.
fn delete(store: &SledStore, ids: &[RunId]) {
    remove_runs(&store.kv, &store.writes, &store.counts, &store.closed, ids).unwrap();
}

/// Writes run `id` with a step entry and a completing transition. Its wake index entry at 0,
/// which its creation wrote, stays (the engine removes it when the run's cell goes).
fn write_completed_run(store: &SledStore, id: &str) {
    assert_eq!(store.insert_run(&running(id)).unwrap(), None);
    complete(store, id);
}

/// Appends to run `id`, running with no entry yet, a step entry and a completing transition
/// (the settling record's one write).
fn complete(store: &SledStore, id: &str) {
    let [started, done] = entries();
    let run = RunId::new(id).unwrap();
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

/// Writes run `id` with a step entry and a transition to `Compensating` (two journal keys,
/// the second carrying the record's state, and the record's view).
fn write_compensating_run(store: &SledStore, id: &str) {
    assert_eq!(store.insert_run(&running(id)).unwrap(), None);
    compensate(store, id);
}

/// Appends to run `id`, running with no entry yet, a step entry and a transition to
/// `Compensating` (the entry, then the record's view).
fn compensate(store: &SledStore, id: &str) {
    let [started, _] = entries();
    let run = RunId::new(id).unwrap();
    for (index, entry, record) in [
        (0, started, None),
        (1, compensation_started(), Some(compensating(id))),
    ] {
        store
            .append(
                &run,
                JournalIndex(index),
                std::slice::from_ref(&entry),
                record.as_ref(),
                Token::CREATED,
            )
            .unwrap();
    }
}

/// Makes run `id`'s record what a crash between a transition's entry and the record's
/// rewrite leaves (the record still running), behind the store's counts.
fn leave_behind(store: &SledStore, id: &str) {
    let id = RunId::new(id).unwrap();
    store
        .kv
        .insert(
            run_key(&id),
            serde_json::to_vec(&running(id.as_str())).unwrap(),
        )
        .unwrap();
    store.kv.flush().unwrap();
}

/// `delete_runs` removes the given runs' records and every journal entry, and nothing of
/// any other run.
#[test]
fn delete_runs_removes_records_and_journals_of_those_runs_only() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path(), PROCESS_CRASH).unwrap();
    for id in ["a", "b", "c"] {
        write_completed_run(&store, id);
        // Unloaded, as the engine leaves a settled run.
        store.remove_wake(&RunId::new(id).unwrap()).unwrap();
    }
    let ids = ["a", "c"].map(|id| RunId::new(id).unwrap());
    delete(&store, &ids);
    for id in &ids {
        assert_eq!(store.read_run(id).unwrap(), None);
        assert_eq!(store.read_journal(id).unwrap(), Vec::<Entry>::new());
    }
    let b = RunId::new("b").unwrap();
    assert_eq!(store.read_run(&b).unwrap(), Some(completed("b")));
    assert_eq!(store.read_journal(&b).unwrap(), entries().to_vec());
    assert_eq!(
        store.kv.sled().len(),
        2,
        "b's record (holding its last entry) and its first entry are all that is left"
    );
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
    store.kv.flush().unwrap();
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
        let page = runs_page(&store.kv, &scan).unwrap();
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
    through_splits_and_merges(PROCESS_CRASH);
}

/// The same, at the default durability and with sled's cache far smaller than what the store
/// holds (the engine bounds it, `limits::SLED_CACHE_BYTES_DEFAULT`): pages are evicted and
/// read back from the log all along, through Keel's patches to sled's reads and syncs.
#[test]
fn a_store_whose_cache_evicts_its_pages_reads_back_what_it_holds() {
    through_splits_and_merges(SledOptions {
        durability: Durability::PowerLoss,
        lost_data: LostData::Refuse,
        cache_bytes: Some(64 * 1024),
    });
}

fn through_splits_and_merges(options: SledOptions) {
    const RUNS: usize = 4_000;
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path(), options).unwrap();
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
        assert_eq!(counted(store), expected);
    };

    write_interleaved(&store, 0..RUNS);
    check(&store, &|_| true, RUNS);
    let grown = shape(store.kv.sled());
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
    delete(&store, &deleted);
    let kept = |n: usize| n.is_multiple_of(10) || n >= RUNS;
    // Lookups merge what deletions emptied: read twice, so that merges started by the first
    // pass have completed.
    check(&store, &kept, RUNS);
    check(&store, &kept, RUNS);
    let shrunk = shape(store.kv.sled());
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
    store.kv.flush().unwrap();
    drop(store);

    let store = SledStore::open(dir.path(), options).unwrap();
    check(&store, &kept, RUNS + RUNS / 2);
    let reopened = shape(store.kv.sled());
    assert!(reopened.widest_index() <= 66, "{:?}", reopened.index_levels);
}

/// The store's counts once whole: after the open's count, when it runs in the background.
fn counted(store: &SledStore) -> BTreeMap<RunStatus, u64> {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(store.counts.counted(store.path()))
        .unwrap()
}

/// Checks that the store's counts, once whole, are `expected`, and so is a scan of every
/// record.
fn assert_counts(store: &SledStore, expected: &BTreeMap<RunStatus, u64>) {
    assert_eq!(&counted(store), expected);
    assert_eq!(&scanned_counts(store), expected);
}

/// The counts a scan of every record gives.
fn scanned_counts(store: &SledStore) -> BTreeMap<RunStatus, u64> {
    let mut counts = BTreeMap::new();
    visit_runs(&store.kv, None, None, &mut |record| {
        if let Ok(record) = record {
            *counts.entry(record.status).or_default() += 1;
        }
        ControlFlow::Continue(())
    })
    .unwrap();
    counts
}
