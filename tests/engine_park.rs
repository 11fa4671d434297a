//! Parked runs: a run whose body waits long enough (a durable timer, a step's retry backoff;
//! receives in `engine_park_receives.rs`) is unloaded while it waits and loaded again when its time comes or an event or
//! an operator call arrives for it. Checked here: what the engine holds in memory
//! (`Engine::resident`), that waiters hear the end through any number of parks, that every
//! step's effect runs once (the ground-truth log), that attempts keep their retry times, that
//! sends, cancels and pauses reach a parked run, and that parked runs park again after a
//! restart and wake on time.

mod common;

use std::time::Duration;

use common::{count, Scratch, Undoable};
use keel::testing::TestClock;
use keel::{
    Ctx, Engine, EngineError, Event, Resident, RetryPolicy, RunStatus, Step, StepContext,
    StepError, Workflow, WorkflowError,
};
use keel_testkit::effects::{self as ground_truth, Action};
use keel_testkit::poll::{resident, CONDITION_TIMEOUT};
use keel_testkit::store::{test_store, TestStore};
use serde::{Deserialize, Serialize};

/// A step's effect, a sleep, another step's effect.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct NapInput {
    log: String,
    sleep_ms: u64,
}

struct Nap;

impl Workflow for Nap {
    const NAME: &'static str = "test.nap";
    type Input = NapInput;
    type Output = u64;

    async fn run(ctx: &mut Ctx, input: NapInput) -> Result<u64, WorkflowError> {
        let log = input.log.clone();
        ctx.step(Undoable { log: log.clone() }).await?;
        ctx.sleep(Duration::from_millis(input.sleep_ms)).await?;
        ctx.step(Undoable { log }).await?;
        Ok(input.sleep_ms)
    }
}

/// [`Nap`], counting its body's runs per run (`common::bodies`): a body runs at every load.
struct Counted;

impl Workflow for Counted {
    const NAME: &'static str = "test.counted-nap";
    type Input = NapInput;
    type Output = u64;

    async fn run(ctx: &mut Ctx, input: NapInput) -> Result<u64, WorkflowError> {
        common::bodies::ran(ctx.run_id().as_str());
        Nap::run(ctx, input).await
    }
}

/// Records each attempt; its first two fail retryably, to be retried a minute later.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Flaky {
    log: String,
}

const RETRY_AFTER: Duration = Duration::from_secs(60);

impl Step for Flaky {
    const KIND: &'static str = "test.flaky";
    const COMPENSABLE: bool = false;
    const RETRY_POLICY: RetryPolicy = RetryPolicy::DEFAULT
        .with_attempts_max(5)
        .with_backoff(Duration::from_millis(1), Duration::from_millis(1));
    type Output = u32;

    async fn execute(&self, ctx: &StepContext) -> Result<u32, StepError> {
        ground_truth::record(&self.log, Action::Do, ctx)?;
        if ctx.attempt().0 <= 2 {
            return Err(StepError::retryable("not yet").with_retry_after(RETRY_AFTER));
        }
        Ok(ctx.attempt().0)
    }
}

struct Retries;

impl Workflow for Retries {
    const NAME: &'static str = "test.retries";
    type Input = String;
    type Output = u32;

    async fn run(ctx: &mut Ctx, log: String) -> Result<u32, WorkflowError> {
        ctx.step(Flaky { log }).await
    }
}

async fn open(scratch: &Scratch, park_after: Option<Duration>) -> Engine {
    open_at(&scratch.data, &scratch.clock, park_after).await
}

async fn open_at(
    data: &std::path::Path,
    clock: &TestClock,
    park_after: Option<Duration>,
) -> Engine {
    keel_testkit::store::builder(data)
        .clock(clock.clone())
        .park_after(park_after)
        .workflow::<Nap>()
        .workflow::<Counted>()
        .workflow::<Retries>()
        .step::<Undoable>()
        .step::<Flaky>()
        .open()
        .await
        .expect("opening the engine")
}

fn parked(parked: usize) -> Resident {
    Resident { loaded: 0, parked }
}

/// Starts a [`Nap`] run `id` of an hour and waits until it is the engine's one parked run.
async fn start_parked_nap(engine: &Engine, scratch: &Scratch, id: &str) -> keel::RunHandle<Nap> {
    let input = NapInput {
        log: scratch.log.clone(),
        sleep_ms: HOUR_MS,
    };
    let handle = engine.start::<Nap>(id, input).await.unwrap();
    resident(engine, parked(1)).await;
    handle
}

