//! Test workflows whose side effects land in the ground-truth log ([`crate::effects`]).

use std::path::Path;
use std::time::Duration;

use keel_engine::{
    Compensation, Ctx, InvalidInput, Probe, RetryPolicy, Step, StepContext, StepError, WaitPolicy,
    Workflow, WorkflowError,
};
use serde::{Deserialize, Serialize};

use crate::effects::{self, Action, PollClock};

/// How an [`EffectStep`] misbehaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fault {
    /// Succeeds.
    None,
    /// The first attempt does the effect, then reports a retryable error, as when the
    /// response is lost; later attempts succeed (adopting the effect by key).
    LostResponseOnce,
    /// Fails permanently without any effect.
    Permanent,
    /// The first attempt does the effect and succeeds; any later attempt (after a crash cut
    /// off the first before its outcome was recorded) fails permanently, leaving the step in
    /// doubt for the saga.
    PermanentOnRetry,
    /// The compensation fails permanently (until the test removes the marker file
    /// `<log>.refuse-undo`).
    UndoRefused,
    /// Fails with a retryable error, without effect, while the marker file `<log>.down`
    /// exists (a dependency that is down until an operator fixes it).
    DownWhileMarked,
}

/// A step that records its effect (and its undo) in the ground-truth log at `log`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EffectStep {
    /// Which step of the flow this is; the output is `n * 10`.
    pub n: u32,
    /// How it misbehaves.
    pub fault: Fault,
    /// The ground-truth log.
    pub log: String,
    /// Each attempt first sleeps a random time below this, so concurrent steps finish in a
    /// different order on every run (not journaled when 0, as in older journals).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub jitter_ms: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl EffectStep {
    /// The step's work, its effect timed by `clock` (the failover torture tells a poll its
    /// worker began before a SIGSTOP from one begun after the SIGCONT by that time).
    async fn execute_timed(&self, ctx: &StepContext, clock: &PollClock) -> Result<u32, StepError> {
        if self.fault == Fault::Permanent {
            return Err(StepError::permanent(format!(
                "step {} refuses for good",
                self.n
            )));
        }
        if self.fault == Fault::PermanentOnRetry && ctx.attempt().0 > 1 {
            return Err(StepError::permanent(format!(
                "step {} refuses its retry",
                self.n
            )));
        }
        if self.fault == Fault::DownWhileMarked && Path::new(&format!("{}.down", self.log)).exists()
        {
            return Err(StepError::retryable(format!(
                "step {}: its dependency is down",
                self.n
            )));
        }
        if self.jitter_ms > 0 {
            let ms = rand::random::<u64>() % self.jitter_ms;
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        effects::record_at(&self.log, Action::Do, ctx, clock.began_us())?;
        if self.fault == Fault::LostResponseOnce && ctx.attempt().0 == 1 {
            return Err(StepError::retryable(format!(
                "response of step {} lost",
                self.n
            )));
        }
        Ok(self.n * 10)
    }

    /// The compensation's work, its undo timed by `clock` (as [`EffectStep::execute_timed`]).
    async fn compensate_timed(
        &self,
        ctx: &StepContext,
        output: Option<u32>,
        clock: &PollClock,
    ) -> Result<Compensation, StepError> {
        if self.fault == Fault::UndoRefused
            && Path::new(&format!("{}.refuse-undo", self.log)).exists()
        {
            return Err(StepError::permanent(format!(
                "undo of step {} refused",
                self.n
            )));
        }
        if output.is_none() {
            // In doubt: look for the effect by key, as a real step looks for a resource by
            // its tag; undo only what exists.
            let key = ctx.key().to_string();
            let exists = effects::read(Path::new(&self.log))
                .iter()
                .any(|e| e.action == Action::Do && e.key == key);
            if !exists {
                return Ok(Compensation::Done);
            }
        }
        effects::record_at(&self.log, Action::Undo, ctx, clock.began_us())?;
        Ok(Compensation::Done)
    }
}

impl Step for EffectStep {
    const KIND: &'static str = "test.effect";
    type Output = u32;

    async fn execute(&self, ctx: &StepContext) -> Result<u32, StepError> {
        let clock = PollClock::default();
        clock.drive(self.execute_timed(ctx, &clock)).await
    }

    fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy::default()
            .with_attempts_max(20)
            .with_backoff(Duration::from_millis(2), Duration::from_millis(40))
    }

    async fn compensate(
        &self,
        ctx: &StepContext,
        output: Option<u32>,
    ) -> Result<Compensation, StepError> {
        let clock = PollClock::default();
        clock
            .drive(self.compensate_timed(ctx, output, &clock))
            .await
    }

    fn compensation_retry_policy(&self) -> RetryPolicy {
        self.retry_policy()
    }
}

/// Input of [`EffectFlow`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EffectFlowInput {
    /// How many steps.
    pub steps: u32,
    /// The step that fails permanently, if any (the run then compensates).
    pub fail_at: Option<u32>,
    /// A durable sleep taken halfway, in milliseconds.
    pub sleep_ms: u64,
    /// The ground-truth log.
    pub log: String,
}

