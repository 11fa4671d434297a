//! Deletes (a purge, garbage collection) against what may meet the runs they delete: a rerun
//! loading its run to note itself there, a rerun whose run goes while it starts, a run
//! started again under an id a collection had found expired. Each runs in a child process
//! whose threads are held at named points (`KEEL_PAUSE_AT`, `keel_engine::crash`), as threads
//! the system leaves unscheduled there would be, or killed at one (`KEEL_CRASH_AT`).

use std::path::Path;
use std::time::Duration;

use keel::testing::TestClock;
use keel::{
    Batch, BatchAction, BatchReport, Ctx, Engine, EngineError, Event, Rerun, Resident, RunFilter,
    RunRecord, RunStatus, Workflow, WorkflowError,
};
use keel_testkit::crash::{is_child, path_env, ChildSpec, Ending};
use keel_testkit::poll::{answered, recorded, resident, CONDITION_TIMEOUT};

/// Fails at once: a run that is finished as soon as it starts.
struct Quick;

impl Workflow for Quick {
    const NAME: &'static str = "test.quick-failure";
    type Input = ();
    type Output = ();

    async fn run(_: &mut Ctx, (): ()) -> Result<(), WorkflowError> {
        Err(WorkflowError::failed("as it should"))
    }
}

/// Waits for an event named `go`, then completes: a run that stays running until told.
struct Waiting;

impl Workflow for Waiting {
    const NAME: &'static str = "test.waiting";
    type Input = ();
    type Output = ();

    async fn run(ctx: &mut Ctx, (): ()) -> Result<(), WorkflowError> {
        ctx.receive::<()>("go").await
    }
}

/// How long finished runs are kept.
const RETENTION: Duration = Duration::from_secs(3600);

/// How long a thread is held at a pause point: long enough for the other thread's whole
/// purge or start, well within a test's patience.
const PAUSE_MS: u64 = 3_000;

async fn open(clock: &TestClock) -> Engine {
    let dir = std::env::var("KEEL_DATA_DIR").expect("KEEL_DATA_DIR");
    keel_testkit::store::builder(Path::new(&dir))
        .clock(clock.clone())
        .workflow::<Quick>()
        .workflow::<Waiting>()
        .retention(RETENTION)
        // Only the pass at the open, before any run expired: the tests collect by hand.
        .gc_interval(Duration::from_secs(24 * 3600))
        .open()
        .await
        .expect("opening the engine")
}

/// Starts `id` (a [`Quick`] run) and returns once it failed, as it does at once, and left
/// the engine's memory (a settled run's cell leaves soon after its end).
async fn finished(engine: &Engine, id: &str) {
    let _ = engine.start::<Quick>(id, ()).await.expect("starting");
    let record = answered("wait", engine.wait(id)).await.expect("waiting");
    assert_eq!(record.status, RunStatus::Failed);
    resident(engine, Resident::default()).await;
}

/// A rerun of run `old` as `new`, on a task of its own.
fn rerun_as_new(engine: &Engine) -> tokio::task::JoinHandle<Result<RunRecord, EngineError>> {
    let engine = engine.clone();
    tokio::spawn(async move {
        let rerun = Rerun {
            as_id: Some("new".into()),
            input: None,
        };
        engine.rerun("old", &rerun).await
    })
}

/// A purge of run `id` (and of nothing else: no other id starts with it here), of runs
/// finished by the clock's now.
async fn purge(engine: &Engine, clock: &TestClock, id: &str) -> BatchReport {
    let batch = Batch {
        action: BatchAction::Purge,
        filter: RunFilter {
            id_prefix: Some(id.into()),
            finished_before_ms: Some(clock.now_ms() + 1),
            ..RunFilter::default()
        },
        dry_run: false,
        after: None,
        limit: 10,
    };
    answered("purge", engine.batch(&batch))
        .await
        .expect("a purge")
}

/// Gives the other thread time to reach its point, where it is then held for [`PAUSE_MS`].
/// A sleep of this thread (the test's, which no task but its own runs on), not of the
/// runtime's timer: tokio drives its timers from a parked worker, and a worker held at a
/// point may be the one that would have, so that the timer waits out the hold and the race
/// is missed (seen on PostgreSQL, where the held worker had last waited on the database).
fn held_meanwhile() {
    std::thread::sleep(Duration::from_millis(600));
}

