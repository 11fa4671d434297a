//! A lane of a workflow body: what one sequence of operations needs to run steps (the run's
//! journal, its cancellation and the engine's shutdown, a jitter source), and the step
//! attempt loop, which runs a step's attempts through [`Attempted`], whatever made the step. The body's `Ctx`
//! has one; each branch of a parallel fan-out gets its own, so branches run concurrently
//! while every journal write still goes through the run's one cell.

use std::sync::Arc;

use futures_util::future::BoxFuture;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::Value;
use tokio::sync::watch;

use crate::cell::RunCell;
use crate::contain::{contained, contained_sync};
use crate::env::RunEnv;
use crate::error::WorkflowError;
use crate::ids::{Attempt, IdempotencyKey, OperationIndex, RunId};
use crate::interrupt::Interrupt;
use crate::journal::{ErrorClass, ErrorRecord, Event};
use crate::limiter::{Priority, RateLimiter, Slot};
use crate::limits::STEP_OUTPUT_BYTES_MAX;
use crate::replay::RunState;
use crate::retry::RetryPolicy;
use crate::stats::EventCounters;
use crate::step::{Step, StepContext, StepError};
use crate::store::while_leased;
use futures_util::FutureExt;

/// Resolves when `signal` changes; never, when there is none or its sender is gone.
async fn changed(signal: Option<&mut watch::Receiver<bool>>) {
    if let Some(signal) = signal {
        if signal.changed().await.is_ok() {
            return;
        }
    }
    std::future::pending().await
}

pub(crate) struct Lane {
    pub(crate) cell: Arc<RunCell>,
    pub(crate) env: Arc<RunEnv>,
    shutdown: watch::Receiver<bool>,
    /// Set for the branches of a `select` once a winner is known: no new attempt starts.
    stop: Option<watch::Receiver<bool>>,
    /// Whether a step that runs out of retries pauses the run (the workflow's setting).
    pause_on_exhausted: bool,
    /// Whether this is the body's main lane, the only one that may park the run (a branch
    /// of a fan-out never does: its siblings would be unwound with it).
    main: bool,
    /// Whether the body's run began where its last park left it (loaded from that park by
    /// this engine, see [`RunCell::take_unparked`]), until a wait takes it
    /// ([`Lane::take_unparked`]). Never set on a branch.
    unparked: bool,
    pub(crate) rng: SmallRng,
}

impl Lane {
    pub(crate) fn new(cell: Arc<RunCell>, env: Arc<RunEnv>, pause_on_exhausted: bool) -> Lane {
        let shutdown = env.shutdown.subscribe();
        let unparked = cell.take_unparked();
        Lane {
            cell,
            env,
            shutdown,
            stop: None,
            pause_on_exhausted,
            main: true,
            unparked,
            // Seeded from the thread's generator (seeded once per thread from the OS), not
            // from the OS per run: a `getrandom` call per run was about 1% of a short run's CPU.
            rng: SmallRng::seed_from_u64(rand::thread_rng().gen()),
        }
    }

    /// Another lane of the same run, for a branch; `stop` stops it early (a `select`).
    pub(crate) fn branch(&mut self, stop: Option<watch::Receiver<bool>>) -> Lane {
        Lane {
            cell: Arc::clone(&self.cell),
            env: Arc::clone(&self.env),
            shutdown: self.shutdown.clone(),
            stop,
            pause_on_exhausted: self.pause_on_exhausted,
            main: false,
            unparked: false,
            rng: SmallRng::seed_from_u64(self.rng.gen()),
        }
    }

    /// A shutdown, cancellation, pause or stop, if one was asked for (in that precedence).
    pub(crate) fn check(&self) -> Result<(), Interrupt> {
        if *self.shutdown.borrow() {
            return Err(Interrupt::ShutDown);
        }
        if self.cell.requests.cancel_requested() {
            return Err(Interrupt::Cancelled);
        }
        // The flag is told once a pause or a resume is durable (`RunCell::tell_pause`); a
        // fresh cell's starts as its journal says. Between a resume's write and its tell the
        // flag is stale, and a run that took it would stop to pause, find the request
        // withdrawn and take it again, busy. The journal's state, written under the cell
        // lock, says whether a request stands; the flag, only that it is worth reading.
        let told = self.cell.requests.pause_told();
        if told && self.cell.with_state(|s| s.pause_requested) {
            return Err(Interrupt::Paused {
                reason: "paused by operator".into(),
                exhausted: false,
            });
        }
        if self.stop.as_ref().is_some_and(|stop| *stop.borrow()) {
            return Err(Interrupt::Stopped);
        }
        Ok(())
    }

