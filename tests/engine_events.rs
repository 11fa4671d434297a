//! Events in and values out: `Engine::send` into a run's mailbox and `Ctx::receive*` out of
//! it (arrival order per name, early arrival, idempotency by event id, mismatches, deadlines,
//! cancel and pause while blocked, finished and unknown runs, bounds), `Ctx::publish` and
//! `Engine::published*` (the last value wins, long polls wake), and starting a run with an
//! event. Each refusal is checked to store nothing.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use keel::testing::TestClock;
use keel::{
    Ctx, Engine, EngineError, Event, EventIn, RunHistory, RunStatus, Workflow, WorkflowError,
};
use keel_testkit::poll::{asleep, until};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// What an [`Inbox`] run does: sleep first (so that events arrive early), then one receive
/// per entry of `plan` (the names it takes an event of), each given up after `within_ms` if
/// set, publishing `progress` after each if `publish`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct InboxInput {
    sleep_ms: u64,
    plan: Vec<Vec<String>>,
    within_ms: Option<u64>,
    publish: bool,
}

/// One receive's result: the event taken, or `None` for a deadline that passed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Got {
    name: String,
    event_id: String,
    payload: Value,
}

struct Inbox;

impl Workflow for Inbox {
    const NAME: &'static str = "test.inbox";
    type Input = InboxInput;
    type Output = Vec<Option<Got>>;

    async fn run(ctx: &mut Ctx, input: InboxInput) -> Result<Vec<Option<Got>>, WorkflowError> {
        if input.sleep_ms > 0 {
            ctx.sleep(Duration::from_millis(input.sleep_ms)).await?;
        }
        let within = input.within_ms.map(Duration::from_millis);
        let mut got = Vec::new();
        for (i, names) in input.plan.iter().enumerate() {
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            match ctx.receive_event::<Value>(&names, within).await {
                Ok(event) => got.push(Some(Got {
                    name: event.name,
                    event_id: event.event_id,
                    payload: event.payload,
                })),
                Err(WorkflowError::EventTimedOut { .. }) => got.push(None),
                Err(e) => return Err(e),
            }
            if input.publish {
                let progress = format!("{} of {}", i + 1, input.plan.len());
                ctx.publish("progress", &progress).await?;
            }
        }
        Ok(got)
    }
}

fn plan(names: &[&str]) -> Vec<Vec<String>> {
    names.iter().map(|n| vec![(*n).to_owned()]).collect()
}

async fn open(data: &Path, clock: Option<&TestClock>) -> Engine {
    let mut builder = keel_testkit::store::builder(data).workflow::<Inbox>();
    if let Some(clock) = clock {
        builder = builder.clock(clock.clone());
    }
    builder.open().await.expect("opening the engine")
}

fn output(record: &keel::RunRecord) -> Vec<Option<Got>> {
    serde_json::from_value(record.output.clone().expect("an output")).unwrap()
}

fn count(history: &RunHistory, predicate: impl Fn(&Event) -> bool) -> usize {
    history
        .entries
        .iter()
        .filter(|e| predicate(&e.event))
        .count()
}

fn deliveries(history: &RunHistory) -> usize {
    count(history, |e| matches!(e, Event::EventDelivered { .. }))
}

/// Events sent before the run asks are kept and taken in the order they arrived, per name:
/// a receive of `a` takes the earliest `a`, whatever arrived between.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_events_wait_in_the_mailbox_and_are_taken_in_arrival_order_per_name() {
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::new();
    let engine = open(dir.path(), Some(&clock)).await;
    let input = InboxInput {
        sleep_ms: 1000,
        plan: plan(&["a", "b", "a", "a"]),
        ..Default::default()
    };
    engine.start::<Inbox>("early", input).await.unwrap();
    asleep(&clock).await;
    for (name, id) in [("a", "a1"), ("a", "a2"), ("b", "b1"), ("a", "a3")] {
        let sent = engine
            .send("early", name, &json!({"id": id}), id)
            .await
            .unwrap();
        assert!(!sent.duplicate);
    }
    clock.advance(Duration::from_millis(1000));
    let record = engine.wait("early").await.unwrap();
    assert_eq!(record.status, RunStatus::Completed, "{:?}", record.error);
    let ids: Vec<String> = output(&record)
        .into_iter()
        .map(|got| got.unwrap().event_id)
        .collect();
    assert_eq!(ids, ["a1", "b1", "a2", "a3"]);
    let history = engine.history("early").await.unwrap();
    assert_eq!(deliveries(&history), 4);
    assert_eq!(
        count(&history, |e| matches!(e, Event::EventReceived { .. })),
        4
    );
    engine.shutdown().await;
}

