//! A start against what may meet its run before the start is durable: a wait, a load by a
//! send, and the start's own caller going away. Each runs in a child process whose threads
//! are held at named points (`KEEL_PAUSE_AT`, `keel_engine::crash`), as threads the system
//! leaves unscheduled there would be.

use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use keel::{Ctx, Engine, RunStatus, Step, StepContext, StepError, Workflow, WorkflowError};
use keel_testkit::crash::{is_child, path_env, ChildSpec, Ending};
use keel_testkit::poll::{answered, recorded, CONDITION_TIMEOUT};

/// Fails at once.
struct Quick;

impl Workflow for Quick {
    const NAME: &'static str = "test.quick-failure";
    type Input = ();
    type Output = ();

    async fn run(_: &mut Ctx, (): ()) -> Result<(), WorkflowError> {
        Err(WorkflowError::failed("as it should"))
    }
}

/// How many times [`Counted`]'s effect ran in this process.
static EFFECTS: AtomicU32 = AtomicU32::new(0);

/// Counts its runs in [`EFFECTS`].
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct Count;

impl Step for Count {
    const KIND: &'static str = "test.count";
    const COMPENSABLE: bool = false;
    type Output = u32;

    async fn execute(&self, _: &StepContext) -> Result<u32, StepError> {
        Ok(EFFECTS.fetch_add(1, Ordering::SeqCst) + 1)
    }
}

/// One [`Count`] step.
struct Counted;

impl Workflow for Counted {
    const NAME: &'static str = "test.counted";
    type Input = ();
    type Output = u32;

    async fn run(ctx: &mut Ctx, (): ()) -> Result<u32, WorkflowError> {
        ctx.step(Count).await
    }
}

async fn open() -> Engine {
    let dir = std::env::var("KEEL_DATA_DIR").expect("KEEL_DATA_DIR");
    keel_testkit::store::builder(Path::new(&dir))
        .workflow::<Quick>()
        .workflow::<Counted>()
        .step::<Count>()
        .open()
        .await
        .expect("opening the engine")
}

/// Runs test `name`'s child with its threads held `pause_ms` at each of `points`.
fn run_child(name: &str, points: &str, pause_ms: u64) {
    let dir = tempfile::tempdir().unwrap();
    let spec = ChildSpec {
        test_name: name,
        env: vec![("KEEL_DATA_DIR".into(), path_env(dir.path(), "data"))],
    };
    let ending = spec.run(
        &[
            ("KEEL_PAUSE_AT", points.into()),
            ("KEEL_PAUSE_MS", pause_ms.to_string()),
        ],
        CONDITION_TIMEOUT * 2,
    );
    assert_eq!(ending, Ending::Finished);
}

/// The start is held right after its start became durable (`start.after_sync`), and a wait
/// comes meanwhile.
fn wait_during_a_start_child() {
    keel_testkit::crash::runtime().block_on(async {
        let engine = open().await;
        let starting = {
            let engine = engine.clone();
            tokio::spawn(async move { engine.start::<Quick>("quick", ()).await.map(|_| ()) })
        };
        // The record is there (and durable) while the start is held.
        recorded(&engine, "quick").await;
        let record = answered("wait", engine.wait("quick")).await;
        assert!(
            matches!(&record, Ok(r) if r.status == RunStatus::Failed),
            "a wait during the run's start heard {record:?}, not its end"
        );
        starting.await.unwrap().unwrap();
    });
}

/// A wait for a run whose start is under way (its record written and durable, its driver not
/// yet running) waits for the run's end: before, it found the run in no map and answered
/// that its driver had stopped on an engine error.
#[test]
fn a_wait_during_a_start_hears_the_end() {
    const NAME: &str = "a_wait_during_a_start_hears_the_end";
    if is_child() {
        return wait_during_a_start_child();
    }
    run_child(NAME, "start.after_sync", 1_000);
}

/// Starts a [`Counted`] run, whose start is held after its record (`start.after_create`),
/// and returns once the record is there.
async fn start_counted_held(engine: &Engine) -> tokio::task::JoinHandle<keel::Result<()>> {
    let starting = {
        let engine = engine.clone();
        tokio::spawn(async move { engine.start::<Counted>("counted", ()).await.map(|_| ()) })
    };
    recorded(engine, "counted").await;
    starting
}

/// Checks a send to the [`Counted`] run, which takes no events: once the start's cell is in,
/// its driver may end the run before the send's delivery, which is then refused. Either
/// answer is right; what the tests check is how often the run's step ran.
fn sent_or_ended(sent: keel::Result<keel::Delivered>) {
    match sent {
        Ok(_) => {}
        Err(keel::EngineError::InvalidState { status, .. }) if status == "completed" => {}
        Err(other) => panic!("the send during the start: {other}"),
    }
}