/// Starts `runs` [`Counted`] runs `{prefix}-{i}` of an hour each and waits until all of them
/// are parked.
async fn start_parked_counted(engine: &Engine, scratch: &Scratch, prefix: &str, runs: usize) {
    for i in 0..runs {
        let input = NapInput {
            log: scratch.log.clone(),
            sleep_ms: HOUR_MS,
        };
        engine
            .start::<Counted>(&format!("{prefix}-{i}"), input)
            .await
            .unwrap();
    }
    resident(engine, parked(runs)).await;
}

/// A task waiting for run `id` to settle.
fn waiter(engine: &Engine, id: &str) -> tokio::task::JoinHandle<keel::Result<keel::RunRecord>> {
    let (engine, id) = (engine.clone(), id.to_string());
    tokio::spawn(async move { engine.wait(&id).await })
}

/// The effects of run `run` in the ground-truth log: (action, step, attempt).
fn effects_of(scratch: &Scratch, run: &str) -> Vec<(Action, u32, u32)> {
    ground_truth::read(std::path::Path::new(&scratch.log))
        .into_iter()
        .filter(|e| e.run == run)
        .map(|e| (e.action, e.step, e.attempt))
        .collect()
}

const HOUR_MS: u64 = 3_600_000;

/// A run sleeping an hour parks (nothing of it is loaded), a waiter from before the park and
/// one from during it both get its output when the clock reaches the wake time (not a
/// millisecond before), and each step's effect ran once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_sleep_parks_the_run_and_its_waiters_hear_the_end() {
    let scratch = Scratch::new();
    let engine = open(&scratch, Some(keel::PARK_AFTER_DEFAULT)).await;
    let input = NapInput {
        log: scratch.log.clone(),
        sleep_ms: HOUR_MS,
    };
    let started_at_ms = scratch.clock.now_ms();
    let handle = engine.start::<Nap>("nap", input).await.unwrap();
    let early = tokio::spawn(async move { handle.result().await });
    resident(&engine, parked(1)).await;
    let during = waiter(&engine, "nap");

    scratch.clock.advance_to(started_at_ms + HOUR_MS - 1);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(engine.resident(), parked(1), "not woken before its time");
    assert!(!early.is_finished() && !during.is_finished());

    scratch.clock.advance_to(started_at_ms + HOUR_MS);
    assert_eq!(early.await.unwrap().unwrap(), HOUR_MS);
    let record = during.await.unwrap().unwrap();
    assert_eq!(record.status, RunStatus::Completed, "{:?}", record.error);
    resident(&engine, Resident::default()).await;
    assert_eq!(
        effects_of(&scratch, "nap"),
        [(Action::Do, 0, 1), (Action::Do, 2, 1)],
        "each step's effect once"
    );
    let history = engine.history("nap").await.unwrap();
    assert_eq!(count(&history, |e| matches!(e, Event::TimerSet { .. })), 1);
    assert_eq!(
        count(&history, |e| matches!(e, Event::TimerFired { .. })),
        1
    );
    engine.shutdown().await;
}

/// A sleep shorter than `park_after` keeps the run loaded, as does any sleep on an engine
/// whose runs never park; both complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_sleep_or_an_engine_that_never_parks_keeps_the_run_loaded() {
    let scratch = Scratch::new();
    let engine = open(&scratch, Some(Duration::from_secs(5))).await;
    let short = NapInput {
        log: scratch.log.clone(),
        sleep_ms: 4_999,
    };
    engine.start::<Nap>("short", short).await.unwrap();
    keel_testkit::poll::asleep(&scratch.clock).await;
    assert_eq!(
        engine.resident(),
        Resident {
            loaded: 1,
            parked: 0
        }
    );
    scratch.clock.advance(Duration::from_millis(4_999));
    assert_eq!(
        engine.wait("short").await.unwrap().status,
        RunStatus::Completed
    );
    engine.shutdown().await;
    drop(engine);

    let engine = open(&scratch, None).await;
    let long = NapInput {
        log: scratch.log.clone(),
        sleep_ms: HOUR_MS,
    };
    engine.start::<Nap>("long", long).await.unwrap();
    keel_testkit::poll::asleep(&scratch.clock).await;
    assert_eq!(
        engine.resident(),
        Resident {
            loaded: 1,
            parked: 0
        }
    );
    scratch.clock.advance(Duration::from_millis(HOUR_MS));
    assert_eq!(
        engine.wait("long").await.unwrap().status,
        RunStatus::Completed
    );
    engine.shutdown().await;
}

