//! Starting runs: a run id is the caller's idempotency key. The same id with the same workflow
//! and input returns the existing run (running or finished) and never makes a second one; the
//! same id with another workflow or input is refused and runs nothing; after retention the id
//! is free again; and a malformed start request is refused with a typed error that stores
//! nothing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keel::testing::TestClock;
use keel::{
    Ctx, Engine, EngineError, Event, RunHistory, RunStatus, Step, StepContext, StepError, Workflow,
    WorkflowError,
};
use keel_testkit::effects::{self, Action, Effect};
use keel_testkit::flows::{EffectFlow, EffectStep, Fault};
use keel_testkit::poll::{until, CONDITION_TIMEOUT};
use serde::{Deserialize, Serialize};

/// Input of [`PlainFlow`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct PlainInput {
    /// How many effect steps.
    steps: u32,
    /// A file whose existence opens the gate taken halfway, if any.
    gate: Option<String>,
    /// The ground-truth effect log.
    log: String,
}

/// `steps` fault-free effect steps, with an optional gate halfway that holds the run until the
/// test opens it; output: the sum of the step outputs.
struct PlainFlow;

impl Workflow for PlainFlow {
    const NAME: &'static str = "test.plain";
    type Input = PlainInput;
    type Output = u32;

    async fn run(ctx: &mut Ctx, input: PlainInput) -> Result<u32, WorkflowError> {
        let mut sum = 0;
        for n in 0..input.steps {
            if n == input.steps / 2 {
                if let Some(path) = &input.gate {
                    ctx.step(Gate { path: path.clone() }).await?;
                }
            }
            sum += ctx
                .step(EffectStep {
                    n,
                    fault: Fault::None,
                    log: input.log.clone(),
                    jitter_ms: 0,
                })
                .await?;
        }
        Ok(sum)
    }
}

/// A step that completes once the file at `path` exists (polled, bounded), so a test can hold
/// a run in the running state for as long as it needs.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Gate {
    path: String,
}

impl Step for Gate {
    const KIND: &'static str = "test.gate";
    type Output = ();