    /// What a step that failed for good becomes: the body's error, or (a retryable error
    /// past the policy, in a workflow that pauses then) a pause of the run.
    pub(crate) fn failed_for_good(
        &self,
        index: OperationIndex,
        kind: &str,
        error: ErrorRecord,
    ) -> Result<WorkflowError, Interrupt> {
        if self.pause_on_exhausted && error.class == ErrorClass::Retryable {
            return Err(Interrupt::Paused {
                reason: format!(
                    "step {index} ({kind}) ran out of retries: {}",
                    error.message
                ),
                exhausted: true,
            });
        }
        Ok(WorkflowError::Step {
            step: index,
            kind: kind.into(),
            error,
        })
    }

    /// What a step stopped because this engine's lease ended becomes: the run is another
    /// engine's now (or will be), and this one stops driving it.
    fn lease_ended(&self) -> Interrupt {
        tracing::warn!(run_id = %self.cell.id, "step stopped: this worker's lease ended");
        Interrupt::Engine(crate::error::EngineError::Fenced {
            id: self.cell.id.clone(),
        })
    }

    pub(crate) fn journal(&self, event: Event) -> Result<(), Interrupt> {
        self.cell
            .append(&*self.env.store, event)
            .map_err(Interrupt::Engine)
    }

    /// Appends an operation's start record (a step's, a child run's) unless a cancel or a
    /// pause was written since this lane's last check (which reads flags told only once
    /// those writes are durable, so an operator's call could otherwise return before an
    /// operation that then starts): the interrupt the next check would give instead.
    /// Decided under the cell lock.
    pub(crate) fn journal_start(&self, event: Event) -> Result<(), Interrupt> {
        let mut refused = None;
        self.cell
            .append_made(&*self.env.store, |_, state| {
                if state.cancel_requested {
                    refused = Some(Interrupt::Cancelled);
                } else if state.pause_requested {
                    refused = Some(Interrupt::Paused {
                        reason: "paused by operator".into(),
                        exhausted: false,
                    });
                }
                Ok(refused.is_none().then_some(event))
            })
            .map_err(Interrupt::Engine)?;
        refused.map_or(Ok(()), Err)
    }

    /// Waits until the run's writes so far are durable. The main lane waits for nothing else
    /// meanwhile, so it may sync on its own thread
    /// ([`crate::store::JournalStore::sync_alone`]); a branch is not counted as alone (a
    /// fan-out's branches write in a crowd).
    pub(crate) async fn durable(&self) -> Result<(), Interrupt> {
        self.cell
            .durable_as(&*self.env.store, self.main)
            .await
            .map_err(Interrupt::Engine)
    }

    /// Sleeps until the absolute time `at_ms`, waking early for an interrupt. With `parks`
    /// (what the run waits for is all in its journal), a wait long enough parks the run
    /// instead: [`Interrupt::Parked`].
    pub(crate) async fn sleep_until(&mut self, at_ms: u64, parks: bool) -> Result<(), Interrupt> {
        let park = parks && self.may_park(self.env.clock.now_ms(), at_ms);
        self.sleep_or_park(at_ms, park).await
    }

    /// [`Lane::sleep_until`], with whether to park decided by the caller ([`Lane::may_park`]):
    /// with `park`, the run parks if the engine lets it ([`Lane::park`]).
    pub(crate) async fn sleep_or_park(&mut self, at_ms: u64, park: bool) -> Result<(), Interrupt> {
        self.check()?;
        let clock = self.env.clock.clone();
        if at_ms > clock.now_ms() {
            // Waiting: whatever killed the process before, this run got this far.
            self.cell.survived(&*self.env.store);
        }
        if park && self.park(Some(at_ms), &|_| true, None).await? {
            return Err(Interrupt::Parked);
        }
        tokio::select! {
            _ = clock.sleep_until(at_ms) => Ok(()),
            cause = self.interrupted() => Err(cause),
        }
    }