/// A step's backoff before its next attempt parks the run; each attempt runs once, none
/// before its journaled retry time, and the third succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_backoff_parks_and_each_attempt_runs_once_at_its_time() {
    let scratch = Scratch::new();
    let engine = open(&scratch, Some(keel::PARK_AFTER_DEFAULT)).await;
    let handle = engine
        .start::<Retries>("flaky", scratch.log.clone())
        .await
        .unwrap();
    for attempt in 1..=2usize {
        // The attempt ran and failed, and the run parked for its backoff.
        keel_testkit::poll::until(&engine, "flaky", |h| {
            count(h, |e| matches!(e, Event::StepFailed { .. })) == attempt
        })
        .await;
        resident(&engine, parked(1)).await;
        assert_eq!(effects_of(&scratch, "flaky").len(), attempt);
        let history = engine.history("flaky").await.unwrap();
        let retry_at_ms = history
            .entries
            .iter()
            .rev()
            .find_map(|e| match &e.event {
                Event::StepFailed { retry_at_ms, .. } => *retry_at_ms,
                _ => None,
            })
            .expect("a retry time");
        scratch.clock.advance_to(retry_at_ms - 1);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            effects_of(&scratch, "flaky").len(),
            attempt,
            "no attempt before its retry time"
        );
        scratch.clock.advance_to(retry_at_ms);
    }
    assert_eq!(handle.result().await.unwrap(), 3);
    assert_eq!(
        effects_of(&scratch, "flaky"),
        [(Action::Do, 0, 1), (Action::Do, 0, 2), (Action::Do, 0, 3)]
    );
    engine.shutdown().await;
}

/// Operator calls reach a parked run: a pause makes it paused, a resume takes it up (it
/// parks again in its sleep), a cancel makes it compensate the step it took before the
/// sleep; its waiter hears `compensated`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_calls_reach_a_parked_run() {
    let scratch = Scratch::new();
    let engine = open(&scratch, Some(keel::PARK_AFTER_DEFAULT)).await;
    start_parked_nap(&engine, &scratch, "nap").await;
    let before_pause = waiter(&engine, "nap");

    engine.pause("nap").await.unwrap();
    let paused = engine.wait("nap").await.unwrap();
    assert_eq!(paused.status, RunStatus::Paused);
    let waited = before_pause.await.unwrap().unwrap();
    assert_eq!(
        waited.status,
        RunStatus::Paused,
        "the waiter hears the pause"
    );
    engine.resume("nap").await.unwrap();
    resident(&engine, parked(1)).await;

    let before_cancel = waiter(&engine, "nap");
    engine.cancel("nap").await.unwrap();
    let record = before_cancel.await.unwrap().unwrap();
    assert_eq!(record.status, RunStatus::Compensated, "{:?}", record.error);
    assert_eq!(
        effects_of(&scratch, "nap"),
        [(Action::Do, 0, 1), (Action::Undo, 0, 1)]
    );
    resident(&engine, Resident::default()).await;
    engine.shutdown().await;
}

