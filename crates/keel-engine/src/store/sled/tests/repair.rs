//! Unit tests of the open's repair and the kept counts (`recovery.rs`, `counts.rs`).

use super::*;
/// A crash between a transition's entry and the record's rewrite leaves the record behind;
/// the next open brings it up to the journal, and leaves other runs as they are.
#[test]
fn open_repairs_a_record_left_behind_its_journal() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path(), PROCESS_CRASH).unwrap();
    write_compensating_run(&store, "behind");
    write_compensating_run(&store, "current");
    write_completed_run(&store, "done");
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
    leave_behind(&store, "behind");
    assert_eq!(store.read_run(&behind).unwrap(), Some(running("behind")));
    drop(store);

    let store = SledStore::open(dir.path(), PROCESS_CRASH).unwrap();
    assert_eq!(
        store.read_run(&behind).unwrap(),
        Some(compensating("behind"))
    );
    let current = RunId::new("current").unwrap();
    assert_eq!(
        store.read_run(&current).unwrap(),
        Some(compensating("current"))
    );
    let done = RunId::new("done").unwrap();
    assert_eq!(store.read_run(&done).unwrap(), Some(completed("done")));
    assert_eq!(
        store.read_run(&running_only.id).unwrap(),
        Some(running_only)
    );
    let [started, _] = entries();
    assert_eq!(
        store.read_journal(&behind).unwrap(),
        vec![started, compensation_started()]
    );
}

/// A settled run's record holds its last entries and is the transition's one write: the
/// open never "repairs" it back to an earlier transition's state from the journal's keys
/// (here the `Compensating` one before its `Compensated`), and reads give back the journal
/// whole, with an entry appended after it settled (a rerun's note) in its place.
#[test]
fn a_settled_record_is_never_repaired_back_to_an_earlier_transition() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path(), PROCESS_CRASH).unwrap();
    write_compensating_run(&store, "undone");
    let id = RunId::new("undone").unwrap();
    let compensated = RunRecord {
        status: RunStatus::Compensated,
        updated_at_ms: 30,
        finished_at_ms: Some(30),
        ..compensating("undone")
    };
    let settled = Entry {
        at_ms: 30,
        event: Event::RunCompensated,
    };
    let note = rerun_note("undone", 40);
    store
        .append(
            &id,
            JournalIndex(2),
            std::slice::from_ref(&settled),
            Some(&compensated),
            Token::CREATED,
        )
        .unwrap();
    let [started, _] = entries();
    let mut journal = vec![started, compensation_started(), settled];
    assert_eq!(store.read_journal(&id).unwrap(), journal);
    // Dropped without a release: the next open reads and repairs every record.
    drop(store);

    let store = SledStore::open(dir.path(), PROCESS_CRASH).unwrap();
    assert_eq!(store.read_run(&id).unwrap(), Some(compensated.clone()));
    assert_eq!(store.read_journal(&id).unwrap(), journal);
    store
        .append(
            &id,
            JournalIndex(3),
            std::slice::from_ref(&note),
            None,
            Token::CREATED,
        )
        .unwrap();
    journal.push(note);
    assert_eq!(store.read_journal(&id).unwrap(), journal);
    drop(store);

    let store = SledStore::open(dir.path(), PROCESS_CRASH).unwrap();
    assert_eq!(store.read_run(&id).unwrap(), Some(compensated));
    assert_eq!(store.read_journal(&id).unwrap(), journal);
    assert_eq!(
        counted(&store),
        BTreeMap::from([(RunStatus::Compensated, 1)])
    );
}