/// Runs test `name`'s child with `env` set, and asserts that it finished its checks.
fn run_child(name: &str, env: &[(&str, String)]) -> Ending {
    let dir = tempfile::tempdir().unwrap();
    let spec = ChildSpec {
        test_name: name,
        env: vec![("KEEL_DATA_DIR".into(), path_env(dir.path(), "data"))],
    };
    spec.run(env, CONDITION_TIMEOUT * 2)
}

fn paused_at(point: &str) -> Vec<(&'static str, String)> {
    vec![
        ("KEEL_PAUSE_AT", point.to_string()),
        ("KEEL_PAUSE_MS", PAUSE_MS.to_string()),
    ]
}

/// A rerun loads its run to note itself in the run's journal; its load is held after it read
/// the run and before the run's cell is in the engine's map (`wake.after_index`), and a purge
/// of the run comes meanwhile.
fn rerun_loading_during_a_purge_child() {
    keel_testkit::crash::runtime().block_on(async {
        let clock = TestClock::new();
        let engine = open(&clock).await;
        finished(&engine, "old").await;
        let rerunning = rerun_as_new(&engine);
        // The new run is durable before the rerun loads the old one; its load is then held.
        recorded(&engine, "new").await;
        held_meanwhile();
        let purging = std::time::Instant::now();
        let report = purge(&engine, &clock, "old").await;
        // It waited for the held load: the race was met, not missed. (On PostgreSQL it did
        // not, before the store's tasks had a thread of their own: the load's last request
        // before its point woke the store's writer onto the held thread, and every query
        // waited out the hold.)
        assert!(
            purging.elapsed() >= Duration::from_millis(PAUSE_MS / 2),
            "the purge did not wait for the rerun's load ({:?}): {report:?}",
            purging.elapsed()
        );
        let rerun = answered("rerun", rerunning).await.unwrap();
        assert_eq!(rerun.expect("the rerun").id.as_str(), "new");
        match engine.history("old").await {
            // The purge found the run loaded and left it: its journal names the rerun.
            Ok(history) => {
                assert_eq!(report.skipped, 1, "{report:?}");
                assert!(
                    history.entries.iter().any(
                        |e| matches!(&e.event, Event::RerunStarted { run } if run.as_str() == "new")
                    ),
                    "{:?}",
                    history.entries
                );
            }
            // The purge deleted the run, and with it every key of its journal: a new run of
            // the same id has a journal of its own entries alone.
            Err(EngineError::RunNotFound { .. }) => {
                assert_eq!(report.done, 1, "{report:?}");
                finished(&engine, "old").await;
                let history = engine
                    .history("old")
                    .await
                    .expect("a new run under a purged id has a readable journal");
                assert!(
                    !history
                        .entries
                        .iter()
                        .any(|e| matches!(e.event, Event::RerunStarted { .. })),
                    "the purged run's rerun note outlived it: {:?}",
                    history.entries
                );
            }
            Err(other) => panic!("the run's journal after the purge: {other}"),
        }
        engine.shutdown().await;
    });
}

/// A purge that comes while a rerun of the run is loading it leaves no journal key of the
/// run behind: either it finds the run loaded and skips it, or it deletes it after the
/// rerun's note, note included. (Before, the purge deleted the run under the load, which
/// then wrote the note into the journal of a run that no longer existed: a key no record
/// owned, read as a gap by the next run of that id.)
#[test]
fn a_purge_during_a_reruns_load_leaves_no_journal_behind() {
    const NAME: &str = "a_purge_during_a_reruns_load_leaves_no_journal_behind";
    if is_child() {
        return rerun_loading_during_a_purge_child();
    }
    let ending = run_child(NAME, &paused_at("wake.after_index"));
    assert_eq!(ending, Ending::Finished);
}

/// A rerun is held after its new run became durable (`start.after_sync`), and a purge deletes
/// the run rerun meanwhile.
fn rerun_whose_run_is_purged_child() {
    keel_testkit::crash::runtime().block_on(async {
        let clock = TestClock::new();
        let engine = open(&clock).await;
        finished(&engine, "old").await;
        let rerunning = rerun_as_new(&engine);
        recorded(&engine, "new").await;
        let report = purge(&engine, &clock, "old").await;
        assert_eq!(report.done, 1, "{report:?}");
        let rerun = answered("rerun", rerunning).await.unwrap();
        let rerun = rerun.expect("a rerun whose new run started is answered with it");
        assert_eq!(rerun.id.as_str(), "new");
        assert_eq!(rerun.rerun_of.as_ref().map(|id| id.as_str()), Some("old"));
        let new = answered("wait", engine.wait("new")).await.unwrap();
        assert_eq!(new.status, RunStatus::Failed, "the new run was driven");
        assert!(matches!(
            engine.status("old").await,
            Err(EngineError::RunNotFound { .. })
        ));
        engine.shutdown().await;
    });
}