/// Runs parked at shutdown (their waiters hear the shutdown) are not read by the reopen (their
/// bodies do not run): on sled it parks them from the wake index, on PostgreSQL it leaves
/// them in the database, not due. They wake on time; every step's effect ran once per run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_runs_park_again_after_a_restart_and_wake_on_time() {
    const RUNS: usize = 40;
    let scratch = Scratch::new();
    let engine = open(&scratch, Some(keel::PARK_AFTER_DEFAULT)).await;
    let started_at_ms = scratch.clock.now_ms();
    for i in 0..RUNS {
        let input = NapInput {
            log: scratch.log.clone(),
            sleep_ms: HOUR_MS + i as u64,
        };
        engine
            .start::<Counted>(&format!("nap-{i}"), input)
            .await
            .unwrap();
    }
    resident(&engine, parked(RUNS)).await;
    let waiting = waiter(&engine, "nap-0");
    tokio::time::sleep(Duration::from_millis(20)).await;
    engine.shutdown().await;
    assert!(matches!(waiting.await.unwrap(), Err(EngineError::ShutDown)));
    drop(engine);

    let before = common::bodies::of("nap-");
    let engine = open(&scratch, Some(keel::PARK_AFTER_DEFAULT)).await;
    assert_eq!(
        engine.resident(),
        parked_by_the_open(RUNS),
        "as the open left them"
    );
    // Long enough for a claim on PostgreSQL to have taken (and loaded) what it would.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(engine.resident(), parked_by_the_open(RUNS));
    assert_eq!(
        common::bodies::of("nap-"),
        before,
        "no body ran: no parked run was loaded"
    );
    scratch
        .clock
        .advance_to(started_at_ms + HOUR_MS + RUNS as u64);
    for i in 0..RUNS {
        let record = engine.wait(&format!("nap-{i}")).await.unwrap();
        assert_eq!(record.status, RunStatus::Completed, "{:?}", record.error);
        assert_eq!(
            effects_of(&scratch, &format!("nap-{i}")),
            [(Action::Do, 0, 1), (Action::Do, 2, 1)]
        );
        let history = engine.history(&format!("nap-{i}")).await.unwrap();
        assert_eq!(
            history.entries.iter().find_map(|e| match e.event {
                Event::TimerFired { .. } => Some(e.at_ms),
                _ => None,
            }),
            Some(started_at_ms + HOUR_MS + RUNS as u64),
            "fired when the clock reached its wake time"
        );
    }
    resident(&engine, Resident::default()).await;
    engine.shutdown().await;
}

/// Opens the store of `runs` parked `old-` runs, checks that every one was loaded (its body
/// ran again to its sleep: `why`) and parked again, and shuts the engine down.
async fn open_reading_every_run(scratch: &Scratch, runs: usize, why: &str) {
    let before = common::bodies::of("old-");
    let engine = open(scratch, Some(keel::PARK_AFTER_DEFAULT)).await;
    resident(&engine, parked(runs)).await;
    assert!(common::bodies::of("old-") >= before + runs, "{why}");
    engine.shutdown().await;
}

/// A store whose wake index is gone (as one written before Keel kept it) is read in full at
/// the next open: every unfinished run is loaded, replays and parks again, and the index is
/// built, so that the open after reads none of them; so is a store whose index an older
/// version marked built (`W`, not `W2`). (sled: PostgreSQL keeps no index.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_without_the_wake_index_is_read_in_full_once_and_indexed() {
    const RUNS: usize = 12;
    if test_store() != TestStore::Sled {
        return;
    }
    let scratch = Scratch::new();
    let engine = open(&scratch, Some(keel::PARK_AFTER_DEFAULT)).await;
    start_parked_counted(&engine, &scratch, "old", RUNS).await;
    engine.shutdown().await;
    drop(engine);
    let db = keel_testkit::raw::open(&scratch.data);
    assert!(keel_testkit::raw::forget_wake_index(&db) > RUNS);
    drop(db);

    open_reading_every_run(
        &scratch,
        RUNS,
        "every run was loaded and ran its body to its sleep",
    )
    .await;

    // An older version opened the store since and built the index by its rules (its mark
    // is `W`; children did not set their parents' entries then): read in full again.
    let db = keel_testkit::raw::open(&scratch.data);
    db.insert(b"W", &[1u8]).unwrap();
    db.flush().unwrap();
    drop(db);
    open_reading_every_run(
        &scratch,
        RUNS,
        "an index an older version marked is not trusted",
    )
    .await;
    let db = keel_testkit::raw::open(&scratch.data);
    assert_eq!(db.get(b"W").unwrap(), None, "the older mark is gone");
    assert!(db.get(b"W2").unwrap().is_some(), "the index is built again");
    drop(db);

    let before = common::bodies::of("old-");
    let engine = open(&scratch, Some(keel::PARK_AFTER_DEFAULT)).await;
    assert_eq!(engine.resident(), parked(RUNS), "parked from the index");
    scratch.clock.advance(Duration::from_millis(HOUR_MS));
    for i in 0..RUNS {
        let record = engine.wait(&format!("old-{i}")).await.unwrap();
        assert_eq!(record.status, RunStatus::Completed, "{:?}", record.error);
        assert_eq!(
            effects_of(&scratch, &format!("old-{i}")),
            [(Action::Do, 0, 1), (Action::Do, 2, 1)]
        );
    }
    assert_eq!(
        common::bodies::of("old-"),
        before + RUNS,
        "each body ran once more: at its wake"
    );
    engine.shutdown().await;
}

