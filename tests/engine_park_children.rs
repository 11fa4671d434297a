//! A parent awaiting a child run parks after `park_after` of waiting, and is loaded again
//! when the child settles: in memory (the child's unload makes the parent due), and after a
//! crash (the child's settling write first sets the parent's wake index entry to "loaded").
//! Checked here: what the engine holds (`Engine::resident`), parents that park while their
//! children end, a restart with both parked, and SIGKILL at the points between a child's
//! end and its parent's wake. The sled store only: a store several engines share keeps no
//! wake index, and there a parent waits for its child in memory.

use std::path::Path;
use std::time::Duration;

use keel::testing::TestClock;
use keel::{child_id, Ctx, Engine, Event, Resident, RunId, RunStatus, Workflow, WorkflowError};
use keel_testkit::crash::{is_child, ChildSpec, Ending};
use keel_testkit::poll::{resident, CONDITION_TIMEOUT};
use serde_json::{json, Value};

/// Takes one event named `go` and returns its payload.
struct Child;

impl Workflow for Child {
    const NAME: &'static str = "test.park-child";
    type Input = ();
    type Output = Value;

    async fn run(ctx: &mut Ctx, (): ()) -> Result<Value, WorkflowError> {
        Ok(ctx.receive_event::<Value>(&["go"], None).await?.payload)
    }
}

/// Awaits one [`Child`] and returns what it returned.
struct Parent;

impl Workflow for Parent {
    const NAME: &'static str = "test.park-parent";
    type Input = ();
    type Output = Value;

    async fn run(ctx: &mut Ctx, (): ()) -> Result<Value, WorkflowError> {
        ctx.child::<Child>(()).await
    }
}

const PARK_AFTER: Duration = Duration::from_secs(10);

async fn open(data: &Path, clock: Option<&TestClock>, park_after: Duration) -> Engine {
    let builder = Engine::builder(data)
        .park_after(Some(park_after))
        .workflow::<Parent>()
        .workflow::<Child>();
    match clock {
        Some(clock) => builder.clock(clock.clone()),
        None => builder,
    }
    .open()
    .await
    .expect("opening the engine")
}

/// The child of parent run `parent`.
fn child_of(parent: &str) -> String {
    child_id(&RunId::new(parent).unwrap(), keel::OperationIndex(0)).to_string()
}

fn holds(loaded: usize, parked: usize) -> Resident {
    Resident { loaded, parked }
}

/// The child parks in its receive at once; the parent waits `park_after` in memory, then
/// parks too: nothing is loaded. The event loads the child, which ends; its end loads the
/// parent, which ends with the child's output, having journaled the child's end once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parent_parks_while_its_child_waits_and_wakes_when_it_ends() {
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::new();
    let engine = open(dir.path(), Some(&clock), PARK_AFTER).await;
    let handle = engine.start::<Parent>("p", ()).await.unwrap();
    resident(&engine, holds(1, 1)).await;
    clock.advance(PARK_AFTER);
    resident(&engine, holds(0, 2)).await;
    engine
        .send(&child_of("p"), "go", &json!("payload"), "go-1")
        .await
        .unwrap();
    let output = tokio::time::timeout(CONDITION_TIMEOUT, handle.result())
        .await
        .unwrap_or_else(|_| panic!("the parent was not woken: {:?}", engine.resident()));
    assert_eq!(output.unwrap(), json!("payload"));
    resident(&engine, holds(0, 0)).await;
    let history = engine.history("p").await.unwrap();
    let ended = history
        .entries
        .iter()
        .filter(|e| matches!(e.event, Event::ChildEnded { .. }))
        .count();
    assert_eq!(ended, 1);
    engine.shutdown().await;
}

/// Both parked, the engine restarts: the open parks both again without loading either (the
/// wake index), and the child's end still wakes the parent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parent_parked_for_its_child_is_woken_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::new();
    let engine = open(dir.path(), Some(&clock), PARK_AFTER).await;
    engine.start::<Parent>("p", ()).await.unwrap();
    resident(&engine, holds(1, 1)).await;
    clock.advance(PARK_AFTER);
    resident(&engine, holds(0, 2)).await;
    engine.shutdown().await;
    drop(engine);

    let engine = open(dir.path(), Some(&clock), PARK_AFTER).await;
    assert_eq!(engine.resident(), holds(0, 2));
    engine
        .send(&child_of("p"), "go", &json!(7), "go-1")
        .await
        .unwrap();
    let record = tokio::time::timeout(CONDITION_TIMEOUT, engine.wait("p"))
        .await
        .expect("the parent was woken")
        .unwrap();
    assert_eq!(record.status, RunStatus::Completed);
    assert_eq!(record.output, Some(json!(7)));
    engine.shutdown().await;
}