/// A rerun whose run is deleted after the new run started answers with the new run, which is
/// durable and driven. (Before, it answered `RunNotFound` for the run rerun: the caller was
/// told the rerun failed while its run ran, and a repeated call could not find it either.)
#[test]
fn a_rerun_whose_run_is_purged_meanwhile_answers_with_its_new_run() {
    const NAME: &str = "a_rerun_whose_run_is_purged_meanwhile_answers_with_its_new_run";
    if is_child() {
        return rerun_whose_run_is_purged_child();
    }
    let ending = run_child(NAME, &paused_at("start.after_sync"));
    assert_eq!(ending, Ending::Finished);
}

/// Garbage collection is held between its scan and its delete (`gc.before_delete`); meanwhile
/// the run it found expired is purged and a new run is started under its id.
fn collection_of_an_id_started_again_child() {
    keel_testkit::crash::runtime().block_on(async {
        let clock = TestClock::new();
        let engine = open(&clock).await;
        finished(&engine, "old").await;
        clock.advance(RETENTION * 2);
        let collecting = {
            let engine = engine.clone();
            tokio::spawn(async move {
                let began = std::time::Instant::now();
                (engine.collect_garbage().await, began.elapsed())
            })
        };
        // The collection's scan takes a moment; then its thread is held.
        held_meanwhile();
        let report = purge(&engine, &clock, "old").await;
        assert_eq!(report.done, 1, "{report:?}");
        finished(&engine, "old").await;
        let (collected, took) = answered("collection", collecting).await.unwrap();
        // Held at its point, which it meets only when its scan found the first run expired:
        // the scan came before the purge.
        assert!(
            took >= Duration::from_millis(PAUSE_MS),
            "the collection was never held ({took:?})"
        );
        assert_eq!(
            collected.expect("a collection"),
            0,
            "the run it found expired was gone, and the new one is not expired"
        );
        let history = engine
            .history("old")
            .await
            .expect("the new run under the collected id is kept");
        assert_eq!(history.run.status, RunStatus::Failed);
        assert_eq!(history.run.created_at_ms, clock.now_ms());
        engine.shutdown().await;
    });
}

/// A run started again under an id that garbage collection found expired is kept: the
/// collection judges each run again as stored when it deletes. (Before, it deleted by the
/// ids its scan found, and so the new run, just started.)
#[test]
fn garbage_collection_keeps_a_run_started_again_under_an_expired_id() {
    const NAME: &str = "garbage_collection_keeps_a_run_started_again_under_an_expired_id";
    if is_child() {
        return collection_of_an_id_started_again_child();
    }
    let ending = run_child(NAME, &paused_at("gc.before_delete"));
    assert_eq!(ending, Ending::Finished);
}

/// A batch of `action` on run `old` (the only run whose id begins so), on a task of its own,
/// answering with its report and how long it took.
fn batch_on_old(
    engine: &Engine,
    action: BatchAction,
) -> tokio::task::JoinHandle<(Result<BatchReport, EngineError>, Duration)> {
    let engine = engine.clone();
    let batch = Batch {
        action,
        filter: RunFilter {
            id_prefix: Some("old".into()),
            ..RunFilter::default()
        },
        dry_run: false,
        after: None,
        limit: 10,
    };
    tokio::spawn(async move {
        let began = std::time::Instant::now();
        (engine.batch(&batch).await, began.elapsed())
    })
}

/// Asserts that the batch was held at its point, and skipped the one run it matched as no
/// longer existing (the run its scan read was deleted, and another started under its id).
async fn skipped_as_gone(
    batching: tokio::task::JoinHandle<(Result<BatchReport, EngineError>, Duration)>,
) {
    let (report, took) = answered("batch", batching).await.unwrap();
    assert!(
        took >= Duration::from_millis(PAUSE_MS),
        "the batch was never held ({took:?})"
    );
    let report = report.expect("a batch");
    assert_eq!(
        (report.matched, report.done, report.skipped),
        (1, 0, 1),
        "{report:?}"
    );
    let reason = report.runs[0].reason.as_deref().unwrap_or_default();
    assert_eq!(reason, "no longer exists", "the run the batch read");
}