/// An engine that lacks the workflow of a parked run refuses to open, naming the run, as for
/// a loaded one: the open finds the type among those the runs use, and then reads every run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unregistered_workflow_of_a_parked_run_refuses_the_open() {
    let scratch = Scratch::new();
    let engine = open(&scratch, Some(keel::PARK_AFTER_DEFAULT)).await;
    start_parked_nap(&engine, &scratch, "orphan").await;
    engine.shutdown().await;
    drop(engine);

    let refused = keel_testkit::store::builder(&scratch.data)
        .clock(scratch.clock.clone())
        .workflow::<Retries>()
        .step::<Undoable>()
        .open()
        .await;
    match refused {
        Err(EngineError::Unregistered {
            runs,
            missing,
            examples,
        }) => {
            assert_eq!(runs, 1);
            assert!(missing.contains("test.nap"), "{missing}");
            assert!(examples.contains("orphan"), "{examples}");
        }
        other => panic!("expected Unregistered, got {other:?}"),
    }
    let engine = open(&scratch, Some(keel::PARK_AFTER_DEFAULT)).await;
    resident(&engine, parked_by_the_open(1)).await;
    engine.shutdown().await;
}

/// What an open holds of `runs` runs parked until later at the last shutdown: on sled, each
/// parked again from the wake index; on PostgreSQL, nothing (claims take only the runs that
/// are due: the others stay in the database until their time).
fn parked_by_the_open(runs: usize) -> Resident {
    match test_store() {
        TestStore::Sled => parked(runs),
        _ => Resident::default(),
    }
}

/// A parked run whose journal was damaged at rest is not read by the open (it is parked from
/// the index); at its wake time it is found unreadable, left as it is and not retried, and
/// its waiter hears why; the damaged entry is as the damage left it. (sled: the damage is
/// made to its raw keys.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_run_with_a_damaged_journal_is_reported_at_its_wake() {
    if test_store() != TestStore::Sled {
        return;
    }
    let scratch = Scratch::new();
    let engine = open(&scratch, Some(keel::PARK_AFTER_DEFAULT)).await;
    let started_at_ms = scratch.clock.now_ms();
    start_parked_nap(&engine, &scratch, "damaged").await;
    engine.shutdown().await;
    drop(engine);
    let id = keel::RunId::existing("damaged").unwrap();
    let key = keel_engine::test_utilities::raw::journal_key_of(&id, keel::JournalIndex(1));
    let db = keel_testkit::raw::open(&scratch.data);
    db.insert(&key, &b"\xff not json"[..]).unwrap();
    db.flush().unwrap();
    drop(db);

    let engine = open(&scratch, Some(keel::PARK_AFTER_DEFAULT)).await;
    assert_eq!(engine.resident(), parked(1));
    let waiting = waiter(&engine, "damaged");
    scratch.clock.advance_to(started_at_ms + HOUR_MS);
    match waiting.await.unwrap() {
        Err(EngineError::RunStopped { reason, .. }) => {
            assert!(reason.contains("journal"), "{reason}")
        }
        other => panic!("expected RunStopped, got {other:?}"),
    }
    assert_eq!(engine.resident(), Resident::default(), "left as it is");
    assert_eq!(
        engine.status("damaged").await.unwrap().status,
        RunStatus::Running
    );
    engine.shutdown().await;
    drop(engine);
    let db = keel_testkit::raw::open(&scratch.data);
    assert_eq!(
        db.get(&key).unwrap().as_deref(),
        Some(&b"\xff not json"[..]),
        "the damaged entry is as it was"
    );
}

