//! Panics in user code are contained: a panicking step attempt is a failed attempt, retried
//! and then in doubt; a panicking compensation is a failed undo attempt; a panicking workflow
//! body suspends its run; a panicking branch of a fan-out lets the others finish. Every
//! waiter hears how the run ended, within a bound.

use std::path::{Path, PathBuf};
use std::time::Duration;

use keel::{
    Compensation, Ctx, Engine, EngineError, ErrorClass, Event, OnRetriesExhausted, RetryPolicy,
    RunHistory, RunStatus, Step, StepContext, StepError, Workflow, WorkflowError,
};
use keel_testkit::effects::{self, Action};
use keel_testkit::poll::CONDITION_TIMEOUT;
use serde::{Deserialize, Serialize};

/// Records its effect, then panics on the attempts up to `panics_until` (and, when
/// `undo_panics`, in every compensation); later attempts return the attempt number.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Panicky {
    log: String,
    panics_until: u32,
    attempts_max: u32,
    undo_panics: bool,
}

impl Step for Panicky {
    const KIND: &'static str = "test.panicky";
    type Output = u32;

    async fn execute(&self, ctx: &StepContext) -> Result<u32, StepError> {
        effects::record(&self.log, Action::Do, ctx)?;
        if ctx.attempt().0 <= self.panics_until {
            panic!("boom at attempt {}", ctx.attempt());
        }
        Ok(ctx.attempt().0)
    }

    fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy::default()
            .with_attempts_max(self.attempts_max)
            .with_backoff(Duration::from_millis(1), Duration::from_millis(5))
    }

    async fn compensate(
        &self,
        ctx: &StepContext,
        output: Option<u32>,
    ) -> Result<Compensation, StepError> {
        if self.undo_panics {
            panic!("undo boom at attempt {}", ctx.attempt());
        }
        if output.is_none() {
            // In doubt: undo only what the key shows was done.
            let key = ctx.key().to_string();
            let done = effects::read(Path::new(&self.log))
                .iter()
                .any(|e| e.action == Action::Do && e.key == key);
            if !done {
                return Ok(Compensation::Done);
            }
        }
        effects::record(&self.log, Action::Undo, ctx)?;
        Ok(Compensation::Done)
    }

    fn compensation_retry_policy(&self) -> RetryPolicy {
        RetryPolicy::default()
            .with_attempts_max(3)
            .with_backoff(Duration::from_millis(1), Duration::from_millis(5))
    }
}

/// One [`Panicky`] step, then (when `fail_after`) a business failure, so the run compensates.
struct PanickyFlow;

#[derive(Clone, Debug, Serialize, Deserialize)]
struct PanickyInput {
    step: Panicky,
    fail_after: bool,
}

impl Workflow for PanickyFlow {
    const NAME: &'static str = "test.panicky-flow";
    type Input = PanickyInput;
    type Output = u32;

    async fn run(ctx: &mut Ctx, input: PanickyInput) -> Result<u32, WorkflowError> {
        let attempt = ctx.step(input.step).await?;
        if input.fail_after {
            return Err(WorkflowError::failed("failing after the step, on purpose"));
        }
        Ok(attempt)
    }
}

/// [`PanickyFlow`], pausing when a step runs out of retries.
struct PausingPanickyFlow;

impl Workflow for PausingPanickyFlow {
    const NAME: &'static str = "test.pausing-panicky-flow";
    const ON_RETRIES_EXHAUSTED: OnRetriesExhausted = OnRetriesExhausted::Pause;
    type Input = PanickyInput;
    type Output = u32;

    async fn run(ctx: &mut Ctx, input: PanickyInput) -> Result<u32, WorkflowError> {
        PanickyFlow::run(ctx, input).await
    }
}

/// A step, then a panic while the marker file `<log>.panic` exists.
struct PanickingBody;

impl Workflow for PanickingBody {
    const NAME: &'static str = "test.panicking-body";
    type Input = String;
    type Output = u32;

    async fn run(ctx: &mut Ctx, log: String) -> Result<u32, WorkflowError> {
        let attempt = ctx.step(panicky(&log, 0, 1)).await?;
        if Path::new(&format!("{log}.panic")).exists() {
            panic!("the body's own bug");
        }
        Ok(attempt)
    }
}

/// Six branches; branch 2 panics on its only attempt, the others sleep a little (so they are
/// still running when it panics) and succeed. Outputs how many branches succeeded.
struct PanickingBranch;

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Slow {
    log: String,
    n: u32,
}

impl Step for Slow {
    const KIND: &'static str = "test.slow-or-panicking";
    type Output = u32;

