//! Engine behaviour at its edges: idempotent start, bad input, a locked data directory,
//! corrupt records, durable timers and retry times across a restart, non-determinism, and
//! retention.

use std::path::Path;
use std::time::{Duration, Instant};

use keel::store::sled::raw;
use keel::{
    Ctx, Engine, EngineError, Event, RetryPolicy, RunHistory, RunId, RunStatus, Step, StepContext,
    StepError, Workflow, WorkflowError,
};
use keel_testkit::crash::{is_child, ChildSpec, Ending};
use keel_testkit::effects::{self, Action};
use keel_testkit::flows::{EffectFlow, EffectFlowInput, EffectStep};
use serde::{Deserialize, Serialize};

fn input(log: &Path, steps: u32) -> EffectFlowInput {
    EffectFlowInput {
        steps,
        fail_at: None,
        sleep_ms: 1,
        log: log.to_string_lossy().into_owned(),
    }
}

async fn open(dir: &Path) -> Engine {
    Engine::builder(dir)
        .workflow::<EffectFlow>()
        .step::<EffectStep>()
        .open()
        .await
        .unwrap()
}

fn dos(log: &Path) -> usize {
    effects::read(log)
        .iter()
        .filter(|e| e.action == Action::Do)
        .count()
}

async fn until(engine: &Engine, id: &str, condition: impl Fn(&RunHistory) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !engine
        .history(id)
        .await
        .map(|h| condition(&h))
        .unwrap_or(false)
    {
        assert!(
            Instant::now() < deadline,
            "condition on run {id} never held"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Same id, workflow and input returns the existing run (nothing runs twice, even from 50
/// concurrent callers); another input or another workflow under the id is refused and runs
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_is_idempotent_by_id() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("effects.jsonl");
    let engine = open(&dir.path().join("data")).await;
    let mut callers = Vec::new();
    for _ in 0..50 {
        let engine = engine.clone();
        let input = input(&log, 3);
        callers.push(tokio::spawn(async move {
            engine
                .start::<EffectFlow>("order-1", input)
                .await
                .unwrap()
                .result()
                .await
                .unwrap()
        }));
    }
    for caller in callers {
        assert_eq!(caller.await.unwrap(), 30);
    }
    let ran = dos(&log);
    assert_eq!(ran, 4, "3 steps, one of which loses its first response");
    let again = engine
        .start::<EffectFlow>("order-1", input(&log, 3))
        .await
        .unwrap();
    assert_eq!(again.result().await.unwrap(), 30);
    let before = engine.history("order-1").await.unwrap();
    let err = engine
        .start::<EffectFlow>("order-1", input(&log, 4))
        .await
        .err()
        .unwrap();
    assert!(
        matches!(err, EngineError::IdempotencyMismatch { .. }),
        "{err}"
    );
    assert!(
        err.to_string()
            .starts_with("run order-1 already exists with workflow \"test.effect-flow\""),
        "{err}"
    );
    let err = engine.start::<UnitFlow>("order-1", ()).await.err().unwrap();
    assert!(
        matches!(err, EngineError::IdempotencyMismatch { .. }),
        "{err}"
    );
    assert_eq!(engine.history("order-1").await.unwrap(), before);
    assert_eq!(dos(&log), ran, "a refused start ran nothing");
    assert_eq!(engine.list().await.unwrap().len(), 1);
    engine.shutdown().await;
}

/// A workflow with no steps and a unit output completes and can be awaited.
struct UnitFlow;

impl Workflow for UnitFlow {
    const NAME: &'static str = "test.unit";
    type Input = ();
    type Output = ();
    async fn run(_ctx: &mut Ctx, _input: ()) -> Result<(), WorkflowError> {
        Ok(())
    }
}

/// A run whose output is `()` (stored as JSON null) completes and its result can be awaited.
#[tokio::test]
async fn unit_output_completes() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::builder(dir.path())
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
        RunStatus::Completed
    );
    engine.shutdown().await;
}

/// Malformed input, an unknown workflow and an invalid id each give a typed error naming the
/// problem, and nothing is stored.
#[tokio::test]
async fn bad_input_is_refused_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path()).await;
    let bad = serde_json::json!({"steps": "three", "fail_at": null, "sleep_ms": 1, "log": "x"});
    let err = engine
        .start_json("test.effect-flow", "bad-1", bad)
        .await
        .unwrap_err();
    assert!(matches!(err, EngineError::MalformedInput { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("malformed input for workflow \"test.effect-flow\""),
        "{err}"
    );
    assert!(
        err.to_string().contains("invalid type: string \"three\""),
        "{err}"
    );
    let missing = serde_json::json!({"fail_at": null, "sleep_ms": 1, "log": "x"});
    let err = engine
        .start_json("test.effect-flow", "bad-2", missing)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("missing field `steps`"), "{err}");
    let err = engine
        .start_json("no.such-flow", "bad-3", serde_json::json!({}))
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "unknown workflow \"no.such-flow\" (registered: test.effect-flow)"
    );
    let err = engine
        .start::<EffectFlow>("bad id", input(dir.path(), 1))
        .await
        .err()
        .unwrap();
    assert!(matches!(err, EngineError::InvalidRunId { .. }), "{err}");
    let err = engine
        .start::<EffectFlow>("", input(dir.path(), 1))
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("length"), "{err}");
    assert!(engine.list().await.unwrap().is_empty(), "nothing stored");
    engine.shutdown().await;
}

