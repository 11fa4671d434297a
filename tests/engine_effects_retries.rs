//! An effect (`Ctx::effect`) is retried and contained as a step is: a retryable error is
//! retried under the effect's options, and a panic in its closure is a failed attempt.

mod common;

use std::time::Duration;

use common::effects::effects_done;
use common::{entries_of, log_in};
use keel::{
    Ctx, EffectOptions, ErrorClass, Event, RetryPolicy, RunHistory, RunStatus, StepError, Workflow,
    WorkflowError,
};
use keel_testkit::effects::{self, Action};
use keel_testkit::open_engine;
use serde::{Deserialize, Serialize};
use serde_json::json;

/// How [`Flaky`]'s effect misbehaves on its first `times` attempts.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
enum Misbehaviour {
    /// A retryable error.
    Retryable,
    /// A panic.
    Panic,
}

/// Input of [`Flaky`].
#[derive(Clone, Debug, Serialize, Deserialize)]
struct FlakyInput {
    log: String,
    misbehaviour: Misbehaviour,
    times: u32,
    attempts_max: u32,
}

/// An effect that misbehaves on its first attempts, under a retry policy of the input's
/// attempts with millisecond backoffs; it returns the attempt that succeeded.
struct Flaky;

const FLAKY: &str = "test.effects-flaky";

impl Workflow for Flaky {
    const NAME: &'static str = "test.effects-flaky-flow";
    type Input = FlakyInput;
    type Output = u32;

    async fn run(ctx: &mut Ctx, input: FlakyInput) -> Result<u32, WorkflowError> {
        let policy = RetryPolicy::DEFAULT
            .with_attempts_max(input.attempts_max)
            .with_backoff(Duration::from_millis(1), Duration::from_millis(2));
        let options = EffectOptions::DEFAULT.retry_policy(policy);
        ctx.effect(FLAKY, options, |sctx| {
            let input = input.clone();
            async move {
                effects::record(&input.log, Action::Do, &sctx)?;
                let attempt = sctx.attempt().0;
                if attempt <= input.times {
                    match input.misbehaviour {
                        Misbehaviour::Retryable => {
                            return Err(StepError::retryable(format!("attempt {attempt}: not yet")))
                        }
                        Misbehaviour::Panic => panic!("attempt {attempt} blew up"),
                    }
                }
                Ok(attempt)
            }
        })
        .await
    }
}

/// The errors of operation 0's failed attempts, with their retry times.
fn failures(history: &RunHistory) -> Vec<(ErrorClass, String, Option<u64>)> {
    entries_of(history, 0)
        .into_iter()
        .filter_map(|e| match e {
            Event::StepFailed {
                error, retry_at_ms, ..
            } => Some((error.class, error.message.clone(), *retry_at_ms)),
            _ => None,
        })
        .collect()
}

/// A retryable error is retried under the options' policy: with three attempts allowed, two
/// failures are retried (each start journaled as not compensable) and the third attempt's
/// output is the run's, timed under `step:<kind>`; with two allowed, the second failure is
/// final and the run fails, with nothing to undo.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retryable_error_is_retried_under_the_options_policy() {
    let dir = tempfile::tempdir().unwrap();
    let log = log_in(dir.path());
    let engine =
        open_engine(|| keel_testkit::store::builder(dir.path().join("data")).workflow::<Flaky>())
            .await;
    let input = |attempts_max| FlakyInput {
        log: log.clone(),
        misbehaviour: Misbehaviour::Retryable,
        times: 2,
        attempts_max,
    };
    let run = engine.start::<Flaky>("recovers", input(3)).await.unwrap();
    assert_eq!(run.result().await.unwrap(), 3);
    let history = engine.history("recovers").await.unwrap();
    let starts: Vec<(u32, bool)> = entries_of(&history, 0)
        .into_iter()
        .filter_map(|e| match e {
            Event::StepStarted {
                kind,
                argument,
                attempt,
                compensable,
                ..
            } => {
                assert_eq!((kind.as_str(), argument), (FLAKY, &json!(null)));
                Some((attempt.0, *compensable))
            }
            _ => None,
        })
        .collect();
    assert_eq!(starts, vec![(1, false), (2, false), (3, false)]);
    let failed = failures(&history);
    assert_eq!(failed.len(), 2, "{failed:?}");
    assert!(failed
        .iter()
        .all(|(class, _, retry)| *class == ErrorClass::Retryable && retry.is_some()));
    let stats = engine
        .operation_stats(&format!("step:{FLAKY}"))
        .expect("the effect's duration is recorded");
    assert_eq!(stats.count, 1, "one success");

    let run = engine.start::<Flaky>("exhausted", input(2)).await.unwrap();
    assert!(run.result().await.is_err());
    let history = engine.history("exhausted").await.unwrap();
    assert_eq!(history.run.status, RunStatus::Failed, "nothing to undo");
    let failed = failures(&history);
    assert_eq!(failed.len(), 2, "{failed:?}");
    assert_eq!(failed[1].2, None, "the policy's last attempt is final");
    assert!(history.run.error.unwrap().contains(FLAKY));
    assert_eq!(
        effects_done(&log).len(),
        3 + 2,
        "every attempt ran the closure once"
    );
    engine.shutdown().await;
}

/// A panic in the closure is a failed attempt (retryable, with the panic's message), not the
/// driver's end: the next attempt calls the closure again and the run completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_the_effect_is_a_failed_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let log = log_in(dir.path());
    let engine =
        open_engine(|| keel_testkit::store::builder(dir.path().join("data")).workflow::<Flaky>())
            .await;
    let input = FlakyInput {
        log: log.clone(),
        misbehaviour: Misbehaviour::Panic,
        times: 1,
        attempts_max: 3,
    };
    let run = engine.start::<Flaky>("panics", input).await.unwrap();
    assert_eq!(run.result().await.unwrap(), 2);
    let history = engine.history("panics").await.unwrap();
    let failed = failures(&history);
    assert_eq!(failed.len(), 1, "{failed:?}");
    let (class, message, retry) = &failed[0];
    assert_eq!(*class, ErrorClass::Retryable);
    assert!(message.contains("panicked: attempt 1 blew up"), "{message}");
    assert!(retry.is_some());
    assert_eq!(effects_done(&log).len(), 2);
    engine.shutdown().await;
}
