//! Durable timers and retry times across real restarts (shutdown, then open again on the same
//! directory), on a test clock that moves only when the test moves it: both are journaled as
//! absolute times, so a restart neither shortens nor extends them (to the millisecond), and
//! attempt numbers go on where they stopped. Also: a step that keeps failing retryably stops
//! after its policy's attempts and, being in doubt, is compensated.

use std::path::{Path, PathBuf};
use std::time::Duration;

use keel::testing::TestClock;
use keel::{
    Attempt, Compensation, Ctx, Engine, Event, OperationIndex, RetryPolicy, RunHistory, RunStatus,
    Step, StepContext, StepError, Workflow, WorkflowError,
};
use keel_testkit::effects::{self, Action};
use keel_testkit::poll::{asleep, until};
use serde::{Deserialize, Serialize};

/// Whether the journal holds an entry for which `predicate` holds.
fn has(history: &RunHistory, predicate: impl Fn(&Event) -> bool) -> bool {
    history.entries.iter().any(|e| predicate(&e.event))
}

/// The timestamp and event of every entry for which `predicate` holds, in journal order.
fn entries(history: &RunHistory, predicate: impl Fn(&Event) -> bool) -> Vec<(u64, Event)> {
    history
        .entries
        .iter()
        .filter(|e| predicate(&e.event))
        .map(|e| (e.at_ms, e.event.clone()))
        .collect()
}

/// Sleeps on a durable timer for the input's milliseconds; outputs the input.
struct SleepFlow;

impl Workflow for SleepFlow {
    const NAME: &'static str = "test.sleep";
    type Input = u64;
    type Output = u64;

    async fn run(ctx: &mut Ctx, sleep_ms: u64) -> Result<u64, WorkflowError> {
        ctx.sleep(Duration::from_millis(sleep_ms)).await?;
        Ok(sleep_ms)
    }
}

/// Sleeps on a durable timer for the input's seconds.
struct SleepSecondsFlow;

impl Workflow for SleepSecondsFlow {
    const NAME: &'static str = "test.sleep-seconds";
    type Input = u64;
    type Output = ();

    async fn run(ctx: &mut Ctx, sleep_s: u64) -> Result<(), WorkflowError> {
        ctx.sleep(Duration::from_secs(sleep_s)).await?;
        Ok(())
    }
}

/// The (set, fired) timestamps and the journaled wake time of the run's only timer.
fn timer_times(history: &RunHistory) -> (u64, u64, u64) {
    let set = entries(history, |e| matches!(e, Event::TimerSet { .. }));
    assert_eq!(set.len(), 1, "one timer set, not set again: {set:?}");
    let (set_at_ms, Event::TimerSet { wake_at_ms, step }) = set[0].clone() else {
        unreachable!()
    };
    assert_eq!(step, OperationIndex(0));
    let fired = entries(history, |e| matches!(e, Event::TimerFired { .. }));
    assert_eq!(fired.len(), 1, "the timer fired once: {fired:?}");
    (set_at_ms, wake_at_ms, fired[0].0)
}

async fn open_sleep(data: &Path, clock: &TestClock) -> Engine {
    keel_testkit::store::builder(data)
        .clock(clock.clone())
        .workflow::<SleepFlow>()
        .open()
        .await
        .expect("opening the engine")
}

