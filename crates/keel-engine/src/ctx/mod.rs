//! The workflow context: what a workflow body calls to take steps and sleep (effects, steps
//! written as closures, are in `effect.rs`). Every call gets the next operation number;
//! replay answers it from the journal when the journal has it. Waits (the poll loop) are in
//! `wait.rs`.

use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::cell::RunCell;
use crate::clock::millis_saturating;
use crate::env::RunEnv;
use crate::error::{EngineError, Result};
use crate::ids::{OperationIndex, RunId};
use crate::interrupt::Interrupt;
use crate::journal::Event;
use crate::lane::{Attempted, Lane, StepAttempts};
use crate::limits::{STEPS_PER_RUN_MAX, STEP_ARGUMENT_BYTES_MAX};
use crate::replay::{step_action, step_undo_action, CompensationAction, Op, StepAction};
use crate::step::Step;
use crate::wait::{Probe, WaitPolicy};
use crate::workflow::{WorkflowError, Workflows};

mod events;
mod wait;

pub use events::Received;

/// The context a workflow body runs in.
pub struct Ctx {
    pub(crate) lane: Lane,
    /// The engine's workflow types, where a child run's type is registered.
    pub(crate) workflows: Arc<Workflows>,
    pub(crate) next: u32,
    pub(crate) interrupt: Option<Interrupt>,
    /// Whether a receive of this body took an event since the run was loaded (not one its
    /// replay took again): its later receives wait `park_after` in memory before they park,
    /// as a run taking events one after another would be loaded again for each.
    pub(crate) took_event: bool,
}

impl std::fmt::Debug for Ctx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctx")
            .field("run_id", &self.lane.cell.id)
            .field("next_operation", &self.next)
            .finish_non_exhaustive()
    }
}

impl Ctx {
    /// The context of a body of the run in `cell`; `pause_on_exhausted` is the workflow's
    /// [`crate::OnRetriesExhausted`] setting.
    pub(crate) fn new(
        cell: Arc<RunCell>,
        env: Arc<RunEnv>,
        workflows: Arc<Workflows>,
        pause_on_exhausted: bool,
    ) -> Ctx {
        Ctx {
            lane: Lane::new(cell, env, pause_on_exhausted),
            workflows,
            next: 0,
            interrupt: None,
            took_event: false,
        }
    }

    /// The id of the run.
    pub fn run_id(&self) -> &RunId {
        &self.lane.cell.id
    }

    /// The engine clock's time (ms since the Unix epoch).
    fn now_ms(&self) -> u64 {
        self.lane.env.clock.now_ms()
    }

    /// How many operations the body has asked for so far.
    pub(crate) fn operations(&self) -> u32 {
        self.next
    }

    pub(crate) fn interrupt(&mut self, cause: Interrupt) -> WorkflowError {
        tracing::debug!(run_id = %self.lane.cell.id, ?cause, "run interrupted");
        if self.interrupt.is_none() {
            self.interrupt = Some(cause);
        }
        WorkflowError::Interrupted
    }

    /// Checks for an earlier interrupt, a cancellation and a shutdown.
    pub(crate) fn check(&mut self) -> Result<(), WorkflowError> {
        if self.interrupt.is_some() {
            return Err(WorkflowError::Interrupted);
        }
        self.lane.check().map_err(|cause| self.interrupt(cause))
    }

    pub(crate) fn next_index(&mut self) -> Result<OperationIndex, WorkflowError> {
        if self.next >= STEPS_PER_RUN_MAX {
            let limit = EngineError::LimitReached {
                what: format!("operations of run {}", self.lane.cell.id),
                limit: u64::from(STEPS_PER_RUN_MAX),
            };
            return Err(self.interrupt(Interrupt::Engine(limit)));
        }
        let index = OperationIndex(self.next);
        self.next += 1;
        Ok(index)
    }

    pub(crate) fn journal(&mut self, event: Event) -> Result<(), WorkflowError> {
        self.lane
            .journal(event)
            .map_err(|cause| self.interrupt(cause))
    }

    async fn durable(&mut self) -> Result<(), WorkflowError> {
        let result = self.lane.durable().await;
        result.map_err(|cause| self.interrupt(cause))
    }

    /// Sleeps until the absolute time `at_ms`, waking early for cancellation and shutdown;
    /// with `parks`, a long enough sleep parks the run (see [`Lane::sleep_until`]).
    async fn sleep_until(&mut self, at_ms: u64, parks: bool) -> Result<(), WorkflowError> {
        if self.interrupt.is_some() {
            return Err(WorkflowError::Interrupted);
        }
        let result = self.lane.sleep_until(at_ms, parks).await;
        result.map_err(|cause| self.interrupt(cause))
    }

