//! Effects (`Ctx::effect`): a closure with nothing to undo, journaled, retried, contained and
//! replayed as a step whose `COMPENSABLE` is false, and passed over by the saga with nothing
//! registered for it; a step turned into an effect keeps replaying its old runs.

use std::path::Path;
use std::time::Duration;

use keel::testing::TestClock;
use keel::{
    Compensation, Ctx, EffectOptions, Engine, EngineError, ErrorClass, Event, OperationIndex,
    RetryPolicy, RunHistory, RunStatus, Step, StepContext, StepError, Workflow, WorkflowError,
};
use keel_engine::StepType;
use keel_testkit::crash::{is_child, path_env, ChildSpec, Ending};
use keel_testkit::effects::{self, Action};
use keel_testkit::open_engine;
use keel_testkit::poll::asleep;
use serde::{Deserialize, Serialize};
use serde_json::json;

const CHILD_TIMEOUT: Duration = Duration::from_secs(120);
const HOUR: Duration = Duration::from_secs(3600);

/// The effect of [`Lookup`]: records itself in the ground-truth log, and returns the id of the
/// process that ran it, so a replayed output is told from a fresh one.
const LOOKUP: &str = "test.effects-lookup";

/// Runs [`LOOKUP`] as an effect of `ctx`, recording in `log`.
async fn lookup(ctx: &mut Ctx, log: &str, options: EffectOptions) -> Result<String, WorkflowError> {
    ctx.effect(LOOKUP, options, |sctx| {
        let log = log.to_string();
        async move {
            effects::record(&log, Action::Do, &sctx)?;
            Ok::<_, StepError>(format!("looked up by {}", std::process::id()))
        }
    })
    .await
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct LookupInput {
    log: String,
    sleep_ms: u64,
}

/// The lookup effect, then a durable sleep.
struct Lookup;

impl Workflow for Lookup {
    const NAME: &'static str = "test.effects-lookup-flow";
    type Input = LookupInput;
    type Output = String;

    async fn run(ctx: &mut Ctx, input: LookupInput) -> Result<String, WorkflowError> {
        let options = EffectOptions::DEFAULT.argument(json!({ "log": input.log }));
        let found = lookup(ctx, &input.log, options).await?;
        ctx.sleep(Duration::from_millis(input.sleep_ms)).await?;
        Ok(found)
    }
}

/// The history entries about operation `step`.
fn entries_of(history: &RunHistory, step: u32) -> Vec<&Event> {
    history
        .entries
        .iter()
        .map(|e| &e.event)
        .filter(|e| e.step() == Some(OperationIndex(step)))
        .collect()
}

/// Whether the saga touched operation `step` (started, skipped or finished an undo).
fn compensation_touched(history: &RunHistory, step: u32) -> bool {
    entries_of(history, step).iter().any(|e| {
        matches!(
            e,
            Event::StepCompensationStarted { .. }
                | Event::StepCompensationSkipped { .. }
                | Event::StepCompensated { .. }
                | Event::StepCompensationFailed { .. }
        )
    })
}

fn log_in(dir: &Path) -> String {
    path_env(dir, "effects.jsonl")
}

fn effects_done(log: &str) -> Vec<effects::Effect> {
    effects::read(Path::new(log))
        .into_iter()
        .filter(|e| e.action == Action::Do)
        .collect()
}

/// The crash test's child: starts the run (idempotently) and waits for its result.
fn lookup_child() {
    let data = std::env::var("KEEL_DATA_DIR").expect("KEEL_DATA_DIR");
    let log = std::env::var("KEEL_EFFECT_LOG").expect("KEEL_EFFECT_LOG");
    keel_testkit::crash::runtime().block_on(async {
        let engine = open_engine(|| Engine::builder(&data).workflow::<Lookup>()).await;
        let input = LookupInput { log, sleep_ms: 20 };
        let run = engine.start::<Lookup>("crashed", input).await.unwrap();
        run.result().await.unwrap();
        engine.shutdown().await;
    });
}

/// An effect's output, once durable, is replayed after a SIGKILL without running the closure
/// again: the restarted process returns the killed process's recorded output.
#[test]
fn an_effects_output_is_replayed_after_a_crash_without_running_it() {
    const NAME: &str = "an_effects_output_is_replayed_after_a_crash_without_running_it";
    if is_child() {
        return lookup_child();
    }
    keel_testkit::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let spec = ChildSpec {
        test_name: NAME,
        env: vec![
            ("KEEL_DATA_DIR".into(), path_env(dir.path(), "data")),
            ("KEEL_EFFECT_LOG".into(), log_in(dir.path())),
        ],
    };
    // The timer's start record is synced after the effect's outcome: killed there, the
    // outcome is durable and the process never woke from its sleep.
    let ending = spec.run(
        &[("KEEL_CRASH_AT", "timer.after_set".into())],
        CHILD_TIMEOUT,
    );
    assert_eq!(ending, Ending::Killed, "the crash point was never reached");
    spec.run_until_finished(CHILD_TIMEOUT);

    let done = effects_done(&log_in(dir.path()));
    assert_eq!(done.len(), 1, "the effect ran once: {done:?}");
    keel_testkit::crash::runtime().block_on(async {
        // No workflow registered: this engine only reads.
        let engine = open_engine(|| Engine::builder(dir.path().join("data"))).await;
        let history = engine.history("crashed").await.unwrap();
        assert_eq!(history.run.status, RunStatus::Completed);
        let recorded = format!("looked up by {}", done[0].pid);
        assert_eq!(
            history.run.output,
            Some(json!(recorded)),
            "the killed process's output"
        );
        let starts = entries_of(&history, 0)
            .into_iter()
            .filter(|e| matches!(e, Event::StepStarted { .. }))
            .count();
        assert_eq!(starts, 1, "one attempt, never started again");
        engine.shutdown().await;
    });
}

/// How [`Flaky`]'s effect misbehaves on its first `times` attempts.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
enum Misbehaviour {
    /// A retryable error.
    Retryable,
    /// A panic.
    Panic,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct FlakyInput {
    log: String,
    misbehaviour: Misbehaviour,
    times: u32,
    attempts_max: u32,
}

/// An effect that misbehaves on its first attempts, under a retry policy of the input's
/// attempts with millisecond backoffs; it returns the attempt that succeeded.
struct Flaky;

const FLAKY: &str = "test.effects-flaky";

impl Workflow for Flaky {
    const NAME: &'static str = "test.effects-flaky-flow";
    type Input = FlakyInput;
    type Output = u32;

    async fn run(ctx: &mut Ctx, input: FlakyInput) -> Result<u32, WorkflowError> {
        let policy = RetryPolicy::DEFAULT
            .with_attempts_max(input.attempts_max)
            .with_backoff(Duration::from_millis(1), Duration::from_millis(2));
        let options = EffectOptions::DEFAULT.retry_policy(policy);
        ctx.effect(FLAKY, options, |sctx| {
            let input = input.clone();
            async move {
                effects::record(&input.log, Action::Do, &sctx)?;
                let attempt = sctx.attempt().0;
                if attempt <= input.times {
                    match input.misbehaviour {
                        Misbehaviour::Retryable => {
                            return Err(StepError::retryable(format!("attempt {attempt}: not yet")))
                        }
                        Misbehaviour::Panic => panic!("attempt {attempt} blew up"),
                    }
                }
                Ok(attempt)
            }
        })
        .await
    }
}

/// The errors of operation 0's failed attempts, with their retry times.
fn failures(history: &RunHistory) -> Vec<(ErrorClass, String, Option<u64>)> {
    entries_of(history, 0)
        .into_iter()
        .filter_map(|e| match e {
            Event::StepFailed {
                error, retry_at_ms, ..
            } => Some((error.class, error.message.clone(), *retry_at_ms)),
            _ => None,
        })
        .collect()
}

/// A retryable error is retried under the options' policy: with three attempts allowed, two
/// failures are retried (each start journaled as not compensable) and the third attempt's
/// output is the run's, timed under `step:<kind>`; with two allowed, the second failure is
/// final and the run fails, with nothing to undo.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retryable_error_is_retried_under_the_options_policy() {
    let dir = tempfile::tempdir().unwrap();
    let log = log_in(dir.path());
    let engine = open_engine(|| Engine::builder(dir.path().join("data")).workflow::<Flaky>()).await;
    let input = |attempts_max| FlakyInput {
        log: log.clone(),
        misbehaviour: Misbehaviour::Retryable,
        times: 2,
        attempts_max,
    };
    let run = engine.start::<Flaky>("recovers", input(3)).await.unwrap();
    assert_eq!(run.result().await.unwrap(), 3);
    let history = engine.history("recovers").await.unwrap();
    let starts: Vec<(u32, bool)> = entries_of(&history, 0)
        .into_iter()
        .filter_map(|e| match e {
            Event::StepStarted {
                kind,
                argument,
                attempt,
                compensable,
                ..
            } => {
                assert_eq!((kind.as_str(), argument), (FLAKY, &json!(null)));
                Some((attempt.0, *compensable))
            }
            _ => None,
        })
        .collect();
    assert_eq!(starts, vec![(1, false), (2, false), (3, false)]);
    let failed = failures(&history);
    assert_eq!(failed.len(), 2, "{failed:?}");
    assert!(failed
        .iter()
        .all(|(class, _, retry)| *class == ErrorClass::Retryable && retry.is_some()));
    let stats = engine
        .operation_stats(&format!("step:{FLAKY}"))
        .expect("the effect's duration is recorded");
    assert_eq!(stats.count, 1, "one success");

    let run = engine.start::<Flaky>("exhausted", input(2)).await.unwrap();
    assert!(run.result().await.is_err());
    let history = engine.history("exhausted").await.unwrap();
    assert_eq!(history.run.status, RunStatus::Failed, "nothing to undo");
    let failed = failures(&history);
    assert_eq!(failed.len(), 2, "{failed:?}");
    assert_eq!(failed[1].2, None, "the policy's last attempt is final");
    assert!(history.run.error.unwrap().contains(FLAKY));
    assert_eq!(
        effects_done(&log).len(),
        3 + 2,
        "every attempt ran the closure once"
    );
    engine.shutdown().await;
}

/// A panic in the closure is a failed attempt (retryable, with the panic's message), not the
/// driver's end: the next attempt calls the closure again and the run completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_the_effect_is_a_failed_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let log = log_in(dir.path());
    let engine = open_engine(|| Engine::builder(dir.path().join("data")).workflow::<Flaky>()).await;
    let input = FlakyInput {
        log: log.clone(),
        misbehaviour: Misbehaviour::Panic,
        times: 1,
        attempts_max: 3,
    };
    let run = engine.start::<Flaky>("panics", input).await.unwrap();
    assert_eq!(run.result().await.unwrap(), 2);
    let history = engine.history("panics").await.unwrap();
    let failed = failures(&history);
    assert_eq!(failed.len(), 1, "{failed:?}");
    let (class, message, retry) = &failed[0];
    assert_eq!(*class, ErrorClass::Retryable);
    assert!(message.contains("panicked: attempt 1 blew up"), "{message}");
    assert!(retry.is_some());
    assert_eq!(effects_done(&log).len(), 2);
    engine.shutdown().await;
}

