//! A run id is the caller's idempotency key: the same id with the same workflow and input
//! returns the existing run (running or finished, typed or through `start_json`) and never
//! makes a second one, even under fifty concurrent starts; the same id with another workflow or
//! input is refused and runs nothing.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use common::start::{fixture, open, sum_of, Fixture, Gate, PlainFlow, PlainInput};
use keel::{Ctx, Engine, EngineError, Event, RunHistory, RunStatus, Step, Workflow, WorkflowError};
use keel_testkit::poll::until;

/// A workflow of another type, to try to start under an id that is taken.
struct OtherFlow;

impl Workflow for OtherFlow {
    const NAME: &'static str = "test.other";
    type Input = PlainInput;
    type Output = u32;

    async fn run(_ctx: &mut Ctx, _input: PlainInput) -> Result<u32, WorkflowError> {
        Ok(0)
    }
}

/// Each of the effect steps `0..steps` ran exactly once, keyed by operation number (a gate
/// halfway takes one operation number).
fn once_each(steps: u32, gated: bool) -> BTreeMap<u32, usize> {
    (0..steps)
        .map(|n| {
            if gated && n >= steps / 2 {
                (n + 1, 1)
            } else {
                (n, 1)
            }
        })
        .collect()
}

/// Whether the run has taken its gate (and waits there until the test opens it).
fn gate_started(history: &RunHistory) -> bool {
    history
        .entries
        .iter()
        .any(|e| matches!(&e.event, Event::StepStarted { kind, .. } if kind == Gate::KIND))
}

/// How many step attempts the journal records as started.
fn step_starts(history: &RunHistory) -> usize {
    history
        .entries
        .iter()
        .filter(|e| matches!(e.event, Event::StepStarted { .. }))
        .count()
}

/// Starting an id again with the same workflow and input returns the existing run, both while
/// it runs and after it finished: every step ran once, and every handle's result is the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_start_returns_the_existing_run_running_or_finished() {
    let f = fixture();
    let engine = open(&f.data).await;
    let input = f.gated_input(4);
    let first = engine
        .start::<PlainFlow>("order-1", input.clone())
        .await
        .unwrap();
    // The gate holds the run at its third operation: steps 0 and 1 ran, 2 and 3 have not.
    until(&engine, "order-1", gate_started).await;
    let second = engine
        .start::<PlainFlow>("order-1", input.clone())
        .await
        .unwrap();
    assert_eq!(second.id(), first.id());
    let record = engine.status("order-1").await.unwrap();
    assert_eq!(record.status, RunStatus::Running, "{:?}", record.error);
    assert_eq!(
        f.runs_per_step("order-1"),
        BTreeMap::from([(0, 1), (1, 1)]),
        "the second start ran nothing again"
    );
    std::fs::write(&f.gate, b"open").unwrap();
    let first_result = first.result().await.unwrap();
    let second_result = second.result().await.unwrap();
    assert_eq!(first_result, sum_of(4));
    assert_eq!(second_result, first_result);

    let finished = engine.history("order-1").await.unwrap();
    assert_eq!(finished.run.status, RunStatus::Completed);
    let third = engine
        .start::<PlainFlow>("order-1", input.clone())
        .await
        .unwrap();
    assert_eq!(third.result().await.unwrap(), first_result);
    assert_eq!(
        engine.history("order-1").await.unwrap(),
        finished,
        "starting a finished run again changed nothing"
    );
    assert_eq!(f.runs_per_step("order-1"), once_each(4, true));
    assert_eq!(step_starts(&finished), 5, "4 effect steps and the gate");
    assert_eq!(engine.list().await.unwrap().len(), 1, "one run");
    engine.shutdown().await;
}

/// The same id with another input, or with another workflow type, is refused with
/// IdempotencyMismatch, while the run is running and after it finished; nothing runs and the
/// journal does not change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_id_with_other_input_or_workflow_is_refused() {
    let f = fixture();
    let engine = open(&f.data).await;
    let input = f.gated_input(2);
    let handle = engine
        .start::<PlainFlow>("order-2", input.clone())
        .await
        .unwrap();
    until(&engine, "order-2", gate_started).await;

    let other_input = PlainInput {
        steps: 3,
        ..input.clone()
    };
    check_refusals(&engine, &f, &input, &other_input, "while running").await;
    std::fs::write(&f.gate, b"open").unwrap();
    assert_eq!(handle.result().await.unwrap(), sum_of(2));
    check_refusals(&engine, &f, &input, &other_input, "after completion").await;
    assert_eq!(f.runs_per_step("order-2"), once_each(2, true));
    let record = engine.status("order-2").await.unwrap();
    assert_eq!(record.workflow, PlainFlow::NAME);
    assert_eq!(record.input, serde_json::to_value(&input).unwrap());
    engine.shutdown().await;
}