    /// Whether the body's run began where its last park left it, asked once (by the wait
    /// the run parked in, which then goes on from its journaled polls).
    pub(crate) fn take_unparked(&mut self) -> bool {
        std::mem::take(&mut self.unparked)
    }

    /// Whether a sleep from `now_ms` until `at_ms` may park the run: this is the main lane,
    /// the engine parks runs, and the sleep is long enough. (The park itself may still be
    /// refused: [`Lane::park`].)
    pub(crate) fn may_park(&self, now_ms: u64, at_ms: u64) -> bool {
        self.main && self.env.parks_for(now_ms, at_ms) && self.env.runs().is_ok()
    }

    /// Parks the run until `wake_at_ms` (or until something arrives for it, when `None`;
    /// with `awaiting`, until that child run settles) if this is the main lane and the engine
    /// lets it (`ready` accepts the run's state under its lock); whether it parked. Then the
    /// caller returns [`Interrupt::Parked`].
    ///
    /// The run's writes are made durable first: whoever loads it next reads its journal from
    /// the store, which (PostgreSQL's) holds only what was synced.
    pub(crate) async fn park(
        &self,
        wake_at_ms: Option<u64>,
        ready: &(dyn Fn(&RunState) -> bool + Sync),
        awaiting: Option<&RunId>,
    ) -> Result<bool, Interrupt> {
        if !self.main {
            return Ok(false);
        }
        let Ok(runs) = self.env.runs() else {
            return Ok(false);
        };
        self.durable().await?;
        Ok(runs.park(&self.cell, wake_at_ms, ready, awaiting))
    }

    /// Resolves when the lane is interrupted (see [`Lane::check`]), with the cause.
    pub(crate) async fn interrupted(&mut self) -> Interrupt {
        loop {
            // Taken before the check: a request after the check wakes it.
            let requested = self.cell.requests.changed();
            if let Err(cause) = self.check() {
                return cause;
            }
            tokio::select! {
                _ = requested => {}
                _ = changed(Some(&mut self.shutdown)) => {}
                _ = changed(self.stop.as_mut()) => {}
            }
        }
    }

