//! Waiters always hear the end: every path that stops driving a run (shutdown, a failure or
//! a suspension whose reason is huge, a write or sync that fails because the disk is full) answers
//! `RunHandle::result` and `Engine::wait` within a bound, with the run's status or the reason
//! it is not driven.

use std::time::Duration;

use keel::{
    Ctx, Engine, EngineError, RunStatus, Step, StepContext, StepError, Workflow, WorkflowError,
};
use keel_testkit::crash::{is_child, path_env, ChildSpec, Ending};
use keel_testkit::poll::CONDITION_TIMEOUT;
use serde::{Deserialize, Serialize};

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
    tokio::time::timeout(CONDITION_TIMEOUT, future)
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
    // The run sleeps loaded (it never parks), so the reopen replays it at once.
    let open = || {
        Engine::builder(dir.path())
            .park_after(None)
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

/// Forty steps each returning 40 KB: about 1.6 MB of journal, more than the 64 KB the disk
/// has room for in the test below.
struct Large;

impl Workflow for Large {
    const NAME: &'static str = "test.large";
    type Input = ();
    type Output = ();

    async fn run(ctx: &mut Ctx, _: ()) -> Result<(), WorkflowError> {
        for n in 0..40u32 {
            ctx.step(Echo(format!("{n}-{}", "x".repeat(40 * 1024))))
                .await?;
        }
        Ok(())
    }
}

/// Makes every file this process writes stop growing `room` bytes past their size now (as a
/// full disk would), with the write failing (`EFBIG`) instead of the process being killed.
#[allow(unsafe_code)]
fn fill_the_disk(room: u64) {
    // SAFETY: setrlimit and signal are called with valid arguments, before any other thread
    // of this process writes files; ignoring SIGXFSZ makes an oversized write return an error.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        let limit = libc::rlimit {
            rlim_cur: room,
            rlim_max: libc::RLIM_INFINITY,
        };
        assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &limit), 0);
    }
}

fn full_disk_child() {
    let dir = std::path::PathBuf::from(std::env::var("KEEL_DATA_DIR").unwrap());
    keel_testkit::crash::runtime().block_on(async {
        let engine = Engine::builder(&dir)
            .workflow::<Large>()
            .step::<Echo>()
            .open()
            .await
            .unwrap();
        let db = std::fs::metadata(dir.join("db")).unwrap().len();
        fill_the_disk(db + 64 * 1024);
        let handle = engine.start::<Large>("large", ()).await.unwrap();
        let err = answered("result", handle.result()).await.unwrap_err();
        // sled fails the write that needs the file to grow (or the sync after it): the
        // waiter hears that error, whichever it was.
        let text = err.to_string();
        assert!(
            matches!(
                err,
                EngineError::RunStopped { .. }
                    | EngineError::Storage { .. }
                    | EngineError::Sync { .. }
            ) && text.contains("File too large"),
            "{text}"
        );
        // The store accepts no more writes, and says so.
        let err = engine.start::<Large>("another", ()).await.err().unwrap();
        assert!(err.to_string().contains("File too large"), "{err}");
    });
}

/// A full disk (files cannot grow: the store's write or sync fails) stops every driver,
/// whose waiters hear the error at once instead of waiting forever; the run is left for
/// the next open. Run in a child process, whose file-size limit plays the full disk.
#[test]
fn a_full_disk_answers_the_waiters_with_the_error() {
    const NAME: &str = "a_full_disk_answers_the_waiters_with_the_error";
    if is_child() {
        return full_disk_child();
    }
    let dir = tempfile::tempdir().unwrap();
    let spec = ChildSpec {
        test_name: NAME,
        env: vec![("KEEL_DATA_DIR".into(), path_env(dir.path(), "data"))],
    };
    assert_eq!(spec.run(&[], CONDITION_TIMEOUT * 2), Ending::Finished);
}

/// Fills the disk (as [`fill_the_disk`], with no room left) once its waiter has had time to
/// wait, and returns.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct FillsTheDisk;

impl Step for FillsTheDisk {
    const KIND: &'static str = "test.fills-the-disk";
    const COMPENSABLE: bool = false;
    type Output = ();

    async fn execute(&self, _: &StepContext) -> Result<(), StepError> {
        tokio::time::sleep(Duration::from_millis(300)).await;
        fill_the_disk(0);
        Ok(())
    }
}

/// Ends after one [`FillsTheDisk`] step: the end's write is the first after the disk filled.
struct EndsOnAFullDisk;

impl Workflow for EndsOnAFullDisk {
    const NAME: &'static str = "test.ends-on-a-full-disk";
    type Input = ();
    type Output = ();

    async fn run(ctx: &mut Ctx, _: ()) -> Result<(), WorkflowError> {
        ctx.step(FillsTheDisk).await
    }
}

fn full_disk_at_the_end_child() {
    let dir = std::path::PathBuf::from(std::env::var("KEEL_DATA_DIR").unwrap());
    keel_testkit::crash::runtime().block_on(async {
        let engine = Engine::builder(&dir)
            .workflow::<EndsOnAFullDisk>()
            .step::<FillsTheDisk>()
            .open()
            .await
            .unwrap();
        let handle = engine.start::<EndsOnAFullDisk>("ends", ()).await.unwrap();
        let waiting = {
            let engine = engine.clone();
            tokio::spawn(async move { engine.wait("ends").await })
        };
        let err = answered("result", handle.result()).await.unwrap_err();
        assert!(err.to_string().contains("File too large"), "{err}");
        let err = answered("wait", waiting).await.unwrap().unwrap_err();
        assert!(err.to_string().contains("File too large"), "{err}");
    });
}

/// A run whose end cannot be made durable (the disk filled during its last step, so the
/// sync of its settling write fails) answers its waiters with the error, though the end is
/// already in the run's record in memory: nothing may tell them of an end that is not
/// durable, and nothing else would answer them. Run in a child process, whose file-size
/// limit plays the full disk.
#[test]
fn a_failed_sync_of_a_runs_end_answers_its_waiters() {
    const NAME: &str = "a_failed_sync_of_a_runs_end_answers_its_waiters";
    if is_child() {
        return full_disk_at_the_end_child();
    }
    let dir = tempfile::tempdir().unwrap();
    let spec = ChildSpec {
        test_name: NAME,
        env: vec![("KEEL_DATA_DIR".into(), path_env(dir.path(), "data"))],
    };
    assert_eq!(spec.run(&[], CONDITION_TIMEOUT * 2), Ending::Finished);
}