/// The kept counts per status are what a scan of every record says: after creations,
/// transitions, deletions (one naming a run twice), an unreadable record, and a reopen that repairs a record a crash
/// left behind its journal.
#[test]
fn kept_counts_match_a_scan_of_every_record() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path(), PROCESS_CRASH).unwrap();
    assert!(counted(&store).is_empty());
    for id in ["a", "b", "d"] {
        write_completed_run(&store, id);
    }
    write_compensating_run(&store, "c");
    for id in ["r1", "r2"] {
        assert_eq!(store.insert_run(&running(id)).unwrap(), None);
    }
    // Creating an existing run changes nothing.
    assert!(store.insert_run(&running("a")).unwrap().is_some());
    let expected = BTreeMap::from([
        (RunStatus::Completed, 3),
        (RunStatus::Compensating, 1),
        (RunStatus::Running, 2),
    ]);
    assert_counts(&store, &expected);

    // "b" named twice is deleted once.
    let ids = ["b", "r2", "gone", "b"].map(|id| RunId::new(id).unwrap());
    delete(&store, &ids);
    let expected = BTreeMap::from([
        (RunStatus::Completed, 2),
        (RunStatus::Compensating, 1),
        (RunStatus::Running, 1),
    ]);
    assert_counts(&store, &expected);

    // A crash between "c"'s compensating entry and its record's rewrite, and a record that
    // no longer decodes: the reopen repairs the one and leaves the other out.
    leave_behind(&store, "c");
    let d = RunId::new("d").unwrap();
    store.kv.insert(run_key(&d), b"{not json".to_vec()).unwrap();
    store.kv.flush().unwrap();
    drop(store);
    let store = SledStore::open(dir.path(), PROCESS_CRASH).unwrap();
    let expected = BTreeMap::from([
        (RunStatus::Completed, 1),
        (RunStatus::Compensating, 1),
        (RunStatus::Running, 1),
    ]);
    assert_counts(&store, &expected);

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
    let expected = BTreeMap::from([(RunStatus::Completed, 2), (RunStatus::Compensating, 1)]);
    assert_counts(&store, &expected);
}

/// Releases `store` as the engine's clean shutdown does, then drops it.
fn close_cleanly(store: SledStore) {
    futures_util::FutureExt::now_or_never(store.release())
        .unwrap()
        .unwrap();
    drop(store);
}

/// A clean close leaves the counts per status, and the next open takes them (reading no
/// record: a record changed behind the store's back is not repaired) and removes them before
/// anything else is written; a store dropped without a release, or written after it, leaves
/// none, and its next open counts (and repairs) every record.
#[test]
fn a_clean_close_leaves_its_counts_for_the_next_open() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path(), PROCESS_CRASH).unwrap();
    write_compensating_run(&store, "a");
    for id in ["b", "c"] {
        write_completed_run(&store, id);
    }
    assert_eq!(store.insert_run(&running("r")).unwrap(), None);
    let expected = BTreeMap::from([
        (RunStatus::Completed, 2),
        (RunStatus::Compensating, 1),
        (RunStatus::Running, 1),
    ]);
    // Changed behind the store's back (not through a write of its own): the counts a clean
    // close leaves are the store's, not this record's.
    leave_behind(&store, "a");
    close_cleanly(store);

    let (counts, repaired) = {
        let db = open_db(dir.path(), Durability::ProcessCrash, None).unwrap();
        assert!(db.contains_key(recovery::CLEAN_CLOSE_KEY).unwrap());
        let path = dir.path().to_owned();
        let held = held_commit(&path, &db.open_tree(mark::SEQUENCE_TREE).unwrap()).unwrap();
        let counts = repair_records(&Kv::new(&path, db.clone()), held).unwrap();
        assert!(
            !db.contains_key(recovery::CLEAN_CLOSE_KEY).unwrap(),
            "taken"
        );
        drop(db);
        counts
    };
    assert_eq!(repaired, recovery::Repaired::Clean);
    assert_eq!(counts, Some(expected.clone()));

    // Taken once: this open (the clean close's key is gone) counts and repairs every record.
    let store = SledStore::open(dir.path(), PROCESS_CRASH).unwrap();
    assert_eq!(
        store.read_run(&RunId::new("a").unwrap()).unwrap(),
        Some(compensating("a"))
    );
    assert_eq!(counted(&store), expected);
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
    let expected = BTreeMap::from([
        (RunStatus::Completed, 3),
        (RunStatus::Compensating, 1),
        (RunStatus::Running, 1),
    ]);
    assert_counts(&store, &expected);
}

/// With the wake index built, an open after a crash repairs the runs whose entry is 0 (the
/// loaded ones, the only ones that wrote since their last park) and counts every record.
#[test]
fn with_the_wake_index_an_open_repairs_the_loaded_runs() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path(), PROCESS_CRASH).unwrap();
    store.write_wake(&RunId::new("loaded").unwrap(), 0).unwrap();
    write_compensating_run(&store, "loaded");
    store.write_wake(&RunId::new("done").unwrap(), 0).unwrap();
    write_completed_run(&store, "done");
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
    let (counts, repaired) = repair_records(&Kv::new(dir.path(), db.clone()), held).unwrap();
    assert_eq!(repaired, recovery::Repaired::Loaded(1));
    assert_eq!(counts, None, "counted after the open");
    drop(db);
    let store = SledStore::open(dir.path(), PROCESS_CRASH).unwrap();
    assert_eq!(
        store.read_run(&RunId::new("loaded").unwrap()).unwrap(),
        Some(compensating("loaded"))
    );
    let expected = BTreeMap::from([
        (RunStatus::Completed, 1),
        (RunStatus::Compensating, 1),
        (RunStatus::Running, 1),
    ]);
    assert_counts(&store, &expected);
}