/// A second process opening a data directory in use gets a clear "locked by another process"
/// error.
#[test]
fn locked_directory_is_refused_to_a_second_process() {
    if is_child() {
        let dir = std::env::var("KEEL_DATA_DIR").unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let err = runtime
            .block_on(Engine::builder(&dir).open())
            .err()
            .expect("second open must fail");
        assert!(matches!(err, EngineError::Locked { .. }), "{err}");
        assert_eq!(
            err.to_string(),
            format!("data directory {dir} is locked by another process")
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let engine = runtime
        .block_on(Engine::builder(dir.path()).open())
        .unwrap();
    let spec = ChildSpec {
        test_name: "locked_directory_is_refused_to_a_second_process",
        env: vec![(
            "KEEL_DATA_DIR".into(),
            dir.path().to_string_lossy().into_owned(),
        )],
    };
    assert_eq!(spec.run(&[], Duration::from_secs(60)), Ending::Finished);
    runtime.block_on(engine.shutdown());
}

/// A corrupt run record and a corrupt journal entry give Corrupt errors naming the record; the
/// engine still opens, the other runs are untouched, and the corrupt bytes stay as they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_records_are_reported_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("effects.jsonl");
    let data = dir.path().join("data");
    {
        let engine = open(&data).await;
        for id in ["good", "bad-record", "bad-entry"] {
            engine
                .start::<EffectFlow>(id, input(&log, 2))
                .await
                .unwrap()
                .result()
                .await
                .unwrap();
        }
        engine.shutdown().await;
    }
    let garbage = b"\xff{not json".to_vec();
    let record_key = raw::run_key_of(&RunId::new("bad-record").unwrap());
    let entry_key = raw::journal_key_of(&RunId::new("bad-entry").unwrap(), keel::JournalIndex(1));
    {
        let db = sled::open(&data).unwrap();
        db.insert(&record_key, garbage.clone()).unwrap();
        db.insert(&entry_key, garbage.clone()).unwrap();
        db.flush().unwrap();
    }
    let good_before;
    {
        let engine = open(&data).await;
        let err = engine.status("bad-record").await.unwrap_err();
        assert!(matches!(err, EngineError::Corrupt { .. }), "{err}");
        assert!(
            err.to_string()
                .starts_with("corrupt record rbad-record: run record:"),
            "{err}"
        );
        let err = engine.history("bad-entry").await.unwrap_err();
        assert!(err.to_string().contains("journal entry"), "{err}");
        good_before = engine.history("good").await.unwrap();
        let listed: Vec<String> = engine
            .list()
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.id.to_string())
            .collect();
        assert_eq!(listed, vec!["bad-entry", "good"]);
        engine.shutdown().await;
    }
    let db = sled::open(&data).unwrap();
    assert_eq!(db.get(&record_key).unwrap().unwrap().to_vec(), garbage);
    assert_eq!(db.get(&entry_key).unwrap().unwrap().to_vec(), garbage);
    drop(db);
    let engine = open(&data).await;
    assert_eq!(engine.history("good").await.unwrap(), good_before);
    engine.shutdown().await;
}