/// A rerun batch is held before its action on the run its scan read, after it checked the
/// run as stored (`batch.before_action`); meanwhile garbage collection deletes the run and a
/// new run is started under its id.
fn batch_on_an_id_started_again_child() {
    keel_testkit::crash::runtime().block_on(async {
        let clock = TestClock::new();
        let engine = open(&clock).await;
        finished(&engine, "old").await;
        let batching = batch_on_old(&engine, BatchAction::Rerun);
        // The batch's scan takes a moment; then its thread is held.
        held_meanwhile();
        clock.advance(RETENTION * 2);
        let collected = engine.collect_garbage().await.expect("a collection");
        assert_eq!(collected, 1, "the run the batch read");
        finished(&engine, "old").await;
        skipped_as_gone(batching).await;
        // Nothing was rerun: the new run under the id is the only run.
        let counts = engine.run_counts().await.expect("the counts");
        assert_eq!(counts.values().sum::<u64>(), 1, "{counts:?}");
        let history = engine.history("old").await.expect("the new run");
        assert_eq!(history.run.created_at_ms, clock.now_ms());
        engine.shutdown().await;
    });
}

/// A batch acts only on the run its scan read: one deleted and started again under the same
/// id after the batch checked it is skipped (the run it read no longer exists), not acted
/// on. (Before, the check was a read ahead of the action: the new run was rerun.)
#[test]
fn a_batch_skips_a_run_started_again_since_its_scan() {
    const NAME: &str = "a_batch_skips_a_run_started_again_since_its_scan";
    if is_child() {
        return batch_on_an_id_started_again_child();
    }
    let ending = run_child(NAME, &paused_at("batch.before_action"));
    assert_eq!(ending, Ending::Finished);
}

/// A cancel batch is held on the running run its scan read, after it checked the run as
/// stored, at the point the test names (before its action, `batch.before_action`, or in the
/// action before its load, `operator.before_load`); meanwhile the run completes, garbage
/// collection deletes it, and a new run is started under its id.
fn cancel_batch_on_an_id_started_again_child() {
    keel_testkit::crash::runtime().block_on(async {
        let clock = TestClock::new();
        let engine = open(&clock).await;
        let _ = engine.start::<Waiting>("old", ()).await.expect("starting");
        let batching = batch_on_old(&engine, BatchAction::Cancel);
        held_meanwhile();
        engine
            .send("old", "go", &(), "go-1")
            .await
            .expect("sending");
        let ended = answered("wait", engine.wait("old")).await.expect("waiting");
        assert_eq!(ended.status, RunStatus::Completed);
        resident(&engine, Resident::default()).await;
        clock.advance(RETENTION * 2);
        let collected = engine.collect_garbage().await.expect("a collection");
        assert_eq!(collected, 1, "the run the batch read");
        let _ = engine
            .start::<Waiting>("old", ())
            .await
            .expect("starting again");
        assert!(
            !batching.is_finished(),
            "the batch was held while its run ended, was collected and started again"
        );
        skipped_as_gone(batching).await;
        // The new run is not cancelled: it runs on, and completes when told.
        let history = engine.history("old").await.expect("the new run");
        assert_eq!(history.run.created_at_ms, clock.now_ms());
        assert!(
            !history
                .entries
                .iter()
                .any(|entry| matches!(entry.event, Event::CancelRequested)),
            "{history:?}"
        );
        engine
            .send("old", "go", &(), "go-2")
            .await
            .expect("sending");
        let ended = answered("wait", engine.wait("old")).await.expect("waiting");
        assert_eq!(ended.status, RunStatus::Completed);
        engine.shutdown().await;
    });
}

/// A cancel batch cancels only the run its scan read: one that ended, was deleted and was
/// started again under the same id after the batch checked it is skipped, and runs on.
/// (Before, the check was a read ahead of the action: the new run was cancelled.)
#[test]
fn a_cancel_batch_leaves_a_run_started_again_since_its_check() {
    const NAME: &str = "a_cancel_batch_leaves_a_run_started_again_since_its_check";
    if is_child() {
        return cancel_batch_on_an_id_started_again_child();
    }
    let ending = run_child(NAME, &paused_at("batch.before_action"));
    assert_eq!(ending, Ending::Finished);
}

