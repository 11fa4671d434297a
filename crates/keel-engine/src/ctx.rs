//! The workflow context: what a workflow body calls to take steps and sleep (effects, steps
//! written as closures, are in `effect.rs`). Every call gets the next operation number;
//! replay answers it from the journal when the journal has it.

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::cell::RunCell;
use crate::clock::millis_saturating;
use crate::contain::{contained, contained_sync};
use crate::env::RunEnv;
use crate::error::{EngineError, Result};
use crate::ids::{Attempt, IdempotencyKey, RunId, StepIndex};
use crate::interrupt::Interrupt;
use crate::journal::{ErrorClass, Event};
use crate::journal::{WaitOutcome, WaitSchedule};
use crate::lane::{Attempted, Lane, StepAttempts};
use crate::limiter::{Priority, Slot};
use crate::limits::UNANSWERED_POLLS_MAX;
use crate::limits::{STEPS_PER_RUN_MAX, STEP_ARGUMENT_BYTES_MAX};
use crate::replay::{step_action, step_undo_action, Op, StepAction, UndoAction};
use crate::step::{Step, StepContext, StepError};
use crate::wait::{Probe, WaitPolicy};
use crate::workflow::{WorkflowError, Workflows};

/// The context a workflow body runs in.
pub struct Ctx {
    pub(crate) lane: Lane,
    /// The engine's workflow types, where a child run's type is registered.
    pub(crate) workflows: Arc<Workflows>,
    pub(crate) next: u32,
    pub(crate) interrupt: Option<Interrupt>,
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
        index: StepIndex,
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
        index: StepIndex,
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
            self.sleep_until(wake_at_ms).await?;
            self.journal(Event::TimerFired { step: index })?;
            crate::crash::point("timer.after_fired");
        }
        Ok(())
    }

    /// Polls `probe` under `policy` until it holds `policy.confirmations` times in a row
    /// (returning the last poll's output) or waiting is judged hopeless
    /// ([`WorkflowError::WaitTimedOut`], which the body may catch to recreate the resource).
    ///
    /// Only the start (with the resolved schedule and absolute deadline) and the end are
    /// journaled. The wait is judged by what the resource answered, not by what the engine
    /// did (docs/waits.md):
    /// - it times out only on a "not ready" answer to a poll *sent* at or after the deadline,
    ///   and only once it has had `confirmations` answers since it (re)started, so a deadline
    ///   that passed while the worker was down, or while polls queued at the rate limiter,
    ///   costs no resource its chance;
    /// - the deadline moves later by the time this process's polls spent queued at the
    ///   service's limiter;
    /// - a throttled or failed poll is no answer: it neither counts as a confirmation nor
    ///   breaks a run of them. Past the deadline, [`UNANSWERED_POLLS_MAX`] of them in a row end
    ///   the wait as failed, with the last error;
    /// - after a restart a run of confirmations starts over (polls are not journaled), so a
    ///   resource is never granted with fewer than `confirmations` polls in a row.
    ///
    /// The time to readiness is recorded in the statistics of `wait:<kind>`, which
    /// [`WaitPolicy::learned`] reads, only when it measures the resource: see
    /// [`crate::stats`] and docs/waits.md.
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
        let started = match journaled {
            Ok(Some((_, _, Some(outcome)))) => return self.wait_result::<P>(index, outcome),
            Ok(Some((schedule, started_at_ms, None))) => WaitStart {
                schedule,
                started_at_ms,
                here: false,
            },
            Ok(None) => {
                let started_at_ms = self.now_ms();
                let stats = self.lane.env.stats.summary(&format!("wait:{}", P::KIND));
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
                WaitStart {
                    schedule,
                    started_at_ms,
                    here: true,
                }
            }
            Err(detail) => return Err(self.interrupt(Interrupt::NonDeterminism { index, detail })),
        };
        let outcome = self.poll(index, &probe, &started).await?;
        self.journal(Event::WaitEnded {
            step: index,
            outcome: outcome.clone(),
        })?;
        crate::stats::EventCounters::bump(&self.lane.env.counters.waits);
        // Not synced here: the next step's start record, or the run's terminal record, shares
        // this entry's sync, as for a step's outcome.
        crate::crash::point("wait.after_ended");
        self.wait_result::<P>(index, outcome)
    }

    async fn poll<P: Probe>(
        &mut self,
        index: StepIndex,
        probe: &P,
        start: &WaitStart,
    ) -> Result<WaitOutcome, WorkflowError> {
        let schedule = &start.schedule;
        let mut polls = PollCount {
            last_sent_ms: start.started_at_ms,
            ..PollCount::default()
        };
        let mut interval_ms = 0;
        let mut next_at_ms = start
            .started_at_ms
            .saturating_add(schedule.initial_delay_ms);
        loop {
            let deadline_ms = schedule.deadline_ms.saturating_add(polls.queued_ms);
            // With no run of confirmations under way, a poll is sent at the deadline (once),
            // so that it is a poll sent there that judges the resource.
            let wake_at_ms = if polls.streak == 0 && polls.last_sent_ms < deadline_ms {
                next_at_ms.min(deadline_ms)
            } else {
                next_at_ms
            };
            self.sleep_until(wake_at_ms).await?;
            let scheduled_ms = self.now_ms();
            let (answer, sent_ms) = self.poll_once(index, probe, Attempt(polls.sent + 1)).await;
            let queued_ms = sent_ms.saturating_sub(scheduled_ms);
            let gap_ms = wake_at_ms.saturating_sub(polls.last_sent_ms);
            polls.sent += 1;
            polls.queued_ms += queued_ms;
            polls.last_sent_ms = sent_ms;
            let deadline_ms = schedule.deadline_ms.saturating_add(polls.queued_ms);
            let past_deadline = sent_ms >= deadline_ms;
            match answer {
                Ok(Some(output)) => {
                    if polls.streak == 0 {
                        polls.streak_started_ms = sent_ms;
                        polls.first_ready_queued_ms = queued_ms;
                        polls.first_ready_gap_ms = gap_ms;
                    }
                    polls.streak += 1;
                    polls.answered();
                    if polls.streak >= schedule.confirmations {
                        return Ok(self.ready::<P>(output, start, &polls));
                    }
                }
                Ok(None) => {
                    polls.streak = 0;
                    polls.answered();
                    if past_deadline && polls.answers >= schedule.confirmations {
                        tracing::info!(run_id = %self.lane.cell.id, step = index.0, kind = P::KIND, polls = polls.sent, "wait timed out");
                        return Ok(WaitOutcome::TimedOut { polls: polls.sent });
                    }
                }
                Err(error) if error.class() == ErrorClass::Permanent => {
                    tracing::info!(run_id = %self.lane.cell.id, step = index.0, kind = P::KIND, %error, "probe failed permanently");
                    return Ok(WaitOutcome::Failed {
                        error: error.to_record(),
                        polls: polls.sent,
                    });
                }
                Err(error) => {
                    // No answer: the streak neither grows nor breaks.
                    polls.unanswered = if past_deadline {
                        polls.unanswered + 1
                    } else {
                        0
                    };
                    tracing::debug!(run_id = %self.lane.cell.id, step = index.0, kind = P::KIND, %error, unanswered = polls.unanswered, "probe failed; no answer");
                    if polls.unanswered >= UNANSWERED_POLLS_MAX {
                        let error = StepError::retryable(format!(
                            "{UNANSWERED_POLLS_MAX} polls in a row past the deadline got no answer; the last: {error}"
                        ));
                        return Ok(WaitOutcome::Failed {
                            error: error.to_record(),
                            polls: polls.sent,
                        });
                    }
                }
            }
            let offset_ms = self.now_ms().saturating_sub(start.started_at_ms);
            let (next_offset_ms, carried_ms) =
                schedule.next_poll(offset_ms, interval_ms, polls.streak, self.lane.rng.gen());
            interval_ms = carried_ms;
            // No more often than the limiter serves polls: after one that queued `queued_ms`,
            // the next waits at least as long, so densely polling waits leave the service's
            // budget to the calls that make progress.
            next_at_ms = start
                .started_at_ms
                .saturating_add(next_offset_ms)
                .max(sent_ms.saturating_add(queued_ms));
        }
    }

    /// One poll of `probe` (number `poll`), in a slot of its service's limiter, and the engine
    /// clock's time when it was sent (after its slot). A panicking poll is a failed poll, as
    /// a retryable error is.
    async fn poll_once<P: Probe>(
        &mut self,
        index: StepIndex,
        probe: &P,
        poll: Attempt,
    ) -> (Result<Option<P::Output>, StepError>, u64) {
        let ctx = StepContext {
            run_id: self.lane.cell.id.clone(),
            step: index,
            key: IdempotencyKey::for_step(&self.lane.cell.id, index),
            attempt: poll,
            resources: Arc::clone(&self.lane.env.resources),
            clock: self.lane.env.clock.clone(),
            effect_by_ms: None,
        };
        let span = tracing::debug_span!("probe", run_id = %self.lane.cell.id, step = index.0, kind = P::KIND, poll = poll.0);
        let service = contained_sync(|| probe.rate_limit().map(str::to_owned))
            .ok()
            .flatten();
        let limiter = service.map(|name| self.lane.env.limiters.get(&name));
        let slot = Slot::take(limiter.as_deref(), Priority::Probe).await;
        let sent_ms = self.now_ms();
        let call = tracing::Instrument::instrument(async { probe.probe(&ctx).await }, span);
        let polled = contained(call)
            .await
            .unwrap_or_else(|panic| Err(StepError::retryable(format!("panicked: {panic}"))));
        slot.report(&polled);
        // Polls are not journaled: a poll that returned is what shows the run survives them.
        self.lane.cell.survived(&*self.lane.env.store);
        (polled, sent_ms)
    }

    /// The outcome of a wait whose probe held: its last output. The time to readiness (from
    /// the wait's start to the sending of the poll that first saw it ready) is recorded under
    /// `wait:<kind>` when it measures the resource: the wait started in this drive of the run
    /// (no restart or suspension inside it), and that poll was not held at the limiter for
    /// longer than the interval it was scheduled after.
    fn ready<P: Probe>(
        &mut self,
        output: P::Output,
        start: &WaitStart,
        polls: &PollCount,
    ) -> WaitOutcome {
        let output = match serde_json::to_value(&output) {
            Ok(v) => v,
            Err(e) => {
                let error = StepError::permanent(format!(
                    "output of probe {} does not serialise: {e}",
                    P::KIND
                ));
                return WaitOutcome::Failed {
                    error: error.to_record(),
                    polls: polls.sent,
                };
            }
        };
        let held_ms = polls
            .first_ready_gap_ms
            .max(start.schedule.dense_interval_ms);
        if start.here && polls.first_ready_queued_ms <= held_ms {
            let waited_ms = polls.streak_started_ms.saturating_sub(start.started_at_ms);
            self.lane.env.stats.record(
                &format!("wait:{}", P::KIND),
                Duration::from_millis(waited_ms),
                self.lane.cell.id.as_str(),
                self.now_ms(),
            );
        } else {
            tracing::debug!(run_id = %self.lane.cell.id, kind = P::KIND, here = start.here, queued_ms = polls.first_ready_queued_ms, "time to readiness not recorded: it would measure the engine, not the resource");
        }
        WaitOutcome::Ready {
            output,
            polls: polls.sent,
        }
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
                    self.compensate_for_recreate::<S>(StepIndex(step)).await?;
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
        step: StepIndex,
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
                None | Some(UndoAction::Finished) => return Ok(()),
                Some(UndoAction::Stuck { error, .. }) => {
                    return Err(WorkflowError::CompensationFailed {
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
    /// The generation that became ready; earlier ones were compensated and recreated.
    pub generation: u32,
}

/// A wait's journaled start, and whether it was journaled by this drive of the run.
struct WaitStart {
    schedule: WaitSchedule,
    started_at_ms: u64,
    /// Started in this drive of the run: no restart or suspension since.
    here: bool,
}

/// What a wait's polls have seen since it (re)started.
#[derive(Default)]
struct PollCount {
    /// Polls sent.
    sent: u32,
    /// Polls answered (ready or not ready).
    answers: u32,
    /// Ready answers in a row.
    streak: u32,
    /// When the poll that began the current run of ready answers was sent.
    streak_started_ms: u64,
    /// When the last poll was sent (the wait's start before the first).
    last_sent_ms: u64,
    /// Polls past the deadline in a row that got no answer.
    unanswered: u32,
    /// Time polls spent queued at the limiter.
    queued_ms: u64,
    /// Of the poll that began the run of ready answers: time queued, and the interval it was
    /// scheduled after.
    first_ready_queued_ms: u64,
    first_ready_gap_ms: u64,
}

impl PollCount {
    /// A poll got an answer, ready or not.
    fn answered(&mut self) {
        self.answers += 1;
        self.unanswered = 0;
    }
}
