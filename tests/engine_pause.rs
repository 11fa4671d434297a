//! Operator pause and resume: a paused run starts no step, survives a SIGKILL and a restart
//! paused, and finishes with every step once when resumed; a workflow configured to pause
//! when a step runs out of retries waits for an operator instead of compensating.

use std::path::Path;
use std::time::Duration;

use keel::{Ctx, Engine, EngineError, OnRetriesExhausted, RunStatus, Workflow, WorkflowError};
use keel_engine::{Event, RunHistory};
use keel_testkit::check::{check_run, effects_at, read_store_blocking, Expect, Tally};
use keel_testkit::crash::{is_child, path_env, until_file, ChildSpec};
use keel_testkit::flows::{EffectStep, FanOutFlow, FanOutInput, Fault};
use serde::{Deserialize, Serialize};

const CHILD_TIMEOUT: Duration = Duration::from_secs(120);

fn fan_out(log: &Path) -> FanOutInput {
    FanOutInput {
        branches: 100,
        width: 4,
        fail_at: None,
        jitter_ms: 40,
        log: log.to_string_lossy().into_owned(),
    }
}

/// Journal entries between the run's pause and its resume.
fn while_paused(history: &RunHistory) -> Vec<&Event> {
    history
        .entries
        .iter()
        .map(|e| &e.event)
        .skip_while(|e| !matches!(e, Event::RunPaused { .. }))
        .skip(1)
        .take_while(|e| !matches!(e, Event::RunResumed))
        .collect()
}

fn child_main() {
    let dir = std::env::var("KEEL_DATA_DIR").expect("KEEL_DATA_DIR");
    let log = std::path::PathBuf::from(std::env::var("KEEL_EFFECT_LOG").expect("KEEL_EFFECT_LOG"));
    let runtime = keel_testkit::crash::runtime();
    runtime.block_on(async {
        let engine = keel_testkit::store::builder(Path::new(&dir).join("data"))
            .workflow::<FanOutFlow>()
            .step::<EffectStep>()
            .open()
            .await
            .unwrap();
        match std::env::var("PHASE").unwrap().as_str() {
            "pause" => {
                engine
                    .start::<FanOutFlow>("long", fan_out(&log))
                    .await
                    .unwrap();
                // Paused mid-fan-out: once a few steps have completed, long before all 100.
                let some_done = |h: &RunHistory| {
                    h.entries
                        .iter()
                        .filter(|e| matches!(e.event, Event::StepCompleted { .. }))
                        .count()
                        >= 4
                };
                keel_testkit::poll::until(&engine, "long", some_done).await;
                engine.pause("long").await.unwrap();
                let record = engine.wait("long").await.unwrap();
                assert_eq!(record.status, RunStatus::Paused);
                std::fs::write(Path::new(&dir).join("paused"), "").unwrap();
                // Killed here by the test.
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
            "resume" => {
                let before = engine.history("long").await.unwrap();
                assert_eq!(before.run.status, RunStatus::Paused);
                tokio::time::sleep(Duration::from_millis(500)).await;
                let after = engine.history("long").await.unwrap();
                assert_eq!(
                    after.entries.len(),
                    before.entries.len(),
                    "a paused run moved"
                );
                engine.resume("long").await.unwrap();
                engine.wait("long").await.unwrap();
                engine.shutdown().await;
            }
            other => panic!("unknown phase {other}"),
        }
    });
}

/// A run paused in the middle of a 100-branch fan-out starts no step while paused, stays
/// paused across a SIGKILL and a restart, and once resumed completes with every step's effect
/// run once (but for the branches that lose their first response by design).
#[test]
fn pause_during_a_fan_out_survives_sigkill_and_resume_finishes_every_step_once() {
    const NAME: &str =
        "pause_during_a_fan_out_survives_sigkill_and_resume_finishes_every_step_once";
    if is_child() {
        return child_main();
    }
    keel_testkit::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let spec = ChildSpec {
        test_name: NAME,
        env: vec![
            (
                "KEEL_DATA_DIR".into(),
                dir.path().to_string_lossy().into_owned(),
            ),
            (
                "KEEL_EFFECT_LOG".into(),
                path_env(dir.path(), "effects.jsonl"),
            ),
        ],
    };
    let mut child = spec.spawn(&[("PHASE", "pause".into())]);
    // Killed once the run is paused.
    until_file(&mut child, &dir.path().join("paused"), CHILD_TIMEOUT);
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    let resume = spec.spawn(&[("PHASE", "resume".into())]).wait().unwrap();
    assert!(resume.success(), "the resuming child failed: {resume}");

    let log = dir.path().join("effects.jsonl");
    read_store_blocking(&dir.path().join("data"), async |engine| {
        let history = engine.history("long").await.unwrap();
        let mut tally = Tally::default();
        let expected = FanOutFlow::expected_output(&fan_out(&log));
        check_run(
            &history,
            Expect::Completed(expected),
            &effects_at(&log),
            &mut tally,
        );
        // Paused mid-fan-out: some branches had run, some had not.
        let before_pause = history
            .entries
            .iter()
            .take_while(|e| !matches!(e.event, Event::RunPaused { .. }))
            .filter(|e| matches!(e.event, Event::StepCompleted { .. }))
            .count();
        assert!(
            (2..100).contains(&before_pause),
            "{before_pause} steps had completed at the pause"
        );
        // Nothing started while paused; every step's effect ran once, but for the branches
        // that lose their first response by design (each third one, 33 of them).
        let paused = while_paused(&history);
        assert!(
            paused
                .iter()
                .all(|e| !matches!(e, Event::StepStarted { .. })),
            "a step started while paused: {paused:?}"
        );
        assert_eq!(tally.steps_rerun, 33);
        assert_eq!(tally.effects, 102 + 33);
    });
}

/// Input of [`PausingFlow`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct PausingInput {
    log: String,
}