    /// The journaled form of a step's or probe's argument (the value itself), within the
    /// argument size limit.
    pub(crate) fn argument<T: serde::Serialize>(
        &mut self,
        index: OperationIndex,
        what: &str,
        kind: &str,
        value: &T,
    ) -> Result<Value, WorkflowError> {
        let argument = match serde_json::to_value(value) {
            Ok(v) => v,
            Err(source) => {
                let e = EngineError::Serialise {
                    what: format!("argument of {what} {index} ({kind})"),
                    source,
                };
                return Err(self.interrupt(Interrupt::Engine(e)));
            }
        };
        let bytes = crate::limits::json_bytes(&argument);
        if bytes > STEP_ARGUMENT_BYTES_MAX {
            let e = EngineError::TooLarge {
                what: format!("argument of {what} {index} ({kind})"),
                bytes,
                limit: STEP_ARGUMENT_BYTES_MAX,
            };
            return Err(self.interrupt(Interrupt::Engine(e)));
        }
        Ok(argument)
    }

    /// Runs `step` (or replays its recorded outcome), retrying per its policy.
    ///
    /// Returns the step's output, or [`WorkflowError::Step`] when it failed for good, which
    /// the body may handle (say, by trying a fallback) or propagate (the run compensates).
    pub async fn step<S: Step>(&mut self, step: S) -> Result<S::Output, WorkflowError> {
        self.check()?;
        let index = self.next_index()?;
        let argument = self.argument(index, "step", S::KIND, &step)?;
        if let Err(e) = self.lane.env.registry.add_step::<S>() {
            return Err(self.interrupt(Interrupt::Engine(e)));
        }
        self.attempted(index, argument, &mut StepAttempts(&step))
            .await
    }

