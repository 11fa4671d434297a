//! What the start suites (`engine_start_*.rs`) share: [`PlainFlow`], a workflow of fault-free
//! effect steps with an optional gate that holds a run until the test opens it, and a fixture
//! of a temporary data directory and ground-truth effect log.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use keel::{Ctx, Engine, Step, StepContext, StepError, Workflow, WorkflowError};
use keel_testkit::effects::{self, Action, Effect};
use keel_testkit::flows::{EffectFlow, EffectStep, Fault};
use keel_testkit::poll::CONDITION_TIMEOUT;
use serde::{Deserialize, Serialize};

/// Input of [`PlainFlow`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PlainInput {
    /// How many effect steps.
    pub(crate) steps: u32,
    /// A file whose existence opens the gate taken halfway, if any.
    pub(crate) gate: Option<String>,
    /// The ground-truth effect log.
    pub(crate) log: String,
}

/// `steps` fault-free effect steps, with an optional gate halfway that holds the run until the
/// test opens it; output: the sum of the step outputs.
pub(crate) struct PlainFlow;

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
pub(crate) struct Gate {
    pub(crate) path: String,
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

/// A temporary data directory and effect log.
pub(crate) struct Fixture {
    _dir: tempfile::TempDir,
    /// The data directory.
    pub(crate) data: PathBuf,
    /// The ground-truth effect log.
    pub(crate) log: PathBuf,
    /// The gate of gated inputs: it opens when this file exists.
    pub(crate) gate: PathBuf,
}

/// A fresh [`Fixture`].
pub(crate) fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    Fixture {
        data: dir.path().join("data"),
        log: dir.path().join("effects.jsonl"),
        gate: dir.path().join("gate"),
        _dir: dir,
    }
}

impl Fixture {
    /// The input of a [`PlainFlow`] run of `steps` steps, with no gate.
    pub(crate) fn input(&self, steps: u32) -> PlainInput {
        PlainInput {
            steps,
            gate: None,
            log: self.log.to_string_lossy().into_owned(),
        }
    }

    /// The input of a [`PlainFlow`] run of `steps` steps that waits at the gate halfway.
    pub(crate) fn gated_input(&self, steps: u32) -> PlainInput {
        PlainInput {
            gate: Some(self.gate.to_string_lossy().into_owned()),
            ..self.input(steps)
        }
    }

    /// Every line of the ground-truth log.
    pub(crate) fn effects(&self) -> Vec<Effect> {
        effects::read(&self.log)
    }

    /// For `run`: how many times each step's side effect ran, by operation number.
    pub(crate) fn runs_per_step(&self, run: &str) -> BTreeMap<u32, usize> {
        let mut counts = BTreeMap::new();
        for effect in self.effects() {
            if effect.run == run && effect.action == Action::Do {
                *counts.entry(effect.step).or_insert(0) += 1;
            }
        }
        counts
    }
}

/// An engine on `data` that knows [`PlainFlow`], [`EffectFlow`] and their steps.
pub(crate) async fn open(data: &Path) -> Engine {
    keel_testkit::open_engine(|| {
        keel_testkit::store::builder(data)
            .workflow::<PlainFlow>()
            .workflow::<EffectFlow>()
            .step::<EffectStep>()
            .step::<Gate>()
    })
    .await
}

/// The output of a [`PlainFlow`] run of `steps` steps.
pub(crate) fn sum_of(steps: u32) -> u32 {
    (0..steps).map(|n| n * 10).sum()
}
