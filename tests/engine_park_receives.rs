//! Parked runs in a receive of events: a run waiting for its first event parks at once; one
//! that took an event since it was loaded waits `park_after` in memory first (unless every run
//! slot is taken), so that a run taking events one after another is not loaded again for
//! each; a send wakes a parked run, a duplicate send loads nothing, a deadline wakes it, and
//! sends racing parks lose no event. (Timers, backoffs and the wake index: `engine_park.rs`.)

mod common;

use std::time::Duration;

use common::{count, Scratch};
use keel::{Ctx, Engine, EngineBuilder, Event, Resident, RunStatus, Workflow, WorkflowError};
use keel_testkit::poll::{resident, CONDITION_TIMEOUT};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

const HOUR_MS: u64 = 3_600_000;

/// Takes an event of each name in turn (within `within_ms` when set; `None` for one that
/// timed out), counting its body's runs (`common::bodies`): a body runs at every load.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct InboxInput {
    names: Vec<String>,
    within_ms: Option<u64>,
}

struct Inbox;

impl Workflow for Inbox {
    const NAME: &'static str = "test.park-inbox";
    type Input = InboxInput;
    type Output = Vec<Option<Value>>;

    async fn run(ctx: &mut Ctx, input: InboxInput) -> Result<Vec<Option<Value>>, WorkflowError> {
        common::bodies::ran(ctx.run_id().as_str());
        let within = input.within_ms.map(Duration::from_millis);
        let mut got = Vec::new();
        for name in &input.names {
            match ctx.receive_event::<Value>(&[name], within).await {
                Ok(event) => got.push(Some(event.payload)),
                Err(WorkflowError::EventTimedOut { .. }) => got.push(None),
                Err(e) => return Err(e),
            }
        }
        Ok(got)
    }
}

/// An engine on the scratch's store, on its test clock, parking after the default.
fn builder(scratch: &Scratch) -> EngineBuilder {
    keel_testkit::store::builder(&scratch.data)
        .clock(scratch.clock.clone())
        .park_after(Some(keel::PARK_AFTER_DEFAULT))
        .workflow::<Inbox>()
}

async fn open(scratch: &Scratch) -> Engine {
    builder(scratch).open().await.expect("opening the engine")
}

fn parked(parked: usize) -> Resident {
    Resident { loaded: 0, parked }
}

fn loaded(loaded: usize) -> Resident {
    Resident { loaded, parked: 0 }
}

/// Waits until run `id` has journaled `receives` receives.
async fn receiving(engine: &Engine, id: &str, receives: usize) {
    keel_testkit::poll::until(engine, id, |h| {
        count(h, |e| matches!(e, Event::ReceiveStarted { .. })) == receives
    })
    .await;
}

/// A receive with no deadline parks at once; a send wakes the run, which takes the event and
/// then waits for the next in memory, parking `park_after` later; a duplicate send to the
/// parked run is answered without loading it; a receive with a deadline parks until the
/// deadline and then times out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receive_parks_until_its_event_or_its_deadline() {
    let scratch = Scratch::new();
    let engine = open(&scratch).await;
    let input = InboxInput {
        names: vec!["a".into(), "b".into()],
        within_ms: None,
    };
    let handle = engine.start::<Inbox>("inbox", input).await.unwrap();
    resident(&engine, parked(1)).await;
    let sent = engine.send("inbox", "a", &json!(1), "a-1").await.unwrap();
    assert!(!sent.duplicate);
    receiving(&engine, "inbox", 2).await;
    assert_eq!(
        engine.resident(),
        loaded(1),
        "a run that took an event parked before park_after"
    );
    keel_testkit::poll::advance_until(&engine, &scratch.clock, keel::PARK_AFTER_DEFAULT, parked(1))
        .await;
    let again = engine.send("inbox", "a", &json!(1), "a-1").await.unwrap();
    assert!(again.duplicate);
    assert_eq!(engine.resident(), parked(1), "a duplicate loads nothing");
    engine.send("inbox", "b", &json!(2), "b-1").await.unwrap();
    assert_eq!(
        handle.result().await.unwrap(),
        vec![Some(json!(1)), Some(json!(2))]
    );
    let history = engine.history("inbox").await.unwrap();
    assert_eq!(
        count(&history, |e| matches!(e, Event::EventDelivered { .. })),
        2
    );
    assert_eq!(
        count(&history, |e| matches!(e, Event::EventReceived { .. })),
        2
    );
    resident(&engine, Resident::default()).await;

    let started_at_ms = scratch.clock.now_ms();
    let input = InboxInput {
        names: vec!["never".into()],
        within_ms: Some(HOUR_MS),
    };
    let handle = engine.start::<Inbox>("deadline", input).await.unwrap();
    resident(&engine, parked(1)).await;
    scratch.clock.advance_to(started_at_ms + HOUR_MS);
    assert_eq!(handle.result().await.unwrap(), vec![None]);
    engine.shutdown().await;
}