/// A settled run that changes again (a completed child its parent compensates): the
/// transition first moves the entries its record holds to keys, so that the record's rewrite
/// loses none. Each state a crash can leave on the way reads back whole: after the move
/// (the record still holds them too), after the transition's entry (the open repairs the
/// record from it), and after the rewrite; and the run's next settling holds its own.
#[test]
fn a_settled_run_that_changes_again_keeps_every_entry() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path(), PROCESS_CRASH).unwrap();
    let [started, done] = entries();
    let (undoing, compensate) = undone_by_parent("x");
    let transition = |store: &SledStore, id: &RunId| {
        let record = RunRecord {
            id: id.clone(),
            ..undoing.clone()
        };
        store
            .append(
                id,
                JournalIndex(2),
                std::slice::from_ref(&compensate),
                Some(&record),
                Token::CREATED,
            )
            .unwrap();
    };
    let [moved, behind, whole] = ["moved", "behind", "whole"].map(|id| RunId::new(id).unwrap());
    for id in [&moved, &behind, &whole] {
        write_completed_run(&store, id.as_str());
    }
    // Stopped after the move: keys and record both hold the run's end (one key, written at
    // once).
    store.move_tail_out(&moved).unwrap();
    let keys = store.kv.scan_prefix(journal_prefix(&moved)).count();
    assert_eq!(keys, 2, "the first entry's key and the moved one");
    // Stopped after the transition's entry: the record as it was before.
    let settled = store.kv.get(run_key(&behind)).unwrap().unwrap();
    transition(&store, &behind);
    store.kv.insert(run_key(&behind), settled).unwrap();
    transition(&store, &whole);
    let two = vec![started.clone(), done.clone()];
    let three = vec![started.clone(), done.clone(), compensate.clone()];
    assert_eq!(store.read_journal(&moved).unwrap(), two);
    assert_eq!(store.read_journal(&whole).unwrap(), three);
    assert_eq!(
        store.read_run(&whole).unwrap().unwrap().status,
        RunStatus::Compensating
    );
    // Dropped without a release: the next open reads and repairs every record.
    drop(store);

    let store = SledStore::open(dir.path(), PROCESS_CRASH).unwrap();
    assert_eq!(store.read_run(&moved).unwrap(), Some(completed("moved")));
    assert_eq!(store.read_journal(&moved).unwrap(), two);
    for id in [&behind, &whole] {
        let record = store.read_run(id).unwrap().unwrap();
        assert_eq!(record.status, RunStatus::Compensating, "{id}");
        assert_eq!(store.read_journal(id).unwrap(), three, "{id}");
    }
    let compensated = RunRecord {
        status: RunStatus::Compensated,
        updated_at_ms: 40,
        ..store.read_run(&whole).unwrap().unwrap()
    };
    let end = Entry {
        at_ms: 40,
        event: Event::RunCompensated,
    };
    store
        .append(
            &whole,
            JournalIndex(3),
            std::slice::from_ref(&end),
            Some(&compensated),
            Token::CREATED,
        )
        .unwrap();
    let four = vec![started, done, compensate, end];
    assert_eq!(store.read_journal(&whole).unwrap(), four);
    drop(store);
    let store = SledStore::open(dir.path(), PROCESS_CRASH).unwrap();
    assert_eq!(store.read_run(&whole).unwrap(), Some(compensated));
    assert_eq!(store.read_journal(&whole).unwrap(), four);
}

