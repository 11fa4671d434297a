//! Waiters always hear the end: every path that stops driving a run (shutdown, a failure or
//! a suspension whose reason is huge, a run nobody drives) answers `RunHandle::result` and
//! `Engine::wait` within a bound, with the run's status or the reason it is not driven.

use std::time::Duration;

use keel::{
    Ctx, Engine, EngineError, RunStatus, Step, StepContext, StepError, Workflow, WorkflowError,
};
use serde::{Deserialize, Serialize};

const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// Sleeps an hour.
struct Sleeper;

impl Workflow for Sleeper {
    const NAME: &'static str = "test.sleeper";
    type Input = ();
    type Output = ();

    async fn run(ctx: &mut Ctx, _: ()) -> Result<(), WorkflowError> {
        ctx.sleep(Duration::from_secs(3600)).await
    }
}

/// Fails with a message of the input's length.
struct Loud;

impl Workflow for Loud {
    const NAME: &'static str = "test.loud";
    type Input = usize;
    type Output = ();

    async fn run(_: &mut Ctx, bytes: usize) -> Result<(), WorkflowError> {
        Err(WorkflowError::failed("x".repeat(bytes)))
    }
}

/// Returns its argument.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Echo(String);

impl Step for Echo {
    const KIND: &'static str = "test.echo";
    type Output = String;

    async fn execute(&self, _: &StepContext) -> Result<String, StepError> {
        Ok(self.0.clone())
    }
}

/// One [`Echo`] step of a 40 KB argument whose content changes between versions of the code
/// (the input picks the letter): a replay under the other letter is non-deterministic with
/// two 40 KB arguments in its reason.
struct Changing;

impl Workflow for Changing {
    const NAME: &'static str = "test.changing";
    type Input = ();
    type Output = ();

    async fn run(ctx: &mut Ctx, _: ()) -> Result<(), WorkflowError> {
        let letter = std::env::var("TEST_LETTER").unwrap_or_else(|_| "a".into());
        ctx.step(Echo(letter.repeat(40 * 1024))).await?;
        ctx.sleep(Duration::from_secs(3600)).await
    }
}

async fn answered<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(ANSWER_TIMEOUT, future)
        .await
        .unwrap_or_else(|_| panic!("{what}: the waiter was never answered"))
}

/// A run's waiter is answered when the engine shuts down under it: the run is not finished,
/// and the answer says the engine shut down instead of leaving the caller pending forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_answers_the_waiters_of_unfinished_runs() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::builder(dir.path())
        .workflow::<Sleeper>()
        .open()
        .await
        .unwrap();
    let handle = engine.start::<Sleeper>("nap", ()).await.unwrap();
    let waiting = tokio::spawn({
        let engine = engine.clone();
        async move { engine.wait("nap").await }
    });
    let result = tokio::spawn(async move { handle.result().await });
    keel_testkit::poll::until(&engine, "nap", |h| h.entries.len() == 1).await;
    engine.shutdown().await;
    let err = answered("result", result).await.unwrap().unwrap_err();
    assert!(matches!(err, EngineError::ShutDown), "{err}");
    let err = answered("wait", waiting).await.unwrap().unwrap_err();
    assert!(matches!(err, EngineError::ShutDown), "{err}");
}

/// A workflow that fails with a 1 MiB message fails (its message cut to the bound), and its
/// waiter hears it: the failure is not an oversized record that stops the driver.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_with_a_huge_message_is_recorded_cut_and_heard() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::builder(dir.path())
        .workflow::<Loud>()
        .open()
        .await
        .unwrap();
    let handle = engine.start::<Loud>("loud", 1 << 20).await.unwrap();
    let err = answered("result", handle.result()).await.unwrap_err();
    match err {
        EngineError::RunEnded { status, error, .. } => {
            assert_eq!(status, RunStatus::Failed);
            assert!(
                error.len() <= keel::limits::ERROR_MESSAGE_BYTES_MAX,
                "{}",
                error.len()
            );
            assert!(
                error.ends_with("(truncated)"),
                "{}",
                &error[error.len() - 40..]
            );
        }
        other => panic!("{other}"),
    }
    engine.shutdown().await;
}

/// A replay mismatch between two 40 KB arguments suspends the run with a reason cut to the
/// bound, and the waiter hears the suspension.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suspension_with_a_huge_reason_is_recorded_cut_and_heard() {
    let dir = tempfile::tempdir().unwrap();
    let open = || {
        Engine::builder(dir.path())
            .workflow::<Changing>()
            .step::<Echo>()
            .open()
    };
    let engine = open().await.unwrap();
    engine.start::<Changing>("changing", ()).await.unwrap();
    keel_testkit::poll::until(&engine, "changing", |h| h.entries.len() == 3).await;
    engine.shutdown().await;
    drop(engine);
    // The "new version of the code": same step kind, another argument.
    std::env::set_var("TEST_LETTER", "b");
    let engine = open().await.unwrap();
    let record = answered("wait", engine.wait("changing")).await.unwrap();
    assert_eq!(record.status, RunStatus::Suspended);
    let reason = record.error.unwrap_or_default();
    assert!(reason.contains("non-determinism"), "{}", &reason[..200]);
    assert!(
        reason.len() <= keel::limits::ERROR_MESSAGE_BYTES_MAX,
        "{}",
        reason.len()
    );
    engine.shutdown().await;
}