/// `steps` effect steps with a durable sleep and a recreated resource halfway (its first
/// generation times out and is abandoned); every third step loses its first response; step
/// `fail_at` fails permanently. Output: the sum of the step outputs and the resource's.
#[derive(Debug)]
pub struct EffectFlow;

impl Workflow for EffectFlow {
    const NAME: &'static str = "test.effect-flow";
    type Input = EffectFlowInput;
    type Output = u32;

    async fn run(ctx: &mut Ctx, input: EffectFlowInput) -> Result<u32, WorkflowError> {
        let mut sum = 0;
        for n in 0..input.steps {
            if n == input.steps / 2 {
                ctx.sleep(Duration::from_millis(input.sleep_ms)).await?;
            }
            if n == input.steps / 2 {
                // A resource whose first generation never becomes ready: abandoned (undone
                // while the run goes on) and created again with a new key.
                let created = ctx
                    .create_and_wait(
                        2,
                        |generation| EffectStep {
                            n: RECREATED_N + generation,
                            fault: Fault::None,
                            log: input.log.clone(),
                            jitter_ms: 0,
                        },
                        |output| ThresholdProbe {
                            value: *output,
                            ready_from: (RECREATED_N + 1) * 10,
                        },
                        WaitPolicy::every(Duration::from_millis(5), Duration::from_millis(40))
                            .growth(1.0),
                    )
                    .await?;
                sum += created.resource;
            }
            let fault = if input.fail_at == Some(n) {
                Fault::Permanent
            } else if n % 3 == 1 {
                Fault::LostResponseOnce
            } else {
                Fault::None
            };
            sum += ctx
                .step(EffectStep {
                    n,
                    fault,
                    log: input.log.clone(),
                    jitter_ms: 0,
                })
                .await?;
        }
        // A flapping readiness check at the end: ready only after two "yes" in a row.
        ctx.wait(
            FlappingProbe {
                pattern: vec![false, true, false, true, true],
            },
            WaitPolicy::every(Duration::from_millis(5), Duration::from_secs(60))
                .growth(1.0)
                .confirmations(2),
        )
        .await?;
        Ok(sum)
    }
}

/// A probe whose n-th poll (from 1, per resumption) answers `pattern[(n - 1) % len]`: a read
/// that flaps in a known way. Ready polls return the poll number.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FlappingProbe {
    /// Ready (true) or not (false), poll by poll, repeating.
    pub pattern: Vec<bool>,
}

impl Probe for FlappingProbe {
    const KIND: &'static str = "test.flapping";
    type Output = u32;

    async fn probe(&self, ctx: &StepContext) -> Result<Option<u32>, StepError> {
        let n = ctx.attempt().0;
        let ready = self.pattern.is_empty() || self.pattern[(n as usize - 1) % self.pattern.len()];
        Ok(ready.then_some(n))
    }
}

/// The `n` of the first generation of [`EffectFlow`]'s recreated resource.
pub const RECREATED_N: u32 = 100;

impl EffectFlow {
    /// The output a run of `input` completes with: the step outputs and the second
    /// generation of the recreated resource.
    pub fn expected_output(input: &EffectFlowInput) -> u32 {
        let recreated = if input.steps > 0 {
            (RECREATED_N + 1) * 10
        } else {
            0
        };
        (0..input.steps).map(|n| n * 10).sum::<u32>() + recreated
    }
}

/// A probe that holds when `value >= ready_from`: a resource that is ready or stuck for
/// good, depending on what its create step returned.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ThresholdProbe {
    /// The create step's output.
    pub value: u32,
    /// The least value that is ready.
    pub ready_from: u32,
}

impl Probe for ThresholdProbe {
    const KIND: &'static str = "test.threshold";
    type Output = u32;

    async fn probe(&self, _ctx: &StepContext) -> Result<Option<u32>, StepError> {
        Ok((self.value >= self.ready_from).then_some(self.value))
    }
}

/// Input of [`FanOutFlow`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FanOutInput {
    /// How many parallel branches.
    pub branches: u32,
    /// How many run at once.
    pub width: u32,
    /// The branch that fails permanently, if any (the run then compensates).
    pub fail_at: Option<u32>,
    /// Each branch attempt sleeps a random time below this first.
    pub jitter_ms: u64,
    /// The ground-truth log.
    pub log: String,
}

/// One effect step, then `branches` effect steps in parallel (`width` at a time; every third
/// loses its first response; branch `fail_at` fails permanently, and the run compensates
/// once every branch has ended), then a last step. Output: the sum of the outputs.
#[derive(Debug)]
pub struct FanOutFlow;

impl FanOutFlow {
    /// The output of a run that completes.
    pub fn expected_output(input: &FanOutInput) -> u32 {
        (0..input.branches + 2).map(|n| n * 10).sum()
    }
}

