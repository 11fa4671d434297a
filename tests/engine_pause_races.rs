//! Races of operator calls with a run: a send, a resume, a pause and a cancel made at once,
//! each many times over, and a cancel made before a defect of the run's code. Whatever order
//! the writes take, the run ends as its journal says: driven, paused, or compensating as a
//! cancel asked; no step or child run starts after a pause request. `KEEL_TEST_RACES` races
//! more (docs/testing.md).

use std::time::Duration;

use keel::{Ctx, Engine, RunStatus, Workflow, WorkflowError};
use keel_engine::Event;
use serde::{Deserialize, Serialize};

/// Waits for one event named `go` and returns its payload.
struct Receiver;

impl Workflow for Receiver {
    const NAME: &'static str = "test.pause-receiver";
    type Input = ();
    type Output = u32;

    async fn run(ctx: &mut Ctx, (): ()) -> Result<u32, WorkflowError> {
        ctx.receive::<u32>("go").await
    }
}

/// How many runs a test races: `default`, or `KEEL_TEST_RACES` divided by `share` (the
/// tests whose runs are heavier race a share of it).
fn races(default: usize, share: usize) -> usize {
    std::env::var("KEEL_TEST_RACES")
        .ok()
        .and_then(|n| n.parse::<usize>().ok())
        .map_or(default, |n| (n / share).max(1))
}

/// An engine on a fresh store in `dir`, as `register` sets it up.
async fn open(
    dir: &std::path::Path,
    register: impl FnOnce(keel::EngineBuilder) -> keel::EngineBuilder,
) -> Engine {
    register(keel_testkit::store::builder(dir.join("data")))
        .open()
        .await
        .unwrap()
}

/// A paused run is not loaded. A send loads it to deliver, finds it paused and unloads it;
/// a resume made at the same moment may load it first, or find the send's cell and take the
/// run up through it. Whichever comes first, the run ends completed with the event's payload,
/// every time.
///
/// Two defects are tried here. A resumed run's driver used to start while its cell's pause
/// flag still stood (it is withdrawn once the resume is durable): the run stopped to pause,
/// found the request withdrawn and went on, in a loop that never yielded, and two such
/// drivers held both runtime threads so that no resume ever finished (seen hanging in two of
/// three runs of 50). And a send's cell was unloaded on a status read before the unload, so a
/// resume through it in between left the run running with nothing driving it (not caught in
/// 9,000 tries: the window is a few instructions wide; fixed by deciding under the cell lock).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
// The watchdog says why it ends the process on stderr: the test's own output dies with it.
#[allow(clippy::print_stderr)]
async fn a_send_and_a_resume_at_once_leave_the_run_driven() {
    keel_testkit::init_tracing();
    let races = races(200, 1);
    // Drivers that never yield starve the runtime, its timers included: only another thread
    // can end the test then.
    let (done, finished) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        let waited = finished.recv_timeout(Duration::from_secs(300));
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = waited {
            eprintln!("the runs did not end in 300 s: the runtime is starved");
            std::process::exit(101);
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), |b| b.workflow::<Receiver>()).await;
    for n in 0..races {
        let id = format!("r{n}");
        engine.start::<Receiver>(&id, ()).await.unwrap();
        engine.pause(&id).await.unwrap();
        let record = engine.wait(&id).await.unwrap();
        assert_eq!(record.status, RunStatus::Paused, "{id}");
    }
    let raced: Vec<_> = (0..races)
        .map(|n| {
            let engine = engine.clone();
            tokio::spawn(async move {
                let id = format!("r{n}");
                let (payload, event_id) = (n as u32, format!("go-{n}"));
                let send = engine.send(&id, "go", &payload, &event_id);
                let resume = engine.resume(&id);
                let (sent, resumed) = tokio::join!(send, resume);
                sent.unwrap();
                resumed.unwrap();
                let record = tokio::time::timeout(Duration::from_secs(60), engine.wait(&id))
                    .await
                    .expect("the run did not end in 60 s");
                (id, n, record)
            })
        })
        .collect();
    for raced in raced {
        let (id, n, record) = raced.await.unwrap();
        let record = record.unwrap_or_else(|e| panic!("run {id}: {e}"));
        assert_eq!(
            record.status,
            RunStatus::Completed,
            "{id}: {:?}",
            record.error
        );
        assert_eq!(record.output, Some(serde_json::json!(n)), "{id}");
    }
    engine.shutdown().await;
    let _ = done.send(());
}