/// Checks that the [`Counted`] run completed and that its step ran once (`why`: what a
/// second run of it would mean), then shuts `engine` down.
async fn completed_with_one_effect(engine: Engine, why: &str) {
    let record = answered("wait", engine.wait("counted")).await.unwrap();
    assert_eq!(record.status, RunStatus::Completed, "{record:?}");
    // A second cell, had there been one, is in the map from before the send (or the start)
    // returned until its driver ended: once the map is empty, its step has run.
    keel_testkit::poll::resident(&engine, keel::Resident::default()).await;
    assert_eq!(
        EFFECTS.load(Ordering::SeqCst),
        1,
        "the run's step ran again: {why}"
    );
    engine.shutdown().await;
}

/// How long `a_load_racing_a_start_drives_the_run_once` holds each thread: half of it is
/// the time the start's cell has, once released, to run the run to its end before the send's
/// load goes on (which, on the code before the fix, is what made the second run).
const RACE_PAUSE_MS: u64 = 4_000;

/// The start is held after its record (`start.after_create`, `RACE_PAUSE_MS`); half of that
/// in, a send loads the run and is held after its reads (`wake.after_index`, as long).
fn load_racing_a_start_child() {
    keel_testkit::crash::runtime().block_on(async {
        let engine = open().await;
        let starting = start_counted_held(&engine).await;
        tokio::time::sleep(Duration::from_millis(RACE_PAUSE_MS / 2)).await;
        let sending = {
            let engine = engine.clone();
            tokio::spawn(async move { engine.send("counted", "poke", &(), "poke-1").await })
        };
        starting.await.unwrap().unwrap();
        sent_or_ended(sending.await.unwrap());
        let why = "a second cell, made from the journal the send read before the start's cell ran, drove the run";
        completed_with_one_effect(engine, why).await;
    });
}

/// A send's load that read the new run's (empty) journal while its start was held, and puts
/// its cell in after the start's own cell ran the run to its end, must not drive the run a
/// second time from what it read. Before, the start put its cell in without the loads' lock,
/// between the load's look for a cell and its insert.
#[test]
fn a_load_racing_a_start_drives_the_run_once() {
    const NAME: &str = "a_load_racing_a_start_drives_the_run_once";
    if is_child() {
        return load_racing_a_start_child();
    }
    run_child(NAME, "start.after_create,wake.after_index", RACE_PAUSE_MS);
}

/// The start is held after its record (`start.after_create`, a second), and a send loads
/// the run meanwhile.
fn load_during_a_start_child() {
    keel_testkit::crash::runtime().block_on(async {
        let engine = open().await;
        let starting = start_counted_held(&engine).await;
        sent_or_ended(engine.send("counted", "poke", &(), "poke-1").await);
        starting.await.unwrap().unwrap();
        let why = "the send's load drove the run while its start was held, and the start then put in a cell of its own and drove it from nothing";
        completed_with_one_effect(engine, why).await;
    });
}

/// A send's load of a run whose start has written its record but not yet put its cell in
/// waits for that cell and takes it: before, it loaded the run and drove it to its end, and
/// the start then put in a cell of its own, from an empty journal, and drove the run again.
#[test]
fn a_load_during_a_start_takes_the_starts_cell() {
    const NAME: &str = "a_load_during_a_start_takes_the_starts_cell";
    if is_child() {
        return load_during_a_start_child();
    }
    run_child(NAME, "start.after_create", 1_000);
}

/// Every sync is held half a second (`commit.before_sync`); the start's caller gives up after
/// a tenth of that.
fn abandoned_start_child() {
    keel_testkit::crash::runtime().block_on(async {
        let engine = open().await;
        let start = engine.start::<Quick>("quick", ());
        // The timer first once it is due, however late this task is polled: the caller gives
        // up and drops the start.
        let finished = tokio::select! {
            biased;
            () = tokio::time::sleep(Duration::from_millis(50)) => false,
            _ = start => true,
        };
        assert!(!finished, "the start was durable before its caller gave up");
        // The start may not have written its record yet (on PostgreSQL it makes a few round
        // trips first).
        recorded(&engine, "quick").await;
        let record = answered("wait", engine.wait("quick")).await;
        assert!(
            matches!(&record, Ok(r) if r.status == RunStatus::Failed),
            "a run whose start's caller went away was not driven: {record:?}"
        );
        engine.shutdown().await;
    });
}

/// A start whose caller goes away before the start is durable (a client that hung up, a
/// timeout around `Engine::start`) leaves its run driven once the start is durable: the run
/// exists, and nothing else would drive it until the next open.
#[test]
fn a_start_whose_caller_went_away_is_driven() {
    const NAME: &str = "a_start_whose_caller_went_away_is_driven";
    if is_child() {
        return abandoned_start_child();
    }
    run_child(NAME, "commit.before_sync", 500);
}

/// A start's future is `Send` and `Sync`, as it was when the start awaited a task of its own:
/// a caller may hold it where either is asked (a compile-time check; never called).
#[allow(dead_code)]
fn a_start_is_send_and_sync(engine: &Engine) {
    fn send_and_sync<T: Send + Sync>(_: T) {}
    send_and_sync(engine.start::<Quick>("id", ()));
    send_and_sync(engine.start_json("test.quick-failure", "id", serde_json::Value::Null));
}