/// The same event id twice is one event, even after the run took it and finished; the same
/// id with another payload or name is refused naming both; an unknown run, a finished run and
/// a run whose workflow cannot take events any more refuse. No refusal stores anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_is_idempotent_by_event_id_and_refuses_mismatches_and_finished_runs() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), None).await;
    let input = InboxInput {
        plan: plan(&["go", "go"]),
        ..Default::default()
    };
    engine.start::<Inbox>("idem", input).await.unwrap();
    let first = engine.send("idem", "go", &json!(1), "e-1").await.unwrap();
    assert!(!first.duplicate);
    let again = engine.send("idem", "go", &json!(1), "e-1").await.unwrap();
    assert!(again.duplicate, "the same id and payload is the same event");

    // The run goes on meanwhile (it takes e-1): refusals are checked to deliver nothing.
    let before = deliveries(&engine.history("idem").await.unwrap());
    let other_payload = engine
        .send("idem", "go", &json!(2), "e-1")
        .await
        .unwrap_err();
    assert!(
        matches!(other_payload, EngineError::EventMismatch { .. }),
        "{other_payload}"
    );
    let message = other_payload.to_string();
    assert!(
        message.contains("e-1") && message.contains("idem"),
        "{message}"
    );
    let other_name = engine
        .send("idem", "stop", &json!(1), "e-1")
        .await
        .unwrap_err();
    assert!(
        matches!(other_name, EngineError::EventMismatch { .. }),
        "{other_name}"
    );
    assert_eq!(deliveries(&engine.history("idem").await.unwrap()), before);

    engine.send("idem", "go", &json!(3), "e-2").await.unwrap();
    let record = engine.wait("idem").await.unwrap();
    assert_eq!(record.status, RunStatus::Completed, "{:?}", record.error);
    let got = output(&record);
    assert_eq!(got[0].as_ref().unwrap().event_id, "e-1");
    assert_eq!(got[1].as_ref().unwrap().event_id, "e-2");

    // Finished: a retried send is still the same event; a new one is refused.
    let finished = engine.history("idem").await.unwrap().entries.len();
    let retried = engine.send("idem", "go", &json!(3), "e-2").await.unwrap();
    assert!(retried.duplicate);
    let late = engine
        .send("idem", "go", &json!(4), "e-3")
        .await
        .unwrap_err();
    assert!(
        matches!(late, EngineError::InvalidState { .. }) && late.to_string().contains("completed"),
        "{late}"
    );
    let mismatch = engine
        .send("idem", "go", &json!(9), "e-2")
        .await
        .unwrap_err();
    assert!(
        matches!(mismatch, EngineError::EventMismatch { .. }),
        "{mismatch}"
    );
    assert_eq!(
        engine.history("idem").await.unwrap().entries.len(),
        finished
    );

    let unknown = engine
        .send("nobody", "go", &json!(1), "e-1")
        .await
        .unwrap_err();
    assert!(
        matches!(unknown, EngineError::RunNotFound { .. }),
        "{unknown}"
    );
    assert_eq!(engine.list().await.unwrap().len(), 1, "nothing created");
    engine.shutdown().await;
}

