//! The workflow context: what a workflow body calls to take steps and sleep. Every call gets
//! the next operation number; replay answers it from the journal when the journal has it.

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use serde_json::Value;

use crate::cell::RunCell;
use crate::contain::{contained, contained_sync};
use crate::engine::Inner;
use crate::error::{EngineError, Result};
use crate::ids::{Attempt, IdempotencyKey, RunId, StepIndex};
use crate::journal::{ErrorClass, Event};
use crate::lane::Lane;
use crate::limits::{STEPS_PER_RUN_MAX, STEP_ARGUMENT_BYTES_MAX};
use crate::replay::{step_action, step_undo_action, Op, StepAction, UndoAction};
use crate::step::{Step, StepContext, StepError};
use crate::wait::{Probe, WaitOutcome, WaitPolicy, WaitSchedule};
use crate::workflow::WorkflowError;

/// Why the engine stopped a workflow body. Once set, every later `ctx` call returns
/// [`WorkflowError::Interrupted`] and the executor acts on this cause, whatever the body
/// returns.
#[derive(Debug)]
pub(crate) enum Interrupt {
    Cancelled,
    ShutDown,
    /// An operator paused the run, or a step ran out of retries (`exhausted`).
    Paused {
        reason: String,
        exhausted: bool,
    },
    /// A `select` branch stopped because another branch won; never leaves the select.
    Stopped,
    NonDeterminism {
        index: StepIndex,
        detail: String,
    },
    Engine(EngineError),
}

/// The context a workflow body runs in.
pub struct Ctx {
    pub(crate) lane: Lane,
    pub(crate) next: u32,
    pub(crate) interrupt: Option<Interrupt>,
}

impl Ctx {
    pub(crate) fn new(cell: Arc<RunCell>, inner: Arc<Inner>) -> Ctx {
        Ctx {
            lane: Lane::new(cell, inner),
            next: 0,
            interrupt: None,
        }
    }

    /// The id of the run.
    pub fn run_id(&self) -> &RunId {
        &self.lane.cell.id
    }

