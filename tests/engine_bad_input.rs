//! Bad input never corrupts state: a data directory locked by another process is refused with
//! a clear error, and a corrupt run record or journal entry is reported as `Corrupt` naming
//! its key while the engine still opens, every other run is served as it was, and the corrupt
//! bytes themselves are left exactly as they were (for an operator to inspect).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use keel::{Engine, EngineError, Event, JournalIndex, RunHistory, RunId, RunStatus};
use keel_engine::test_utilities::raw;
use keel_testkit::crash::{is_child, ChildSpec, Ending};
use keel_testkit::effects::{self, Action};
use keel_testkit::flows::{EffectFlow, EffectFlowInput, EffectStep};
use keel_testkit::poll::{until, CONDITION_TIMEOUT};

/// Not valid JSON, nor valid UTF-8.
const GARBAGE: &[u8] = b"\xff\xfe{\"not\": json";

/// Every key and value of runs in the store's default tree: run records, journals and
/// statistics. Left out: the load count `l<run id>` that driving a healthy run writes and
/// clears (`store/sled/mod.rs`; the commit sequence lives in a tree of its own).
type RawSnapshot = BTreeMap<Vec<u8>, Vec<u8>>;

fn raw_snapshot(data: &Path) -> RawSnapshot {
    let db = keel_testkit::raw::open(data);
    let snapshot = db
        .iter()
        .map(|item| {
            let (k, v) = item.unwrap();
            (k.to_vec(), v.to_vec())
        })
        .filter(|(k, _)| !k.starts_with(b"l"))
        .collect();
    drop(db);
    snapshot
}

/// Overwrites `key` with [`GARBAGE`] in the closed store at `data`.
fn corrupt(data: &Path, key: &[u8]) {
    let db = keel_testkit::raw::open(data);
    let old = db.insert(key, GARBAGE).unwrap();
    assert!(old.is_some(), "corrupting a record that exists");
    db.flush().unwrap();
}

/// Runs stay loaded while they sleep (they never park), so that every open reads the
/// unfinished ones: a parked run's journal is read when it wakes, and what a damaged one does
/// then is in `engine_park.rs`.
async fn open(data: &Path) -> Engine {
    keel_testkit::open_engine(|| {
        Engine::builder(data)
            .park_after(None)
            .workflow::<EffectFlow>()
            .step::<EffectStep>()
    })
    .await
}

/// Runs `id` to its end on the store at `data`, closes the engine and returns the run's
/// history.
async fn finished_run(data: &Path, id: &str, input: EffectFlowInput) -> RunHistory {
    let engine = open(data).await;
    engine
        .start::<EffectFlow>(id, input)
        .await
        .unwrap()
        .result()
        .await
        .unwrap();
    let history = engine.history(id).await.unwrap();
    engine.shutdown().await;
    history
}

/// The child of [`second_process_gets_locked_error`]: opens the data directory and expects
/// what `KEEL_EXPECT` says ("locked", or "open" once the parent let go); exits 0 if so and
/// panics otherwise.
fn locked_child() {
    let dir = std::env::var("KEEL_DATA_DIR").expect("KEEL_DATA_DIR");
    let expect = std::env::var("KEEL_EXPECT").expect("KEEL_EXPECT");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        match expect.as_str() {
            "locked" => match Engine::builder(&dir).open().await {
                Err(err @ EngineError::Locked { .. }) => {
                    let message = err.to_string();
                    assert!(
                        message.contains("locked by another process"),
                        "unclear message: {message}"
                    );
                    assert!(
                        message.contains(&dir),
                        "message names the directory: {message}"
                    );
                }
                Err(other) => panic!("expected Locked, got {other:?}"),
                Ok(_) => panic!("a second process opened a directory in use"),
            },
            "open" => {
                // The parent's store may take a few milliseconds to let go of its lock after
                // the parent dropped it (see `keel_testkit::open_engine`).
                let engine = keel_testkit::open_engine(|| Engine::builder(&dir)).await;
                let record = engine.status("before-lock").await.unwrap();
                assert_eq!(record.status, RunStatus::Completed, "{:?}", record.error);
                engine.shutdown().await;
            }
            other => panic!("unknown expectation {other:?}"),
        }
    });
}