/// Three effect steps; the second depends on something that is down while
/// `<log>.down` exists. Pauses when a step runs out of retries.
struct PausingFlow;

impl Workflow for PausingFlow {
    const NAME: &'static str = "test.pausing";
    const ON_RETRIES_EXHAUSTED: OnRetriesExhausted = OnRetriesExhausted::Pause;
    type Input = PausingInput;
    type Output = u32;

    async fn run(ctx: &mut Ctx, input: PausingInput) -> Result<u32, WorkflowError> {
        let effect = |n: u32, fault: Fault| EffectStep {
            n,
            fault,
            log: input.log.clone(),
            jitter_ms: 0,
        };
        let mut sum = ctx.step(effect(0, Fault::None)).await?;
        sum += ctx.step(effect(1, Fault::DownWhileMarked)).await?;
        sum += ctx.step(effect(2, Fault::None)).await?;
        Ok(sum)
    }
}

async fn pausing_engine(dir: &Path) -> Engine {
    keel_testkit::store::builder(dir.join("data"))
        .workflow::<PausingFlow>()
        .step::<EffectStep>()
        .open()
        .await
        .unwrap()
}

/// A workflow configured to pause when a step runs out of retries pauses instead of
/// compensating, stays paused across a restart, and once resumed gives the step a new round of
/// attempts and completes; a paused run that is cancelled compensates; and only running runs
/// pause and only paused ones resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_out_of_retries_pauses_the_run_and_resume_gives_it_a_new_round() {
    keel_testkit::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("effects.jsonl");
    let down = dir.path().join("effects.jsonl.down");
    std::fs::write(&down, "").unwrap();
    let input = PausingInput {
        log: log.to_string_lossy().into_owned(),
    };
    let engine = pausing_engine(dir.path()).await;
    engine
        .start::<PausingFlow>("fixed", input.clone())
        .await
        .unwrap();
    engine
        .start::<PausingFlow>("given-up", input.clone())
        .await
        .unwrap();
    for id in ["fixed", "given-up"] {
        let record = engine.wait(id).await.unwrap();
        assert_eq!(record.status, RunStatus::Paused, "{id}");
        let reason = record.error.unwrap();
        assert!(
            reason.contains("step #1 (test.effect) ran out of retries") && reason.contains("down"),
            "{reason}"
        );
    }

    // Paused across a restart.
    engine.shutdown().await;
    drop(engine);
    let engine = pausing_engine(dir.path()).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        engine.status("fixed").await.unwrap().status,
        RunStatus::Paused
    );

    // The dependency is fixed; resumed, the step gets a new round of 20 attempts.
    std::fs::remove_file(&down).unwrap();
    engine.resume("fixed").await.unwrap();
    let record = engine.wait("fixed").await.unwrap();
    assert_eq!(record.status, RunStatus::Completed, "{:?}", record.error);
    let history = engine.history("fixed").await.unwrap();
    let attempts = history
        .entries
        .iter()
        .filter(|e| matches!(&e.event, Event::StepStarted { step, .. } if step.0 == 1))
        .count();
    assert_eq!(attempts, 21, "20 attempts, a pause, one more");
    let effects = effects_at(&log);
    check_run(
        &history,
        Expect::Completed(30),
        &effects,
        &mut Tally::default(),
    );

    // Cancelled while paused: it compensates at once.
    // `cancel` answers with the record as it stands once the cancellation is durable; the
    // compensation (one undo) may already have finished by then.
    let record = engine.cancel("given-up").await.unwrap();
    assert!(
        matches!(
            record.status,
            RunStatus::Compensating | RunStatus::Compensated
        ),
        "{:?}",
        record.status
    );
    let record = engine.wait("given-up").await.unwrap();
    assert_eq!(record.status, RunStatus::Compensated, "{:?}", record.error);
    let history = engine.history("given-up").await.unwrap();
    check_run(
        &history,
        Expect::Compensated,
        &effects_at(&log),
        &mut Tally::default(),
    );

    // Only running runs pause; only paused (or pausing, or suspended) ones resume.
    for (result, operation) in [
        (engine.pause("fixed").await, "pause"),
        (engine.resume("given-up").await, "resume"),
    ] {
        match result {
            Err(EngineError::InvalidState { operation: op, .. }) => assert_eq!(op, operation),
            other => panic!("{operation}: {other:?}"),
        }
    }
    engine.shutdown().await;
}

