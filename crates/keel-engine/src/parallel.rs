//! Parallel steps: a fan-out of steps run concurrently under a width bound, joined in the
//! order the code listed them.
//!
//! The fork is one operation and its branches the operations right after it, numbered in
//! list order when the fork starts; so every branch's step index, and with it its
//! idempotency key, is the same on every replay, whatever order the branches finished in
//! before a crash. Branches journal through the run's one cell; each starts only after its
//! start record is durable, as a sequential step does (concurrent branches share syncs).

use serde_json::Value;
use tokio::task::JoinSet;

use crate::ctx::{Ctx, Interrupt};
use crate::error::EngineError;
use crate::ids::{Attempt, StepIndex};
use crate::journal::Event;
use crate::limits::{FAN_OUT_MAX, STEPS_PER_RUN_MAX};
use crate::replay::{step_action, Op, StepAction};
use crate::step::Step;
use crate::workflow::WorkflowError;

/// What one branch of a fan-out needs to do, decided before any branch runs.
enum Plan<S: Step> {
    Done(Result<S::Output, WorkflowError>),
    Run {
        step: S,
        argument: Value,
        attempt: Attempt,
        not_before_ms: Option<u64>,
    },
}

impl Ctx {
    /// Runs `steps` concurrently, at most `width` at a time, and returns each one's result
    /// in the order given: its output, or [`WorkflowError::Step`] when it failed for good.
    /// Every branch runs to its end (one failure does not stop the others); the body then
    /// decides, typically by propagating the first failure so the run compensates. The outer
    /// error is an interrupt (cancellation, shutdown, a journal failure): in-flight branches
    /// finish and are recorded first.
    ///
    /// Compensation undoes every completed or in-doubt branch, in reverse list order, like
    /// sequential steps. At most [`FAN_OUT_MAX`] branches; `width` from 1.
    pub async fn join<S: Step>(
        &mut self,
        steps: Vec<S>,
        width: usize,
    ) -> Result<Vec<Result<S::Output, WorkflowError>>, WorkflowError> {
        self.check()?;
        let count = steps.len();
        if width == 0 {
            let e = EngineError::InvalidRequest(format!(
                "fan-out of {count} {} steps with width 0 (must be at least 1)",
                S::KIND
            ));
            return Err(self.interrupt(Interrupt::Engine(e)));
        }
        if count > FAN_OUT_MAX as usize {
            let e = EngineError::LimitReached {
                what: format!("fan-out of {count} {} steps", S::KIND),
                limit: u64::from(FAN_OUT_MAX),
            };
            return Err(self.interrupt(Interrupt::Engine(e)));
        }
        let branches = count as u32;
        let fork = self.next_index()?;
        if self.next.saturating_add(branches) > STEPS_PER_RUN_MAX {
            let e = EngineError::LimitReached {
                what: format!("operations of run {}", self.lane.cell.id),
                limit: u64::from(STEPS_PER_RUN_MAX),
            };
            return Err(self.interrupt(Interrupt::Engine(e)));
        }
        let first = self.next;
        self.next += branches;
        if let Err(e) = self.lane.inner.registry.add_step::<S>() {
            return Err(self.interrupt(Interrupt::Engine(e)));
        }
        let journaled = self
            .lane
            .cell
            .with_state(|state| match state.ops.get(fork.0 as usize) {
                None => Ok(false),
                Some(Op::Fork { branches: n }) if *n == branches => Ok(true),
                Some(other) => Err(format!(
                    "journal holds {}, code asks for a fan-out of {branches} {:?} steps",
                    other.describe(),
                    S::KIND
                )),
            });
        match journaled {
            Ok(true) => {}
            // Not synced: the first branch's start record shares the sync.
            Ok(false) => self.journal(Event::ForkStarted {
                step: fork,
                branches,
            })?,
            Err(detail) => {
                return Err(self.interrupt(Interrupt::NonDeterminism {
                    index: fork,
                    detail,
                }))
            }
        }

        let mut plans = Vec::with_capacity(count);
        for (i, step) in steps.into_iter().enumerate() {
            let index = StepIndex(first + i as u32);
            let argument = self.argument(index, "step", S::KIND, &step)?;
            let action = self.lane.cell.with_state(|state| match state.ops.get(index.0 as usize) {
                Some(Op::Branch) => Ok(step_action(None)),
                Some(Op::Step(op)) if op.kind == S::KIND && op.argument == argument => {
                    Ok(step_action(Some(op)))
                }
                Some(other) => Err(format!(
                    "journal holds {} at branch {i} of fan-out {fork}, code asks for {:?} with argument {argument}",
                    other.describe(),
                    S::KIND
                )),
                None => Err(format!("branch {i} of fan-out {fork} is missing from the journal")),
            });
            let action = match action {
                Ok(action) => action,
                Err(detail) => {
                    return Err(self.interrupt(Interrupt::NonDeterminism { index, detail }))
                }
            };
            plans.push(match action {
                StepAction::Replay(output) => Plan::Done(self.decode_output::<S>(index, output)),
                StepAction::Fail(error) => Plan::Done(Err(WorkflowError::Step {
                    step: index,
                    kind: S::KIND.into(),
                    error,
                })),
                StepAction::Run {
                    attempt,
                    not_before_ms,
                } => Plan::Run {
                    step,
                    argument,
                    attempt,
                    not_before_ms,
                },
            });
        }

        let mut results: Vec<Option<Result<S::Output, WorkflowError>>> =
            (0..count).map(|_| None).collect();
        let mut pending = Vec::new();
        for (i, plan) in plans.into_iter().enumerate() {
            match plan {
                Plan::Done(result) => results[i] = Some(result),
                Plan::Run {
                    step,
                    argument,
                    attempt,
                    not_before_ms,
                } => pending.push((i, step, argument, attempt, not_before_ms)),
            }
        }
        // Start in list order, `width` at a time; collect in completion order.
        let mut pending = pending.into_iter();
        let mut running = JoinSet::new();
        let mut interrupt = None;
        loop {
            while running.len() < width && interrupt.is_none() {
                let Some((i, step, argument, attempt, not_before_ms)) = pending.next() else {
                    break;
                };
                let mut lane = self.lane.branch();
                let index = StepIndex(first + i as u32);
                running.spawn(async move {
                    let result = lane
                        .run_attempts(index, &step, argument, attempt, not_before_ms)
                        .await;
                    (i, result)
                });
            }
            let Some(joined) = running.join_next().await else {
                break;
            };
            let (i, result) = match joined {
                Ok(done) => done,
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Err(e) => panic!("a fan-out branch was cancelled: {e}"),
            };
            match result {
                Ok(result) => results[i] = Some(result),
                // Branches in flight finish and are recorded; no new one starts.
                Err(cause) => {
                    interrupt.get_or_insert(cause);
                }
            }
        }
        if let Some(cause) = interrupt {
            return Err(self.interrupt(cause));
        }
        Ok(results
            .into_iter()
            .map(|r| r.expect("every branch ran or was replayed"))
            .collect())
    }
}