/// Records its effect; its undo fails retryably (retried an hour later) while `<log>.down`
/// exists.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Undoable {
    log: String,
}

impl Step for Undoable {
    const KIND: &'static str = "test.effects-undoable";
    type Output = ();

    async fn execute(&self, ctx: &StepContext) -> Result<(), StepError> {
        effects::record(&self.log, Action::Do, ctx)
    }

    async fn compensate(
        &self,
        ctx: &StepContext,
        _: Option<()>,
    ) -> Result<Compensation, StepError> {
        if Path::new(&format!("{}.down", self.log)).exists() {
            return Err(StepError::retryable("undo target down").with_retry_after(HOUR));
        }
        effects::record(&self.log, Action::Undo, ctx)?;
        Ok(Compensation::Done)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct FailingInput {
    log: String,
    /// Take the undoable step between the effect and the failure.
    undoable: bool,
}

/// The lookup effect, optionally the undoable step, then a failure.
struct EffectThenFail;

impl Workflow for EffectThenFail {
    const NAME: &'static str = "test.effects-then-fail";
    type Input = FailingInput;
    type Output = ();

    async fn run(ctx: &mut Ctx, input: FailingInput) -> Result<(), WorkflowError> {
        lookup(ctx, &input.log, EffectOptions::DEFAULT).await?;
        if input.undoable {
            ctx.step(Undoable { log: input.log }).await?;
        }
        Err(WorkflowError::failed("failing on purpose"))
    }
}

/// A run that fails after an effect passes over it with nothing registered for it: alone,
/// the run fails with nothing to undo; with a step after it, the run compensates across a
/// restart (by an engine that registers only the workflow and that step), the step is
/// undone and the journal holds nothing of compensation about the effect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_run_passes_over_its_effect_with_nothing_registered() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log = log_in(dir.path());
    let clock = TestClock::new();
    let builder = || {
        Engine::builder(&data)
            .clock(clock.clone())
            .workflow::<EffectThenFail>()
            .step::<Undoable>()
    };
    let engine = open_engine(builder).await;
    let input = |undoable| FailingInput {
        log: log.clone(),
        undoable,
    };
    engine
        .start::<EffectThenFail>("alone", input(false))
        .await
        .unwrap();
    let alone = engine.wait("alone").await.unwrap();
    assert_eq!(alone.status, RunStatus::Failed, "{:?}", alone.error);
    assert!(!compensation_touched(
        &engine.history("alone").await.unwrap(),
        0
    ));

    std::fs::write(format!("{log}.down"), "").unwrap();
    engine
        .start::<EffectThenFail>("compensating", input(true))
        .await
        .unwrap();
    // The step's undo failed once and waits an hour for its retry.
    asleep(&clock).await;
    assert_eq!(
        engine.status("compensating").await.unwrap().status,
        RunStatus::Compensating
    );
    engine.shutdown().await;
    drop(engine);

    std::fs::remove_file(format!("{log}.down")).unwrap();
    let engine = open_engine(builder).await;
    let record = clock
        .skip_until_settled(&engine, "compensating")
        .await
        .unwrap();
    assert_eq!(record.status, RunStatus::Compensated, "{:?}", record.error);
    let history = engine.history("compensating").await.unwrap();
    assert!(
        !compensation_touched(&history, 0),
        "the effect is passed over"
    );
    assert!(matches!(
        entries_of(&history, 0)[0],
        Event::StepStarted {
            compensable: false,
            ..
        }
    ));
    let undos: Vec<u32> = effects::read(Path::new(&log))
        .iter()
        .filter(|e| e.action == Action::Undo)
        .map(|e| e.step)
        .collect();
    assert_eq!(undos, vec![1], "only the step is undone");
    engine.shutdown().await;
}

/// The lookup effect with the given kind and argument, then an hour's sleep.
async fn drifting(
    ctx: &mut Ctx,
    log: &str,
    kind: &'static str,
    n: u32,
) -> Result<(), WorkflowError> {
    let options = EffectOptions::DEFAULT.argument(json!({ "n": n }));
    ctx.effect(kind, options, |sctx| {
        let log = log.to_string();
        async move { effects::record(&log, Action::Do, &sctx) }
    })
    .await?;
    ctx.sleep(HOUR).await
}

/// The code that journals the runs.
struct Drift;

impl Workflow for Drift {
    const NAME: &'static str = "test.effects-drift";
    type Input = String;
    type Output = ();