/// A run taking events one after another, each sent once it took the one before, is loaded
/// for its first and then stays loaded between them: its body runs twice (at its start and
/// at the first event's load; each load replays the journal, which grows by two entries an
/// event), not once per event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_taking_events_one_after_another_is_not_loaded_for_each() {
    const EVENTS: usize = 10;
    let scratch = Scratch::new();
    let engine = open(&scratch).await;
    let input = InboxInput {
        names: (0..EVENTS).map(|n| format!("e{n}")).collect(),
        within_ms: None,
    };
    let handle = engine.start::<Inbox>("burst", input).await.unwrap();
    // Its first receive parks at once (a send racing it would find it loaded).
    resident(&engine, parked(1)).await;
    for n in 0..EVENTS {
        receiving(&engine, "burst", n + 1).await;
        engine
            .send("burst", &format!("e{n}"), &json!(n), &format!("e{n}-1"))
            .await
            .unwrap();
    }
    let expected: Vec<Option<Value>> = (0..EVENTS).map(|n| Some(json!(n))).collect();
    assert_eq!(handle.result().await.unwrap(), expected);
    assert_eq!(
        common::bodies::of("burst"),
        2,
        "the run was loaded again between its events"
    );
    engine.shutdown().await;
}

/// With every run slot taken (`runs_concurrent_max`), a run that took an event parks at once
/// instead of waiting in memory, where it would keep its slot: another run gets the slot
/// without the clock moving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_that_took_an_event_parks_at_once_when_every_run_slot_is_taken() {
    let scratch = Scratch::new();
    let engine = builder(&scratch)
        .runs_concurrent_max(1)
        .open()
        .await
        .expect("opening the engine");
    let input = InboxInput {
        names: vec!["a".into(), "b".into()],
        within_ms: None,
    };
    engine.start::<Inbox>("slots", input).await.unwrap();
    resident(&engine, parked(1)).await;
    engine.send("slots", "a", &json!(1), "a-1").await.unwrap();
    receiving(&engine, "slots", 2).await;
    resident(&engine, parked(1)).await;
    let input = InboxInput {
        names: vec![],
        within_ms: None,
    };
    let next = engine.start::<Inbox>("after", input).await.unwrap();
    tokio::time::timeout(CONDITION_TIMEOUT, next.result())
        .await
        .expect("the second run got no slot")
        .unwrap();
    engine.shutdown().await;
}

/// Sends racing runs that are parking lose no event and load no run twice: every run takes
/// its one event once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_racing_parks_lose_no_event() {
    const RUNS: usize = 150;
    let scratch = Scratch::new();
    let engine = open(&scratch).await;
    let mut sends = Vec::new();
    for i in 0..RUNS {
        let input = InboxInput {
            names: vec!["go".into()],
            within_ms: None,
        };
        let id = format!("race-{i}");
        engine.start::<Inbox>(&id, input).await.unwrap();
        let engine = engine.clone();
        // Some sends land before the run parks, some while it parks, some after.
        sends.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_micros((i % 7) as u64 * 300)).await;
            engine.send(&id, "go", &json!(i), "go-1").await
        }));
    }
    for send in sends {
        assert!(!send.await.unwrap().unwrap().duplicate);
    }
    for i in 0..RUNS {
        let id = format!("race-{i}");
        let record = engine.wait(&id).await.unwrap();
        assert_eq!(record.status, RunStatus::Completed, "{:?}", record.error);
        assert_eq!(record.output, Some(json!([i])));
        let history = engine.history(&id).await.unwrap();
        assert_eq!(
            count(&history, |e| matches!(e, Event::EventReceived { .. })),
            1
        );
    }
    resident(&engine, Resident::default()).await;
    engine.shutdown().await;
}