/// A 1500 ms durable timer interrupted by a restart 300 ms into its sleep, after 300 ms of
/// downtime, sleeps until its journaled wake time (the set time plus 1500 ms) and fires at
/// exactly that time: the restart neither shortened nor extended it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timer_keeps_its_wake_time_across_restart() {
    const SLEEP_MS: u64 = 1500;
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::new();
    let engine = open_sleep(dir.path(), &clock).await;
    let started_at_ms = clock.now_ms();
    engine.start::<SleepFlow>("nap", SLEEP_MS).await.unwrap();
    let wake_at_ms = asleep(&clock).await;
    assert_eq!(wake_at_ms, started_at_ms + SLEEP_MS);
    clock.advance(Duration::from_millis(300));
    engine.shutdown().await;
    let down = engine.history("nap").await.unwrap();
    assert_eq!(down.run.status, RunStatus::Running);
    assert!(!has(&down, |e| matches!(e, Event::TimerFired { .. })));
    drop(engine);

    // The engine is down for 300 ms of the sleep.
    clock.advance(Duration::from_millis(300));
    let engine = open_sleep(dir.path(), &clock).await;
    assert_eq!(
        asleep(&clock).await,
        wake_at_ms,
        "the reopened run sleeps until the journaled wake time"
    );
    clock.advance_to(wake_at_ms - 1);
    assert_eq!(
        engine.status("nap").await.unwrap().status,
        RunStatus::Running
    );
    clock.advance_to(wake_at_ms);
    let record = engine.wait("nap").await.unwrap();
    assert_eq!(record.status, RunStatus::Completed, "{:?}", record.error);
    assert_eq!(record.output, Some(serde_json::json!(SLEEP_MS)));

    let history = engine.history("nap").await.unwrap();
    assert_eq!(
        history.entries[..down.entries.len()],
        down.entries[..],
        "the journal before the restart is unchanged"
    );
    assert_eq!(
        timer_times(&history),
        (
            started_at_ms,
            started_at_ms + SLEEP_MS,
            started_at_ms + SLEEP_MS
        ),
        "set at the start, wake time and firing time exactly the start plus the sleep"
    );
    engine.shutdown().await;
}

/// A sleep longer than milliseconds since the epoch can count (18446744073709552 s, whose
/// milliseconds are 2^64 + 384) wakes at the end of time, not 384 ms after it was set: the
/// wake time saturates instead of wrapping, and the run sleeps on past a day.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timer_past_what_milliseconds_count_never_wakes_early() {
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::new();
    let engine = keel_testkit::store::builder(dir.path())
        .clock(clock.clone())
        .workflow::<SleepSecondsFlow>()
        .open()
        .await
        .expect("opening the engine");
    engine
        .start::<SleepSecondsFlow>("forever", 18_446_744_073_709_552)
        .await
        .unwrap();
    assert_eq!(asleep(&clock).await, u64::MAX, "the wake time saturates");
    let history = engine.history("forever").await.unwrap();
    let set = entries(&history, |e| matches!(e, Event::TimerSet { .. }));
    assert!(
        matches!(
            set[..],
            [(
                _,
                Event::TimerSet {
                    wake_at_ms: u64::MAX,
                    ..
                }
            )]
        ),
        "{set:?}"
    );
    clock.advance(Duration::from_secs(24 * 3600));
    assert_eq!(
        engine.status("forever").await.unwrap().status,
        RunStatus::Running
    );
    engine.shutdown().await;
}

/// A timer whose wake time passed while the engine was down fires as soon as the engine is
/// open again, without the clock moving: the sleep is not restarted from the reopen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timer_due_during_downtime_fires_at_reopen() {
    const SLEEP_MS: u64 = 800;
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::new();
    let engine = open_sleep(dir.path(), &clock).await;
    engine
        .start::<SleepFlow>("overslept", SLEEP_MS)
        .await
        .unwrap();
    let wake_at_ms = asleep(&clock).await;
    engine.shutdown().await;
    drop(engine);

    clock.advance_to(wake_at_ms + 200);
    let reopened_at_ms = clock.now_ms();
    let engine = open_sleep(dir.path(), &clock).await;
    let record = engine.wait("overslept").await.unwrap();
    assert_eq!(record.status, RunStatus::Completed, "{:?}", record.error);
    let (_, journaled_wake_at_ms, fired_at_ms) =
        timer_times(&engine.history("overslept").await.unwrap());
    assert_eq!(journaled_wake_at_ms, wake_at_ms);
    assert_eq!(fired_at_ms, reopened_at_ms, "fired at the reopen, at once");
    engine.shutdown().await;
}

/// Fails its first attempt retryably with a 1.5 s retry-after hint, then succeeds with its
/// attempt number; every attempt is written to the ground-truth log at `log`.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Throttled {
    log: String,
}