    async fn run(ctx: &mut Ctx, log: String) -> Result<(), WorkflowError> {
        drifting(ctx, &log, LOOKUP, 1).await
    }
}

/// Changed code: another kind at the effect's operation.
struct DriftKind;

impl Workflow for DriftKind {
    const NAME: &'static str = "test.effects-drift";
    type Input = String;
    type Output = ();

    async fn run(ctx: &mut Ctx, log: String) -> Result<(), WorkflowError> {
        drifting(ctx, &log, "test.effects-other", 1).await
    }
}

/// Changed code: another argument for the effect.
struct DriftArgument;

impl Workflow for DriftArgument {
    const NAME: &'static str = "test.effects-drift";
    type Input = String;
    type Output = ();

    async fn run(ctx: &mut Ctx, log: String) -> Result<(), WorkflowError> {
        drifting(ctx, &log, LOOKUP, 2).await
    }
}

/// Journals a [`Drift`] run up to its sleep in a fresh store under `dir`, then replays it
/// with the code `W`; returns the settled run's error, checking that the effect never ran
/// again.
async fn replayed_under<W: Workflow<Input = String>>(dir: &Path) -> Option<String> {
    let data = dir.join("data");
    let log = log_in(dir);
    let clock = TestClock::new();
    let engine = open_engine(|| {
        Engine::builder(&data)
            .clock(clock.clone())
            .workflow::<Drift>()
    })
    .await;
    engine.start::<Drift>("drift", log.clone()).await.unwrap();
    asleep(&clock).await;
    engine.shutdown().await;
    drop(engine);

    let engine = open_engine(|| Engine::builder(&data).clock(clock.clone()).workflow::<W>()).await;
    let record = engine.wait("drift").await.unwrap();
    assert_eq!(record.status, RunStatus::Suspended, "{:?}", record.error);
    assert_eq!(effects_done(&log).len(), 1, "nothing ran on replay");
    engine.shutdown().await;
    record.error
}

/// Code that asks for another kind (or another argument) at an effect's operation than the
/// journal holds suspends the run as non-deterministic, naming both, and runs nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_kind_at_an_effects_operation_suspends_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let error = replayed_under::<DriftKind>(dir.path()).await.unwrap();
    assert!(
        error.contains(&format!("{LOOKUP:?}")) && error.contains("\"test.effects-other\""),
        "the error names both kinds: {error}"
    );
    let dir = tempfile::tempdir().unwrap();
    let error = replayed_under::<DriftArgument>(dir.path()).await.unwrap();
    assert!(
        error.contains(r#"{"n":1}"#) && error.contains(r#"{"n":2}"#),
        "the error names both arguments: {error}"
    );
}

/// The kind of a step that [`Ported`] turns into an effect.
const ENDPOINT: &str = "test.effects-describe-endpoint";

/// A read-only step with nothing to undo, as `DescribeDataEndpoint` was: its runs must replay
/// once the step is an effect.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct DescribeEndpoint {
    region: String,
}