    async fn execute(&self, _ctx: &StepContext) -> Result<(), StepError> {
        let deadline = Instant::now() + CONDITION_TIMEOUT;
        while !Path::new(&self.path).exists() {
            if Instant::now() >= deadline {
                return Err(StepError::permanent(format!(
                    "gate {} never opened",
                    self.path
                )));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        Ok(())
    }
}

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

/// A temporary data directory and effect log.
struct Fixture {
    _dir: tempfile::TempDir,
    data: PathBuf,
    log: PathBuf,
    gate: PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    Fixture {
        data: dir.path().join("data"),
        log: dir.path().join("effects.jsonl"),
        gate: dir.path().join("gate"),
        _dir: dir,
    }
}

impl Fixture {
    fn input(&self, steps: u32) -> PlainInput {
        PlainInput {
            steps,
            gate: None,
            log: self.log.to_string_lossy().into_owned(),
        }
    }

    fn gated_input(&self, steps: u32) -> PlainInput {
        PlainInput {
            gate: Some(self.gate.to_string_lossy().into_owned()),
            ..self.input(steps)
        }
    }

    fn effects(&self) -> Vec<Effect> {
        effects::read(&self.log)
    }

    /// For `run`: how many times each step's side effect ran, by operation number.
    fn runs_per_step(&self, run: &str) -> BTreeMap<u32, usize> {
        let mut counts = BTreeMap::new();
        for effect in self.effects() {
            if effect.run == run && effect.action == Action::Do {
                *counts.entry(effect.step).or_insert(0) += 1;
            }
        }
        counts
    }
}

async fn open(data: &Path) -> Engine {
    keel_testkit::open_engine(|| {
        Engine::builder(data)
            .workflow::<PlainFlow>()
            .workflow::<EffectFlow>()
            .step::<EffectStep>()
            .step::<Gate>()
    })
    .await
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

/// The output of a [`PlainFlow`] run of `steps` steps.
fn sum_of(steps: u32) -> u32 {
    (0..steps).map(|n| n * 10).sum()
}

fn gate_started(history: &RunHistory) -> bool {
    history
        .entries
        .iter()
        .any(|e| matches!(&e.event, Event::StepStarted { kind, .. } if kind == Gate::KIND))
}

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

/// The retention of the collection tests: a day, on a test clock that the tests move.
const RETENTION: Duration = Duration::from_secs(24 * 3600);

/// An engine for the collection tests, on `clock`: the background pass the engine makes at
/// open sees nothing expired (the clock has not moved), and the background interval is long,
/// so it makes no other pass during a test.
async fn open_collecting(data: &Path, clock: &TestClock) -> Engine {
    Engine::builder(data)
        .clock(clock.clone())
        .workflow::<PlainFlow>()
        .step::<EffectStep>()
        .retention(RETENTION)
        .gc_interval(Duration::from_secs(3600))
        .open()
        .await
        .unwrap()
}

/// Garbage collection deletes many runs in chunks: more runs than one write takes are all
/// collected, each with its journal, and runs still within the retention stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collection_deletes_every_expired_run_and_keeps_the_rest() {
    const EXPIRED: usize = 600;
    let f = fixture();
    let clock = TestClock::new();
    let engine = open_collecting(&f.data, &clock).await;
    let mut handles = Vec::new();
    for n in 0..EXPIRED {
        handles.push(
            engine
                .start::<PlainFlow>(&format!("old-{n}"), f.input(1))
                .await
                .unwrap(),
        );
    }
    for handle in handles {
        handle.result().await.unwrap();
    }
    clock.advance(RETENTION);
    let kept = engine
        .start::<PlainFlow>("recent", f.input(1))
        .await
        .unwrap();
    kept.result().await.unwrap();
    clock.advance(Duration::from_millis(1));

    assert_eq!(engine.collect_garbage().await.unwrap(), EXPIRED);
    let left = engine.list().await.unwrap();
    assert_eq!(left.len(), 1, "only the recent run is left");
    assert_eq!(left[0].id.as_str(), "recent");
    for n in [0, 255, 256, EXPIRED - 1] {
        let err = engine.history(&format!("old-{n}")).await.unwrap_err();
        assert!(matches!(err, EngineError::RunNotFound { .. }), "{err}");
    }
    assert_eq!(
        engine.history("recent").await.unwrap().run.status,
        RunStatus::Completed
    );
    engine.shutdown().await;
}

/// A retention too long to count in milliseconds keeps every run (as good as forever)
/// instead of wrapping to a few hundred milliseconds and collecting runs a second old.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retention_past_what_milliseconds_count_keeps_every_run() {
    let f = fixture();
    let clock = TestClock::new();
    let engine = Engine::builder(&f.data)
        .clock(clock.clone())
        .workflow::<PlainFlow>()
        .step::<EffectStep>()
        .retention(Duration::from_secs(18_446_744_073_709_552))
        .gc_interval(Duration::from_secs(3600))
        .open()
        .await
        .unwrap();
    let run = engine.start::<PlainFlow>("kept", f.input(1)).await.unwrap();
    run.result().await.unwrap();
    clock.advance(Duration::from_secs(1));
    assert_eq!(
        engine.collect_garbage().await.unwrap(),
        0,
        "nothing expired"
    );
    assert_eq!(engine.list().await.unwrap().len(), 1);
    engine.shutdown().await;
}

/// Once a finished run is older than the retention, garbage collection deletes it (and says
/// so), its id is unknown, and starting the id again runs the workflow anew.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collected_id_starts_a_new_run() {
    let f = fixture();
    let clock = TestClock::new();
    let engine = open_collecting(&f.data, &clock).await;
    let output = engine
        .start::<PlainFlow>("order-4", f.input(2))
        .await
        .unwrap()
        .result()
        .await
        .unwrap();
    assert_eq!(output, sum_of(2));
    let first = engine.status("order-4").await.unwrap();
    let finished_at_ms = first.finished_at_ms.expect("a completed run has finished");
    // Collection passes over loaded runs, and a settled run is unloaded just after its
    // waiters are told: reopen, so nothing is loaded and the counts below are exact.
    engine.shutdown().await;
    drop(engine);
    let engine = open_collecting(&f.data, &clock).await;
    clock.advance(RETENTION - Duration::from_millis(1));
    assert_eq!(
        engine.collect_garbage().await.unwrap(),
        0,
        "kept for the retention"
    );
    clock.advance(Duration::from_millis(1));