/// Parents start parking (the clock passes `park_after`) while their children end (the
/// events arrive at the same moment): whichever comes first, every parent ends. A parent
/// that parked after its child's end had been decided would never be loaded again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parents_parking_while_their_children_end_all_end() {
    const RUNS: usize = 100;
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::new();
    let engine = open(dir.path(), Some(&clock), PARK_AFTER).await;
    let ids: Vec<String> = (0..RUNS).map(|i| format!("p{i:03}")).collect();
    for id in &ids {
        engine.start::<Parent>(id, ()).await.unwrap();
    }
    resident(&engine, holds(RUNS, RUNS)).await;
    let sends = {
        let engine = engine.clone();
        let ids = ids.clone();
        tokio::spawn(async move {
            for (i, id) in ids.iter().enumerate() {
                engine
                    .send(&child_of(id), "go", &json!(i), "go-1")
                    .await
                    .unwrap();
            }
        })
    };
    clock.advance(PARK_AFTER);
    sends.await.unwrap();
    for (i, id) in ids.iter().enumerate() {
        let record = tokio::time::timeout(CONDITION_TIMEOUT, engine.wait(id))
            .await
            .unwrap_or_else(|_| panic!("parent {id} never ended: {:?}", engine.resident()))
            .unwrap();
        assert_eq!(record.output, Some(json!(i)), "{id}");
    }
    resident(&engine, holds(0, 0)).await;
    engine.shutdown().await;
}

/// The crash test's child process: starts parent `p` (in its first life only), waits until it and its child
/// are parked, sends the child its event (once) and waits for the parent's end.
fn child_main() {
    let data = std::env::var("KEEL_DATA_DIR").expect("KEEL_DATA_DIR");
    keel_testkit::crash::runtime().block_on(async {
        let engine = open(Path::new(&data), None, Duration::from_millis(5)).await;
        // Not started again: a start of a run that exists loads it, and this test is about
        // what wakes a parked parent.
        if engine.status("p").await.is_err() {
            engine.start::<Parent>("p", ()).await.unwrap();
        }
        let deadline = std::time::Instant::now() + CONDITION_TIMEOUT;
        while engine.status("p").await.unwrap().status.is_drivable()
            && engine.resident() != holds(0, 2)
            && std::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        // Refused once the child ended (an earlier life sent it).
        let _ = engine
            .send(&child_of("p"), "go", &json!("sent"), "go-1")
            .await;
        let record = engine.wait("p").await.unwrap();
        assert_eq!(record.status, RunStatus::Completed);
        engine.shutdown().await;
    });
}

/// SIGKILL where a child's end and its parent's wake are apart: after the child's settling
/// write (its record holding its last entries, before its sync), after it is durable (before
/// its unload wakes the parent), after a parking run's index entry, after a waking run's.
/// Each time the next life ends the parent, with the child's output and the child's end
/// journaled once.
#[test]
fn sigkill_between_a_childs_end_and_its_parents_wake() {
    const NAME: &str = "sigkill_between_a_childs_end_and_its_parents_wake";
    if is_child() {
        return child_main();
    }
    keel_testkit::init_tracing();
    for point in [
        "store.after_transition_entry",
        "run.after_terminal",
        "park.after_index",
        "wake.after_index",
    ] {
        for skip in 0..2u32 {
            let dir = tempfile::tempdir().unwrap();
            let spec = ChildSpec {
                test_name: NAME,
                env: vec![(
                    "KEEL_DATA_DIR".into(),
                    dir.path().to_string_lossy().into_owned(),
                )],
            };
            let env = [
                ("KEEL_CRASH_AT", point.to_string()),
                ("KEEL_CRASH_SKIP", skip.to_string()),
            ];
            assert_eq!(
                spec.run(&env, CHILD_TIMEOUT),
                Ending::Killed,
                "{point} (skip {skip}) was never reached"
            );
            spec.run_until_finished(CHILD_TIMEOUT);
            keel_testkit::check::read_store_blocking(dir.path(), async |engine| {
                let history = engine.history("p").await.unwrap();
                assert_eq!(history.run.status, RunStatus::Completed, "{point} {skip}");
                assert_eq!(history.run.output, Some(json!("sent")));
                let ended = history
                    .entries
                    .iter()
                    .filter(|e| matches!(e.event, Event::ChildEnded { .. }))
                    .count();
                assert_eq!(ended, 1, "{point} {skip}");
            });
        }
    }
}

const CHILD_TIMEOUT: Duration = Duration::from_secs(60);