/// A deadline that passes is `EventTimedOut`, which the body catches; the deadline is
/// journaled as an absolute time and kept across a restart; an event that arrives after it
/// stays in the mailbox for a later receive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passed_deadline_is_event_timed_out_kept_across_restart() {
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::new();
    let engine = open(dir.path(), Some(&clock)).await;
    let input = InboxInput {
        plan: plan(&["late", "late"]),
        within_ms: Some(5000),
        ..Default::default()
    };
    let started_at = clock.now_ms();
    engine.start::<Inbox>("deadline", input).await.unwrap();
    assert_eq!(asleep(&clock).await, started_at + 5000);
    clock.advance(Duration::from_millis(2000));
    engine.shutdown().await;
    drop(engine);

    clock.advance(Duration::from_millis(1000));
    let engine = open(dir.path(), Some(&clock)).await;
    assert_eq!(
        asleep(&clock).await,
        started_at + 5000,
        "the reopened receive waits until its journaled deadline"
    );
    clock.advance_to(started_at + 5000);
    // The first receive timed out; the second waits with a fresh deadline: an event sent
    // now is taken by it.
    until(&engine, "deadline", |h| {
        count(h, |e| matches!(e, Event::ReceiveTimedOut { .. })) == 1
            && count(h, |e| matches!(e, Event::ReceiveStarted { .. })) == 2
    })
    .await;
    engine
        .send("deadline", "late", &json!("now"), "l-1")
        .await
        .unwrap();
    let record = engine.wait("deadline").await.unwrap();
    assert_eq!(record.status, RunStatus::Completed, "{:?}", record.error);
    let got = output(&record);
    assert_eq!(got[0], None, "the first receive timed out");
    assert_eq!(got[1].as_ref().unwrap().event_id, "l-1");
    let history = engine.history("deadline").await.unwrap();
    let timed_out_at: Vec<u64> = history
        .entries
        .iter()
        .filter(|e| matches!(e.event, Event::ReceiveTimedOut { .. }))
        .map(|e| e.at_ms)
        .collect();
    assert_eq!(
        timed_out_at,
        [started_at + 5000],
        "timed out at its deadline exactly"
    );
    engine.shutdown().await;
}

/// A pause wakes a run blocked in a receive (it pauses; events sent meanwhile are kept and
/// taken after the resume); a cancel wakes one and it settles without completing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_and_cancel_wake_a_blocked_receive() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), None).await;
    let input = InboxInput {
        plan: plan(&["x"]),
        ..Default::default()
    };
    engine
        .start::<Inbox>("paused", input.clone())
        .await
        .unwrap();
    engine.start::<Inbox>("cancelled", input).await.unwrap();
    for id in ["paused", "cancelled"] {
        until(&engine, id, |h| {
            count(h, |e| matches!(e, Event::ReceiveStarted { .. })) == 1
        })
        .await;
    }

    engine.pause("paused").await.unwrap();
    let record = engine.wait("paused").await.unwrap();
    assert_eq!(record.status, RunStatus::Paused);
    engine
        .send("paused", "x", &json!("while paused"), "p-1")
        .await
        .unwrap();
    engine.resume("paused").await.unwrap();
    let record = engine.wait("paused").await.unwrap();
    assert_eq!(record.status, RunStatus::Completed, "{:?}", record.error);
    assert_eq!(output(&record)[0].as_ref().unwrap().event_id, "p-1");

    engine.cancel("cancelled").await.unwrap();
    let record = engine.wait("cancelled").await.unwrap();
    assert!(
        matches!(record.status, RunStatus::Failed | RunStatus::Compensated),
        "{:?}",
        record.status
    );
    let refused = engine
        .send("cancelled", "x", &json!(1), "c-1")
        .await
        .unwrap_err();
    assert!(
        matches!(refused, EngineError::InvalidState { .. }),
        "{refused}"
    );
    engine.shutdown().await;
}