/// A pause followed at once by a resume, whether or not the run reached the pause first,
/// leaves the run to complete with one resume journaled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_withdrawn_before_the_run_reached_it_changes_nothing() {
    keel_testkit::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("effects.jsonl");
    let down = dir.path().join("effects.jsonl.down");
    std::fs::write(&down, "").unwrap();
    let engine = pausing_engine(dir.path()).await;
    let input = PausingInput {
        log: log.to_string_lossy().into_owned(),
    };
    // Step 1 is retrying: the run is running, between attempts.
    engine
        .start::<PausingFlow>("withdrawn", input)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(30)).await;
    engine.pause("withdrawn").await.unwrap();
    let resumed = engine.resume("withdrawn").await.unwrap();
    std::fs::remove_file(&down).unwrap();
    let record = engine.wait("withdrawn").await.unwrap();
    // Either the pause took effect before the resume (then the resume took it up again) or
    // it was withdrawn in time; both end completed, with the resume journaled once.
    assert!(matches!(resumed.status, RunStatus::Running), "{resumed:?}");
    assert_eq!(record.status, RunStatus::Completed, "{:?}", record.error);
    let history = engine.history("withdrawn").await.unwrap();
    let resumes = history
        .entries
        .iter()
        .filter(|e| matches!(e.event, Event::RunResumed))
        .count();
    assert_eq!(resumes, 1);
    engine.shutdown().await;
}