/// A second process opening a data directory held by a running engine gets
/// `EngineError::Locked` saying "locked by another process"; the holder goes on working
/// undisturbed, and once it shuts down another process can open the directory and finds the
/// data intact.
#[test]
fn second_process_gets_locked_error() {
    const NAME: &str = "second_process_gets_locked_error";
    if is_child() {
        return locked_child();
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log = dir.path().join("effects.jsonl");
    let runtime = keel_testkit::crash::runtime();
    let engine = runtime.block_on(open(&data));
    let input = EffectFlowInput {
        steps: 2,
        fail_at: None,
        sleep_ms: 1,
        log: log.to_string_lossy().into_owned(),
    };
    let output = runtime.block_on(async {
        engine
            .start::<EffectFlow>("before-lock", input.clone())
            .await
            .unwrap()
            .result()
            .await
            .unwrap()
    });
    let spec = ChildSpec {
        test_name: NAME,
        env: vec![("KEEL_DATA_DIR".into(), data.to_string_lossy().into_owned())],
    };
    assert_eq!(
        spec.run(&[("KEEL_EXPECT", "locked".into())], CONDITION_TIMEOUT),
        Ending::Finished
    );
    // The holder is undisturbed: it still reads and writes.
    let after = runtime.block_on(async {
        assert_eq!(
            engine.status("before-lock").await.unwrap().output,
            Some(serde_json::json!(output))
        );
        engine
            .start::<EffectFlow>("after-lock", input.clone())
            .await
            .unwrap()
            .result()
            .await
            .unwrap()
    });
    assert_eq!(after, output);
    runtime.block_on(engine.shutdown());
    drop(engine);
    drop(runtime);
    assert_eq!(
        spec.run(&[("KEEL_EXPECT", "open".into())], CONDITION_TIMEOUT),
        Ending::Finished,
        "the lock is released at shutdown"
    );
}

/// Two completed runs and one asleep on a one-hour durable timer, in a closed store.
struct Store {
    _dir: tempfile::TempDir,
    data: PathBuf,
    log: PathBuf,
}

const DONE_1: &str = "done-1";
const DONE_2: &str = "done-2";
const ASLEEP: &str = "asleep";

fn input(log: &Path, sleep_ms: u64) -> EffectFlowInput {
    EffectFlowInput {
        steps: 2,
        fail_at: None,
        sleep_ms,
        log: log.to_string_lossy().into_owned(),
    }
}

async fn three_runs() -> Store {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log = dir.path().join("effects.jsonl");
    let engine = open(&data).await;
    for id in [DONE_1, DONE_2] {
        engine
            .start::<EffectFlow>(id, input(&log, 1))
            .await
            .unwrap()
            .result()
            .await
            .unwrap();
    }
    // Step 0, then a one-hour sleep before step 1.
    engine
        .start::<EffectFlow>(ASLEEP, input(&log, 3_600_000))
        .await
        .unwrap();
    until(&engine, ASLEEP, |h| {
        h.entries
            .iter()
            .any(|e| matches!(e.event, Event::TimerSet { .. }))
    })
    .await;
    engine.shutdown().await;
    drop(engine);
    Store {
        _dir: dir,
        data,
        log,
    }
}

fn dos(log: &Path) -> usize {
    effects::read(log)
        .iter()
        .filter(|e| e.action == Action::Do)
        .count()
}

fn id(id: &str) -> RunId {
    RunId::new(id).unwrap()
}

/// The histories of `ids`, in order.
async fn histories(engine: &Engine, ids: &[&str]) -> Vec<RunHistory> {
    let mut histories = Vec::new();
    for id in ids {
        histories.push(engine.history(id).await.unwrap());
    }
    histories
}

async fn listed(engine: &Engine) -> Vec<String> {
    let mut ids: Vec<String> = engine
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id.to_string())
        .collect();
    ids.sort();
    ids
}