impl Step for Throttled {
    const KIND: &'static str = "test.throttled";
    type Output = u32;

    async fn execute(&self, ctx: &StepContext) -> Result<u32, StepError> {
        effects::record(&self.log, Action::Do, ctx)?;
        if ctx.attempt() == Attempt::FIRST {
            return Err(
                StepError::retryable("rate exceeded").with_retry_after(Duration::from_millis(1500))
            );
        }
        Ok(ctx.attempt().0)
    }

    fn retry_policy(&self) -> RetryPolicy {
        // Backoff ceilings far below the hint, so the hint alone sets the retry time.
        RetryPolicy::default().with_backoff(Duration::from_millis(1), Duration::from_millis(10))
    }
}

/// One [`Throttled`] step; outputs the attempt that succeeded.
struct ThrottledFlow;

impl Workflow for ThrottledFlow {
    const NAME: &'static str = "test.throttled-flow";
    type Input = String;
    type Output = u32;

    async fn run(ctx: &mut Ctx, log: String) -> Result<u32, WorkflowError> {
        ctx.step(Throttled { log }).await
    }
}

/// A retry time journaled before a restart holds after it: attempt 2 starts exactly at the
/// failure's `retry_at_ms` (which honours the 1.5 s hint), it is numbered 2 (the count goes
/// on, it does not restart at 1), and it runs with the same idempotency key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_time_and_attempt_count_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log: PathBuf = dir.path().join("effects.jsonl");
    let clock = TestClock::new();
    let open = || async {
        keel_testkit::store::builder(&data)
            .clock(clock.clone())
            .workflow::<ThrottledFlow>()
            .step::<Throttled>()
            .open()
            .await
            .expect("opening the engine")
    };
    let engine = open().await;
    engine
        .start::<ThrottledFlow>("throttled", log.to_string_lossy().into_owned())
        .await
        .unwrap();
    until(&engine, "throttled", |h| {
        has(h, |e| matches!(e, Event::StepFailed { .. }))
    })
    .await;
    engine.shutdown().await;
    let down = engine.history("throttled").await.unwrap();
    drop(engine);
    let failures = entries(&down, |e| matches!(e, Event::StepFailed { .. }));
    let (
        failed_at_ms,
        Event::StepFailed {
            attempt,
            retry_at_ms,
            ..
        },
    ) = failures[0].clone()
    else {
        unreachable!()
    };
    assert_eq!(attempt, Attempt(1));
    assert_eq!(
        retry_at_ms,
        Some(failed_at_ms + 1500),
        "the retry time honours the 1500 ms hint, the backoff being far below it"
    );
    let retry_at_ms = retry_at_ms.unwrap();
    assert!(
        !has(
            &down,
            |e| matches!(e, Event::StepStarted { attempt, .. } if attempt.0 > 1)
        ),
        "shut down before attempt 2 began"
    );

    // Down for 500 ms of the backoff.
    clock.advance(Duration::from_millis(500));
    let engine = open().await;
    assert_eq!(
        asleep(&clock).await,
        retry_at_ms,
        "the backoff is not restarted"
    );
    clock.advance_to(retry_at_ms);
    let record = engine.wait("throttled").await.unwrap();
    assert_eq!(record.status, RunStatus::Completed, "{:?}", record.error);
    assert_eq!(
        record.output,
        Some(serde_json::json!(2)),
        "attempt 2 succeeded"
    );

    let history = engine.history("throttled").await.unwrap();
    let starts = entries(&history, |e| matches!(e, Event::StepStarted { .. }));
    let attempts: Vec<u32> = starts
        .iter()
        .map(|(_, e)| match e {
            Event::StepStarted { attempt, .. } => attempt.0,
            _ => unreachable!(),
        })
        .collect();
    assert_eq!(
        attempts,
        vec![1, 2],
        "attempt numbers go on after the restart"
    );
    assert_eq!(
        starts[1].0, retry_at_ms,
        "attempt 2 started at its retry time"
    );

    let ran = effects::read(&log);
    let ran_attempts: Vec<u32> = ran.iter().map(|e| e.attempt).collect();
    assert_eq!(
        ran_attempts,
        vec![1, 2],
        "ground truth: each attempt ran once"
    );
    assert_eq!(ran[0].key, ran[1].key, "both attempts used the same key");
    engine.shutdown().await;
}