/// A full read that cannot read some run leaves the wake index unbuilt: that run has no entry,
/// so an index marked built would never load it again. The open after therefore reads every
/// run again, and the readable ones park as before. (sled: the damage is made to raw keys.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_read_that_cannot_read_a_run_leaves_the_index_unbuilt() {
    const RUNS: usize = 3;
    if test_store() != TestStore::Sled {
        return;
    }
    let scratch = Scratch::new();
    let engine = open(&scratch, Some(keel::PARK_AFTER_DEFAULT)).await;
    start_parked_counted(&engine, &scratch, "unbuilt", RUNS).await;
    engine.shutdown().await;
    drop(engine);
    let id = keel::RunId::existing("unbuilt-0").unwrap();
    let key = keel_engine::test_utilities::raw::journal_key_of(&id, keel::JournalIndex(1));
    let db = keel_testkit::raw::open(&scratch.data);
    assert!(keel_testkit::raw::forget_wake_index(&db) > RUNS);
    db.insert(&key, &b"\xff not json"[..]).unwrap();
    db.flush().unwrap();
    drop(db);

    for open_number in 0..2 {
        let before = common::bodies::of("unbuilt-");
        let engine = open(&scratch, Some(keel::PARK_AFTER_DEFAULT)).await;
        resident(&engine, parked(RUNS - 1)).await;
        assert_eq!(
            common::bodies::of("unbuilt-"),
            before + RUNS - 1,
            "open {open_number}: every readable run was read and ran to its sleep"
        );
        match engine.wait("unbuilt-0").await {
            Err(EngineError::RunStopped { reason, .. }) => {
                assert!(reason.contains("journal"), "{reason}")
            }
            other => panic!("expected RunStopped, got {other:?}"),
        }
        engine.shutdown().await;
        drop(engine);
        let db = keel_testkit::raw::open(&scratch.data);
        assert_eq!(
            db.get(b"W2").unwrap(),
            None,
            "open {open_number}: the index is not marked built"
        );
        drop(db);
    }
}

/// The times of run `id`'s entries in the store's wake index (sled's raw keys `w` + wake
/// time + run id).
fn wake_entries(db: &sled::Db, id: &str) -> Vec<u64> {
    db.scan_prefix(b"w")
        .keys()
        .map(|key| key.unwrap())
        .filter(|key| &key[9..] == id.as_bytes())
        .map(|key| u64::from_be_bytes(key[1..9].try_into().unwrap()))
        .collect()
}

/// A run whose wake time passed while the engine was down is driven by the open, and its
/// index entry is 0 before it writes (rule 27): an open after a crash checks only the runs
/// whose entry is 0 for a record left behind its journal. (sled: PostgreSQL keeps no index.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_due_at_the_open_is_indexed_as_loaded_before_it_writes() {
    if test_store() != TestStore::Sled {
        return;
    }
    let scratch = Scratch::new();
    let engine = open(&scratch, Some(keel::PARK_AFTER_DEFAULT)).await;
    engine
        .start::<Retries>("due", scratch.log.clone())
        .await
        .unwrap();
    resident(&engine, parked(1)).await;
    engine.shutdown().await;
    drop(engine);
    let db = keel_testkit::raw::open(&scratch.data);
    let parked_until = wake_entries(&db, "due");
    assert_eq!(parked_until.len(), 1);
    assert!(
        parked_until[0] > 0,
        "parked in its backoff: {parked_until:?}"
    );
    drop(db);

    // Due at the open; kept loaded through its next backoff.
    scratch.clock.advance(RETRY_AFTER);
    let engine = open(&scratch, None).await;
    let deadline = std::time::Instant::now() + CONDITION_TIMEOUT;
    while effects_of(&scratch, "due").len() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the second attempt never ran"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(
        engine.resident(),
        Resident {
            loaded: 1,
            parked: 0
        }
    );
    engine.shutdown().await;
    drop(engine);
    let db = keel_testkit::raw::open(&scratch.data);
    assert_eq!(wake_entries(&db, "due"), [0], "loaded: its entry is 0");
}

/// An engine shut down and dropped leaves the runs per status (sled's key `C`) for the next
/// open, which then reads no record; that open takes them. (sled only.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_shutdown_leaves_the_counts_for_the_next_open() {
    if test_store() != TestStore::Sled {
        return;
    }
    let scratch = Scratch::new();
    let engine = open(&scratch, Some(keel::PARK_AFTER_DEFAULT)).await;
    start_parked_nap(&engine, &scratch, "counted").await;
    engine.shutdown().await;
    drop(engine);
    let db = keel_testkit::raw::try_open(&scratch.data).unwrap();
    assert!(db.contains_key(b"C").unwrap(), "left by the clean close");
    drop(db);

    let engine = open(&scratch, Some(keel::PARK_AFTER_DEFAULT)).await;
    assert_eq!(engine.resident(), parked(1));
    let counts = engine.run_counts().await.unwrap();
    assert_eq!(counts.get(&RunStatus::Running), Some(&1), "{counts:?}");
    engine.shutdown().await;
}