    assert_eq!(
        engine.collect_garbage().await.unwrap(),
        1,
        "the run is collected"
    );
    let err = engine.status("order-4").await.unwrap_err();
    assert!(matches!(err, EngineError::RunNotFound { .. }), "{err}");
    let err = engine.history("order-4").await.unwrap_err();
    assert!(matches!(err, EngineError::RunNotFound { .. }), "{err}");
    assert!(engine.list().await.unwrap().is_empty());
    assert_eq!(
        engine.collect_garbage().await.unwrap(),
        0,
        "nothing left to collect"
    );

    let again = engine
        .start::<PlainFlow>("order-4", f.input(2))
        .await
        .unwrap();
    assert_eq!(again.result().await.unwrap(), output);
    let second = engine.history("order-4").await.unwrap();
    assert_eq!(second.run.status, RunStatus::Completed);
    assert_eq!(
        second.run.created_at_ms,
        finished_at_ms + RETENTION.as_millis() as u64,
        "a new run, created when the old one was collected"
    );
    assert_eq!(
        second
            .entries
            .iter()
            .filter(|e| matches!(e.event, Event::RunCompleted { .. }))
            .count(),
        1,
        "the new journal starts afresh"
    );
    assert_eq!(
        f.runs_per_step("order-4"),
        BTreeMap::from([(0, 2), (1, 2)]),
        "every step ran again, once"
    );
    engine.shutdown().await;
}

/// `start_json` refuses a malformed input, an unknown workflow (listing the registered ones)
/// and an invalid run id, each with its typed error, and stores nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_json_refuses_bad_requests_and_stores_nothing() {
    let f = fixture();
    let engine = open(&f.data).await;
    let log = f.log.to_string_lossy().into_owned();

    let wrong_type = serde_json::json!({"steps": "three", "gate": null, "log": log});
    let err = engine
        .start_json("test.plain", "bad-1", wrong_type)
        .await
        .unwrap_err();
    assert!(matches!(err, EngineError::MalformedInput { .. }), "{err}");
    let message = err.to_string();
    assert!(
        message.starts_with("malformed input for workflow \"test.plain\""),
        "{message}"
    );

    let missing = serde_json::json!({"gate": null, "log": log});
    let err = engine
        .start_json("test.plain", "bad-2", missing)
        .await
        .unwrap_err();
    assert!(matches!(err, EngineError::MalformedInput { .. }), "{err}");
    assert!(err.to_string().contains("missing field `steps`"), "{err}");

    let err = engine
        .start_json("no.such-flow", "bad-3", serde_json::json!({}))
        .await
        .unwrap_err();
    match &err {
        EngineError::UnknownWorkflow { name, registered } => {
            assert_eq!(name, "no.such-flow");
            assert_eq!(registered, "test.effect-flow, test.plain");
        }
        other => panic!("expected UnknownWorkflow, got {other}"),
    }
    assert_eq!(
        err.to_string(),
        "unknown workflow \"no.such-flow\" (registered: test.effect-flow, test.plain)"
    );

    let good_input = serde_json::to_value(f.input(1)).unwrap();
    for bad_id in ["a b", "", "tab\there", "nul\u{0}byte"] {
        let err = engine
            .start_json("test.plain", bad_id, good_input.clone())
            .await
            .unwrap_err();
        match &err {
            EngineError::InvalidRunId { id, .. } => assert_eq!(id, bad_id),
            other => panic!("id {bad_id:?}: expected InvalidRunId, got {other}"),
        }
    }
    let err = engine
        .start_json("test.plain", &"x".repeat(129), good_input.clone())
        .await
        .unwrap_err();
    assert!(matches!(err, EngineError::InvalidRunId { .. }), "{err}");

    assert!(engine.list().await.unwrap().is_empty(), "nothing stored");
    assert!(f.effects().is_empty(), "nothing ran");
    engine.shutdown().await;
    drop(engine);
    let engine = open(&f.data).await;
    assert!(
        engine.list().await.unwrap().is_empty(),
        "nothing stored, after a reopen either"
    );
    engine.shutdown().await;
}