/// Bad names, ids and payloads, and a full mailbox, are refused with an error naming what is
/// wrong, and nothing is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounds_are_refused_and_store_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), None).await;
    let input = InboxInput {
        sleep_ms: 3_600_000,
        plan: plan(&["x"]),
        ..Default::default()
    };
    engine.start::<Inbox>("bounded", input).await.unwrap();
    until(&engine, "bounded", |h| {
        count(h, |e| matches!(e, Event::TimerSet { .. })) == 1
    })
    .await;
    let before = engine.history("bounded").await.unwrap().entries.len();
    let long_name = "n".repeat(keel::limits::EVENT_NAME_LEN_MAX + 1);
    let long_id = "i".repeat(keel::limits::EVENT_ID_LEN_MAX + 1);
    let big = "p".repeat(keel::limits::EVENT_PAYLOAD_BYTES_MAX);
    let cases: Vec<(&str, &str, Value, &str)> = vec![
        ("", "e", json!(1), "1 to 64 bytes"),
        ("has space", "e", json!(1), "' '"),
        (&long_name, "e", json!(1), "1 to 64 bytes"),
        ("x", "", json!(1), "event id"),
        ("x", "has space", json!(1), "event id"),
        ("x", &long_id, json!(1), "1 to 128 bytes"),
        ("x", "e", json!(big), "payload of event"),
    ];
    for (name, id, payload, says) in cases {
        let error = engine
            .send("bounded", name, &payload, id)
            .await
            .unwrap_err();
        assert!(
            matches!(
                error,
                EngineError::InvalidRequest(_) | EngineError::TooLarge { .. }
            ),
            "{error}"
        );
        assert!(
            error.to_string().contains(says),
            "{error} should say {says:?}"
        );
    }
    assert_eq!(
        engine.history("bounded").await.unwrap().entries.len(),
        before
    );

    // A full mailbox: every event up to the bound is kept, the next one refused.
    let max = keel::limits::MAILBOX_EVENTS_MAX;
    let sends: Vec<_> = (0..max)
        .map(|i| {
            let engine = engine.clone();
            tokio::spawn(async move { engine.send("bounded", "x", &i, &format!("m-{i}")).await })
        })
        .collect();
    for sent in sends {
        sent.await.unwrap().unwrap();
    }
    let full = engine.send("bounded", "x", &0, "m-over").await.unwrap_err();
    assert!(matches!(full, EngineError::LimitReached { .. }), "{full}");
    assert!(
        full.to_string().contains("mailbox of run bounded"),
        "{full}"
    );
    let history = engine.history("bounded").await.unwrap();
    assert_eq!(deliveries(&history), max as usize);
    // A retry of a kept event is still answered as such, full mailbox or not.
    assert!(
        engine
            .send("bounded", "x", &7u32, "m-7")
            .await
            .unwrap()
            .duplicate
    );
    engine.shutdown().await;
}

/// The last value published wins; `published_wait` wakes when one appears and again when it
/// changes, returns at once for a finished run, and gives up at its timeout with what is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_values_last_wins_and_long_polls_wake() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), None).await;
    let input = InboxInput {
        plan: plan(&["go", "go", "go"]),
        publish: true,
        ..Default::default()
    };
    engine.start::<Inbox>("progress", input).await.unwrap();
    assert_eq!(
        engine.published("progress", "progress").await.unwrap(),
        None
    );
    let waited = engine
        .published_wait("progress", "progress", None, Duration::from_millis(50))
        .await
        .unwrap();
    assert_eq!(waited, None, "nothing published within the timeout");

    let waiter = {
        let engine = engine.clone();
        tokio::spawn(async move {
            engine
                .published_wait("progress", "progress", None, Duration::from_secs(30))
                .await
        })
    };
    let sent_at = std::time::Instant::now();
    engine.send("progress", "go", &1, "g-1").await.unwrap();
    let first = waiter.await.unwrap().unwrap().expect("a value");
    assert!(
        sent_at.elapsed() < Duration::from_secs(20),
        "the publish woke the long poll (it did not wait out its 30 s)"
    );
    assert_eq!(first.value, json!("1 of 3"));

    let waiter = {
        let engine = engine.clone();
        let seen = first.version;
        tokio::spawn(async move {
            engine
                .published_wait("progress", "progress", Some(seen), Duration::from_secs(30))
                .await
        })
    };
    let sent_at = std::time::Instant::now();
    engine.send("progress", "go", &2, "g-2").await.unwrap();
    let second = waiter.await.unwrap().unwrap().expect("a value");
    assert!(
        sent_at.elapsed() < Duration::from_secs(20),
        "woken by the change"
    );
    assert_eq!(second.value, json!("2 of 3"));
    assert!(second.version > first.version);

    engine.send("progress", "go", &3, "g-3").await.unwrap();
    let record = engine.wait("progress").await.unwrap();
    assert_eq!(record.status, RunStatus::Completed, "{:?}", record.error);
    let last = engine
        .published("progress", "progress")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(last.value, json!("3 of 3"));
    // Finished: a wait for something newer answers at once with the last value.
    let at_once = tokio::time::timeout(
        Duration::from_secs(5),
        engine.published_wait(
            "progress",
            "progress",
            Some(last.version),
            Duration::from_secs(60),
        ),
    )
    .await
    .expect("a finished run's wait answers at once")
    .unwrap();
    assert_eq!(at_once, Some(last.clone()));
    // A wait too long to count is the end of time, not a panic.
    let forever = engine
        .published_wait("progress", "progress", Some(last.version), Duration::MAX)
        .await
        .unwrap();
    assert_eq!(forever, Some(last));
    let bad = engine.published("progress", "no spaces").await.unwrap_err();
    assert!(matches!(bad, EngineError::InvalidRequest(_)), "{bad}");
    engine.shutdown().await;
}

