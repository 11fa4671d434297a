//! The provisioning workflows talking to the outside, against moto's server through the fault
//! proxy, with moto's own state read directly as ground truth: a Greengrass core that waits
//! for its check-in completes when the `core-checked-in` event comes and records it, and one
//! whose deadline passes undoes everything it made; a fleet above its `approval_above` waits
//! with nothing made until an `approve` (it completes) or a `reject` (it fails, nothing made),
//! and a fleet at the bound does not wait. Progress is read as a caller would, through
//! `Engine::published`.

mod common;

use std::time::{Duration, Instant};

use common::env;
use keel_engine::{Engine, EngineError, Event, RunStatus};
use keel_testkit::inventory::Inventory;
use keel_testkit::proxy::{Fault, FaultRule, Rules};
use keel_workflows::fleet::{OnboardFleet, APPROVE_EVENT, PROGRESS, REJECT_EVENT};
use keel_workflows::greengrass::{CheckInWait, CheckedIn, ProvisionCore, CHECK_IN_EVENT};
use keel_workflows::sample::{core, fleet};
use serde_json::{json, Value};

/// How long a run may take to get to the point a test waits for (provisioning through the
/// proxy's faults included).
const PROGRESS_TIMEOUT: Duration = Duration::from_secs(120);

fn hostile(seed: u64) -> Rules {
    Rules::seeded(seed)
        .fault(FaultRule::new(Fault::LostResponse).probability(0.1))
        .fault(FaultRule::new(Fault::Throttle).probability(0.1))
}

/// Waits until run `id` has published a progress value containing `needle`, and returns it;
/// panics after [`PROGRESS_TIMEOUT`] naming the value it saw last.
async fn progress_containing(engine: &Engine, id: &str, needle: &str) -> String {
    let deadline = Instant::now() + PROGRESS_TIMEOUT;
    let mut seen = None;
    let mut last = String::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let value = engine
            .published_wait(id, PROGRESS, seen, left.min(Duration::from_secs(5)))
            .await
            .unwrap();
        if let Some(value) = value {
            seen = Some(value.version);
            last = value.value.as_str().unwrap_or_default().to_string();
            if last.contains(needle) {
                return last;
            }
        }
        assert!(
            Instant::now() < deadline,
            "run {id} published no progress containing {needle:?} within \
             {PROGRESS_TIMEOUT:?}; last {last:?}"
        );
    }
}

/// The latest progress value of run `id`, as a string.
async fn progress(engine: &Engine, id: &str) -> String {
    let published = engine.published(id, PROGRESS).await.unwrap();
    let value = published.map(|p| p.value).unwrap_or(Value::Null);
    value.as_str().unwrap_or_default().to_string()
}

/// How many of run `id`'s journal entries `predicate` matches.
async fn count(engine: &Engine, id: &str, predicate: impl Fn(&Event) -> bool) -> usize {
    let history = engine.history(id).await.unwrap();
    history
        .entries
        .iter()
        .filter(|e| predicate(&e.event))
        .count()
}

/// The names of the things moto holds whose name starts with `prefix`.
fn things(truth: &Inventory, prefix: &str) -> Vec<String> {
    let mut names: Vec<String> = truth
        .things
        .iter()
        .filter(|t| t.name.starts_with(prefix))
        .map(|t| t.name.clone())
        .collect();
    names.sort();
    names
}

/// A core asked to wait for its check-in publishes that it waits once deployed, stays
/// running with its group in moto, and completes when `core-checked-in` is sent, its output
/// recording the event's id and payload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_core_that_checks_in_completes_recording_the_check_in() {
    let env = env(hostile(11)).await;
    let mut input = core("plant", 1);
    input.wait_for_check_in = Some(CheckInWait { within_s: 600 });
    let run = env
        .engine
        .start::<ProvisionCore>("plant", input)
        .await
        .unwrap();
    let waiting = progress_containing(&env.engine, "plant", "waiting for check-in").await;
    assert_eq!(
        waiting,
        "deployed; waiting for check-in of plant-core (up to 600 s)"
    );
    let record = env.engine.status("plant").await.unwrap();
    assert_eq!(record.status, RunStatus::Running);
    let truth = Inventory::read(&env.direct).await.unwrap();
    assert_eq!(truth.groups.len(), 1, "deployed: {}", truth.summary());

    let payload = json!({"greengrass_version": "1.11.6", "ip": "10.0.0.7"});
    let delivered = env
        .engine
        .send("plant", CHECK_IN_EVENT, &payload, "plant-core-boot-1")
        .await
        .unwrap();
    assert!(!delivered.duplicate);
    let output = run.result().await.unwrap();
    assert_eq!(
        output.checked_in,
        Some(CheckedIn {
            event_id: "plant-core-boot-1".into(),
            payload,
        })
    );
    assert_eq!(
        progress(&env.engine, "plant").await,
        "checked in (plant-core, event \"plant-core-boot-1\")"
    );
    let truth = Inventory::read(&env.direct).await.unwrap();
    assert_eq!(things(&truth, "plant"), ["plant-client-0", "plant-core"]);
    assert_eq!(truth.groups.len(), 1, "{}", truth.summary());
    assert_eq!(truth.roles.len(), 1, "{}", truth.summary());
    env.engine.shutdown().await;
}