    /// Runs attempts of `call` from `attempt` on, retrying per its policy. The outer error is
    /// an interrupt (the run stops); the inner one the step's failure for good.
    ///
    /// The whole operation (every attempt and the backoff between them) runs in one `step`
    /// span, the parent of each attempt's `attempt` span; its `outcome` field says how the
    /// operation ended (`ok`, `failed` or `interrupted`).
    pub(crate) async fn run_attempts<'a, T: Serialize + Send>(
        &mut self,
        index: OperationIndex,
        call: &mut dyn Attempted<'a, T>,
        argument: Value,
        attempt: Attempt,
        not_before_ms: Option<u64>,
    ) -> Result<Result<T, WorkflowError>, Interrupt> {
        let key = IdempotencyKey::for_step(&self.cell.id, index);
        let span = tracing::info_span!(
            "step",
            run_id = self.cell.id.as_str(),
            step = index.0,
            kind = call.kind(),
            idempotency_key = %key,
            outcome = tracing::field::Empty,
        );
        let ran = tracing::Instrument::instrument(
            self.attempts_of(index, key, call, argument, attempt, not_before_ms),
            span.clone(),
        )
        .await;
        span.record(
            "outcome",
            match &ran {
                Ok(Ok(_)) => "ok",
                Ok(Err(_)) => "failed",
                Err(_) => "interrupted",
            },
        );
        ran
    }

    /// The attempt loop of [`Lane::run_attempts`], inside its operation's span.
    async fn attempts_of<'a, T: Serialize + Send>(
        &mut self,
        index: OperationIndex,
        key: IdempotencyKey,
        call: &mut dyn Attempted<'a, T>,
        argument: Value,
        mut attempt: Attempt,
        mut not_before_ms: Option<u64>,
    ) -> Result<Result<T, WorkflowError>, Interrupt> {
        let kind = call.kind();
        // A step's settings are user code too: a panic there is a bug of the step, which
        // then gets one attempt and no limiter rather than stopping the run.
        let policy = contained_sync(|| call.retry_policy()).unwrap_or_else(|panic| {
            tracing::error!(run_id = %self.cell.id, step = index.0, kind, %panic, "the step's retry_policy panicked: one attempt, no retry");
            RetryPolicy::no_retry()
        });
        let limiter = contained_sync(|| call.rate_limit().map(|name| self.env.limiters.get(name)))
            .unwrap_or_else(|panic| {
                tracing::error!(run_id = %self.cell.id, step = index.0, kind, %panic, "the step's rate_limit panicked: no limiter");
                None
            });
        let attempts = Attempts {
            index,
            key,
            kind,
            compensable: call.compensable(),
            argument: &argument,
            policy: &policy,
            limiter: limiter.as_deref(),
        };
        loop {
            if let Some(at_ms) = not_before_ms {
                // The failed attempt and its retry time are journaled: the backoff may park.
                self.sleep_until(at_ms, true).await?;
            }
            match self.attempt(call, &attempts, attempt).await? {
                Ended::Completed(output) => return Ok(Ok(output)),
                Ended::FailedForGood(record) => {
                    return self.failed_for_good(index, kind, record).map(Err)
                }
                Ended::RetryAt(at_ms) => {
                    attempt = attempt.next();
                    not_before_ms = Some(at_ms);
                }
            }
        }
    }

    /// One attempt: its slot of the service's limiter, its start record (durable before the
    /// call), the call, and its outcome, journaled.
    async fn attempt<'a, T: Serialize + Send>(
        &mut self,
        call: &mut dyn Attempted<'a, T>,
        attempts: &Attempts<'_>,
        attempt: Attempt,
    ) -> Result<Ended<T>, Interrupt> {
        let (index, kind) = (attempts.index, attempts.kind);
        self.check()?;
        // The run got past its replay and body code to here; a death from now on belongs to
        // this attempt, which its start record tells (`poison.rs`). Waiting for the
        // limiter's slot comes before that record, so time queued never looks like a call.
        self.cell.survived(&*self.env.store);
        let slot = Slot::take(attempts.limiter, Priority::Call).await;
        self.check()?;
        crate::crash::point("step.before_started");
        if attempts.compensable {
            // Among the types the runs use before a start that may have to be undone.
            self.env
                .types
                .step_kind(&*self.env.store, kind)
                .await
                .map_err(Interrupt::Engine)?;
        }
        self.journal_start(Event::StepStarted {
            step: index,
            kind: kind.into(),
            argument: attempts.argument.clone(),
            attempt,
            compensable: attempts.compensable,
        })?;
        // The start record (and the previous step's outcome with it) is durable before
        // the side effect begins: one sync per step.
        self.durable().await?;
        crate::crash::point("step.after_started");
        // A child of the operation's `step` span (the caller's current span). The run id
        // goes in as `&str` and the key as a lazy `Display`: nothing is formatted unless a
        // subscriber wants the span.
        let span = tracing::info_span!(
            "attempt",
            run_id = self.cell.id.as_str(),
            step = index.0,
            kind,
            attempt = attempt.0,
            idempotency_key = %attempts.key,
            outcome = tracing::field::Empty,
        );
        let ctx = StepContext {
            run_id: self.cell.id.clone(),
            step: index,
            key: attempts.key,
            attempt,
            resources: Arc::clone(&self.env.resources),
            clock: self.env.clock.clone(),
            effect_by_ms: None,
        };
        let started = std::time::Instant::now();
        // Boxed: the attempt's future (the user's, wrapped) is not nested in the body's,
        // which keeps the type of a long workflow body within the compiler's limits. The
        // call is made inside the contained future, so a panic making it is contained too.
        let call = async { call.call(ctx).await };
        let call = attempt_contained(tracing::Instrument::instrument(call, span.clone()));
        let Some(result) = while_leased(&*self.env.store, self.cell.token(), Box::pin(call)).await
        else {
            span.record("outcome", "interrupted");
            return Err(self.lease_ended());
        };
        slot.report(&result);
        crate::crash::point("step.after_effect");
        let kept = result.map(|output| (kept_output(kind, &output), output));
        span.record(
            "outcome",
            match &kept {
                Ok((Ok(_), _)) => "ok",
                // An output that cannot be kept fails the step for good.
                Ok((Err(_), _)) => "permanent",
                Err(error) => match error.class() {
                    ErrorClass::Retryable => "retryable",
                    ErrorClass::Permanent => "permanent",
                },
            },
        );
        match kept {
            Ok((Ok(value), output)) => {
                self.record_success(attempts, attempt, started.elapsed(), value)?;
                Ok(Ended::Completed(output))
            }
            Ok((Err(reason), _)) => self.reject_output(attempts, attempt, reason).await,
            Err(error) => self.record_failure(attempts, attempt, error).await,
        }
    }

    /// Journals an attempt's output and records its duration under `step:<kind>`.
    fn record_success(
        &mut self,
        attempts: &Attempts<'_>,
        attempt: Attempt,
        elapsed: std::time::Duration,
        output: Value,
    ) -> Result<(), Interrupt> {
        let (index, kind) = (attempts.index, attempts.kind);
        let now = self.env.clock.now_ms();
        // Not `format!`: this runs at every step, and its machinery cost as much as the rest.
        let mut operation = String::with_capacity("step:".len() + kind.len());
        operation.push_str("step:");
        operation.push_str(kind);
        self.env
            .stats
            .record(&operation, elapsed, self.cell.id.as_str(), now);
        tracing::debug!(run_id = %self.cell.id, step = index.0, kind, elapsed_ms = elapsed.as_millis() as u64, "step completed");
        // Neither written nor synced here: the store gets it with the run's next entry (the
        // next step's start, or the run's end), in one write and one sync.
        self.cell
            .append_deferred(
                &*self.env.store,
                Event::StepCompleted {
                    step: index,
                    attempt,
                    output,
                },
            )
            .map_err(Interrupt::Engine)?;
        crate::crash::point("step.after_outcome");
        Ok(())
    }

    /// Journals an attempt that succeeded with an output that cannot be kept. The effect
    /// happened; only its output is lost: in doubt, not "no effect", so the saga undoes it,
    /// found by key.
    async fn reject_output<T>(
        &mut self,
        attempts: &Attempts<'_>,
        attempt: Attempt,
        reason: String,
    ) -> Result<Ended<T>, Interrupt> {
        let (index, kind) = (attempts.index, attempts.kind);
        let record = ErrorRecord {
            class: ErrorClass::Permanent,
            message: crate::step::truncate(reason),
        };
        tracing::warn!(run_id = %self.cell.id, step = index.0, kind, attempt = attempt.0, error = %record.message, "step output rejected; the effect will be undone");
        self.journal(Event::StepOutputRejected {
            step: index,
            attempt,
            error: record.clone(),
        })?;
        self.durable().await?;
        crate::crash::point("step.after_failure");
        Ok(Ended::FailedForGood(record))
    }

    /// Journals a failed attempt, with the next attempt's time if the policy allows one,
    /// and makes it durable (so a restart neither resets the attempt count nor shortens
    /// the backoff).
    async fn record_failure<T>(
        &mut self,
        attempts: &Attempts<'_>,
        attempt: Attempt,
        error: StepError,
    ) -> Result<Ended<T>, Interrupt> {
        let index = attempts.index;
        let record = error.to_record();
        let retry_at_ms = match error.class() {
            ErrorClass::Permanent => None,
            ErrorClass::Retryable => {
                let now = self.env.clock.now_ms();
                let (first_started, round_base) = self
                    .cell
                    .with_state(|s| {
                        s.step(index)
                            .map(|op| (op.first_started_at_ms, op.round_base))
                    })
                    .unwrap_or((now, 0));
                let jitter: f64 = self.rng.gen();
                attempts.policy.next_attempt_at_ms(
                    Attempt(attempt.0 - round_base),
                    first_started,
                    now,
                    error.retry_after(),
                    jitter,
                )
            }
        };
        tracing::info!(run_id = %self.cell.id, step = index.0, kind = attempts.kind, attempt = attempt.0, error = %record.message, ?retry_at_ms, "step attempt failed");
        self.journal(Event::StepFailed {
            step: index,
            attempt,
            error: record.clone(),
            retry_at_ms,
        })?;
        if retry_at_ms.is_some() {
            EventCounters::bump(&self.env.counters.retries);
        }
        self.durable().await?;
        crate::crash::point("step.after_failure");
        Ok(match retry_at_ms {
            Some(at_ms) => Ended::RetryAt(at_ms),
            None => Ended::FailedForGood(record),
        })
    }
}