/// A completed run's record overwritten with garbage: the engine opens; `status` of that run
/// is `Corrupt` naming its key; a start or cancel of it is refused the same way; `list` and
/// the healthy runs (finished and asleep) are served unchanged; and afterwards every byte in
/// the store, the garbage included, is exactly as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_run_record_is_reported_and_left_alone() {
    let store = three_runs().await;
    let key = raw::run_key_of(&id(DONE_2));
    let healthy: Vec<RunHistory> = {
        let engine = open(&store.data).await;
        let histories = histories(&engine, &[DONE_1, ASLEEP]).await;
        engine.shutdown().await;
        histories
    };
    corrupt(&store.data, &key);
    let before = raw_snapshot(&store.data);
    assert_eq!(before.get(&key).map(Vec::as_slice), Some(GARBAGE));
    let dos_before = dos(&store.log);

    let engine = open(&store.data).await;
    let err = engine.status(DONE_2).await.unwrap_err();
    match &err {
        EngineError::Corrupt { key, detail } => {
            assert_eq!(key, "rdone-2", "the readable key");
            assert!(detail.starts_with("run record:"), "{detail}");
        }
        other => panic!("expected Corrupt, got {other}"),
    }
    assert!(err.to_string().contains("done-2"), "{err}");
    let err = engine.history(DONE_2).await.unwrap_err();
    assert!(matches!(err, EngineError::Corrupt { .. }), "{err}");
    let err = engine
        .start::<EffectFlow>(DONE_2, input(&store.log, 1))
        .await
        .expect_err("starting over a corrupt record must fail");
    assert!(matches!(err, EngineError::Corrupt { .. }), "{err}");
    let err = engine.cancel(DONE_2).await.unwrap_err();
    assert!(matches!(err, EngineError::Corrupt { .. }), "{err}");

    assert_eq!(listed(&engine).await, vec![ASLEEP, DONE_1]);
    for history in &healthy {
        assert_eq!(
            &engine.history(history.run.id.as_str()).await.unwrap(),
            history,
            "run {} changed",
            history.run.id
        );
    }
    assert_eq!(
        engine.status(ASLEEP).await.unwrap().status,
        RunStatus::Running,
        "the healthy unfinished run sleeps on"
    );
    assert_eq!(engine.collect_garbage().await.unwrap(), 0);
    engine.shutdown().await;
    drop(engine);

    assert_eq!(dos(&store.log), dos_before, "nothing ran");
    assert_eq!(
        raw_snapshot(&store.data),
        before,
        "every record, the garbage included, is as it was"
    );
}

/// What [`corrupt_journal_of_unfinished_run`] saw of the damaged run.
struct Damaged {
    /// `history` of the damaged run.
    history: keel::Result<RunHistory>,
    /// The raw key of the damaged entry.
    key: Vec<u8>,
    /// The whole store after the engine closed.
    after: RawSnapshot,
}

/// Damages the unfinished run's journal with `damage` (given the open raw store and the key of
/// its entry 1), then checks everything that must hold whatever the damage: the engine opens
/// and does not drive that run (its record still reads, Running, and `wait` says at once that
/// nobody drives it, instead of sleeping out its hour); a cancel or a start of it is refused as Corrupt;
/// the other runs are listed and served unchanged; nothing runs; and afterwards every byte in
/// the store is exactly as the damage left it.
async fn corrupt_journal_of_unfinished_run(damage: impl FnOnce(&sled::Db, &[u8])) -> Damaged {
    let store = three_runs().await;
    let healthy: Vec<RunHistory> = {
        let engine = open(&store.data).await;
        let histories = histories(&engine, &[DONE_1, DONE_2]).await;
        let asleep = engine.history(ASLEEP).await.unwrap();
        // Step 0 started and completed, then the timer was set.
        assert_eq!(asleep.entries.len(), 3, "{asleep:?}");
        engine.shutdown().await;
        histories
    };
    let key = raw::journal_key_of(&id(ASLEEP), JournalIndex(1));
    {
        let db = keel_testkit::raw::open(&store.data);
        damage(&db, &key);
        db.flush().unwrap();
    }
    let before = raw_snapshot(&store.data);
    let dos_before = dos(&store.log);

    let engine = open(&store.data).await;
    let history = engine.history(ASLEEP).await;
    let record = engine.status(ASLEEP).await.unwrap();
    assert_eq!(record.status, RunStatus::Running, "its record is intact");
    // A waiter of a run that is not being driven hears why at once; a driven one would be
    // awaited for an hour.
    let waited = tokio::time::timeout(CONDITION_TIMEOUT, engine.wait(ASLEEP))
        .await
        .expect("the run with a corrupt journal is not being driven");
    match waited {
        Err(EngineError::RunStopped { reason, .. }) => {
            assert!(reason.contains("journal"), "{reason}")
        }
        other => panic!("expected RunStopped, got {other:?}"),
    }
    let err = engine.cancel(ASLEEP).await.unwrap_err();
    match &err {
        EngineError::Corrupt { key, .. } => assert!(key.contains("asleep"), "{key:?}"),
        other => panic!("expected Corrupt, got {other}"),
    }
    let err = engine
        .start::<EffectFlow>(ASLEEP, input(&store.log, 3_600_000))
        .await
        .expect_err("starting a run whose journal is corrupt must fail");
    assert!(matches!(err, EngineError::Corrupt { .. }), "{err}");

    assert_eq!(listed(&engine).await, vec![ASLEEP, DONE_1, DONE_2]);
    for history in &healthy {
        assert_eq!(
            &engine.history(history.run.id.as_str()).await.unwrap(),
            history,
            "run {} changed",
            history.run.id
        );
    }
    assert_eq!(engine.collect_garbage().await.unwrap(), 0);
    engine.shutdown().await;
    drop(engine);

    assert_eq!(dos(&store.log), dos_before, "nothing ran");
    let after = raw_snapshot(&store.data);
    assert_eq!(after, before, "every record is as the damage left it");
    Damaged {
        history,
        key,
        after,
    }
}

