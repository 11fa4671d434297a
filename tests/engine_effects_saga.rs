//! The saga passes over an effect (`Ctx::effect`, a step whose `COMPENSABLE` is false) with
//! nothing registered for it, and an effect's kind registered as such
//! (`StepType::effect`) is skipped in journals written before start records said that.

mod common;

use common::effects::{lookup, ENDPOINT};
use common::{compensation_touched, entries_of, Scratch, Undoable};
use keel::{
    Ctx, EffectOptions, EngineError, Event, RunStatus, Step, StepContext, StepError, Workflow,
    WorkflowError,
};
use keel_engine::StepType;
use keel_testkit::open_engine;
use keel_testkit::poll::asleep;
use serde::{Deserialize, Serialize};

/// Input of [`EffectThenFail`].
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
    let s = Scratch::new();
    let builder = || {
        keel_testkit::store::builder(&s.data)
            .clock(s.clock.clone())
            .workflow::<EffectThenFail>()
            .step::<Undoable>()
    };
    let engine = open_engine(builder).await;
    let input = |undoable| FailingInput {
        log: s.log.clone(),
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

    s.take_undo_down();
    engine
        .start::<EffectThenFail>("compensating", input(true))
        .await
        .unwrap();
    // The step's undo failed once and waits an hour for its retry.
    asleep(&s.clock).await;
    assert_eq!(
        engine.status("compensating").await.unwrap().status,
        RunStatus::Compensating
    );
    engine.shutdown().await;
    drop(engine);

    s.bring_undo_up();
    let engine = open_engine(builder).await;
    let record = s
        .clock
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
    assert_eq!(s.undone(), vec![1], "only the step is undone");
    engine.shutdown().await;
}

/// The read-only step of kind [`ENDPOINT`] as it was before steps said that they have nothing
/// to undo: its start records read as compensable.
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
    let s = Scratch::new();
    s.take_undo_down();
    let engine = open_engine(|| {
        keel_testkit::store::builder(&s.data)
            .clock(s.clock.clone())
            .workflow::<Older>()
            .step::<OlderDescribeEndpoint>()
            .step::<Undoable>()
    })
    .await;
    engine.start::<Older>("older", s.log.clone()).await.unwrap();
    asleep(&s.clock).await;
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
        keel_testkit::store::builder(&s.data)
            .clock(s.clock.clone())
            .step::<Undoable>()
    };
    let err = without().open().await.expect_err("the kind is needed");
    assert!(matches!(err, EngineError::Unregistered { .. }), "{err}");
    assert!(err.to_string().contains(ENDPOINT), "{err}");

    s.bring_undo_up();
    let engine = open_engine(|| without().steps(&[StepType::effect(ENDPOINT)])).await;
    let record = s.clock.skip_until_settled(&engine, "older").await.unwrap();
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