/// One step's attempts, with what made the step erased: a [`Step`] value ([`StepAttempts`])
/// or an effect's closure (`effect.rs`). The attempt loop ([`Lane::run_attempts`]) sees
/// only this, so both are journaled, retried, rate-limited, contained and measured alike.
pub(crate) trait Attempted<'a, T>: Send {
    /// The step kind.
    fn kind(&self) -> &'static str;
    /// Whether the kind has a compensation (journaled with every start).
    fn compensable(&self) -> bool;
    /// How failed attempts are retried (a step's code: the loop contains its panics).
    fn retry_policy(&self) -> RetryPolicy;
    /// The rate-limited service each attempt calls, if any (contained as well).
    fn rate_limit(&self) -> Option<&str>;
    /// One attempt's call, given its context.
    fn call(&mut self, ctx: StepContext) -> BoxFuture<'a, Result<T, StepError>>;
}

/// The attempts of a [`Step`] value.
pub(crate) struct StepAttempts<'a, S>(pub(crate) &'a S);

impl<'a, S: Step> Attempted<'a, S::Output> for StepAttempts<'a, S> {
    fn kind(&self) -> &'static str {
        S::KIND
    }

    fn compensable(&self) -> bool {
        S::COMPENSABLE
    }

    fn retry_policy(&self) -> RetryPolicy {
        self.0.retry_policy()
    }

    fn rate_limit(&self) -> Option<&str> {
        self.0.rate_limit()
    }

    fn call(&mut self, ctx: StepContext) -> BoxFuture<'a, Result<S::Output, StepError>> {
        let step = self.0;
        Box::pin(async move { step.execute(&ctx).await })
    }
}