    async fn execute(&self, ctx: &StepContext) -> Result<u32, StepError> {
        if self.n == 2 {
            panic!("branch {} panics", self.n);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        effects::record(&self.log, Action::Do, ctx)?;
        Ok(self.n)
    }

    fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy::no_retry()
    }
}

impl Workflow for PanickingBranch {
    const NAME: &'static str = "test.panicking-branch";
    type Input = String;
    type Output = usize;

    async fn run(ctx: &mut Ctx, log: String) -> Result<usize, WorkflowError> {
        let steps = (0..6)
            .map(|n| Slow {
                log: log.clone(),
                n,
            })
            .collect();
        let results = ctx.join(steps, 6).await?;
        Ok(results.iter().filter(|r| r.is_ok()).count())
    }
}

fn panicky(log: &str, panics_until: u32, attempts_max: u32) -> Panicky {
    Panicky {
        log: log.into(),
        panics_until,
        attempts_max,
        undo_panics: false,
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    data: PathBuf,
    log: String,
}

fn setup() -> Setup {
    keel_testkit::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log = dir
        .path()
        .join("effects.jsonl")
        .to_string_lossy()
        .into_owned();
    Setup {
        _dir: dir,
        data,
        log,
    }
}

async fn open(data: &Path) -> Engine {
    keel_testkit::store::builder(data)
        .workflow::<PanickyFlow>()
        .workflow::<PausingPanickyFlow>()
        .workflow::<PanickingBody>()
        .workflow::<PanickingBranch>()
        .step::<Panicky>()
        .step::<Slow>()
        .open()
        .await
        .unwrap()
}

/// The run's record once it settled, failing the test if no answer comes within the bound.
async fn settled(engine: &Engine, id: &str) -> keel::RunRecord {
    tokio::time::timeout(CONDITION_TIMEOUT, engine.wait(id))
        .await
        .unwrap_or_else(|_| panic!("the waiter of run {id} was never answered"))
        .unwrap()
}

fn failures(history: &RunHistory) -> Vec<(u32, ErrorClass, String, bool)> {
    history
        .entries
        .iter()
        .filter_map(|e| match &e.event {
            Event::StepFailed {
                attempt,
                error,
                retry_at_ms,
                ..
            } => Some((
                attempt.0,
                error.class,
                error.message.clone(),
                retry_at_ms.is_some(),
            )),
            _ => None,
        })
        .collect()
}

fn count(log: &str, action: Action) -> usize {
    effects::read(Path::new(log))
        .iter()
        .filter(|e| e.action == action)
        .count()
}

/// A step attempt that panics is a failed attempt, journaled as "panicked: <message>" and
/// retryable, so it is retried under the step's policy: two panics, then the third attempt
/// completes the run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_step_attempt_is_a_failed_attempt_and_is_retried() {
    let s = setup();
    let engine = open(&s.data).await;
    let input = PanickyInput {
        step: panicky(&s.log, 2, 5),
        fail_after: false,
    };
    engine.start::<PanickyFlow>("retried", input).await.unwrap();
    let record = settled(&engine, "retried").await;
    assert_eq!(record.status, RunStatus::Completed, "{:?}", record.error);
    assert_eq!(record.output, Some(serde_json::json!(3)));
    let history = engine.history("retried").await.unwrap();
    let failed = failures(&history);
    assert_eq!(failed.len(), 2, "{failed:?}");
    for (i, (attempt, class, message, retried)) in failed.iter().enumerate() {
        assert_eq!(*attempt, i as u32 + 1);
        assert_eq!(*class, ErrorClass::Retryable);
        assert!(
            message.starts_with("panicked: boom at attempt"),
            "{message}"
        );
        assert!(retried, "attempt {attempt} is retried");
    }
    assert_eq!(count(&s.log, Action::Do), 3, "ground truth: three attempts");
    engine.shutdown().await;
}

/// A step whose every attempt panics runs out of retries in doubt (each attempt may have
/// taken effect), so the run compensates it, without an output, found by key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_that_always_panics_is_in_doubt_and_undone() {
    let s = setup();
    let engine = open(&s.data).await;
    let input = PanickyInput {
        step: panicky(&s.log, u32::MAX, 3),
        fail_after: false,
    };
    engine.start::<PanickyFlow>("doubt", input).await.unwrap();
    let record = settled(&engine, "doubt").await;
    assert_eq!(record.status, RunStatus::Compensated, "{:?}", record.error);
    assert!(
        record.error.as_deref().unwrap_or("").contains("panicked"),
        "{:?}",
        record.error
    );
    assert_eq!(count(&s.log, Action::Do), 3);
    assert_eq!(
        count(&s.log, Action::Undo),
        1,
        "the in-doubt step was undone"
    );
    engine.shutdown().await;
}