/// Tries to start `order-2` with `other_input`, as another workflow type, and through
/// `start_json` with `other_input`: each is refused with IdempotencyMismatch and changes
/// neither the journal nor the effect log.
async fn check_refusals(
    engine: &Engine,
    f: &Fixture,
    input: &PlainInput,
    other_input: &PlainInput,
    phase: &str,
) {
    let before = engine.history("order-2").await.unwrap();
    let effects_before = f.effects();

    let err = engine
        .start::<PlainFlow>("order-2", other_input.clone())
        .await
        .err()
        .unwrap_or_else(|| panic!("{phase}: another input was accepted"));
    assert!(
        matches!(err, EngineError::IdempotencyMismatch { .. }),
        "{phase}: {err}"
    );
    let message = err.to_string();
    assert!(
        message.starts_with("run order-2 already exists with workflow \"test.plain\""),
        "{phase}: {message}"
    );
    let digest_in = serde_json::to_value(input).unwrap();
    let digest_other = serde_json::to_value(other_input).unwrap();
    assert!(
        message.contains(&keel_engine::test_utilities::digest(&digest_in))
            && message.contains(&keel_engine::test_utilities::digest(&digest_other)),
        "{phase}: the message names both inputs' digests: {message}"
    );

    let err = engine
        .start::<OtherFlow>("order-2", input.clone())
        .await
        .err()
        .unwrap_or_else(|| panic!("{phase}: another workflow was accepted"));
    assert!(
        matches!(err, EngineError::IdempotencyMismatch { .. }),
        "{phase}: {err}"
    );
    assert!(err.to_string().contains("\"test.other\""), "{phase}: {err}");

    let err = engine
        .start_json(
            "test.plain",
            "order-2",
            serde_json::to_value(other_input).unwrap(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, EngineError::IdempotencyMismatch { .. }),
        "{phase}: {err}"
    );

    assert_eq!(
        engine.history("order-2").await.unwrap(),
        before,
        "{phase}: a refused start changed the journal"
    );
    assert_eq!(
        f.effects(),
        effects_before,
        "{phase}: a refused start ran something"
    );
    assert_eq!(engine.list().await.unwrap().len(), 1, "{phase}: one run");
}

/// Fifty concurrent starts of one id (on a multi-thread runtime, released together) create
/// exactly one run; each of its steps ran once and every caller gets the same result.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_starts_create_one_run() {
    const CALLERS: usize = 50;
    let f = fixture();
    let engine = open(&f.data).await;
    let barrier = Arc::new(tokio::sync::Barrier::new(CALLERS));
    let mut callers = Vec::new();
    for _ in 0..CALLERS {
        let engine = engine.clone();
        let barrier = Arc::clone(&barrier);
        let input = f.input(5);
        callers.push(tokio::spawn(async move {
            barrier.wait().await;
            let handle = engine.start::<PlainFlow>("order-3", input).await.unwrap();
            handle.result().await.unwrap()
        }));
    }
    for caller in callers {
        assert_eq!(caller.await.unwrap(), sum_of(5));
    }
    assert_eq!(f.runs_per_step("order-3"), once_each(5, false));
    let history = engine.history("order-3").await.unwrap();
    assert_eq!(
        step_starts(&history),
        5,
        "one start per step in the journal"
    );
    let completions = history
        .entries
        .iter()
        .filter(|e| matches!(e.event, Event::RunCompleted { .. }))
        .count();
    assert_eq!(completions, 1, "the run completed once");
    assert_eq!(engine.list().await.unwrap().len(), 1, "exactly one run");
    engine.shutdown().await;
}

/// A start through `start_json` and a typed `start` of the same input are the same start,
/// even when the JSON leaves out an optional field the typed input serialises as null: the
/// second returns the existing run instead of a mismatch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_json_and_typed_start_of_the_same_input_agree() {
    let f = fixture();
    let engine = open(&f.data).await;
    let input = f.input(2);
    assert_eq!(input.gate, None);
    let sparse = serde_json::json!({"steps": input.steps, "log": input.log});
    let record = engine
        .start_json("test.plain", "order-5", sparse)
        .await
        .unwrap();
    assert_eq!(record.status, RunStatus::Running);
    let typed = engine
        .start::<PlainFlow>("order-5", input.clone())
        .await
        .expect("the same input, typed, is the same start");
    assert_eq!(typed.result().await.unwrap(), sum_of(2));
    assert_eq!(f.runs_per_step("order-5"), once_each(2, false));
    engine.shutdown().await;
}