impl Step for DescribeEndpoint {
    const KIND: &'static str = ENDPOINT;
    type Output = String;
    const COMPENSABLE: bool = false;

    async fn execute(&self, ctx: &StepContext) -> Result<String, StepError> {
        effects::record(&format!("{}.log", self.region), Action::Do, ctx)?;
        Ok(format!("endpoint of {}", self.region))
    }
}

/// The code before the port: the step, then an hour's sleep.
struct Unported;

impl Workflow for Unported {
    const NAME: &'static str = "test.effects-port";
    type Input = String;
    type Output = String;

    async fn run(ctx: &mut Ctx, region: String) -> Result<String, WorkflowError> {
        let endpoint = ctx.step(DescribeEndpoint { region }).await?;
        ctx.sleep(HOUR).await?;
        Ok(endpoint)
    }
}

/// The code after the port: the same kind as an effect, journaled with the step value's JSON.
struct Ported;

impl Workflow for Ported {
    const NAME: &'static str = "test.effects-port";
    type Input = String;
    type Output = String;

    async fn run(ctx: &mut Ctx, region: String) -> Result<String, WorkflowError> {
        let options = EffectOptions::DEFAULT.argument(json!({ "region": region }));
        let endpoint = ctx
            .effect(ENDPOINT, options, |sctx| {
                let region = region.clone();
                async move {
                    effects::record(&format!("{region}.log"), Action::Do, &sctx)?;
                    Ok::<_, StepError>(format!("ported endpoint of {region}"))
                }
            })
            .await?;
        ctx.sleep(HOUR).await?;
        Ok(endpoint)
    }
}