/// A cancel batch cancels only the run its scan read, also when that run is deleted and
/// another started under its id after the call's check of the run as stored, before its load
/// (`operator.before_load`): the loaded run's creation time is checked too, and it is skipped.
/// (Seen cancelling the new run with that check removed.)
#[test]
fn a_cancel_batch_leaves_a_run_started_again_before_its_load() {
    const NAME: &str = "a_cancel_batch_leaves_a_run_started_again_before_its_load";
    if is_child() {
        return cancel_batch_on_an_id_started_again_child();
    }
    let ending = run_child(NAME, &paused_at("operator.before_load"));
    assert_eq!(ending, Ending::Finished);
}

/// A rerun of run `old` is held between its check of the run as stored and the load that
/// notes the rerun in its journal (`operator.before_load`, after the new run started);
/// meanwhile garbage collection deletes `old` and a new run is started under its id.
fn rerun_noting_in_an_id_started_again_child() {
    keel_testkit::crash::runtime().block_on(async {
        let clock = TestClock::new();
        let engine = open(&clock).await;
        finished(&engine, "old").await;
        let rerunning = rerun_as_new(&engine);
        recorded(&engine, "new").await;
        held_meanwhile();
        clock.advance(RETENTION * 2);
        // The new run may be collected too (it failed at once, as `old` did).
        engine.collect_garbage().await.expect("a collection");
        assert!(
            matches!(
                engine.history("old").await,
                Err(EngineError::RunNotFound { .. })
            ),
            "the run rerun was collected"
        );
        let _ = engine
            .start::<Quick>("old", ())
            .await
            .expect("starting again");
        assert!(
            !rerunning.is_finished(),
            "the rerun was held while its run was collected and started again"
        );
        let started_again = clock.now_ms();
        let rerun = answered("rerun", rerunning).await.unwrap();
        assert_eq!(rerun.expect("the rerun").id.as_str(), "new");
        let history = engine.history("old").await.expect("the new run");
        assert_eq!(history.run.created_at_ms, started_again);
        assert!(
            !history
                .entries
                .iter()
                .any(|e| matches!(e.event, Event::RerunStarted { .. })),
            "the rerun noted itself in the run started again: {:?}",
            history.entries
        );
        engine.shutdown().await;
    });
}

/// A rerun notes itself only in the run it reran: when that run is deleted and another
/// started under its id between the rerun's check of it and its load, the rerun answers
/// with its new run and writes nothing into the other. (Seen noting itself in the other run
/// with the loaded run's check removed.)
#[test]
fn a_rerun_notes_nothing_in_a_run_started_again_before_its_load() {
    const NAME: &str = "a_rerun_notes_nothing_in_a_run_started_again_before_its_load";
    if is_child() {
        return rerun_noting_in_an_id_started_again_child();
    }
    let ending = run_child(NAME, &paused_at("operator.before_load"));
    assert_eq!(ending, Ending::Finished);
}

/// Runs a killed collection found expired: one atomic write's worth and some more, so that
/// it writes twice.
const KILLED_RUNS: usize = keel_engine::GC_RUNS_PER_WRITE + 44;