/// Sleeps, then fails its first attempt with a 1.5 s retry-after hint.
struct TimedFlow;

#[derive(Serialize, Deserialize)]
struct Hinted;

impl Step for Hinted {
    const KIND: &'static str = "test.hinted";
    type Output = u32;
    async fn execute(&self, ctx: &StepContext) -> Result<u32, StepError> {
        if ctx.attempt().0 == 1 {
            return Err(StepError::retryable("busy").with_retry_after(Duration::from_millis(1500)));
        }
        Ok(ctx.attempt().0)
    }
    fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy::default().with_backoff(Duration::from_millis(1), Duration::from_millis(10))
    }
}

impl Workflow for TimedFlow {
    const NAME: &'static str = "test.timed";
    type Input = u64;
    type Output = u32;
    async fn run(ctx: &mut Ctx, sleep_ms: u64) -> Result<u32, WorkflowError> {
        ctx.sleep(Duration::from_millis(sleep_ms)).await?;
        ctx.step(Hinted).await
    }
}

fn entry_at(history: &RunHistory, predicate: impl Fn(&Event) -> bool) -> (u64, Event) {
    let entry = history
        .entries
        .iter()
        .find(|e| predicate(&e.event))
        .expect("entry present");
    (entry.at_ms, entry.event.clone())
}

/// A durable timer and a journaled retry time survive a restart: the timer fires at its
/// original wake time (not shortened, not restarted), and the retry neither restarts its
/// attempt count nor starts before its journaled time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timers_and_retry_times_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    let open = || {
        Engine::builder(dir.path())
            .workflow::<TimedFlow>()
            .step::<Hinted>()
            .open()
    };
    let engine = open().await.unwrap();
    engine.start::<TimedFlow>("timed", 1200).await.unwrap();
    until(&engine, "timed", |h| {
        h.entries
            .iter()
            .any(|e| matches!(e.event, Event::TimerSet { .. }))
    })
    .await;
    engine.shutdown().await;
    drop(engine);
    let engine = open().await.unwrap();
    until(&engine, "timed", |h| {
        h.entries
            .iter()
            .any(|e| matches!(e.event, Event::StepFailed { .. }))
    })
    .await;
    engine.shutdown().await;
    drop(engine);
    let engine = open().await.unwrap();
    let record = engine.wait("timed").await.unwrap();
    assert_eq!(record.status, RunStatus::Completed, "{:?}", record.error);
    assert_eq!(
        record.output,
        Some(serde_json::json!(2)),
        "attempt 2 succeeded: the count went on after restart"
    );
    let history = engine.history("timed").await.unwrap();
    let (set_at, set) = entry_at(&history, |e| matches!(e, Event::TimerSet { .. }));
    let Event::TimerSet { wake_at_ms, .. } = set else {
        unreachable!()
    };
    assert!(
        (1200..1300).contains(&(wake_at_ms - set_at)),
        "wake time is set-time + 1200 ms"
    );
    let (fired_at, _) = entry_at(&history, |e| matches!(e, Event::TimerFired { .. }));
    assert!(
        fired_at >= wake_at_ms,
        "timer fired {} ms early",
        wake_at_ms - fired_at
    );
    let (_, failed) = entry_at(&history, |e| matches!(e, Event::StepFailed { .. }));
    let Event::StepFailed {
        retry_at_ms: Some(retry_at_ms),
        ..
    } = failed
    else {
        panic!("{failed:?}")
    };
    let (second_at, _) = entry_at(
        &history,
        |e| matches!(e, Event::StepStarted { attempt, .. } if attempt.0 == 2),
    );
    assert!(
        second_at >= retry_at_ms,
        "attempt 2 started {} ms before its journaled time",
        retry_at_ms - second_at
    );
    engine.shutdown().await;
}