/// A run started with an event has it in its mailbox from its first entry; the same start
/// again is the same run and the same event; another input under the id is refused and
/// stores nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_with_event_is_one_durable_idempotent_step() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), None).await;
    let input = InboxInput {
        plan: plan(&["hello", "hello"]),
        ..Default::default()
    };
    let event = EventIn::new("hello", "h-1", &json!({"from": "start"})).unwrap();
    engine
        .start_with_event::<Inbox>("greeted", input.clone(), event.clone())
        .await
        .unwrap();
    engine
        .start_with_event::<Inbox>("greeted", input.clone(), event.clone())
        .await
        .unwrap();
    let history = engine.history("greeted").await.unwrap();
    assert!(matches!(
        history.entries[0].event,
        Event::EventDelivered { ref event_id, .. } if event_id == "h-1"
    ));
    assert_eq!(
        deliveries(&history),
        1,
        "one event however often it is started"
    );
    let other = InboxInput {
        plan: plan(&["hello"]),
        ..Default::default()
    };
    let refused = engine
        .start_with_event::<Inbox>("greeted", other, event)
        .await
        .unwrap_err();
    assert!(
        matches!(refused, EngineError::IdempotencyMismatch { .. }),
        "{refused}"
    );
    // A second event through a start of the same run.
    let second = EventIn::new("hello", "h-2", &json!(2)).unwrap();
    engine
        .start_with_event::<Inbox>("greeted", input, second)
        .await
        .unwrap();
    let record = engine.wait("greeted").await.unwrap();
    assert_eq!(record.status, RunStatus::Completed, "{:?}", record.error);
    let ids: Vec<String> = output(&record)
        .into_iter()
        .map(|g| g.unwrap().event_id)
        .collect();
    assert_eq!(ids, ["h-1", "h-2"]);
    assert_eq!(engine.list().await.unwrap().len(), 1);
    engine.shutdown().await;
}