/// First life: finishes [`KILLED_RUNS`] runs and collects them once they expired, killed at
/// the point the parent armed. Second life: each run is whole (its record and history
/// readable) or gone; the gone ones are the first write's runs, or all of them (each write
/// atomic, in id order); the counts by status agree with the runs left; a run started again
/// under a collected id has its own journal alone; and a collection deletes the rest.
fn collection_killed_child() {
    keel_testkit::crash::runtime().block_on(async {
        let clock = TestClock::new();
        let engine = open(&clock).await;
        let ids: Vec<String> = (0..KILLED_RUNS).map(|n| format!("old-{n:04}")).collect();
        // Armed in the first life only (the runs cannot tell: the kill may have left none).
        if std::env::var("KEEL_CRASH_AT").is_ok() {
            for id in &ids {
                finished(&engine, id).await;
            }
            clock.advance(RETENTION * 2);
            let collected = engine.collect_garbage().await;
            panic!("the collection was not killed at its point: {collected:?}");
        }
        let mut gone = 0;
        for (n, id) in ids.iter().enumerate() {
            match engine.history(id).await {
                Ok(history) => {
                    assert_eq!(history.run.status, RunStatus::Failed, "{id}");
                    assert!(!history.entries.is_empty(), "{id} kept no journal");
                }
                Err(EngineError::RunNotFound { .. }) => {
                    assert_eq!(n, gone, "{id} is gone but an earlier run is not");
                    gone += 1;
                }
                Err(error) => panic!("{id}: {error}"),
            }
        }
        assert!(
            [0, keel_engine::GC_RUNS_PER_WRITE, KILLED_RUNS].contains(&gone),
            "{gone} runs gone: not a whole number of the collection's writes"
        );
        if let Ok(expected) = std::env::var("KEEL_EXPECT_GONE") {
            assert_eq!(gone.to_string(), expected, "runs gone");
        }
        let counts = engine.run_counts().await.expect("the counts");
        let left = (KILLED_RUNS - gone) as u64;
        assert_eq!(counts.get(&RunStatus::Failed).copied().unwrap_or(0), left);
        assert_eq!(counts.values().sum::<u64>(), left, "{counts:?}");
        // A run of a fresh id, and one started again under each collected id: the same
        // journal (a collected run's entries left behind would be read as the new run's).
        finished(&engine, "fresh").await;
        let fresh = engine.history("fresh").await.expect("the fresh run");
        for id in &ids[..gone] {
            finished(&engine, id).await;
            let again = engine.history(id).await.expect("the run started again");
            assert_eq!(again.entries.len(), fresh.entries.len(), "{id}");
        }
        clock.advance(RETENTION * 2);
        let collected = engine.collect_garbage().await.expect("a collection");
        assert_eq!(collected, KILLED_RUNS + 1);
        for id in ids.iter().chain(["fresh".to_string()].iter()) {
            assert!(
                matches!(
                    engine.status(id).await,
                    Err(EngineError::RunNotFound { .. })
                ),
                "{id} was not collected"
            );
        }
        let counts = engine.run_counts().await.expect("the counts");
        assert_eq!(counts.values().sum::<u64>(), 0, "{counts:?}");
        engine.shutdown().await;
    });
}

/// Garbage collection killed at each of its points (before its first write, after its first
/// and after its last, before their sync) leaves every run whole or gone, a whole write at a
/// time, and the next collection deletes the rest. Killed at once after a write, the write
/// may be lost or kept; held a second first (sled's flusher and PostgreSQL's idle commit
/// make it durable meanwhile), it is kept, and the runs it deleted are gone: the checks of
/// a partly collected store are met for certain.
#[test]
fn garbage_collection_killed_at_its_points_leaves_whole_runs_to_the_next() {
    const NAME: &str = "garbage_collection_killed_at_its_points_leaves_whole_runs_to_the_next";
    if is_child() {
        return collection_killed_child();
    }
    let per_write = keel_engine::GC_RUNS_PER_WRITE;
    // The point, the hits passed, and the runs gone when the write was held before the kill.
    let kills = [
        ("gc.before_delete", 0, None),
        ("gc.after_delete", 0, None),
        ("gc.after_delete", 1, None),
        ("gc.after_delete", 0, Some(per_write)),
        ("gc.after_delete", 1, Some(KILLED_RUNS)),
    ];
    for point in keel_engine::crash::GC_POINTS {
        assert!(kills.iter().any(|(at, ..)| at == point), "{point} untested");
    }
    for (point, skip, held) in kills {
        let dir = tempfile::tempdir().unwrap();
        let spec = ChildSpec {
            test_name: NAME,
            env: vec![("KEEL_DATA_DIR".into(), path_env(dir.path(), "data"))],
        };
        let mut armed = vec![
            ("KEEL_CRASH_AT", point.to_string()),
            ("KEEL_CRASH_SKIP", skip.to_string()),
        ];
        let mut second = Vec::new();
        if let Some(gone) = held {
            armed.push(("KEEL_PAUSE_AT", point.to_string()));
            armed.push(("KEEL_PAUSE_MS", "1000".to_string()));
            second.push(("KEEL_EXPECT_GONE", gone.to_string()));
        }
        let ending = spec.run(&armed, CONDITION_TIMEOUT * 2);
        assert_eq!(
            ending,
            Ending::Killed,
            "{point} (skip {skip}, held {held:?}) was never reached"
        );
        let ending = spec.run(&second, CONDITION_TIMEOUT * 2);
        assert_eq!(
            ending,
            Ending::Finished,
            "after {point} (skip {skip}, held {held:?})"
        );
    }
}