/// Version 1 of a workflow: step `test.first`, then a long sleep.
struct ChangingV1;
/// The "same" workflow after an incompatible code change: another step kind first.
struct ChangingV2;

#[derive(Serialize, Deserialize)]
struct First(u32);
#[derive(Serialize, Deserialize)]
struct Second(u32);

impl Step for First {
    const KIND: &'static str = "test.first";
    type Output = u32;
    async fn execute(&self, _ctx: &StepContext) -> Result<u32, StepError> {
        Ok(self.0)
    }
}

impl Step for Second {
    const KIND: &'static str = "test.second";
    type Output = u32;
    async fn execute(&self, _ctx: &StepContext) -> Result<u32, StepError> {
        Ok(self.0)
    }
}

impl Workflow for ChangingV1 {
    const NAME: &'static str = "test.changing";
    type Input = u64;
    type Output = u32;
    async fn run(ctx: &mut Ctx, sleep_ms: u64) -> Result<u32, WorkflowError> {
        let n = ctx.step(First(7)).await?;
        ctx.sleep(Duration::from_millis(sleep_ms)).await?;
        Ok(n)
    }
}

impl Workflow for ChangingV2 {
    const NAME: &'static str = "test.changing";
    const VERSION: u32 = 2;
    type Input = u64;
    type Output = u32;
    async fn run(ctx: &mut Ctx, _sleep_ms: u64) -> Result<u32, WorkflowError> {
        ctx.step(Second(7)).await
    }
}

/// Replay is checked: when the code asks for another step kind than the journal holds at an
/// operation number, the run stops Suspended with an error naming both, and after the code is
/// fixed an operator resume completes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_code_suspends_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::builder(dir.path())
        .workflow::<ChangingV1>()
        .open()
        .await
        .unwrap();
    engine.start::<ChangingV1>("changing", 400).await.unwrap();
    until(&engine, "changing", |h| {
        h.entries
            .iter()
            .any(|e| matches!(e.event, Event::TimerSet { .. }))
    })
    .await;
    engine.shutdown().await;
    drop(engine);
    let engine = Engine::builder(dir.path())
        .workflow::<ChangingV2>()
        .open()
        .await
        .unwrap();
    let record = engine.wait("changing").await.unwrap();
    assert_eq!(record.status, RunStatus::Suspended);
    let error = record.error.unwrap();
    assert!(
        error.contains("\"test.first\"") && error.contains("\"test.second\""),
        "{error}"
    );
    engine.shutdown().await;
    drop(engine);
    let engine = Engine::builder(dir.path())
        .workflow::<ChangingV1>()
        .open()
        .await
        .unwrap();
    assert_eq!(
        engine.status("changing").await.unwrap().status,
        RunStatus::Suspended,
        "suspended survives a restart"
    );
    engine.resume("changing").await.unwrap();
    let record = engine.wait("changing").await.unwrap();
    assert_eq!(record.status, RunStatus::Completed, "{:?}", record.error);
    engine.shutdown().await;
}

/// Finished runs are kept for the retention period, then collected; the id can then start a
/// new run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_runs_are_collected_after_retention() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("effects.jsonl");
    let data = dir.path().join("data");
    let kept = open(&data).await;
    kept.start::<EffectFlow>("old", input(&log, 1))
        .await
        .unwrap()
        .result()
        .await
        .unwrap();
    assert_eq!(
        kept.collect_garbage().unwrap(),
        0,
        "within the default 7-day retention"
    );
    kept.shutdown().await;
    drop(kept);
    let engine = Engine::builder(&data)
        .workflow::<EffectFlow>()
        .step::<EffectStep>()
        .retention(Duration::ZERO)
        .open()
        .await
        .unwrap();
    // Collected by the background pass at open or by this call, whichever comes first.
    engine.collect_garbage().unwrap();
    assert!(matches!(
        engine.status("old").await,
        Err(EngineError::RunNotFound { .. })
    ));
    let before = dos(&log);
    engine
        .start::<EffectFlow>("old", input(&log, 1))
        .await
        .unwrap()
        .result()
        .await
        .unwrap();
    assert_eq!(dos(&log), before + 1, "the id ran anew");
    engine.shutdown().await;
}