/// Always fails retryably, as when every response is lost after the work was done: each
/// attempt is written to the ground-truth log, and so is the compensation (with whether it
/// was given an output).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Flaky {
    log: String,
}

impl Step for Flaky {
    const KIND: &'static str = "test.flaky";
    type Output = u32;

    async fn execute(&self, ctx: &StepContext) -> Result<u32, StepError> {
        effects::record(&self.log, Action::Do, ctx)?;
        Err(StepError::retryable("response lost"))
    }

    fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy::default()
            .with_attempts_max(3)
            .with_backoff(Duration::from_millis(1), Duration::from_millis(5))
    }

    async fn compensate(
        &self,
        ctx: &StepContext,
        output: Option<u32>,
    ) -> Result<Compensation, StepError> {
        if let Some(output) = output {
            // Fails the compensation, and with it the test's status check.
            return Err(StepError::permanent(format!(
                "a step that never succeeded was given output {output}"
            )));
        }
        effects::record(&self.log, Action::Undo, ctx)?;
        Ok(Compensation::Done)
    }
}

/// One [`Flaky`] step.
struct FlakyFlow;

impl Workflow for FlakyFlow {
    const NAME: &'static str = "test.flaky-flow";
    type Input = String;
    type Output = u32;

    async fn run(ctx: &mut Ctx, log: String) -> Result<u32, WorkflowError> {
        ctx.step(Flaky { log }).await
    }
}

/// A step that fails retryably on every attempt under a 3-attempt policy is tried exactly 3
/// times; because each attempt may have taken effect the step is in doubt, so the run
/// compensates it (status Compensated, not Failed) with no output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_stop_at_the_policy_and_the_run_compensates() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("effects.jsonl");
    let clock = TestClock::new();
    let engine = keel_testkit::store::builder(dir.path().join("data"))
        .clock(clock.clone())
        .workflow::<FlakyFlow>()
        .step::<Flaky>()
        .open()
        .await
        .unwrap();
    engine
        .start::<FlakyFlow>("flaky", log.to_string_lossy().into_owned())
        .await
        .unwrap();
    let record = clock.skip_until_settled(&engine, "flaky").await.unwrap();
    let error = record.error.unwrap_or_default();
    assert!(error.contains("response lost"), "{error}");
    let history = engine.history("flaky").await.unwrap();
    assert_eq!(
        history.run.status,
        RunStatus::Compensated,
        "{:?}",
        history.run.error
    );

    let starts = entries(&history, |e| matches!(e, Event::StepStarted { .. }));
    let attempts: Vec<u32> = starts
        .iter()
        .map(|(_, e)| match e {
            Event::StepStarted { attempt, .. } => attempt.0,
            _ => unreachable!(),
        })
        .collect();
    assert_eq!(attempts, vec![1, 2, 3], "exactly 3 attempts");
    let failures = entries(&history, |e| matches!(e, Event::StepFailed { .. }));
    let retry_times: Vec<Option<u64>> = failures
        .iter()
        .map(|(_, e)| match e {
            Event::StepFailed { retry_at_ms, .. } => *retry_at_ms,
            _ => unreachable!(),
        })
        .collect();
    assert_eq!(retry_times.len(), 3, "{failures:?}");
    assert!(
        retry_times[0].is_some() && retry_times[1].is_some() && retry_times[2].is_none(),
        "attempts 1 and 2 were retried, attempt 3 was the last: {retry_times:?}"
    );
    assert!(has(&history, |e| matches!(
        e,
        Event::StepCompensated { step } if *step == OperationIndex(0)
    )));
    assert!(has(&history, |e| matches!(e, Event::RunCompensated)));

    let ran = effects::read(&log);
    let done: Vec<u32> = ran
        .iter()
        .filter(|e| e.action == Action::Do)
        .map(|e| e.attempt)
        .collect();
    assert_eq!(done, vec![1, 2, 3], "ground truth: 3 attempts ran");
    let undone = ran.iter().filter(|e| e.action == Action::Undo).count();
    assert_eq!(undone, 1, "ground truth: the in-doubt step was undone once");
    engine.shutdown().await;
}