/// What every attempt of one step shares.
struct Attempts<'a> {
    index: OperationIndex,
    /// The step's idempotency key, the same for every attempt.
    key: IdempotencyKey,
    kind: &'static str,
    compensable: bool,
    argument: &'a Value,
    policy: &'a RetryPolicy,
    limiter: Option<&'a RateLimiter>,
}

/// How one attempt ended, as journaled.
enum Ended<T> {
    Completed(T),
    /// A permanent error, an output that cannot be kept, or the policy's last attempt.
    FailedForGood(ErrorRecord),
    /// Retryable: the next attempt may start at this time.
    RetryAt(u64),
}

/// Runs one attempt's call; a panic in it is a failed attempt (retryable: the attempt may
/// have taken effect before it panicked, so it is in doubt like a lost response). Not an
/// `async fn`, which would store `call` twice (see `contain.rs`).
fn attempt_contained<T>(
    call: impl std::future::Future<Output = Result<T, StepError>>,
) -> impl std::future::Future<Output = Result<T, StepError>> {
    contained(call).map(|caught| {
        caught.unwrap_or_else(|panic| Err(StepError::retryable(format!("panicked: {panic}"))))
    })
}

/// The journaled form of a step's output, or why it cannot be kept (not serialisable, or
/// over [`STEP_OUTPUT_BYTES_MAX`]).
fn kept_output<T: Serialize>(kind: &str, output: &T) -> Result<Value, String> {
    let value = contained_sync(|| serde_json::to_value(output))
        .map_err(|panic| format!("serialising the output of {kind} panicked: {panic}"))?
        .map_err(|e| format!("output of {kind} does not serialise: {e}"))?;
    let bytes = crate::limits::json_bytes(&value);
    if bytes > STEP_OUTPUT_BYTES_MAX {
        return Err(format!(
            "output of {kind} is {bytes} bytes, over the limit of {STEP_OUTPUT_BYTES_MAX} bytes"
        ));
    }
    Ok(value)
}
