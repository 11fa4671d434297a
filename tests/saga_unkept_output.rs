//! An effect whose output cannot be kept (over the output bound, or not serialisable) is in
//! doubt, not "no effect": the run compensates it, found by key, and the ground-truth log
//! shows the undo.

use std::collections::HashMap;
use std::path::Path;

use keel::{
    Compensation, Ctx, Event, RunStatus, Step, StepContext, StepError, Workflow, WorkflowError,
};
use keel_testkit::effects::{self, Action};
use keel_testkit::poll::CONDITION_TIMEOUT;
use serde::{Deserialize, Serialize};

/// Records its effect, then returns an output the engine cannot keep: 1 MiB of bytes, or a
/// map with non-string keys (which JSON cannot hold).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Unkeepable {
    log: String,
    too_large: bool,
}

#[derive(Debug, Serialize, Deserialize)]
enum Output {
    Bytes(Vec<u8>),
    Map(HashMap<Vec<u8>, u32>),
}

impl Step for Unkeepable {
    const KIND: &'static str = "test.unkeepable";
    type Output = Output;

    async fn execute(&self, ctx: &StepContext) -> Result<Output, StepError> {
        effects::record(&self.log, Action::Do, ctx)?;
        Ok(if self.too_large {
            Output::Bytes(vec![7; 1024 * 1024])
        } else {
            Output::Map(HashMap::from([(vec![1, 2], 3)]))
        })
    }

    async fn compensate(
        &self,
        ctx: &StepContext,
        output: Option<Output>,
    ) -> Result<Compensation, StepError> {
        assert!(output.is_none(), "an unkept output cannot be handed back");
        let key = ctx.key().to_string();
        let done = effects::read(Path::new(&self.log))
            .iter()
            .any(|e| e.action == Action::Do && e.key == key);
        if done {
            effects::record(&self.log, Action::Undo, ctx)?;
        }
        Ok(Compensation::Done)
    }
}

struct UnkeepableFlow;

impl Workflow for UnkeepableFlow {
    const NAME: &'static str = "test.unkeepable-flow";
    type Input = Unkeepable;
    type Output = ();

    async fn run(ctx: &mut Ctx, step: Unkeepable) -> Result<(), WorkflowError> {
        ctx.step(step).await?;
        Ok(())
    }
}

async fn run(too_large: bool) {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("effects.jsonl");
    let engine = keel_testkit::store::builder(dir.path().join("data"))
        .workflow::<UnkeepableFlow>()
        .step::<Unkeepable>()
        .open()
        .await
        .unwrap();
    let step = Unkeepable {
        log: log.to_string_lossy().into_owned(),
        too_large,
    };
    engine.start::<UnkeepableFlow>("big", step).await.unwrap();
    let record = tokio::time::timeout(CONDITION_TIMEOUT, engine.wait("big"))
        .await
        .expect("never answered")
        .unwrap();
    assert_eq!(record.status, RunStatus::Compensated, "{:?}", record.error);
    let reason = record.error.unwrap_or_default();
    let expected = if too_large {
        "over the limit"
    } else {
        "does not serialise"
    };
    assert!(reason.contains(expected), "{reason}");
    let history = engine.history("big").await.unwrap();
    assert!(
        history
            .entries
            .iter()
            .any(|e| matches!(e.event, Event::StepCompensated { .. })),
        "the step is undone by the saga: {:?}",
        history.entries
    );
    let effects = effects::read(&log);
    let undos = effects.iter().filter(|e| e.action == Action::Undo).count();
    assert_eq!(undos, 1, "ground truth: the effect was undone: {effects:?}");
    engine.shutdown().await;
}

/// A step that creates an effect and returns 1 MiB: the output is over the bound, the effect
/// exists, and the run compensates it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_effect_whose_output_is_too_large_is_undone() {
    run(true).await;
}

/// A step that creates an effect and returns a value JSON cannot hold: the run compensates
/// the effect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_effect_whose_output_does_not_serialise_is_undone() {
    run(false).await;
}
