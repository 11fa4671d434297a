//! What the batch and rerun suites (`engine_batch.rs`, `engine_rerun.rs`) share: runs that
//! hold (for a day, or at a gate the test opens) or finish at once, an engine that knows
//! them, and readers of a batch's report and of the ground-truth log.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use keel::{
    Batch, BatchAction, BatchOutcome, BatchReport, Ctx, Engine, RunFilter, RunStatus, Step,
    StepContext, StepError, Workflow, WorkflowError,
};
use keel_testkit::effects::{self as ground_truth, Action};
use serde::{Deserialize, Serialize};

use super::{Scratch, Undoable};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct HoldInput {
    pub(crate) log: String,
    /// Fail (with nothing to undo) instead of holding.
    #[serde(default)]
    pub(crate) fail: bool,
}

/// Takes an effect (undone when it compensates), then holds for a day; or fails at once.
pub(crate) struct Hold;

impl Workflow for Hold {
    const NAME: &'static str = "test.hold";
    type Input = HoldInput;
    type Output = u32;

    async fn run(ctx: &mut Ctx, input: HoldInput) -> Result<u32, WorkflowError> {
        if input.fail {
            return Err(WorkflowError::failed("asked to fail"));
        }
        ctx.step(Undoable { log: input.log }).await?;
        ctx.sleep(Duration::from_secs(24 * 3600)).await?;
        Ok(1)
    }
}

/// Completes at once; kept for an hour when finished.
pub(crate) struct Brief;

impl Workflow for Brief {
    const NAME: &'static str = "test.brief";
    const RETENTION: Option<Duration> = Some(Duration::from_secs(3600));
    type Input = u32;
    type Output = u32;

    async fn run(_: &mut Ctx, input: u32) -> Result<u32, WorkflowError> {
        Ok(input)
    }
}

/// Stays in flight until the file `<gate>.open` exists; `<gate>.entered` says it began.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Gate {
    pub(crate) gate: String,
}

impl Step for Gate {
    const KIND: &'static str = "test.gate";
    const COMPENSABLE: bool = false;
    type Output = ();

    async fn execute(&self, _: &StepContext) -> Result<(), StepError> {
        std::fs::write(format!("{}.entered", self.gate), "").unwrap();
        while !Path::new(&format!("{}.open", self.gate)).exists() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct GatedInput {
    pub(crate) log: String,
    pub(crate) gate: String,
}

/// Takes an effect (undone when it compensates), waits at its gate, then holds for a day.
pub(crate) struct Gated;

impl Workflow for Gated {
    const NAME: &'static str = "test.gated";
    type Input = GatedInput;
    type Output = ();

    async fn run(ctx: &mut Ctx, input: GatedInput) -> Result<(), WorkflowError> {
        ctx.step(Undoable { log: input.log }).await?;
        ctx.step(Gate { gate: input.gate }).await?;
        ctx.sleep(Duration::from_secs(24 * 3600)).await?;
        Ok(())
    }
}

pub(crate) async fn open(scratch: &Scratch) -> Engine {
    keel_testkit::store::builder(&scratch.data)
        .workflow::<Hold>()
        .workflow::<Brief>()
        .workflow::<Gated>()
        .step::<Undoable>()
        .step::<Gate>()
        .clock(scratch.clock.clone())
        .open()
        .await
        .unwrap()
}

pub(crate) fn hold(scratch: &Scratch) -> serde_json::Value {
    serde_json::to_value(HoldInput {
        log: scratch.log.clone(),
        fail: false,
    })
    .unwrap()
}

/// Starts held runs `ids` and waits until each took its effect and sleeps (its timer is
/// journaled: the run sleeps loaded, or parked).
pub(crate) async fn start_held(engine: &Engine, scratch: &Scratch, ids: &[String]) {
    for id in ids {
        engine
            .start_json(Hold::NAME, id, hold(scratch))
            .await
            .unwrap();
    }
    for id in ids {
        keel_testkit::poll::until(engine, id, |history| {
            history
                .entries
                .iter()
                .any(|e| matches!(e.event, keel::Event::TimerSet { .. }))
        })
        .await;
    }
}

pub(crate) fn filter(statuses: &[RunStatus]) -> RunFilter {
    RunFilter {
        statuses: statuses.to_vec(),
        ..RunFilter::default()
    }
}

pub(crate) fn batch(action: BatchAction, filter: RunFilter, limit: usize) -> Batch {
    Batch {
        action,
        filter,
        dry_run: false,
        after: None,
        limit,
    }
}

pub(crate) fn ids_of(report: &BatchReport, outcome: BatchOutcome) -> Vec<String> {
    report
        .runs
        .iter()
        .filter(|r| r.outcome == outcome)
        .map(|r| r.id.to_string())
        .collect()
}

pub(crate) async fn statuses(engine: &Engine) -> BTreeMap<String, RunStatus> {
    engine
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.id.to_string(), r.status))
        .collect()
}

pub(crate) async fn settle(engine: &Engine, ids: &[String]) {
    for id in ids {
        engine.wait(id).await.unwrap();
    }
}

/// Undo lines per run in the ground-truth log.
pub(crate) fn undos(log: &str) -> BTreeMap<String, usize> {
    let mut undos = BTreeMap::new();
    for effect in ground_truth::read(Path::new(log)) {
        if effect.action == Action::Undo {
            *undos.entry(effect.run).or_default() += 1;
        }
    }
    undos
}