/// The error for an input field of the wrong type names that field, so the caller can tell
/// which part of a large input to fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_input_error_names_the_bad_field() {
    let f = fixture();
    let engine = open(&f.data).await;
    let log = f.log.to_string_lossy().into_owned();
    let wrong_type = serde_json::json!({"steps": "three", "gate": null, "log": log});
    let err = engine
        .start_json("test.plain", "bad-field", wrong_type)
        .await
        .unwrap_err();
    assert!(matches!(err, EngineError::MalformedInput { .. }), "{err}");
    let message = err.to_string();
    assert!(
        message.contains("steps"),
        "the message names the field of the wrong type: {message}"
    );
    assert!(engine.list().await.unwrap().is_empty(), "nothing stored");
    engine.shutdown().await;
}

/// Input of [`StrictFlow`]: unknown fields are refused, here and in the nested role.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StrictInput {
    role: StrictRole,
    #[serde(default)]
    note: Option<String>,
}

/// The nested part of [`StrictInput`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StrictRole {
    name: String,
    #[serde(default)]
    managed_policy_arns: Vec<String>,
}

/// A workflow whose input refuses unknown fields; it does nothing.
struct StrictFlow;

impl Workflow for StrictFlow {
    const NAME: &'static str = "test.strict";
    type Input = StrictInput;
    type Output = ();

    async fn run(_ctx: &mut Ctx, _input: StrictInput) -> Result<(), WorkflowError> {
        Ok(())
    }
}

/// A field the input type does not know (a typo of a real one, nested or at the top) is
/// refused by `start_json` as `InvalidInput` naming its path and the fields expected there,
/// in one line, and nothing is stored; a field of the wrong type is still `MalformedInput`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_input_fields_are_refused_naming_their_path() {
    let f = fixture();
    let engine =
        keel_testkit::open_engine(|| Engine::builder(&f.data).workflow::<StrictFlow>()).await;
    let typo = serde_json::json!({"role": {"name": "r", "managed_policy_arn": ["arn"]}});
    let err = engine
        .start_json("test.strict", "typo", typo)
        .await
        .unwrap_err();
    match &err {
        EngineError::InvalidInput { field, reason, .. } => {
            assert_eq!(field, "role.managed_policy_arn");
            assert_eq!(
                reason,
                "unknown field (expected `name` or `managed_policy_arns`)"
            );
        }
        other => panic!("expected InvalidInput, got {other:?}"),
    }
    assert_eq!(
        err.to_string(),
        "invalid input for workflow \"test.strict\": field role.managed_policy_arn: unknown \
         field (expected `name` or `managed_policy_arns`)"
    );
    let top = serde_json::json!({"role": {"name": "r"}, "colour": "red"});
    let err = engine
        .start_json("test.strict", "top", top)
        .await
        .unwrap_err();
    match &err {
        EngineError::InvalidInput { field, reason, .. } => {
            assert_eq!(field, "colour");
            assert_eq!(reason, "unknown field (expected `role` or `note`)");
        }
        other => panic!("expected InvalidInput, got {other:?}"),
    }
    let wrong_type = serde_json::json!({"role": {"name": 7}});
    let err = engine
        .start_json("test.strict", "wrong", wrong_type)
        .await
        .unwrap_err();
    assert!(matches!(err, EngineError::MalformedInput { .. }), "{err}");
    assert!(engine.list().await.unwrap().is_empty(), "nothing stored");

    let known = serde_json::json!({"role": {"name": "r", "managed_policy_arns": ["arn"]}});
    let record = engine.start_json("test.strict", "ok", known).await.unwrap();
    assert_eq!(record.input["role"]["managed_policy_arns"][0], "arn");
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

/// A workflow with no steps and a unit output.
struct UnitFlow;

impl keel::Workflow for UnitFlow {
    const NAME: &'static str = "test.unit";
    type Input = ();
    type Output = ();
    async fn run(_ctx: &mut keel::Ctx, _input: ()) -> Result<(), keel::WorkflowError> {
        Ok(())
    }
}

/// A run whose output is `()` (stored as JSON null, which reads back as an absent output)
/// completes and its result can be awaited.
#[tokio::test]
async fn unit_output_completes() {
    let dir = tempfile::tempdir().unwrap();
    let engine = keel::Engine::builder(dir.path())
        .workflow::<UnitFlow>()
        .open()
        .await
        .unwrap();
    engine
        .start::<UnitFlow>("unit", ())
        .await
        .unwrap()
        .result()
        .await
        .unwrap();
    assert_eq!(
        engine.status("unit").await.unwrap().status,
        keel::RunStatus::Completed
    );
    engine.shutdown().await;
}