/// A run journaled by a step replays under code that made the step an effect (same kind,
/// the step value's JSON as the argument), with nothing registered: the recorded output is
/// the result and neither the step nor the closure runs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_journaled_by_a_step_replays_once_the_step_is_an_effect() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let region = path_env(dir.path(), "region");
    let clock = TestClock::new();
    let engine = open_engine(|| {
        Engine::builder(&data)
            .clock(clock.clone())
            .workflow::<Unported>()
            .step::<DescribeEndpoint>()
    })
    .await;
    engine
        .start::<Unported>("ported", region.clone())
        .await
        .unwrap();
    asleep(&clock).await;
    engine.shutdown().await;
    drop(engine);

    let engine = open_engine(|| {
        Engine::builder(&data)
            .clock(clock.clone())
            .workflow::<Ported>()
    })
    .await;
    let record = clock.skip_until_settled(&engine, "ported").await.unwrap();
    assert_eq!(record.status, RunStatus::Completed, "{:?}", record.error);
    assert_eq!(record.output, Some(json!(format!("endpoint of {region}"))));
    assert_eq!(
        effects_done(&format!("{region}.log")).len(),
        1,
        "ran once, as the step"
    );
    engine.shutdown().await;
}

/// [`DescribeEndpoint`] as it was before steps said that they have nothing to undo: its start
/// records read as compensable.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct OlderDescribeEndpoint {
    region: String,
}

