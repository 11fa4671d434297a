//! An effect (`Ctx::effect`) replays as a step does: its durable output is replayed after a
//! SIGKILL without running the closure again, code that asks for another kind or argument at
//! its operation suspends the run, and a run journaled by a step replays once the step is an
//! effect.

mod common;

use std::path::Path;
use std::time::Duration;

use common::effects::{effects_done, lookup, ENDPOINT, HOUR, LOOKUP};
use common::{entries_of, log_in};
use keel::testing::TestClock;
use keel::{
    Ctx, EffectOptions, Event, RunStatus, Step, StepContext, StepError, Workflow, WorkflowError,
};
use keel_testkit::crash::{is_child, path_env, ChildSpec, Ending};
use keel_testkit::effects::{self, Action};
use keel_testkit::open_engine;
use keel_testkit::poll::asleep;
use serde::{Deserialize, Serialize};
use serde_json::json;

/// How long a crash-test child may run.
const CHILD_TIMEOUT: Duration = Duration::from_secs(120);

/// Input of [`Lookup`].
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

/// The crash test's child: starts the run (idempotently) and waits for its result.
fn lookup_child() {
    let data = std::env::var("KEEL_DATA_DIR").expect("KEEL_DATA_DIR");
    let log = std::env::var("KEEL_EFFECT_LOG").expect("KEEL_EFFECT_LOG");
    keel_testkit::crash::runtime().block_on(async {
        let engine = open_engine(|| keel_testkit::store::builder(&data).workflow::<Lookup>()).await;
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
        let engine = open_engine(|| keel_testkit::store::builder(dir.path().join("data"))).await;
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
/// with the code `W` (when it wakes: a parked run's body replays when it is loaded); returns
/// the settled run's error, checking that the effect never ran again.
async fn replayed_under<W: Workflow<Input = String>>(dir: &Path) -> Option<String> {
    let data = dir.join("data");
    let log = log_in(dir);
    let clock = TestClock::new();
    let engine = open_engine(|| {
        keel_testkit::store::builder(&data)
            .clock(clock.clone())
            .workflow::<Drift>()
    })
    .await;
    engine.start::<Drift>("drift", log.clone()).await.unwrap();
    asleep(&clock).await;
    engine.shutdown().await;
    drop(engine);

    let engine = open_engine(|| {
        keel_testkit::store::builder(&data)
            .clock(clock.clone())
            .workflow::<W>()
    })
    .await;
    clock.advance(HOUR);
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
        keel_testkit::store::builder(&data)
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
        keel_testkit::store::builder(&data)
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