/// 1,000 events sent from 50 tasks to 20 runs: every one is taken once, each task's events to
/// a run are taken in the order it sent them, and each run takes each name's events in the
/// order they arrived.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_events_from_fifty_tasks_to_twenty_runs() {
    const RUNS: usize = 20;
    const TASKS: usize = 50;
    const PER_TASK: usize = 20;
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), None).await;
    // Task t sends PER_TASK events to run t % RUNS, alternating "even" and "odd".
    let tasks_of = |run: usize| (0..TASKS).filter(move |t| t % RUNS == run).count();
    for run in 0..RUNS {
        let half = tasks_of(run) * PER_TASK / 2;
        let mut names = vec!["even"; half];
        names.extend(vec!["odd"; half]);
        let input = InboxInput {
            plan: plan(&names),
            ..Default::default()
        };
        engine
            .start::<Inbox>(&format!("busy-{run}"), input)
            .await
            .unwrap();
    }
    let engine = Arc::new(engine);
    let senders: Vec<_> = (0..TASKS)
        .map(|task| {
            let engine = Arc::clone(&engine);
            tokio::spawn(async move {
                let run = format!("busy-{}", task % RUNS);
                for seq in 0..PER_TASK {
                    let name = if seq % 2 == 0 { "even" } else { "odd" };
                    let id = format!("t{task}-s{seq}");
                    let payload = json!({"task": task, "seq": seq});
                    engine.send(&run, name, &payload, &id).await.unwrap();
                }
            })
        })
        .collect();
    for sender in senders {
        sender.await.unwrap();
    }
    for run in 0..RUNS {
        let id = format!("busy-{run}");
        let record = engine.wait(&id).await.unwrap();
        assert_eq!(record.status, RunStatus::Completed, "{:?}", record.error);
        let got: Vec<Got> = output(&record).into_iter().map(Option::unwrap).collect();
        assert_eq!(
            got.len(),
            tasks_of(run) * PER_TASK,
            "run {id} took every event"
        );
        let mut seen = std::collections::BTreeSet::new();
        let mut last_seq: BTreeMap<(u64, String), u64> = BTreeMap::new();
        for event in &got {
            assert!(
                seen.insert(event.event_id.clone()),
                "{} taken twice",
                event.event_id
            );
            let task = event.payload["task"].as_u64().unwrap();
            let seq = event.payload["seq"].as_u64().unwrap();
            assert_eq!(task as usize % RUNS, run, "an event of another run");
            if let Some(previous) = last_seq.insert((task, event.name.clone()), seq) {
                assert!(
                    previous < seq,
                    "task {task}'s {} events out of order",
                    event.name
                );
            }
        }
        // Per name, taken in journal (arrival) order.
        let history = engine.history(&id).await.unwrap();
        for name in ["even", "odd"] {
            let arrived: Vec<&str> = history
                .entries
                .iter()
                .filter_map(|e| match &e.event {
                    Event::EventDelivered {
                        name: n, event_id, ..
                    } if n == name => Some(event_id.as_str()),
                    _ => None,
                })
                .collect();
            let taken: Vec<&str> = got
                .iter()
                .filter(|g| g.name == name)
                .map(|g| g.event_id.as_str())
                .collect();
            assert_eq!(
                taken, arrived,
                "run {id} took {name} events out of arrival order"
            );
        }
    }
    let engine = Arc::try_unwrap(engine).expect("the senders are done");
    engine.shutdown().await;
}

/// Publishes a value of the input's size under the input's name; with the name `step`, takes
/// a step whose argument is that size instead.
struct Publisher;

impl Workflow for Publisher {
    const NAME: &'static str = "test.publisher";
    type Input = (String, usize);
    type Output = ();

    async fn run(ctx: &mut Ctx, (name, bytes): (String, usize)) -> Result<(), WorkflowError> {
        if name == "step" {
            return ctx.step(Sized("a".repeat(bytes))).await;
        }
        ctx.publish(&name, &"v".repeat(bytes)).await
    }
}

/// A step with nothing to do but an argument of the size given.
#[derive(Serialize, Deserialize)]
struct Sized(String);

impl keel::Step for Sized {
    const KIND: &'static str = "test.sized";
    type Output = ();
    async fn execute(&self, _ctx: &keel::StepContext) -> Result<(), keel::StepError> {
        Ok(())
    }
}

/// A body that publishes a value past the bound, or under a bad name, or receives under a bad
/// name, or takes a step whose argument is past its bound, is a defect of its code: its run
/// is suspended with the reason, and nothing of the operation is journaled. (Before, a value
/// past its bound stopped the run's driver, "to resume at the next open", where it stopped
/// again: the run was never settled.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_past_the_bounds_is_suspended() {
    let dir = tempfile::tempdir().unwrap();
    let engine = keel_testkit::store::builder(dir.path())
        .workflow::<Inbox>()
        .workflow::<Publisher>()
        .open()
        .await
        .unwrap();
    let big = keel::limits::EVENT_PAYLOAD_BYTES_MAX;
    engine
        .start::<Publisher>("too-big", ("progress".into(), big))
        .await
        .unwrap();
    engine
        .start::<Publisher>("bad-name", ("no spaces".into(), 1))
        .await
        .unwrap();
    engine
        .start::<Publisher>("big-step", ("step".into(), big))
        .await
        .unwrap();
    let input = InboxInput {
        plan: vec![vec!["fine".into(), "fine".into()]],
        ..Default::default()
    };
    engine.start::<Inbox>("names-twice", input).await.unwrap();
    for (id, says) in [
        ("too-big", "published value \"progress\" is"),
        ("bad-name", "published value name \"no spaces\""),
        ("names-twice", "names event \"fine\" twice"),
        ("big-step", "argument of step #0 (test.sized) is"),
    ] {
        let record = engine.wait(id).await.unwrap();
        assert_eq!(record.status, RunStatus::Suspended, "{id}: {record:?}");
        let error = record.error.unwrap_or_default();
        assert!(error.contains(says), "{id}: {error:?} should say {says:?}");
        let history = engine.history(id).await.unwrap();
        assert_eq!(
            count(&history, |e| matches!(
                e,
                Event::ValuePublished { .. }
                    | Event::ReceiveStarted { .. }
                    | Event::StepStarted { .. }
            )),
            0,
            "{id}: nothing of the operation journaled"
        );
    }
    engine.shutdown().await;
}