/// Sleeps `ms` milliseconds: a step long enough to be in flight when a pause or a cancel
/// comes.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Nap {
    ms: u64,
}

impl keel::Step for Nap {
    const KIND: &'static str = "test.nap";
    type Output = ();

    async fn execute(&self, _: &keel::StepContext) -> Result<(), keel::StepError> {
        tokio::time::sleep(Duration::from_millis(self.ms)).await;
        Ok(())
    }
}

/// 200 naps in a row.
struct Napper;

impl Workflow for Napper {
    const NAME: &'static str = "test.napper";
    type Input = ();
    type Output = ();

    async fn run(ctx: &mut Ctx, (): ()) -> Result<(), WorkflowError> {
        for _ in 0..200 {
            ctx.step(Nap { ms: 2 }).await?;
        }
        Ok(())
    }
}

/// A resume and a pause of a pausing run made at once: whatever order their writes took,
/// the run ends as its journal says, paused when a pause request was the last word, else
/// completed. A resume used to tell the run's lanes that no pause stands once it was
/// durable, whatever had been written since: a pause written after it, and told first, was
/// lost, and the run completed with the request standing in its journal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_written_after_a_resume_is_not_withdrawn_by_it() {
    keel_testkit::init_tracing();
    let races = races(40, 5);
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), |b| b.workflow::<Napper>().step::<Nap>()).await;
    let raced: Vec<_> = (0..races)
        .map(|n| {
            let engine = engine.clone();
            tokio::spawn(async move {
                let id = format!("n{n}");
                engine.start::<Napper>(&id, ()).await.unwrap();
                tokio::time::sleep(Duration::from_millis(10)).await;
                engine.pause(&id).await.unwrap();
                let (resumed, paused) = tokio::join!(engine.resume(&id), engine.pause(&id));
                let record = engine.wait(&id).await.unwrap();
                (id, resumed, paused, record)
            })
        })
        .collect();
    let mut paused_at_end = 0;
    for raced in raced {
        let (id, resumed, paused, record) = raced.await.unwrap();
        // Pausing or paused, the run admits a resume, whichever it was when the call looked.
        let resumed = resumed.unwrap_or_else(|e| panic!("{id}: resume refused: {e}"));
        let history = engine.history(&id).await.unwrap();
        // No step starts while a pause request stands in the journal.
        let mut requested = false;
        for entry in &history.entries {
            match &entry.event {
                Event::PauseRequested => requested = true,
                Event::RunResumed => requested = false,
                Event::StepStarted { step, .. } => {
                    assert!(
                        !requested,
                        "{id}: step {step} started after a pause request"
                    )
                }
                _ => {}
            }
        }
        let last =
            |wanted: fn(&Event) -> bool| history.entries.iter().rposition(|e| wanted(&e.event));
        let requested = last(|e| matches!(e, Event::PauseRequested));
        let resumed_at = last(|e| matches!(e, Event::RunResumed));
        let stands = requested > resumed_at;
        let expected = if stands {
            paused_at_end += 1;
            RunStatus::Paused
        } else {
            RunStatus::Completed
        };
        assert_eq!(
            record.status, expected,
            "{id}: resume {resumed:?}, pause {paused:?}, last request at {requested:?}, last resume at {resumed_at:?}"
        );
    }
    tracing::info!(races, paused_at_end, "pauses that were the last word");
    engine.shutdown().await;
}

/// A pause and a cancel of a running run made at once: the cancel, once it returned, wins
/// whatever order the writes took. A run that stopped to pause used to settle as paused
/// even when a cancel was written meanwhile, and then waited, cancelled, for a resume (a
/// second cancel took the first as done).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_made_while_the_run_stops_to_pause_compensates_it() {
    keel_testkit::init_tracing();
    let races = races(40, 5);
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), |b| b.workflow::<Napper>().step::<Nap>()).await;
    let raced: Vec<_> = (0..races)
        .map(|n| {
            let engine = engine.clone();
            tokio::spawn(async move {
                let id = format!("c{n}");
                engine.start::<Napper>(&id, ()).await.unwrap();
                tokio::time::sleep(Duration::from_millis(10)).await;
                let (paused, cancelled) = tokio::join!(engine.pause(&id), engine.cancel(&id));
                let record = engine.wait(&id).await.unwrap();
                (id, paused, cancelled, record)
            })
        })
        .collect();
    for raced in raced {
        let (id, paused, cancelled, record) = raced.await.unwrap();
        let cancelled = cancelled.unwrap_or_else(|e| panic!("{id}: cancel refused: {e}"));
        assert_eq!(
            record.status,
            RunStatus::Compensated,
            "{id}: pause {paused:?}, cancel {cancelled:?}: {:?}",
            record.error
        );
    }
    engine.shutdown().await;
}