/// A completed child given a rerun's note and then compensated by its parent: the note's key
/// follows the record's entries, the move writes them before it, and the journal reads back
/// in order before and after a reopen.
#[test]
fn a_note_then_a_transition_after_settling_keeps_the_journal_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path(), PROCESS_CRASH).unwrap();
    write_completed_run(&store, "child");
    let id = RunId::new("child").unwrap();
    let note = rerun_note("child", 25);
    let (undoing, compensate) = undone_by_parent("child");
    for (index, entry, record) in [(2, &note, None), (3, &compensate, Some(&undoing))] {
        store
            .append(
                &id,
                JournalIndex(index),
                std::slice::from_ref(entry),
                record,
                Token::CREATED,
            )
            .unwrap();
    }
    let [started, done] = entries();
    let journal = vec![started, done, note, compensate];
    assert_eq!(store.read_journal(&id).unwrap(), journal);
    drop(store);
    let store = SledStore::open(dir.path(), PROCESS_CRASH).unwrap();
    assert_eq!(store.read_run(&id).unwrap(), Some(undoing));
    assert_eq!(store.read_journal(&id).unwrap(), journal);
}

/// Opens the store in `dir` with its count (after a crash) stopped after its first `batches`
/// batches (0: before it reads any), once it got there; the count goes on when the sender
/// returned sends, or is dropped (or a minute passed).
fn open_with_the_count_paused(
    dir: &Path,
    batches: u64,
) -> (SledStore, std::sync::mpsc::Sender<()>) {
    let (reached, reached_there) = std::sync::mpsc::channel();
    let (go, went) = std::sync::mpsc::channel::<()>();
    let (went, before) = (std::sync::Mutex::new(went), AtomicU64::new(0));
    let pause = move || {
        if before.fetch_add(1, Ordering::SeqCst) == batches {
            let _ = reached.send(());
            let _ = went
                .lock()
                .unwrap()
                .recv_timeout(std::time::Duration::from_secs(60));
        }
    };
    counts::PAUSES
        .lock()
        .insert(dir.to_owned(), Arc::new(pause));
    let store = SledStore::open(dir, PROCESS_CRASH).unwrap();
    reached_there
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("the count reaches its pause");
    (store, go)
}

/// Runs `run-0000` .. `run-{runs-1}` (four digits), running, in a store whose wake index is
/// built, left as a crash leaves it (not released): its next open counts every record after
/// the open.
fn store_of_running_runs(dir: &Path, runs: usize) {
    let store = SledStore::open(dir, PROCESS_CRASH).unwrap();
    for n in 0..runs {
        let id = format!("run-{n:04}");
        assert_eq!(store.insert_run(&running(&id)).unwrap(), None);
    }
    store.write_wakes_built().unwrap();
    drop(store);
}

/// After a crash, a store whose wake index is built counts its records after the open, while
/// it is written. Each write during the count is counted once: by a move of the counts for a
/// record the count has passed, by the count's read for one it has not reached. The count is
/// paused before it reads anything, and after two batches (256 records, up to `run-0255`),
/// while runs are created, moved (through both kinds of transition write) and deleted on
/// both sides of where it stands, and at its edge.
#[test]
fn writes_during_the_opens_count_are_counted_once() {
    for batches in [0, 2] {
        let dir = tempfile::tempdir().unwrap();
        store_of_running_runs(dir.path(), 600);
        let (store, go) = open_with_the_count_paused(dir.path(), batches);
        assert_eq!(store.counts.now(), None, "not whole while the count runs");

        for (settled, compensating, deleted, created) in [
            (
                "run-0010",
                "run-0011",
                Some("run-0020"),
                ["a-first", "run-0100a"],
            ),
            ("run-0255", "run-0256", None, ["run-0255a", "run-0256a"]),
            (
                "run-0400",
                "run-0401",
                Some("run-0410"),
                ["run-0500a", "zz-last"],
            ),
        ] {
            complete(&store, settled);
            compensate(&store, compensating);
            if let Some(deleted) = deleted {
                delete(&store, &[RunId::new(deleted).unwrap()]);
            }
            for id in created {
                assert_eq!(store.insert_run(&running(id)).unwrap(), None);
            }
        }
        go.send(()).unwrap();
        let expected = BTreeMap::from([
            (RunStatus::Completed, 3),
            (RunStatus::Compensating, 3),
            (RunStatus::Running, 598),
        ]);
        assert_eq!(counted(&store), expected, "paused after {batches} batches");
        assert_eq!(scanned_counts(&store), expected);
        // Moved from here on as before.
        complete(&store, "run-0300");
        let moved = BTreeMap::from([
            (RunStatus::Completed, 4),
            (RunStatus::Compensating, 3),
            (RunStatus::Running, 597),
        ]);
        assert_eq!(store.counts.now(), Some(moved.clone()));
        assert_eq!(scanned_counts(&store), moved);
        counts::PAUSES.lock().remove(dir.path());
    }
}