impl Workflow for FanOutFlow {
    const NAME: &'static str = "test.fan-out-flow";
    type Input = FanOutInput;
    type Output = u32;

    async fn run(ctx: &mut Ctx, input: FanOutInput) -> Result<u32, WorkflowError> {
        let effect = |n: u32, fault: Fault| EffectStep {
            n,
            fault,
            log: input.log.clone(),
            jitter_ms: input.jitter_ms,
        };
        let mut sum = ctx.step(effect(0, Fault::None)).await?;
        let branches = (1..=input.branches)
            .map(|n| {
                let fault = if input.fail_at == Some(n) {
                    Fault::Permanent
                } else if n % 3 == 0 {
                    Fault::LostResponseOnce
                } else {
                    Fault::None
                };
                effect(n, fault)
            })
            .collect();
        for result in ctx.join(branches, input.width as usize).await? {
            sum += result?;
        }
        sum += ctx.step(effect(input.branches + 1, Fault::None)).await?;
        Ok(sum)
    }
}

/// Input of [`ChildFlow`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChildInput {
    /// Which child this is; its steps are `n * 100` and `n * 100 + 1`.
    pub n: u32,
    /// Whether its second step fails permanently (the child then compensates itself).
    pub fail: bool,
    /// Each step attempt sleeps a random time below this first.
    pub jitter_ms: u64,
    /// The ground-truth log.
    pub log: String,
}

/// Two effect steps; the second fails permanently when asked to. Output: the sum of the
/// step outputs.
#[derive(Debug)]
pub struct ChildFlow;

impl Workflow for ChildFlow {
    const NAME: &'static str = "test.child";
    type Input = ChildInput;
    type Output = u32;

    fn validate(input: &ChildInput) -> Result<(), InvalidInput> {
        if input.n == 0 {
            return Err(InvalidInput::new("n", "children are numbered from 1"));
        }
        Ok(())
    }

    async fn run(ctx: &mut Ctx, input: ChildInput) -> Result<u32, WorkflowError> {
        let effect = |n: u32, fault: Fault| EffectStep {
            n,
            fault,
            log: input.log.clone(),
            jitter_ms: input.jitter_ms,
        };
        let first = ctx.step(effect(input.n * 100, Fault::None)).await?;
        let fault = if input.fail {
            Fault::Permanent
        } else {
            Fault::LostResponseOnce
        };
        let second = ctx.step(effect(input.n * 100 + 1, fault)).await?;
        Ok(first + second)
    }
}

/// Input of [`ParentFlow`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParentInput {
    /// How many children.
    pub children: u32,
    /// How many run at once.
    pub width: u32,
    /// The children (numbered from 1) that fail.
    pub fail: Vec<u32>,
    /// A durable sleep after the children, in milliseconds (time to cancel the parent).
    pub hold_ms: u64,
    /// Each step attempt sleeps a random time below this first.
    pub jitter_ms: u64,
    /// The ground-truth log.
    pub log: String,
}

/// What [`ParentFlow`] returns: which children completed and which did not.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParentOutput {
    /// The children that completed, with their outputs.
    pub completed: Vec<(u32, u32)>,
    /// The children that failed (and compensated themselves).
    pub failed: Vec<u32>,
}

/// One child run per child, `width` at a time; a failing child does not fail the parent,
/// whose output lists both kinds. Then an optional durable sleep.
#[derive(Debug)]
pub struct ParentFlow;

impl ParentFlow {
    /// The output of a run that completes.
    pub fn expected_output(input: &ParentInput) -> ParentOutput {
        let (failed, completed): (Vec<u32>, Vec<u32>) =
            (1..=input.children).partition(|n| input.fail.contains(n));
        ParentOutput {
            completed: completed
                .into_iter()
                .map(|n| (n, (n * 100) * 10 + (n * 100 + 1) * 10))
                .collect(),
            failed,
        }
    }
}

impl Workflow for ParentFlow {
    const NAME: &'static str = "test.parent";
    type Input = ParentInput;
    type Output = ParentOutput;

    async fn run(ctx: &mut Ctx, input: ParentInput) -> Result<ParentOutput, WorkflowError> {
        let inputs = (1..=input.children)
            .map(|n| ChildInput {
                n,
                fail: input.fail.contains(&n),
                jitter_ms: input.jitter_ms,
                log: input.log.clone(),
            })
            .collect();
        let mut output = ParentOutput {
            completed: Vec::new(),
            failed: Vec::new(),
        };
        let results = ctx
            .children::<ChildFlow>(inputs, input.width as usize)
            .await?;
        for (n, result) in (1..).zip(results) {
            match result {
                Ok(sum) => output.completed.push((n, sum)),
                Err(WorkflowError::Child { .. }) => output.failed.push(n),
                Err(e) => return Err(e),
            }
        }
        if input.hold_ms > 0 {
            ctx.sleep(Duration::from_millis(input.hold_ms)).await?;
        }
        Ok(output)
    }
}