/// A core that never checks in fails when its deadline (2 s after the deployment) passes and
/// compensates everything, child runs included: moto holds nothing, the run's error says the
/// core never checked in, and a check-in sent afterwards is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_core_that_never_checks_in_is_compensated_to_nothing() {
    let env = env(hostile(12)).await;
    let mut input = core("silent", 1);
    input.wait_for_check_in = Some(CheckInWait { within_s: 2 });
    let error = env
        .engine
        .start::<ProvisionCore>("silent", input)
        .await
        .unwrap()
        .result()
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("compensated"), "{error}");
    assert!(
        error
            .contains("core silent-core never checked in: no \"core-checked-in\" event within 2 s"),
        "{error}"
    );
    assert_eq!(
        count(&env.engine, "silent", |e| matches!(
            e,
            Event::ReceiveTimedOut { .. }
        ))
        .await,
        1
    );
    let truth = Inventory::read(&env.direct).await.unwrap();
    assert!(truth.is_empty(), "{}", truth.summary());
    for run in env.engine.list().await.unwrap() {
        assert_eq!(
            run.status,
            RunStatus::Compensated,
            "{}: {:?}",
            run.id,
            run.error
        );
    }
    let late = env
        .engine
        .send("silent", CHECK_IN_EVENT, &json!({}), "silent-late")
        .await
        .unwrap_err();
    assert!(matches!(late, EngineError::InvalidState { .. }), "{late}");
    env.engine.shutdown().await;
}

/// Fleets above `approval_above` wait, running, with nothing made and "awaiting approval"
/// published; `reject` ends one failed with its reason and nothing in moto, `approve` lets
/// another complete with every thing in moto; a fleet at the bound never waits. Each ends
/// with "M of M devices onboarded" published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleets_above_the_bound_wait_for_approve_or_reject() {
    let env = env(hostile(13)).await;
    let above = |prefix: &str, count| {
        let mut input = fleet(prefix, count, 2);
        input.approval_above = Some(3);
        input
    };
    let rejected = env
        .engine
        .start::<OnboardFleet>("rejected", above("rejected", 4))
        .await
        .unwrap();
    let approved = env
        .engine
        .start::<OnboardFleet>("approved", above("approved", 4))
        .await
        .unwrap();
    let small = env
        .engine
        .start::<OnboardFleet>("small", above("small", 3))
        .await
        .unwrap();
    for id in ["rejected", "approved"] {
        let waiting = progress_containing(&env.engine, id, "awaiting approval").await;
        assert_eq!(
            waiting,
            "awaiting approval: 4 devices, more than approval_above (3); send \"approve\" or \
             \"reject\""
        );
        let record = env.engine.status(id).await.unwrap();
        assert_eq!(record.status, RunStatus::Running, "{id}");
    }
    // The small fleet goes on meanwhile: awaiting fleets are not blocking anything else.
    let small = small.result().await.unwrap();
    assert_eq!(small.onboarded.len(), 3);
    assert_eq!(small.approval_event_id, None);
    assert_eq!(
        count(&env.engine, "small", |e| matches!(
            e,
            Event::ReceiveStarted { .. }
        ))
        .await,
        0,
        "at the bound, no wait"
    );
    assert_eq!(
        progress(&env.engine, "small").await,
        "3 of 3 devices onboarded"
    );
    // The fan-out reported each device as it ended, before the final count.
    let history = env.engine.history("small").await.unwrap();
    let reports: Vec<&Value> = history
        .entries
        .iter()
        .filter_map(|e| match &e.event {
            Event::ProgressPublished { value, .. } => Some(value),
            _ => None,
        })
        .collect();
    assert_eq!(reports.len(), 3, "one report per device: {reports:?}");
    assert_eq!(*reports[0], json!("1 of 3 devices onboarded"));
    let truth = Inventory::read(&env.direct).await.unwrap();
    assert!(things(&truth, "rejected").is_empty(), "{}", truth.summary());
    assert!(things(&truth, "approved").is_empty(), "{}", truth.summary());
    let children: Vec<String> = env
        .engine
        .list()
        .await
        .unwrap()
        .into_iter()
        .filter_map(|r| r.parent.map(|p| p.to_string()))
        .collect();
    assert!(
        children.iter().all(|p| p == "small"),
        "no child run of a waiting fleet: {children:?}"
    );

    env.engine
        .send(
            "rejected",
            REJECT_EVENT,
            &json!({"reason": "over this week's budget"}),
            "ops-1",
        )
        .await
        .unwrap();
    let error = rejected.result().await.unwrap_err().to_string();
    assert!(error.contains("ended failed"), "{error}");
    assert!(
        error.contains("fleet of 4 devices rejected (event \"ops-1\"): over this week's budget"),
        "{error}"
    );
    assert_eq!(
        env.engine.status("rejected").await.unwrap().status,
        RunStatus::Failed
    );

    env.engine
        .send("approved", APPROVE_EVENT, &json!({"by": "ops"}), "ops-2")
        .await
        .unwrap();
    let approved = approved.result().await.unwrap();
    assert_eq!(approved.onboarded.len(), 4);
    assert!(approved.failed.is_empty());
    assert_eq!(approved.approval_event_id.as_deref(), Some("ops-2"));
    assert_eq!(
        progress(&env.engine, "approved").await,
        "4 of 4 devices onboarded"
    );

    let truth = Inventory::read(&env.direct).await.unwrap();
    assert!(things(&truth, "rejected").is_empty(), "{}", truth.summary());
    assert_eq!(
        things(&truth, "approved"),
        ["approved-0", "approved-1", "approved-2", "approved-3"]
    );
    assert_eq!(things(&truth, "small"), ["small-0", "small-1", "small-2"]);
    assert_eq!(truth.things.len(), 7, "{}", truth.summary());
    assert_eq!(truth.certificates.len(), 7, "{}", truth.summary());
    assert!(truth.things.iter().all(|t| t.principals.len() == 1));
    env.engine.shutdown().await;
}
