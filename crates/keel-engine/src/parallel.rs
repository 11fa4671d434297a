//! Parallel steps: a fan-out of steps run concurrently under a width bound, joined in the
//! order the code listed them (`join`), or raced for the first success (`select`).
//!
//! The fork is one operation and its branches the operations right after it, numbered in
//! list order when the fork starts; so every branch's step index, and with it its
//! idempotency key, is the same on every replay, whatever order the branches finished in
//! before a crash. Branches journal through the run's one cell; each starts only after its
//! start record is durable, as a sequential step does (concurrent branches share syncs).
//! Child runs fan out the same way (`child.rs`).

use std::future::Future;

use serde_json::Value;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::ctx::Ctx;
use crate::error::EngineError;
use crate::ids::{Attempt, OperationIndex};
use crate::interrupt::Interrupt;
use crate::journal::Event;
use crate::lane::{Lane, StepAttempts};
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

/// A fork as journaled: its operation number, its first branch's, and (for a select) the
/// winner once chosen.
pub(crate) struct Fork {
    pub(crate) index: OperationIndex,
    pub(crate) first: u32,
    pub(crate) selected: Option<u32>,
    /// The fork's span: its branches' operations (and their attempts) are its children.
    pub(crate) span: tracing::Span,
}

impl Fork {
    /// The operation number of branch `i`.
    pub(crate) fn branch(&self, i: usize) -> OperationIndex {
        OperationIndex(self.first + i as u32)
    }
}

impl Ctx {
    /// Checks a fan-out of `count` branches of `what` against its bounds, reserves the fork's
    /// operation and its branches', and journals the fork (or checks the journaled one).
    pub(crate) fn fork(
        &mut self,
        count: usize,
        width: usize,
        what: &str,
    ) -> Result<Fork, WorkflowError> {
        self.check()?;
        if width == 0 || count == 0 {
            let e = EngineError::InvalidRequest(format!(
                "fan-out of {count} {what} with width {width} (both must be at least 1)"
            ));
            return Err(self.interrupt(Interrupt::Engine(e)));
        }
        if count > FAN_OUT_MAX as usize {
            let e = EngineError::LimitReached {
                what: format!("fan-out of {count} {what}"),
                limit: u64::from(FAN_OUT_MAX),
            };
            return Err(self.interrupt(Interrupt::Engine(e)));
        }
        let branches = count as u32;
        let index = self.next_index()?;
        if self.next.saturating_add(branches) > STEPS_PER_RUN_MAX {
            let e = EngineError::LimitReached {
                what: format!("operations of run {}", self.lane.cell.id),
                limit: u64::from(STEPS_PER_RUN_MAX),
            };
            return Err(self.interrupt(Interrupt::Engine(e)));
        }
        let first = self.next;
        self.next += branches;
        let journaled = self
            .lane
            .cell
            .with_state(|state| match state.ops.get(index.0 as usize) {
                None => Ok(None),
                Some(Op::Fork {
                    branches: n,
                    selected,
                }) if *n == branches => Ok(Some(*selected)),
                Some(other) => Err(format!(
                    "journal holds {}, code asks for a fan-out of {branches} {what}",
                    other.describe(),
                )),
            });
        let selected = match journaled {
            Ok(Some(selected)) => selected,
            Ok(None) => {
                // Not synced: the first branch's start record shares the sync.
                self.journal(Event::ForkStarted {
                    step: index,
                    branches,
                })?;
                None
            }
            Err(detail) => return Err(self.interrupt(Interrupt::NonDeterminism { index, detail })),
        };
        let span = tracing::info_span!(
            "fork",
            run_id = self.lane.cell.id.as_str(),
            step = index.0,
            branches,
            width,
        );
        Ok(Fork {
            index,
            first,
            selected,
            span,
        })
    }