/// The unfinished run's journal entry overwritten with garbage bytes: besides the common
/// checks, its `history` is `Corrupt` naming the entry's key, and the garbage stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_journal_entry_is_reported_and_left_alone() {
    let damaged = corrupt_journal_of_unfinished_run(|db, key| {
        db.insert(key, GARBAGE).unwrap().expect("entry 1 exists");
    })
    .await;
    match damaged.history {
        Err(EngineError::Corrupt { key, detail }) => {
            assert!(
                key.starts_with("jasleep/"),
                "the readable key names the run's journal: {key:?}"
            );
            assert!(detail.starts_with("journal entry:"), "{detail}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert_eq!(
        damaged.after.get(&damaged.key).map(Vec::as_slice),
        Some(GARBAGE),
        "the garbage is still there, byte for byte"
    );
}

/// The unfinished run's journal entry replaced by well-formed JSON that breaks the step state
/// machine (the outcome of a step that never started): the run is not taken up, and the
/// common checks hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journal_entry_breaking_the_state_machine_is_left_alone() {
    corrupt_journal_of_unfinished_run(|db, key| {
        let entry = keel::Entry {
            at_ms: 1,
            event: Event::StepCompleted {
                step: keel::OperationIndex(5),
                attempt: keel::Attempt(1),
                output: serde_json::json!(0),
            },
        };
        db.insert(key, serde_json::to_vec(&entry).unwrap())
            .unwrap()
            .expect("entry 1 exists");
    })
    .await;
}

/// The unfinished run's journal missing an entry before others: `history` is `Corrupt`
/// naming the gap, the run is not taken up, and the common checks hold. (Its first entry is
/// removed: the step's completion and the timer after it share the value at index 1, so
/// removing that one would leave a shorter journal, as a crash may, not a gap.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journal_with_a_gap_is_reported_and_left_alone() {
    let damaged = corrupt_journal_of_unfinished_run(|db, _| {
        let first = raw::journal_key_of(&id(ASLEEP), JournalIndex(0));
        db.remove(first).unwrap().expect("entry 0 exists");
    })
    .await;
    match damaged.history {
        Err(EngineError::Corrupt { key, detail }) => {
            assert!(key.starts_with("jasleep/"), "{key:?}");
            assert!(detail.contains("gap"), "{detail}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

/// An engine shut down and dropped releases its data directory: opening the directory again
/// in the same process, right away, succeeds instead of reporting it "locked by another
/// process". Tried 60 times on each of 6 threads at once, since the lock outlives the drop
/// only now and then, when sled's background threads are busy.
#[test]
fn reopen_in_the_same_process_is_not_refused_as_locked() {
    const THREADS: usize = 6;
    const CYCLES: usize = 60;
    let workers: Vec<_> = (0..THREADS)
        .map(|_| {
            std::thread::spawn(|| {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                let mut refused = Vec::new();
                for _ in 0..CYCLES {
                    let dir = tempfile::tempdir().unwrap();
                    let data = dir.path().join("data");
                    let log = dir.path().join("effects.jsonl");
                    runtime.block_on(async {
                        let engine = Engine::builder(&data)
                            .workflow::<EffectFlow>()
                            .step::<EffectStep>()
                            .open()
                            .await
                            .unwrap();
                        // Some writes, as a real session makes before it shuts down.
                        engine
                            .start::<EffectFlow>("run", input(&log, 1))
                            .await
                            .unwrap()
                            .result()
                            .await
                            .unwrap();
                        engine.shutdown().await;
                        drop(engine);
                        match Engine::builder(&data).open().await {
                            Ok(engine) => engine.shutdown().await,
                            Err(err) => refused.push(err.to_string()),
                        }
                    });
                }
                refused
            })
        })
        .collect();
    let refused: Vec<String> = workers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    assert!(
        refused.is_empty(),
        "{} of {} reopens were refused, the first with: {}",
        refused.len(),
        THREADS * CYCLES,
        refused.first().map(String::as_str).unwrap_or("")
    );
}

/// A snapshot that sled was writing when the process died (`snap.<lsn>.generating`, torn) makes
/// plain sled 0.34 refuse the store with `Corruption` on every later open; the engine removes
/// that torn file, opens from the last committed snapshot and the log, and every run is as it
/// was. A `.generating` file that is whole is left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torn_sled_snapshot_left_by_a_crash_does_not_lose_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log = dir.path().join("effects.jsonl");
    let input = EffectFlowInput {
        steps: 3,
        fail_at: None,
        sleep_ms: 1,
        log: log.to_string_lossy().into_owned(),
    };
    let before = finished_run(&data, "kept", input).await;
    // What a SIGKILL in the middle of sled's snapshot write leaves: a truncated file under the
    // temporary name, sorting after every committed snapshot.
    let torn = data.join("snap.FFFFFFFFFFFFFFFF.generating");
    std::fs::write(&torn, b"half a snapshot").unwrap();
    let whole = std::fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("snap.")
                && p != &torn
        });
    let whole_copy = whole.as_ref().map(|p| {
        let copy = PathBuf::from(format!("{}.generating", p.display()));
        std::fs::copy(p, &copy).unwrap();
        copy
    });
    let refused = keel_testkit::raw::try_open(&data);
    assert!(
        matches!(refused, Err(sled::Error::Corruption { .. })),
        "plain sled must refuse the store: {refused:?}"
    );
    let engine = open(&data).await;
    assert_eq!(engine.history("kept").await.unwrap(), before);
    assert!(!torn.exists(), "the torn snapshot is removed");
    if let Some(copy) = whole_copy {
        assert!(copy.exists(), "a whole .generating snapshot is left alone");
    }
    engine.shutdown().await;
}