    /// Replays the step at `index` from the journal, or runs its attempts (`call`): the one
    /// path of [`Ctx::step`] and [`Ctx::effect`]. Whatever the journal holds at `index` must
    /// be a step of the same kind and `argument`, or the run is suspended as non-deterministic.
    pub(crate) async fn attempted<'a, T>(
        &mut self,
        index: OperationIndex,
        argument: Value,
        call: &mut dyn Attempted<'a, T>,
    ) -> Result<T, WorkflowError>
    where
        T: Serialize + DeserializeOwned + Send,
    {
        let kind = call.kind();
        let action = self
            .lane
            .cell
            .with_state(|state| match state.ops.get(index.0 as usize) {
                None => Ok(step_action(None)),
                Some(Op::Step(op)) if op.kind != kind => Err(format!(
                    "journal holds step kind {:?}, code asks for {kind:?}",
                    op.kind
                )),
                Some(Op::Step(op)) if op.argument != argument => Err(format!(
                    "journal holds {kind} with argument {}, code asks for argument {argument}",
                    op.argument
                )),
                Some(Op::Step(op)) => Ok(step_action(Some(op))),
                Some(other) => Err(format!(
                    "journal holds {}, code asks for step {kind:?}",
                    other.describe()
                )),
            });
        let action = match action {
            Ok(action) => action,
            Err(detail) => return Err(self.interrupt(Interrupt::NonDeterminism { index, detail })),
        };
        match action {
            StepAction::Replay(output) => self.decode_output(index, kind, output),
            StepAction::Fail(error) => match self.lane.failed_for_good(index, kind, error) {
                Ok(error) => Err(error),
                Err(cause) => Err(self.interrupt(cause)),
            },
            StepAction::Run {
                attempt,
                not_before_ms,
            } => {
                let result = self
                    .lane
                    .run_attempts(index, call, argument, attempt, not_before_ms)
                    .await;
                result.unwrap_or_else(|cause| Err(self.interrupt(cause)))
            }
        }
    }

    /// A recorded output of a step of `kind`, decoded; one that does not decode is
    /// non-determinism (the code's output type changed).
    pub(crate) fn decode_output<T: DeserializeOwned>(
        &mut self,
        index: OperationIndex,
        kind: &str,
        output: Value,
    ) -> Result<T, WorkflowError> {
        serde_json::from_value(output).map_err(|e| {
            let detail = format!("recorded output of {kind} does not decode: {e}");
            self.interrupt(Interrupt::NonDeterminism { index, detail })
        })
    }

    /// Sleeps for `duration` on a durable timer: the wake time is journaled as an absolute
    /// time, so a restart neither shortens nor extends the sleep.
    pub async fn sleep(&mut self, duration: Duration) -> Result<(), WorkflowError> {
        self.check()?;
        let index = self.next_index()?;
        let journaled = self
            .lane
            .cell
            .with_state(|state| match state.ops.get(index.0 as usize) {
                None => Ok(None),
                Some(Op::Timer { wake_at_ms, fired }) => Ok(Some((*wake_at_ms, *fired))),
                Some(other) => Err(format!(
                    "journal holds {}, code asks for a timer",
                    other.describe()
                )),
            });
        let (wake_at_ms, fired) = match journaled {
            Ok(Some(timer)) => timer,
            Ok(None) => {
                let wake_at_ms = self.now_ms().saturating_add(millis_saturating(duration));
                self.journal(Event::TimerSet {
                    step: index,
                    wake_at_ms,
                })?;
                self.durable().await?;
                crate::crash::point("timer.after_set");
                (wake_at_ms, false)
            }
            Err(detail) => return Err(self.interrupt(Interrupt::NonDeterminism { index, detail })),
        };
        if !fired {
            let span =
                tracing::info_span!("timer", run_id = self.lane.cell.id.as_str(), step = index.0);
            // The wake time is durable: the sleep may park the run.
            tracing::Instrument::instrument(self.sleep_until(wake_at_ms, true), span).await?;
            self.journal(Event::TimerFired { step: index })?;
            crate::crash::point("timer.after_fired");
        }
        Ok(())
    }

    /// Creates a resource with the step `create(generation)` and waits for it with the probe
    /// `probe(&output)`; when the wait times out, compensates the stuck resource (runs the create
    /// step's compensation once, journaled, without waiting for the deletion to take effect)
    /// and creates it again, up to `generations` creations in all.
    ///
    /// Each generation is a new step, so it gets a new idempotency key: a retry of the new
    /// create cannot adopt the stuck resource. The last generation's timeout is returned as
    /// [`WorkflowError::WaitTimedOut`]; a compensation that fails for good ends the recreation
    /// with [`WorkflowError::CompensationFailed`] (propagated, the run compensates and stops at that
    /// step for an operator). Replay is deterministic: generations, waits and undos are all
    /// journaled operations or journaled states of them.
    pub async fn create_and_wait<S, P>(
        &mut self,
        generations: u32,
        mut create: impl FnMut(u32) -> S + Send,
        mut probe: impl FnMut(&S::Output) -> P + Send,
        policy: WaitPolicy,
    ) -> Result<Created<S::Output, P::Output>, WorkflowError>
    where
        S: Step,
        P: Probe,
    {
        let generations = generations.max(1);
        let mut generation = 0;
        loop {
            let step = self.next;
            let resource = self.step(create(generation)).await?;
            match self.wait(probe(&resource), policy.clone()).await {
                Ok(ready) => {
                    return Ok(Created {
                        resource,
                        ready,
                        generation,
                    })
                }
                Err(WorkflowError::WaitTimedOut { polls, .. }) if generation + 1 < generations => {
                    tracing::info!(run_id = %self.lane.cell.id, step, kind = S::KIND, generation, polls, "resource not ready by the deadline; compensating it and creating another (recreate)");
                    self.compensate_for_recreate::<S>(OperationIndex(step))
                        .await?;
                    generation += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Undoes completed step `step` now, while the run goes on, with the saga's journaled
    /// undo attempts and the step's compensation retry policy. Idempotent across replays:
    /// a recorded undo is not run again, an undo cut off by a crash runs again.
    pub(crate) async fn compensate_for_recreate<S: Step>(
        &mut self,
        step: OperationIndex,
    ) -> Result<(), WorkflowError> {
        // `Ctx::step` registered the kind before it ran or replayed the step.
        let entry = self
            .lane
            .env
            .registry
            .step(S::KIND)
            .expect("a step that ran is registered");
        loop {
            self.check()?;
            match self.lane.cell.with_state(|s| step_undo_action(s, step)) {
                None | Some(CompensationAction::Finished) => return Ok(()),
                Some(CompensationAction::Stuck { error, .. }) => {
                    return Err(WorkflowError::CompensationFailed {
                        step,
                        kind: S::KIND.into(),
                        error,
                    })
                }
                Some(CompensationAction::Compensate {
                    attempt,
                    round_attempts,
                    not_before_ms,
                    ..
                }) => {
                    if let Some(at_ms) = not_before_ms {
                        self.sleep_until(at_ms, false).await?;
                        self.check()?;
                    }
                    let result = crate::saga::undo_attempt(
                        &self.lane.env,
                        &self.lane.cell,
                        &entry,
                        step,
                        attempt,
                        round_attempts,
                    )
                    .await;
                    if let Err(e) = result {
                        return Err(self.interrupt(Interrupt::Engine(e)));
                    }
                }
            }
        }
    }
}

/// What [`Ctx::create_and_wait`] returns: the create step's output, the probe's last output,
/// and which generation (from 0) became ready.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Created<R, P> {
    /// The create step's output.
    pub resource: R,
    /// The probe's output when the resource was ready.
    pub ready: P,
    /// The generation that became ready; earlier ones were compensated and recreated.
    pub generation: u32,
}
