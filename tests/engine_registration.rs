//! Registration is checked, not hoped for: a second workflow type under a taken name is
//! refused; opening a store whose unfinished runs need unregistered workflows or compensable
//! step kinds is refused with one error naming all of them (and changes nothing), unless the
//! operator allows it, and then those runs are left undriven and their waiters told why; a
//! step without compensation needs no registration for its run to compensate after a restart.

mod common;

use std::time::Duration;

use common::{compensation_touched, Scratch, Undoable};
use keel::{
    Ctx, Engine, EngineError, RunHistory, RunStatus, Step, StepContext, StepError, Workflow,
    WorkflowError,
};
use keel_testkit::poll::asleep;
use serde::{Deserialize, Serialize};

/// Reads; nothing to undo.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct ReadOnly;

impl Step for ReadOnly {
    const KIND: &'static str = "test.reg-read-only";
    type Output = u32;
    const COMPENSABLE: bool = false;

    async fn execute(&self, _: &StepContext) -> Result<u32, StepError> {
        Ok(7)
    }
}

/// Input of [`Flow`].
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Input {
    log: String,
    /// Sleep an hour after the steps instead of failing.
    sleep: bool,
}

/// A read-only step, an undoable one, then an hour's sleep or a failure (so the run compensates).
struct Flow;

impl Workflow for Flow {
    const NAME: &'static str = "test.reg-flow";
    type Input = Input;
    type Output = ();

    async fn run(ctx: &mut Ctx, input: Input) -> Result<(), WorkflowError> {
        ctx.step(ReadOnly).await?;
        ctx.step(Undoable { log: input.log }).await?;
        if input.sleep {
            return ctx.sleep(Duration::from_secs(3600)).await;
        }
        Err(WorkflowError::failed("failing on purpose"))
    }
}

/// Another workflow type under [`Flow`]'s name.
struct Impostor;

impl Workflow for Impostor {
    const NAME: &'static str = "test.reg-flow";
    type Input = ();
    type Output = ();

    async fn run(_: &mut Ctx, _: ()) -> Result<(), WorkflowError> {
        Ok(())
    }
}

/// The history of every run the engine holds.
async fn histories(engine: &Engine) -> Vec<RunHistory> {
    let mut all = Vec::new();
    for record in engine.list().await.unwrap() {
        all.push(engine.history(record.id.as_str()).await.unwrap());
    }
    all
}

/// A second workflow type under a name already taken is refused: at build time (open fails,
/// naming the name) and at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_workflow_type_under_a_taken_name_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let err = keel_testkit::store::builder(dir.path())
        .workflow::<Flow>()
        .workflow::<Impostor>()
        .open()
        .await
        .expect_err("two types under one name must be refused");
    assert!(
        matches!(&err, EngineError::DuplicateWorkflow { name } if name == Flow::NAME),
        "{err}"
    );
    let engine = keel_testkit::store::builder(dir.path())
        .workflow::<Flow>()
        .open()
        .await
        .unwrap();
    let err = engine
        .start::<Impostor>("impostor", ())
        .await
        .expect_err("a start of the other type must be refused");
    assert!(
        matches!(err, EngineError::DuplicateWorkflow { .. }),
        "{err}"
    );
    assert!(engine.list().await.unwrap().is_empty(), "nothing stored");
    engine.shutdown().await;
}

/// A store with a sleeping run (needs its workflow and its effect's kind) and a run whose
/// compensation failed (needs the effect's kind) is refused by an engine that registers
/// neither, with one error naming both types and counting both runs; nothing stored changes.
/// Allowed, the engine opens and leaves them undriven, and a waiter hears why; an engine
/// that registers both drives them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_refuses_unfinished_runs_of_unregistered_types_naming_all() {
    let s = Scratch::new();
    let registered = || {
        keel_testkit::store::builder(&s.data)
            .clock(s.clock.clone())
            .workflow::<Flow>()
            .step::<Undoable>()
    };
    let engine = registered().open().await.unwrap();
    s.refuse_undo();
    let input = |sleep| Input {
        log: s.log.clone(),
        sleep,
    };
    engine.start::<Flow>("stuck", input(false)).await.unwrap();
    let stuck = engine.wait("stuck").await.unwrap();
    assert_eq!(stuck.status, RunStatus::CompensationFailed);
    engine.start::<Flow>("asleep", input(true)).await.unwrap();
    asleep(&s.clock).await;
    let before = histories(&engine).await;
    engine.shutdown().await;
    drop(engine);

    let err = keel_testkit::store::builder(&s.data)
        .clock(s.clock.clone())
        .open()
        .await
        .expect_err("unregistered types must be refused");
    let text = err.to_string();
    match &err {
        EngineError::Unregistered { runs, .. } => assert_eq!(*runs, 2, "{text}"),
        other => panic!("expected Unregistered, got {other}"),
    }
    for name in [Flow::NAME, Undoable::KIND, "asleep", "stuck"] {
        assert!(text.contains(name), "{name} is not named: {text}");
    }
    assert!(
        !text.contains(ReadOnly::KIND),
        "a step without compensation needs no registration: {text}"
    );

    let engine = keel_testkit::store::builder(&s.data)
        .clock(s.clock.clone())
        .allow_unregistered()
        .open()
        .await
        .unwrap();
    match engine.wait("asleep").await {
        Err(EngineError::RunStopped { reason, .. }) => {
            assert!(reason.contains(Flow::NAME), "{reason}")
        }
        other => panic!("expected RunStopped, got {other:?}"),
    }
    let err = engine.resume("stuck").await.unwrap_err();
    assert!(matches!(err, EngineError::InvalidState { .. }), "{err}");
    assert_eq!(histories(&engine).await, before, "nothing stored changed");
    engine.shutdown().await;
    drop(engine);

    let engine = registered().open().await.unwrap();
    assert_eq!(
        asleep(&s.clock).await,
        before[0].entries[0].at_ms + 3_600_000,
        "the sleeping run is driven again"
    );
    engine.shutdown().await;
}

/// A run compensating across a restart passes over a step without compensation, although
/// the restarted engine never registered that step's kind: it ends Compensated, with the
/// effect undone, instead of CompensationFailed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_without_compensation_needs_no_registration_to_be_passed_over() {
    let s = Scratch::new();
    s.take_undo_down();
    let engine = keel_testkit::store::builder(&s.data)
        .clock(s.clock.clone())
        .workflow::<Flow>()
        .step::<Undoable>()
        .step::<ReadOnly>()
        .open()
        .await
        .unwrap();
    engine
        .start::<Flow>(
            "compensating",
            Input {
                log: s.log.clone(),
                sleep: false,
            },
        )
        .await
        .unwrap();
    // The undo failed once and waits an hour for its retry.
    asleep(&s.clock).await;
    assert_eq!(
        engine.status("compensating").await.unwrap().status,
        RunStatus::Compensating
    );
    engine.shutdown().await;
    drop(engine);

    s.bring_undo_up();
    let engine = keel_testkit::store::builder(&s.data)
        .clock(s.clock.clone())
        .workflow::<Flow>()
        .step::<Undoable>()
        .open()
        .await
        .unwrap();
    let record = s
        .clock
        .skip_until_settled(&engine, "compensating")
        .await
        .unwrap();
    assert_eq!(record.status, RunStatus::Compensated, "{:?}", record.error);
    let history = engine.history("compensating").await.unwrap();
    assert!(
        !compensation_touched(&history, 0),
        "the read-only step is passed over"
    );
    assert_eq!(s.undone().len(), 1, "the effect is undone");
    engine.shutdown().await;
}