/// Starts one [`Inbox`] child per input plan, two at a time, reporting "N of M" under
/// `progress` as each child ends.
struct Fan;

impl Workflow for Fan {
    const NAME: &'static str = "test.fan";
    type Input = Vec<InboxInput>;
    type Output = usize;

    async fn run(ctx: &mut Ctx, inputs: Vec<InboxInput>) -> Result<usize, WorkflowError> {
        let results = ctx
            .children_reporting::<Inbox, _>(inputs, 2, "progress", |p| {
                format!("{} of {} ({} ended)", p.completed, p.total, p.ended)
            })
            .await?;
        Ok(results.iter().filter(|r| r.is_ok()).count())
    }
}

/// A fan-out of children reports its progress as each child ends, readable (and waited for)
/// while it goes on; the reports are not operations, so a restart mid-fan-out replays the
/// body without them and goes on reporting from where the children are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fan_out_reports_progress_as_children_end() {
    let dir = tempfile::tempdir().unwrap();
    let open_fan = |dir: std::path::PathBuf| async move {
        keel_testkit::store::builder(dir)
            .workflow::<Inbox>()
            .workflow::<Fan>()
            .open()
            .await
            .unwrap()
    };
    let engine = open_fan(dir.path().to_owned()).await;
    let child = InboxInput {
        plan: plan(&["go"]),
        ..Default::default()
    };
    engine.start::<Fan>("fan", vec![child; 4]).await.unwrap();
    assert_eq!(engine.published("fan", "progress").await.unwrap(), None);
    // The fork is operation 0; its branches, the children, are operations 1 to 4.
    let mut seen = None;
    for (n, child) in ["fan/1", "fan/2"].into_iter().enumerate() {
        until(&engine, child, |h| {
            count(h, |e| matches!(e, Event::ReceiveStarted { .. })) == 1
        })
        .await;
        engine
            .send(child, "go", &n, &format!("{child}-go"))
            .await
            .unwrap();
        let report = engine
            .published_wait("fan", "progress", seen, Duration::from_secs(30))
            .await
            .unwrap()
            .expect("a report");
        assert_eq!(
            report.value,
            json!(format!("{} of 4 ({} ended)", n + 1, n + 1))
        );
        seen = Some(report.version);
    }
    engine.shutdown().await;
    drop(engine);

    let engine = open_fan(dir.path().to_owned()).await;
    for (n, child) in ["fan/3", "fan/4"].into_iter().enumerate() {
        until(&engine, child, |h| {
            count(h, |e| matches!(e, Event::ReceiveStarted { .. })) == 1
        })
        .await;
        engine
            .send(child, "go", &n, &format!("{child}-go"))
            .await
            .unwrap();
        let done = n + 3;
        until(&engine, "fan", |h| {
            h.entries.iter().any(|e| {
                matches!(&e.event, Event::ProgressPublished { value, .. }
                    if *value == json!(format!("{done} of 4 ({done} ended)")))
            })
        })
        .await;
    }
    let record = engine.wait("fan").await.unwrap();
    assert_eq!(record.status, RunStatus::Completed, "{:?}", record.error);
    assert_eq!(record.output, Some(json!(4)));
    let last = engine.published("fan", "progress").await.unwrap().unwrap();
    assert_eq!(last.value, json!("4 of 4 (4 ended)"));
    engine.shutdown().await;
}