    /// The engine clock's time (ms since the Unix epoch).
    fn now_ms(&self) -> u64 {
        self.lane.inner.clock.now_ms()
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

    pub(crate) fn next_index(&mut self) -> Result<StepIndex, WorkflowError> {
        if self.next >= STEPS_PER_RUN_MAX {
            let limit = EngineError::LimitReached {
                what: format!("operations of run {}", self.lane.cell.id),
                limit: u64::from(STEPS_PER_RUN_MAX),
            };
            return Err(self.interrupt(Interrupt::Engine(limit)));
        }
        let index = StepIndex(self.next);
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

    /// Sleeps until the absolute time `at_ms`, waking early for cancellation and shutdown.
    async fn sleep_until(&mut self, at_ms: u64) -> Result<(), WorkflowError> {
        if self.interrupt.is_some() {
            return Err(WorkflowError::Interrupted);
        }
        let result = self.lane.sleep_until(at_ms).await;
        result.map_err(|cause| self.interrupt(cause))
    }

    /// The journaled form of a step's or probe's argument (the value itself), within the
    /// argument size limit.
    pub(crate) fn argument<T: serde::Serialize>(
        &mut self,
        index: StepIndex,
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
        let bytes = argument.to_string().len();
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
        if let Err(e) = self.lane.inner.registry.add_step::<S>() {
            return Err(self.interrupt(Interrupt::Engine(e)));
        }
        let action = self
            .lane
            .cell
            .with_state(|state| match state.ops.get(index.0 as usize) {
                None => Ok(step_action(None)),
                Some(Op::Step(op)) if op.kind != S::KIND => Err(format!(
                    "journal holds step kind {:?}, code asks for {:?}",
                    op.kind,
                    S::KIND
                )),
                Some(Op::Step(op)) if op.argument != argument => Err(format!(
                    "journal holds {} with argument {}, code asks for argument {}",
                    S::KIND,
                    op.argument,
                    argument
                )),
                Some(Op::Step(op)) => Ok(step_action(Some(op))),
                Some(other) => Err(format!(
                    "journal holds {}, code asks for step {:?}",
                    other.describe(),
                    S::KIND
                )),
            });
        let action = match action {
            Ok(action) => action,
            Err(detail) => return Err(self.interrupt(Interrupt::NonDeterminism { index, detail })),
        };
        match action {
            StepAction::Replay(output) => self.decode_output::<S>(index, output),
            StepAction::Fail(error) => match self.lane.failed_for_good(index, S::KIND, error) {
                Ok(error) => Err(error),
                Err(cause) => Err(self.interrupt(cause)),
            },
            StepAction::Run {
                attempt,
                not_before_ms,
            } => {
                let result = self
                    .lane
                    .run_attempts(index, &step, argument, attempt, not_before_ms)
                    .await;
                result.unwrap_or_else(|cause| Err(self.interrupt(cause)))
            }
        }
    }

    pub(crate) fn decode_output<S: Step>(
        &mut self,
        index: StepIndex,
        output: Value,
    ) -> Result<S::Output, WorkflowError> {
        serde_json::from_value(output).map_err(|e| {
            let detail = format!("recorded output of {} does not decode: {e}", S::KIND);
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
                let wake_at_ms = self.now_ms().saturating_add(duration.as_millis() as u64);
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
            self.sleep_until(wake_at_ms).await?;
            self.journal(Event::TimerFired { step: index })?;
            crate::crash::point("timer.after_fired");
        }
        Ok(())
    }

    /// Polls `probe` under `policy` until it holds `policy.confirmations` times in a row
    /// (returning the last poll's output) or the deadline passes
    /// ([`WorkflowError::WaitTimedOut`], which the body may catch to recreate the resource).
    ///
    /// Only the start (with the resolved schedule and absolute deadline) and the end are
    /// journaled. After a restart the wait resumes polling under the journaled schedule, with
    /// the original deadline; a run of confirmations starts over. The wait times out at the
    /// first "not ready" at or past the deadline: it polls at least once after every
    /// (re)start, and a run of confirmations under way at the deadline is finished. The time to readiness is
    /// recorded in the statistics of `wait:<kind>`, which [`WaitPolicy::learned`] reads.
    pub async fn wait<P: Probe>(
        &mut self,
        probe: P,
        policy: WaitPolicy,
    ) -> Result<P::Output, WorkflowError> {
        self.check()?;
        let index = self.next_index()?;
        let argument = self.argument(index, "wait", P::KIND, &probe)?;
        let journaled = self.lane.cell.with_state(|state| match state.ops.get(index.0 as usize) {
            None => Ok(None),
            Some(Op::Wait(op)) if op.kind == P::KIND && op.argument == argument => {
                Ok(Some((op.schedule.clone(), op.started_at_ms, op.outcome.clone())))
            }
            Some(Op::Wait(op)) => Err(format!(
                "journal holds wait {:?} with argument {}, code asks for wait {:?} with argument {}",
                op.kind,
                op.argument,
                P::KIND,
                argument
            )),
            Some(other) => Err(format!("journal holds {}, code asks for wait {:?}", other.describe(), P::KIND)),
        });
        let (schedule, started_at_ms) = match journaled {
            Ok(Some((_, _, Some(outcome)))) => return self.wait_result::<P>(index, outcome),
            Ok(Some((schedule, started_at_ms, None))) => (schedule, started_at_ms),
            Ok(None) => {
                let started_at_ms = self.now_ms();
                let stats = self.lane.inner.stats.summary(&format!("wait:{}", P::KIND));
                let schedule = policy.resolve(started_at_ms, stats.as_ref());
                tracing::debug!(run_id = %self.lane.cell.id, step = index.0, kind = P::KIND, ?schedule, "wait starts");
                self.journal(Event::WaitStarted {
                    step: index,
                    kind: P::KIND.into(),
                    argument,
                    schedule: schedule.clone(),
                })?;
                self.durable().await?;
                crate::crash::point("wait.after_started");
                (schedule, started_at_ms)
            }
            Err(detail) => return Err(self.interrupt(Interrupt::NonDeterminism { index, detail })),
        };
        let outcome = self.poll(index, &probe, &schedule, started_at_ms).await?;
        self.journal(Event::WaitEnded {
            step: index,
            outcome: outcome.clone(),
        })?;
        crate::stats::EventCounters::bump(&self.lane.inner.counters.waits);
        // Not synced here: the next step's start record, or the run's terminal record, shares
        // this entry's sync, as for a step's outcome.
        crate::crash::point("wait.after_ended");
        self.wait_result::<P>(index, outcome)
    }

    async fn poll<P: Probe>(
        &mut self,
        index: StepIndex,
        probe: &P,
        schedule: &WaitSchedule,
        started_at_ms: u64,
    ) -> Result<WaitOutcome, WorkflowError> {
        let mut polls = 0u32;
        let mut streak = 0u32;
        let mut ready_since_ms = 0;
        let mut interval_ms = 0;
        let mut next_at_ms = started_at_ms.saturating_add(schedule.initial_delay_ms);
        loop {
            // Past the deadline, a poll is made only to finish a run of confirmations, or as
            // the first poll after a (re)start: a wait whose deadline passed while the engine
            // was down still looks once before it judges the resource hopeless.
            let wake_at_ms = if streak > 0 {
                next_at_ms
            } else {
                next_at_ms.min(schedule.deadline_ms)
            };
            self.sleep_until(wake_at_ms).await?;
            if self.now_ms() >= schedule.deadline_ms && streak == 0 && polls > 0 {
                tracing::info!(run_id = %self.lane.cell.id, step = index.0, kind = P::KIND, polls, "wait timed out");
                return Ok(WaitOutcome::TimedOut { polls });
            }
            polls += 1;
            match self.poll_once(index, probe, Attempt(polls)).await {
                Ok(Some(output)) => {
                    if streak == 0 {
                        ready_since_ms = self.now_ms();
                    }
                    streak += 1;
                    if streak >= schedule.confirmations {
                        let waited = ready_since_ms.saturating_sub(started_at_ms);
                        return Ok(self.ready::<P>(output, polls, waited));
                    }
                }
                Ok(None) => streak = 0,
                Err(error) if error.class() == ErrorClass::Permanent => {
                    tracing::info!(run_id = %self.lane.cell.id, step = index.0, kind = P::KIND, %error, "probe failed permanently");
                    return Ok(WaitOutcome::Failed {
                        error: error.to_record(),
                        polls,
                    });
                }
                Err(error) => {
                    tracing::debug!(run_id = %self.lane.cell.id, step = index.0, kind = P::KIND, %error, "probe failed; counts as not ready");
                    streak = 0;
                }
            }
            let offset_ms = self.now_ms().saturating_sub(started_at_ms);
            let (next_offset_ms, carried_ms) =
                schedule.next_poll(offset_ms, interval_ms, streak, self.lane.rng.gen());
            interval_ms = carried_ms;
            next_at_ms = started_at_ms.saturating_add(next_offset_ms);
        }
    }

    /// One poll of `probe` (number `poll`), in a slot of its service's limiter. A panicking
    /// poll is a failed poll, as a retryable error is.
    async fn poll_once<P: Probe>(
        &mut self,
        index: StepIndex,
        probe: &P,
        poll: Attempt,
    ) -> Result<Option<P::Output>, StepError> {
        let ctx = StepContext {
            run_id: self.lane.cell.id.clone(),
            step: index,
            key: IdempotencyKey::for_step(&self.lane.cell.id, index),
            attempt: poll,
            resources: Arc::clone(&self.lane.inner.resources),
        };
        let span = tracing::debug_span!("probe", run_id = %self.lane.cell.id, step = index.0, kind = P::KIND, poll = poll.0);
        let service = contained_sync(|| probe.rate_limit().map(str::to_owned))
            .ok()
            .flatten();
        let call = || async {
            let call = tracing::Instrument::instrument(async { probe.probe(&ctx).await }, span);
            contained(call)
                .await
                .unwrap_or_else(|panic| Err(StepError::retryable(format!("panicked: {panic}"))))
        };
        let polled = rate_limited(&self.lane.inner, service.as_deref(), call).await;
        // Polls are not journaled: a poll that returned is what shows the run survives them.
        self.lane.cell.survived(&*self.lane.inner.store);
        polled
    }

    /// The outcome of a wait whose probe held: its last output, and the time to readiness
    /// (`waited_ms` from the wait's start) recorded under `wait:<kind>`.
    fn ready<P: Probe>(&mut self, output: P::Output, polls: u32, waited_ms: u64) -> WaitOutcome {
        let output = match serde_json::to_value(&output) {
            Ok(v) => v,
            Err(e) => {
                let error = StepError::permanent(format!(
                    "output of probe {} does not serialise: {e}",
                    P::KIND
                ));
                return WaitOutcome::Failed {
                    error: error.to_record(),
                    polls,
                };
            }
        };
        self.lane.inner.stats.record(
            &format!("wait:{}", P::KIND),
            Duration::from_millis(waited_ms),
            self.lane.cell.id.as_str(),
            self.now_ms(),
        );
        WaitOutcome::Ready { output, polls }
    }

    /// Creates a resource with the step `create(generation)` and waits for it with the probe
    /// `probe(&output)`; when the wait times out, abandons the stuck resource (runs the create
    /// step's compensation once, journaled, without waiting for the deletion to take effect)
    /// and creates it again, up to `generations` creations in all.
    ///
    /// Each generation is a new step, so it gets a new idempotency key: a retry of the new
    /// create cannot adopt the stuck resource. The last generation's timeout is returned as
    /// [`WorkflowError::WaitTimedOut`]; a compensation that fails for good ends the recreation
    /// with [`WorkflowError::UndoFailed`] (propagated, the run compensates and stops at that
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
                    tracing::info!(run_id = %self.lane.cell.id, step, kind = S::KIND, generation, polls, "resource not ready by the deadline; abandoning it and creating another");
                    self.abandon::<S>(StepIndex(step)).await?;
                    generation += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Undoes completed step `step` now, while the run goes on, with the saga's journaled
    /// undo attempts and the step's compensation retry policy. Idempotent across replays:
    /// a recorded undo is not run again, an undo cut off by a crash runs again.
    pub(crate) async fn abandon<S: Step>(&mut self, step: StepIndex) -> Result<(), WorkflowError> {
        // `Ctx::step` registered the kind before it ran or replayed the step.
        let entry = self
            .lane
            .inner
            .registry
            .step(S::KIND)
            .expect("a step that ran is registered");
        loop {
            self.check()?;
            match self.lane.cell.with_state(|s| step_undo_action(s, step)) {
                None | Some(UndoAction::Finished) => return Ok(()),
                Some(UndoAction::Stuck { error, .. }) => {
                    return Err(WorkflowError::UndoFailed {
                        step,
                        kind: S::KIND.into(),
                        error,
                    })
                }
                Some(UndoAction::Undo {
                    attempt,
                    round_attempts,
                    not_before_ms,
                    ..
                }) => {
                    if let Some(at_ms) = not_before_ms {
                        self.sleep_until(at_ms).await?;
                        self.check()?;
                    }
                    let result = crate::saga::undo_attempt(
                        &self.lane.inner,
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

    fn wait_result<P: Probe>(
        &mut self,
        index: StepIndex,
        outcome: WaitOutcome,
    ) -> Result<P::Output, WorkflowError> {
        match outcome {
            WaitOutcome::Ready { output, .. } => serde_json::from_value(output).map_err(|e| {
                let detail = format!("recorded output of wait {} does not decode: {e}", P::KIND);
                self.interrupt(Interrupt::NonDeterminism { index, detail })
            }),
            WaitOutcome::TimedOut { polls } => Err(WorkflowError::WaitTimedOut {
                step: index,
                kind: P::KIND.into(),
                polls,
            }),
            WaitOutcome::Failed { error, .. } => Err(WorkflowError::Step {
                step: index,
                kind: P::KIND.into(),
                error,
            }),
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
    /// The generation that became ready; earlier ones were abandoned.
    pub generation: u32,
}

/// Makes `call` in a slot of the limiter of `service` (if any) and reports its outcome back:
/// success, throttling, or neither. `call` makes the call's future, so that future is
/// stored once, inside this one (a future passed in would be stored twice: `contain.rs`).
pub(crate) async fn rate_limited<T, F>(
    inner: &Inner,
    service: Option<&str>,
    call: impl FnOnce() -> F,
) -> Result<T, StepError>
where
    F: std::future::Future<Output = Result<T, StepError>>,
{
    let Some(limiter) = service.map(|name| inner.limiter(name)) else {
        return call().await;
    };
    let permit = limiter.acquire().await;
    let result = call().await;
    crate::lane::report(&limiter, permit, &result);
    result
}
