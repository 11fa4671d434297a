//! Unit tests of the open's repair and the kept counts (`recovery.rs`, `counts.rs`).

use super::*;
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
    delete(&store, &ids);
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