/// Completes; its undo fails retryably on the first attempt and succeeds on the next, under a
/// compensation policy bounded to one minute of elapsed time.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct SlowUndo {
    log: String,
}

impl Step for SlowUndo {
    const KIND: &'static str = "test.slow-undo";
    type Output = u32;

    async fn execute(&self, ctx: &StepContext) -> Result<u32, StepError> {
        effects::record(&self.log, Action::Do, ctx)?;
        Ok(1)
    }

    async fn compensate(
        &self,
        ctx: &StepContext,
        _output: Option<u32>,
    ) -> Result<Compensation, StepError> {
        if ctx.attempt() == Attempt::FIRST {
            return Err(StepError::retryable("undo throttled"));
        }
        effects::record(&self.log, Action::Undo, ctx)?;
        Ok(Compensation::Done)
    }

    fn compensation_retry_policy(&self) -> RetryPolicy {
        RetryPolicy::default()
            .with_attempts_max(5)
            .with_backoff(Duration::from_millis(1), Duration::from_millis(5))
            .with_elapsed_max(Duration::from_secs(60))
    }
}

/// Fails permanently at once.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Refused;

impl Step for Refused {
    const KIND: &'static str = "test.refused";
    type Output = u32;

    async fn execute(&self, _ctx: &StepContext) -> Result<u32, StepError> {
        Err(StepError::permanent("refused"))
    }
}

/// A [`SlowUndo`] step, then a [`Refused`] one: the run compensates the first.
struct SlowUndoFlow;

impl Workflow for SlowUndoFlow {
    const NAME: &'static str = "test.slow-undo-flow";
    type Input = String;
    type Output = u32;

    async fn run(ctx: &mut Ctx, log: String) -> Result<u32, WorkflowError> {
        ctx.step(SlowUndo { log }).await?;
        ctx.step(Refused).await
    }
}

/// A compensation policy's elapsed-time bound is measured from the undo's own attempts (not
/// from the Unix epoch): an undo that fails retryably once, a few milliseconds in, under a
/// one-minute bound, is retried, and the run ends Compensated (not CompensationFailed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undo_retry_within_its_elapsed_bound_is_retried() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("effects.jsonl");
    let clock = TestClock::new();
    let engine = keel_testkit::store::builder(dir.path().join("data"))
        .clock(clock.clone())
        .workflow::<SlowUndoFlow>()
        .step::<SlowUndo>()
        .step::<Refused>()
        .open()
        .await
        .unwrap();
    engine
        .start::<SlowUndoFlow>("slow-undo", log.to_string_lossy().into_owned())
        .await
        .unwrap();
    let record = clock
        .skip_until_settled(&engine, "slow-undo")
        .await
        .unwrap();
    let history = engine.history("slow-undo").await.unwrap();
    let undo_failures = entries(&history, |e| {
        matches!(e, Event::StepCompensationFailed { .. })
    });
    assert_eq!(undo_failures.len(), 1, "{undo_failures:?}");
    let Event::StepCompensationFailed { retry_at_ms, .. } = &undo_failures[0].1 else {
        unreachable!()
    };
    assert!(
        retry_at_ms.is_some(),
        "the undo failed {} ms into its one-minute bound and must be retried: {:?}",
        undo_failures[0].0 - history.entries[0].at_ms,
        history.run.error
    );
    assert_eq!(record.status, RunStatus::Compensated, "{:?}", record.error);
    let undone = effects::read(&log)
        .iter()
        .filter(|e| e.action == Action::Undo)
        .count();
    assert_eq!(undone, 1, "ground truth: the step was undone");
    engine.shutdown().await;
}