    /// Decides, from the journal, what each step branch of `fork` must do.
    fn plan<S: Step>(&mut self, fork: &Fork, steps: Vec<S>) -> Result<Vec<Plan<S>>, WorkflowError> {
        if let Err(e) = self.lane.env.registry.add_step::<S>() {
            return Err(self.interrupt(Interrupt::Engine(e)));
        }
        let mut plans = Vec::with_capacity(steps.len());
        for (i, step) in steps.into_iter().enumerate() {
            let index = fork.branch(i);
            let argument = self.argument(index, "step", S::KIND, &step)?;
            let action = self.lane.cell.with_state(|state| match state.ops.get(index.0 as usize) {
                Some(Op::Branch) => Ok(step_action(None)),
                Some(Op::Step(op)) if op.kind == S::KIND && op.argument == argument => {
                    Ok(step_action(Some(op)))
                }
                Some(other) => Err(format!(
                    "journal holds {} at branch {i} of fan-out {}, code asks for {:?} with argument {argument}",
                    other.describe(),
                    fork.index,
                    S::KIND
                )),
                None => Err(format!("branch {i} of fan-out {} is missing from the journal", fork.index)),
            });
            let action = match action {
                Ok(action) => action,
                Err(detail) => {
                    return Err(self.interrupt(Interrupt::NonDeterminism { index, detail }))
                }
            };
            plans.push(match action {
                StepAction::Replay(output) => {
                    Plan::Done(self.decode_output(index, S::KIND, output))
                }
                StepAction::Fail(error) => match self.lane.failed_for_good(index, S::KIND, error) {
                    Ok(error) => Plan::Done(Err(error)),
                    Err(cause) => return Err(self.interrupt(cause)),
                },
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
        Ok(plans)
    }

    /// Runs `steps` concurrently, at most `width` at a time, and returns each one's result
    /// in the order given: its output, or [`WorkflowError::Step`] when it failed for good.
    /// Every branch runs to its end (one failure does not stop the others); the body then
    /// decides, typically by propagating the first failure so the run compensates. The outer
    /// error is an interrupt (cancellation, pause, shutdown, a journal failure): in-flight
    /// branches finish and are recorded first.
    ///
    /// Compensation undoes every completed or in-doubt branch, in reverse list order, like
    /// sequential steps. At most [`FAN_OUT_MAX`] branches; `width` from 1.
    pub async fn join<S: Step>(
        &mut self,
        steps: Vec<S>,
        width: usize,
    ) -> Result<Vec<Result<S::Output, WorkflowError>>, WorkflowError> {
        let count = steps.len();
        let fork = self.fork(count, width, &format!("{} steps", S::KIND))?;
        let plans = self.plan(&fork, steps)?;
        let mut results: Vec<Option<Result<S::Output, WorkflowError>>> =
            (0..count).map(|_| None).collect();
        let mut tasks = Vec::new();
        for (i, plan) in plans.into_iter().enumerate() {
            match plan {
                Plan::Done(result) => results[i] = Some(result),
                Plan::Run { .. } => tasks.push((i, run_plan(fork.branch(i), plan))),
            }
        }
        let ran = tracing::Instrument::instrument(
            run_all(&mut self.lane, width, tasks),
            fork.span.clone(),
        );
        match ran.await {
            Ok(done) => done.into_iter().for_each(|(i, r)| results[i] = Some(r)),
            Err(cause) => return Err(self.interrupt(cause)),
        }
        Ok(results
            .into_iter()
            .map(|r| r.expect("every branch ran or was replayed"))
            .collect())
    }

    /// Runs the branches `tasks` of a select until one succeeds (the others then stop before
    /// their next attempt), recording each branch's output or error; the winner, if any.
    async fn race<T, F>(
        &mut self,
        count: usize,
        tasks: Vec<(usize, F)>,
        outputs: &mut [Option<T>],
        errors: &mut [String],
    ) -> Result<Option<usize>, WorkflowError>
    where
        T: Send + 'static,
        F: FnOnce(Lane) -> BranchFuture<Result<T, WorkflowError>>,
    {
        let (stop, stopped) = watch::channel(false);
        let mut winner = None;
        let mut interrupt = None;
        run_branches(
            &mut self.lane,
            count,
            tasks,
            Some(stopped),
            |i, result| match result {
                Ok(Ok(output)) => {
                    outputs[i] = Some(output);
                    if winner.is_none() {
                        winner = Some(i);
                        stop.send_replace(true);
                    }
                    true
                }
                Ok(Err(error)) => {
                    errors[i] = error.to_string();
                    true
                }
                // A loser stopped before its next attempt.
                Err(Interrupt::Stopped) => true,
                Err(cause) => {
                    interrupt.get_or_insert(cause);
                    false
                }
            },
        )
        .await;
        match interrupt {
            Some(cause) => Err(self.interrupt(cause)),
            None => Ok(winner),
        }
    }

    /// Runs `steps` concurrently and returns the first to succeed, with its position in the
    /// list. Once one succeeds, no other branch starts a new attempt; those in flight finish
    /// and are recorded; then every other branch that took effect (or may have) is undone at
    /// once, in reverse list order, with its compensation, so a run that goes on owns only
    /// the winner's effect. When every branch fails, [`WorkflowError::NoneSucceeded`] lists
    /// the errors.
    ///
    /// Replay returns the same winner: it is journaled before the body sees it (a crash
    /// before that picks the first completed branch in list order, which nothing outside
    /// has seen either). At most [`FAN_OUT_MAX`] branches, all started at once.
    pub async fn select<S: Step>(
        &mut self,
        steps: Vec<S>,
    ) -> Result<(usize, S::Output), WorkflowError> {
        let count = steps.len();
        let fork = self.fork(count, count, &format!("{} steps to select from", S::KIND))?;
        let plans = self.plan(&fork, steps)?;
        let mut outputs: Vec<Option<S::Output>> = (0..count).map(|_| None).collect();
        let mut errors: Vec<String> = vec![String::new(); count];
        let mut tasks = Vec::new();
        for (i, plan) in plans.into_iter().enumerate() {
            match plan {
                Plan::Done(Ok(output)) => outputs[i] = Some(output),
                Plan::Done(Err(error)) => errors[i] = error.to_string(),
                Plan::Run { .. } => tasks.push((i, run_plan(fork.branch(i), plan))),
            }
        }
        let mut winner = fork
            .selected
            .map(|w| w as usize)
            .or_else(|| outputs.iter().position(Option::is_some));
        if winner.is_none() {
            let raced = self.race(count, tasks, &mut outputs, &mut errors);
            winner = tracing::Instrument::instrument(raced, fork.span.clone()).await?;
        }
        let Some(winner) = winner else {
            return Err(WorkflowError::NoneSucceeded {
                fork: fork.index,
                errors,
            });
        };
        if fork.selected.is_none() {
            self.journal(Event::ForkSelected {
                step: fork.index,
                branch: winner as u32,
            })?;
        }
        for i in (0..count).rev().filter(|i| *i != winner) {
            self.compensate_for_recreate::<S>(fork.branch(i)).await?;
        }
        let output = outputs[winner].take().ok_or_else(|| {
            let detail = format!("the journal selects branch {winner}, which did not complete");
            self.interrupt(Interrupt::NonDeterminism {
                index: fork.index,
                detail,
            })
        })?;
        Ok((winner, output))
    }
}

type BranchFuture<T> = std::pin::Pin<Box<dyn Future<Output = Result<T, Interrupt>> + Send>>;

/// The task of a branch that must run: its attempts, on the lane it is given.
fn run_plan<S: Step>(
    index: OperationIndex,
    plan: Plan<S>,
) -> impl FnOnce(Lane) -> BranchFuture<Result<S::Output, WorkflowError>> {
    move |mut lane: Lane| {
        Box::pin(async move {
            let Plan::Run {
                step,
                argument,
                attempt,
                not_before_ms,
            } = plan
            else {
                unreachable!("only branches that must run get a task")
            };
            lane.run_attempts(
                index,
                &mut StepAttempts(&step),
                argument,
                attempt,
                not_before_ms,
            )
            .await
        })
    }
}

/// Runs every task (see [`run_branches`]) and returns each result with its branch number,
/// or the first interrupt once the branches in flight have ended.
pub(crate) async fn run_all<T, F, Fut>(
    lane: &mut Lane,
    width: usize,
    tasks: Vec<(usize, F)>,
) -> Result<Vec<(usize, T)>, Interrupt>
where
    T: Send + 'static,
    F: FnOnce(Lane) -> Fut,
    Fut: Future<Output = Result<T, Interrupt>> + Send + 'static,
{
    run_all_observed(lane, width, tasks, |_| {}).await
}

/// [`run_all`], handing each result to `observe` as it comes.
pub(crate) async fn run_all_observed<T, F, Fut>(
    lane: &mut Lane,
    width: usize,
    tasks: Vec<(usize, F)>,
    mut observe: impl FnMut(&T),
) -> Result<Vec<(usize, T)>, Interrupt>
where
    T: Send + 'static,
    F: FnOnce(Lane) -> Fut,
    Fut: Future<Output = Result<T, Interrupt>> + Send + 'static,
{
    let mut done = Vec::with_capacity(tasks.len());
    let mut interrupt = None;
    run_branches(lane, width, tasks, None, |i, result| match result {
        Ok(result) => {
            observe(&result);
            done.push((i, result));
            true
        }
        Err(cause) => {
            interrupt.get_or_insert(cause);
            false
        }
    })
    .await;
    match interrupt {
        Some(cause) => Err(cause),
        None => Ok(done),
    }
}

/// Runs `tasks` (branch number, task) at most `width` at a time in list order, each on its
/// own lane of the run (stopped early by `stop`, if given), and hands each result to
/// `on_end` as it comes; once `on_end` returns false no further task starts. Returns when
/// every started task has ended: branches are never dropped mid-step.
pub(crate) async fn run_branches<T, F, Fut>(
    lane: &mut Lane,
    width: usize,
    tasks: Vec<(usize, F)>,
    stop: Option<watch::Receiver<bool>>,
    mut on_end: impl FnMut(usize, Result<T, Interrupt>) -> bool,
) where
    T: Send + 'static,
    F: FnOnce(Lane) -> Fut,
    Fut: Future<Output = Result<T, Interrupt>> + Send + 'static,
{
    let mut tasks = tasks.into_iter();
    let mut running = JoinSet::new();
    let mut more = true;
    // User code cannot panic a branch (its calls, and the step's settings, are contained);
    // a panic here is the engine's. It is raised again once every other branch has ended
    // and been recorded.
    let mut panicked = None;
    loop {
        while more && running.len() < width {
            let Some((i, task)) = tasks.next() else {
                break;
            };
            let branch = task(lane.branch(stop.clone()));
            // In the body's current span, so that each branch's operation spans stay in the
            // run's trace although the branch is a task of its own.
            let branch = tracing::Instrument::in_current_span(async move { (i, branch.await) });
            running.spawn(branch);
        }
        let Some(joined) = running.join_next().await else {
            break;
        };
        let (i, result) = match joined {
            Ok(done) => done,
            Err(e) if e.is_panic() => {
                panicked.get_or_insert(e.into_panic());
                more = false;
                continue;
            }
            Err(e) => panic!("a fan-out branch was cancelled: {e}"),
        };
        more &= on_end(i, result);
    }
    if let Some(payload) = panicked {
        std::panic::resume_unwind(payload);
    }
}