/// The settings sled 0.34.7 writes to `conf` at a store's first open, without the CRC-32 that
/// its second write appends: what a process killed between the two writes leaves.
const TORN_CONFIG: &[u8] = b"segment_size: 524288\nuse_compression: false\nversion: 0.34\n";

/// A process killed while sled first writes its configuration file leaves the settings without
/// their CRC, and plain sled 0.34 refuses every later open of the store with `Corruption` (CI
/// met it in `crash_at_random_moments`). Such a store holds nothing yet: the engine removes
/// the torn file, opens, and runs. A torn configuration beside a log that holds data did not
/// come from a crash: the engine refuses it as damaged, naming the file, and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torn_sled_config_left_by_a_crash_at_first_open() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("effects.jsonl");
    let input = EffectFlowInput {
        steps: 2,
        fail_at: None,
        sleep_ms: 1,
        log: log.to_string_lossy().into_owned(),
    };

    // What sled's first open leaves when killed between its two writes: `blobs/`, and
    // `conf` without its CRC; no log yet.
    let fresh = dir.path().join("fresh");
    std::fs::create_dir_all(fresh.join("blobs")).unwrap();
    std::fs::write(fresh.join("conf"), TORN_CONFIG).unwrap();
    let refused = keel_testkit::raw::try_open(&fresh);
    assert!(
        matches!(refused, Err(sled::Error::Corruption { .. })),
        "plain sled must refuse the store: {refused:?}"
    );
    drop(refused);
    std::fs::write(fresh.join("conf"), TORN_CONFIG).unwrap();
    finished_run(&fresh, "after-the-torn-config", input.clone()).await;
    let conf = std::fs::read(fresh.join("conf")).unwrap();
    assert_ne!(conf, TORN_CONFIG, "sled wrote its configuration again");

    let kept = dir.path().join("kept");
    finished_run(&kept, "kept", input).await;
    std::fs::write(kept.join("conf"), TORN_CONFIG).unwrap();
    let db_before = std::fs::read(kept.join("db")).unwrap();
    let opened = Engine::builder(&kept)
        .workflow::<EffectFlow>()
        .step::<EffectStep>()
        .open()
        .await;
    match opened {
        Err(EngineError::StoreDamaged { file, detail, .. }) => {
            assert!(file.ends_with("conf"), "{file:?}: {detail}");
        }
        other => panic!("a torn configuration beside data must be refused: {other:?}"),
    }
    assert_eq!(std::fs::read(kept.join("conf")).unwrap(), TORN_CONFIG);
    assert_eq!(std::fs::read(kept.join("db")).unwrap(), db_before);
}