/// One nap, as a child run.
struct Kid;

impl Workflow for Kid {
    const NAME: &'static str = "test.kid";
    type Input = ();
    type Output = ();

    async fn run(ctx: &mut Ctx, (): ()) -> Result<(), WorkflowError> {
        ctx.step(Nap { ms: 2 }).await
    }
}

/// 100 [`Kid`] runs, one after the other.
struct Brood;

impl Workflow for Brood {
    const NAME: &'static str = "test.brood";
    type Input = ();
    type Output = ();

    async fn run(ctx: &mut Ctx, (): ()) -> Result<(), WorkflowError> {
        for _ in 0..100 {
            ctx.child::<Kid>(()).await?;
        }
        Ok(())
    }
}

/// A run starting child runs one after the other is paused: no child run is started once
/// the pause request is in its journal, even before the request is durable and told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_child_run_starts_after_a_pause_request() {
    keel_testkit::init_tracing();
    let races = races(20, 10);
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), |b| {
        b.workflow::<Brood>().workflow::<Kid>().step::<Nap>()
    })
    .await;
    let raced: Vec<_> = (0..races)
        .map(|n| {
            let engine = engine.clone();
            tokio::spawn(async move {
                let id = format!("b{n}");
                engine.start::<Brood>(&id, ()).await.unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
                engine.pause(&id).await.unwrap();
                let record = engine.wait(&id).await.unwrap();
                (id, record)
            })
        })
        .collect();
    for raced in raced {
        let (id, record) = raced.await.unwrap();
        assert_eq!(record.status, RunStatus::Paused, "{id}: {:?}", record.error);
        let history = engine.history(&id).await.unwrap();
        let requested = history
            .entries
            .iter()
            .position(|e| matches!(e.event, Event::PauseRequested))
            .expect("a pause request");
        let after: Vec<_> = history.entries[requested..]
            .iter()
            .filter(|e| matches!(e.event, Event::ChildStarted { .. }))
            .collect();
        assert!(
            after.is_empty(),
            "{id}: child runs started after the pause request: {after:?} in {:#?}",
            history.entries.iter().map(|e| &e.event).collect::<Vec<_>>()
        );
    }
    engine.shutdown().await;
}

/// A 1 s nap, then a defect: the body panics.
struct Doomed;

impl Workflow for Doomed {
    const NAME: &'static str = "test.doomed";
    type Input = ();
    type Output = ();

    async fn run(ctx: &mut Ctx, (): ()) -> Result<(), WorkflowError> {
        ctx.step(Nap { ms: 1_000 }).await?;
        panic!("the body's own bug, after its step");
    }
}

/// A run cancelled while a step is in flight, whose body then fails with a defect of its
/// code, compensates as the cancel asked. It used to be suspended with the cancel standing,
/// and a second cancel took the first as done: only a resume moved it on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_cancelled_before_a_defect_compensates_instead_of_suspending() {
    keel_testkit::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), |b| b.workflow::<Doomed>().step::<Nap>()).await;
    engine.start::<Doomed>("doomed", ()).await.unwrap();
    // The cancel lands while the nap is in flight, well before its end.
    let napping = |h: &keel::RunHistory| {
        h.entries
            .iter()
            .any(|e| matches!(e.event, Event::StepStarted { .. }))
    };
    keel_testkit::poll::until(&engine, "doomed", napping).await;
    engine.cancel("doomed").await.unwrap();
    let record = engine.wait("doomed").await.unwrap();
    assert_eq!(record.status, RunStatus::Compensated, "{:?}", record.error);
    let history = engine.history("doomed").await.unwrap();
    assert!(
        history
            .entries
            .iter()
            .all(|e| !matches!(e.event, Event::RunSuspended { .. })),
        "{:#?}",
        history.entries
    );
    engine.shutdown().await;
}