/// In a workflow that pauses when a step runs out of retries, a step that keeps panicking
/// pauses the run for an operator, as any other exhausted step does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_that_keeps_panicking_pauses_a_pausing_workflow() {
    let s = setup();
    let engine = open(&s.data).await;
    let input = PanickyInput {
        step: panicky(&s.log, u32::MAX, 2),
        fail_after: false,
    };
    engine
        .start::<PausingPanickyFlow>("paused", input)
        .await
        .unwrap();
    let record = settled(&engine, "paused").await;
    assert_eq!(record.status, RunStatus::Paused, "{:?}", record.error);
    assert!(
        record.error.as_deref().unwrap_or("").contains("panicked"),
        "{:?}",
        record.error
    );
    engine.shutdown().await;
}

/// A compensation that panics is a failed undo attempt: retried under the compensation's
/// policy (3 attempts), then the run needs an operator (`CompensationFailed`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_compensation_is_retried_then_compensation_failed() {
    let s = setup();
    let engine = open(&s.data).await;
    let input = PanickyInput {
        step: Panicky {
            undo_panics: true,
            ..panicky(&s.log, 0, 1)
        },
        fail_after: true,
    };
    engine.start::<PanickyFlow>("undo", input).await.unwrap();
    let record = settled(&engine, "undo").await;
    assert_eq!(
        record.status,
        RunStatus::CompensationFailed,
        "{:?}",
        record.error
    );
    assert!(
        record
            .error
            .as_deref()
            .unwrap_or("")
            .contains("panicked: undo boom"),
        "{:?}",
        record.error
    );
    let history = engine.history("undo").await.unwrap();
    let undo_attempts = history
        .entries
        .iter()
        .filter(|e| matches!(e.event, Event::StepCompensationFailed { .. }))
        .count();
    assert_eq!(undo_attempts, 3, "every undo attempt is journaled");
    engine.shutdown().await;
}

/// A panic in a workflow body suspends the run with the panic's message, its waiter hears
/// it, a restart does not drive it into the panic again, and after the bug is fixed a
/// resume completes it without running the recorded step again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_body_suspends_its_run_until_resumed() {
    let s = setup();
    std::fs::write(format!("{}.panic", s.log), "").unwrap();
    let engine = open(&s.data).await;
    let handle = engine
        .start::<PanickingBody>("body", s.log.clone())
        .await
        .unwrap();
    let err = tokio::time::timeout(CONDITION_TIMEOUT, handle.result())
        .await
        .expect("the waiter of a run whose body panicked was never answered")
        .unwrap_err();
    match &err {
        EngineError::RunEnded { status, error, .. } => {
            assert_eq!(*status, RunStatus::Suspended);
            assert!(error.contains("panicked: the body's own bug"), "{error}");
        }
        other => panic!("{other}"),
    }
    engine.shutdown().await;
    drop((handle, engine));

    // A restart leaves it suspended: nothing drives it into the same panic again.
    let engine = open(&s.data).await;
    assert_eq!(
        engine.status("body").await.unwrap().status,
        RunStatus::Suspended
    );
    std::fs::remove_file(format!("{}.panic", s.log)).unwrap();
    engine.resume("body").await.unwrap();
    let record = settled(&engine, "body").await;
    assert_eq!(record.status, RunStatus::Completed, "{:?}", record.error);
    assert_eq!(count(&s.log, Action::Do), 1, "the recorded step ran once");
    engine.shutdown().await;
}

/// A branch of a fan-out that panics is a failed branch; the five others, still running
/// when it panicked, finish and are recorded, and the body gets every result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_branch_lets_the_other_branches_finish() {
    let s = setup();
    let engine = open(&s.data).await;
    engine
        .start::<PanickingBranch>("fan", s.log.clone())
        .await
        .unwrap();
    let record = settled(&engine, "fan").await;
    assert_eq!(record.status, RunStatus::Completed, "{:?}", record.error);
    assert_eq!(record.output, Some(serde_json::json!(5)));
    let history = engine.history("fan").await.unwrap();
    let completed = history
        .entries
        .iter()
        .filter(|e| matches!(e.event, Event::StepCompleted { .. }))
        .count();
    assert_eq!(completed, 5, "every other branch is recorded");
    assert_eq!(count(&s.log, Action::Do), 5);
    engine.shutdown().await;
}