impl Step for OlderDescribeEndpoint {
    const KIND: &'static str = ENDPOINT;
    type Output = String;

    async fn execute(&self, _: &StepContext) -> Result<String, StepError> {
        Ok(format!("endpoint of {}", self.region))
    }
}

/// The older code: the step, the undoable step, a failure.
struct Older;

impl Workflow for Older {
    const NAME: &'static str = "test.effects-older";
    type Input = String;
    type Output = ();

    async fn run(ctx: &mut Ctx, log: String) -> Result<(), WorkflowError> {
        ctx.step(OlderDescribeEndpoint {
            region: "eu".into(),
        })
        .await?;
        ctx.step(Undoable { log }).await?;
        Err(WorkflowError::failed("failing on purpose"))
    }
}

/// A compensating run journaled when start records did not say that a step has nothing to
/// undo needs the step's kind: without it the store is refused at open, naming the kind;
/// registered as an effect's (`StepType::effect`), the saga skips the step and compensates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_effects_kind_registered_as_such_is_skipped_in_older_journals() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log = log_in(dir.path());
    let clock = TestClock::new();
    std::fs::write(format!("{log}.down"), "").unwrap();
    let engine = open_engine(|| {
        Engine::builder(&data)
            .clock(clock.clone())
            .workflow::<Older>()
            .step::<OlderDescribeEndpoint>()
            .step::<Undoable>()
    })
    .await;
    engine.start::<Older>("older", log.clone()).await.unwrap();
    asleep(&clock).await;
    let history = engine.history("older").await.unwrap();
    assert!(matches!(
        entries_of(&history, 0)[0],
        Event::StepStarted {
            compensable: true,
            ..
        }
    ));
    engine.shutdown().await;
    drop(engine);

    let without = || {
        Engine::builder(&data)
            .clock(clock.clone())
            .step::<Undoable>()
    };
    let err = without().open().await.expect_err("the kind is needed");
    assert!(matches!(err, EngineError::Unregistered { .. }), "{err}");
    assert!(err.to_string().contains(ENDPOINT), "{err}");

    std::fs::remove_file(format!("{log}.down")).unwrap();
    let engine = open_engine(|| without().steps(&[StepType::effect(ENDPOINT)])).await;
    let record = clock.skip_until_settled(&engine, "older").await.unwrap();
    assert_eq!(record.status, RunStatus::Compensated, "{:?}", record.error);
    let history = engine.history("older").await.unwrap();
    assert!(
        entries_of(&history, 0)
            .iter()
            .any(|e| matches!(e, Event::StepCompensationSkipped { .. })),
        "the step is skipped"
    );
    engine.shutdown().await;
}
