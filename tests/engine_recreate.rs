//! Recreate instead of waiting: a resource whose wait times out is compensated (its create
//! step's compensation runs while the run goes on) and created again under a new idempotency key, up to N
//! generations. Ground truth is the effect log; the journal must say the same.

use std::path::Path;
use std::time::Duration;

use keel::{Ctx, Engine, Event, OperationIndex, RunStatus, WaitPolicy, Workflow, WorkflowError};
use keel_testkit::effects::{self, Action};
use keel_testkit::flows::{EffectStep, Fault, ThresholdProbe};
use keel_testkit::poll::until;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct RecreateInput {
    /// Generations allowed.
    generations: u32,
    /// The first generation that becomes ready (`None`: none does).
    ready_at: Option<u32>,
    /// How the create step misbehaves.
    fault: Fault,
    log: String,
}

/// Creates an [`EffectStep`] resource with `n = generation`, ready when its output (n * 10)
/// reaches `ready_at * 10`. Output: the generation that became ready.
struct RecreateFlow;

impl Workflow for RecreateFlow {
    const NAME: &'static str = "test.recreate";
    type Input = RecreateInput;
    type Output = u32;

    async fn run(ctx: &mut Ctx, input: RecreateInput) -> Result<u32, WorkflowError> {
        let ready_from = input.ready_at.map_or(u32::MAX, |g| g * 10);
        let created = ctx
            .create_and_wait(
                input.generations,
                |generation| EffectStep {
                    n: generation,
                    fault: input.fault,
                    log: input.log.clone(),
                    jitter_ms: 0,
                },
                |output| ThresholdProbe {
                    value: *output,
                    ready_from,
                },
                WaitPolicy::every(Duration::from_millis(5), Duration::from_millis(60)).growth(1.0),
            )
            .await?;
        assert_eq!(created.resource, created.generation * 10);
        assert_eq!(created.ready, created.resource);
        Ok(created.generation)
    }
}

async fn open(dir: &Path) -> Engine {
    keel_testkit::store::builder(dir.join("data"))
        .workflow::<RecreateFlow>()
        .step::<EffectStep>()
        .open()
        .await
        .unwrap()
}

fn input(dir: &Path, generations: u32, ready_at: Option<u32>, fault: Fault) -> RecreateInput {
    RecreateInput {
        generations,
        ready_at,
        fault,
        log: dir.join("effects.jsonl").to_string_lossy().into_owned(),
    }
}

/// (step, action) pairs of the effect log, in order.
fn effect_trace(log: &str) -> Vec<(u32, Action)> {
    effects::read(Path::new(log))
        .into_iter()
        .map(|e| (e.step, e.action))
        .collect()
}

/// A resource whose wait times out is undone and created again under a new key, until a
/// generation becomes ready: the run completes with the last generation in place and the
/// earlier ones undone, as the effect log and the journal both say.
#[tokio::test]
async fn a_stuck_resource_is_compensated_and_the_next_generation_succeeds() {
    keel_testkit::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path()).await;
    let input = input(dir.path(), 3, Some(2), Fault::None);
    let log = input.log.clone();
    let generation = engine
        .start::<RecreateFlow>("stuck", input)
        .await
        .unwrap()
        .result()
        .await
        .unwrap();
    assert_eq!(generation, 2);
    // Operations: create 0, wait 1 (timed out), create 2, wait 3 (timed out), create 4,
    // wait 5 (ready). Generations 0 and 1 were undone before the next was created; the
    // third is left in place.
    assert_eq!(
        effect_trace(&log),
        vec![
            (0, Action::Do),
            (0, Action::Undo),
            (2, Action::Do),
            (2, Action::Undo),
            (4, Action::Do),
        ]
    );
    // Every generation ran under its own key.
    let keys: std::collections::BTreeSet<String> = effects::read(Path::new(&log))
        .into_iter()
        .filter(|e| e.action == Action::Do)
        .map(|e| e.key)
        .collect();
    assert_eq!(keys.len(), 3);
    let history = engine.history("stuck").await.unwrap();
    assert_eq!(history.run.status, RunStatus::Completed);
    let undone: Vec<OperationIndex> = history
        .entries
        .iter()
        .filter_map(|e| match e.event {
            Event::StepCompensated { step } => Some(step),
            _ => None,
        })
        .collect();
    assert_eq!(undone, vec![OperationIndex(0), OperationIndex(2)]);
    engine.shutdown().await;
}

/// When every generation's wait times out, the run compensates, and each generation is
/// undone exactly once: the saga does not undo again what the recreation already undid.
#[tokio::test]
async fn when_every_generation_is_stuck_the_run_compensates_each_resource_once() {
    keel_testkit::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path()).await;
    let input = input(dir.path(), 2, None, Fault::None);
    let log = input.log.clone();
    let error = engine
        .start::<RecreateFlow>("hopeless", input)
        .await
        .unwrap()
        .result()
        .await
        .unwrap_err();
    assert!(
        error
            .to_string()
            .contains("wait #3 (test.threshold) timed out"),
        "{error}"
    );
    // The first generation was compensated by the recreation, the second by the saga; the
    // saga did not undo the first again.
    assert_eq!(
        effect_trace(&log),
        vec![
            (0, Action::Do),
            (0, Action::Undo),
            (2, Action::Do),
            (2, Action::Undo),
        ]
    );
    let history = engine.history("hopeless").await.unwrap();
    assert_eq!(history.run.status, RunStatus::Compensated);
    engine.shutdown().await;
}

/// An undo refused during a recreation stops it: no next generation is created, the run ends
/// `CompensationFailed`, and once the operator lets the undo through and retries the
/// compensation, the stuck resource is removed and the run ends compensated.
#[tokio::test]
async fn a_refused_undo_stops_the_recreation_and_the_run_waits_for_an_operator() {
    keel_testkit::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path()).await;
    let input = input(dir.path(), 3, Some(1), Fault::UndoRefused);
    let log = input.log.clone();
    std::fs::write(format!("{log}.refuse-undo"), b"").unwrap();
    let error = engine
        .start::<RecreateFlow>("refused", input)
        .await
        .unwrap()
        .result()
        .await
        .unwrap_err();
    assert!(
        error.to_string().contains("undo of step 0 refused"),
        "{error}"
    );
    // No second generation was created while the first could not be removed.
    assert_eq!(effect_trace(&log), vec![(0, Action::Do)]);
    let history = engine.history("refused").await.unwrap();
    assert_eq!(history.run.status, RunStatus::CompensationFailed);
    // The operator lets the undo through and retries: the stuck resource is removed and the
    // run ends compensated.
    std::fs::remove_file(format!("{log}.refuse-undo")).unwrap();
    engine.retry_compensation("refused").await.unwrap();
    until(&engine, "refused", |h| {
        h.run.status.is_terminal() && h.run.status != RunStatus::CompensationFailed
    })
    .await;
    let status = engine.history("refused").await.unwrap().run.status;
    assert_eq!(status, RunStatus::Compensated);
    assert_eq!(effect_trace(&log), vec![(0, Action::Do), (0, Action::Undo)]);
    engine.shutdown().await;
}