/// The same, with no pause: two threads complete runs all over the key space while the count
/// reads, for as long as it does (the lock makes each write and each batch one after the
/// other; without it a write could be counted twice or not at all).
#[test]
fn writes_racing_the_opens_count_are_counted_once() {
    const RUNS: usize = 6_000;
    let dir = tempfile::tempdir().unwrap();
    store_of_running_runs(dir.path(), RUNS);
    let store = SledStore::open(dir.path(), PROCESS_CRASH).unwrap();
    let settled = std::thread::scope(|scope| {
        let writers: Vec<_> = (0..2)
            .map(|writer| {
                let store = &store;
                scope.spawn(move || {
                    let mut settled = 0;
                    // One from the first run up, behind the count; one from the last down,
                    // ahead of it until they cross.
                    let runs: Vec<usize> = match writer {
                        0 => (0..RUNS).step_by(7).collect(),
                        _ => (3..RUNS).step_by(7).rev().collect(),
                    };
                    for n in runs {
                        if store.counts.now().is_some() {
                            break;
                        }
                        complete(store, &format!("run-{n:04}"));
                        settled += 1;
                    }
                    settled
                })
            })
            .collect();
        writers.into_iter().map(|w| w.join().unwrap()).sum::<u64>()
    });
    // Else the writes did not overlap the count, and this test checked nothing.
    assert!(settled > 0, "no run settled while the count ran");
    let expected = BTreeMap::from([
        (RunStatus::Completed, settled),
        (RunStatus::Running, RUNS as u64 - settled),
    ]);
    assert_counts(&store, &expected);
}

/// A store closed cleanly while the open's count is not done leaves no counts for the next
/// open (they are not whole), which counts every record again; the close stops the count.
#[test]
fn a_store_closed_during_the_opens_count_leaves_no_counts() {
    let dir = tempfile::tempdir().unwrap();
    store_of_running_runs(dir.path(), 600);
    let (store, go) = open_with_the_count_paused(dir.path(), 1);
    complete(&store, "run-0000");
    // The count goes on only once told to stop, so the close finds it not done.
    let stop = Arc::clone(&store.counting.as_ref().expect("counting").1);
    let told = std::thread::spawn(move || {
        while !stop.load(Ordering::SeqCst) {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        go.send(()).unwrap();
    });
    close_cleanly(store);
    told.join().unwrap();
    counts::PAUSES.lock().remove(dir.path());
    counted_again_at_the_next_open(dir.path());
}

/// Checks that the store in `dir`, of 600 runs of which `run-0000` completed, was closed
/// without leaving counts, and that its next open counts them whole.
fn counted_again_at_the_next_open(dir: &Path) {
    let db = open_db(dir, Durability::ProcessCrash, None).unwrap();
    assert!(
        !db.contains_key(recovery::CLEAN_CLOSE_KEY).unwrap(),
        "no counts left"
    );
    drop(db);
    let store = SledStore::open(dir, PROCESS_CRASH).unwrap();
    let expected = BTreeMap::from([(RunStatus::Completed, 1), (RunStatus::Running, 599)]);
    assert_counts(&store, &expected);
}

/// A count that fails (here it panics) makes the counts unavailable, the store's error,
/// until the next open: never partial counts, none left by a clean close, and the next open
/// counts again.
#[test]
fn a_failed_count_makes_the_counts_an_error_until_the_next_open() {
    let dir = tempfile::tempdir().unwrap();
    store_of_running_runs(dir.path(), 600);
    let pause: counts::Pause = Arc::new(|| panic!("a count that fails"));
    counts::PAUSES.lock().insert(dir.path().to_owned(), pause);
    let store = SledStore::open(dir.path(), PROCESS_CRASH).unwrap();
    let error = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(store.counts.counted(store.path()))
        .expect_err("the count failed");
    let text = error.to_string();
    assert!(text.contains(&dir.path().display().to_string()), "{text}");
    assert!(
        text.contains("the open's count of the runs failed: it panicked: a count that fails"),
        "{text}"
    );
    assert_eq!(store.counts.now(), None);
    // Writes go on, without waiting for a count that is gone.
    complete(&store, "run-0000");
    close_cleanly(store);
    counts::PAUSES.lock().remove(dir.path());
    counted_again_at_the_next_open(dir.path());
}
