//! Crash loops: a run whose code aborts the whole process (`std::process::abort`, as a stack
//! overflow or an out-of-memory kill would end it) is driven into the same death at every
//! start; after 5 such loads it is suspended as poisoned, naming what died, and the process
//! lives again. Three places a run can kill the process from: a step (judged by the step's
//! attempts cut off in a row, from the journal), a branch of a fan-out whose other branch
//! parks meanwhile (which once cleared the count and let the loop go on forever), and the
//! body's own code outside any step (judged by the run's load count). A run asleep on a timer
//! through all those deaths is not poisoned. After the fix, `resume` takes the poisoned run
//! up and it completes.

use std::path::Path;
use std::time::Duration;

use keel::{
    Ctx, Engine, EngineError, RunStatus, Step, StepContext, StepError, Workflow, WorkflowError,
};
use keel_testkit::crash::{is_child, path_env, ChildSpec, Ending};
use keel_testkit::effects::{self, Action};
use serde::{Deserialize, Serialize};

const CHILD_TIMEOUT: Duration = Duration::from_secs(60);

/// Whether the marker file `<log>.abort` exists: the bug is still there.
fn buggy(log: &str) -> bool {
    Path::new(&format!("{log}.abort")).exists()
}

/// Records its effect, then (after `delay_ms`) aborts the process while the bug is there.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Aborting {
    log: String,
    delay_ms: u64,
}

impl Step for Aborting {
    const KIND: &'static str = "test.aborting";
    type Output = ();

    async fn execute(&self, ctx: &StepContext) -> Result<(), StepError> {
        effects::record(&self.log, Action::Do, ctx)?;
        tokio::time::sleep(Duration::from_millis(self.delay_ms)).await;
        if buggy(&self.log) {
            std::process::abort();
        }
        Ok(())
    }
}

/// Fails retryably until the marker is gone, asking for its next attempt 2 s later: its
/// branch parks while the bug is there (the sibling aborts 1 s into each load, long after
/// the park is journaled).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Parking {
    log: String,
}

impl Step for Parking {
    const KIND: &'static str = "test.parking";
    type Output = ();

    async fn execute(&self, _: &StepContext) -> Result<(), StepError> {
        if buggy(&self.log) {
            return Err(StepError::retryable("not yet").with_retry_after(Duration::from_secs(2)));
        }
        Ok(())
    }
}

/// Where the bug is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum Bug {
    /// In its one step.
    Step,
    /// In one branch of a fan-out; the other branch parks first.
    Branch,
    /// In the body's own code, before any step.
    Body,
    /// In its one step, 2 s into each attempt (time for the cancel to reach the log); the
    /// run is cancelled during the fifth.
    Cancelled,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Input {
    log: String,
    bug: Bug,
}

/// Dies where its input says, while the bug is there.
struct AbortingFlow;

impl Workflow for AbortingFlow {
    const NAME: &'static str = "test.aborting-flow";
    type Input = Input;
    type Output = ();

    async fn run(ctx: &mut Ctx, input: Input) -> Result<(), WorkflowError> {
        let aborting = |delay_ms| Aborting {
            log: input.log.clone(),
            delay_ms,
        };
        match input.bug {
            Bug::Step => ctx.step(aborting(0)).await,
            Bug::Branch => {
                // The parking branch parks at once; the other aborts 1 s into its attempt.
                let results = ctx
                    .join(
                        vec![
                            Either::Park(Parking {
                                log: input.log.clone(),
                            }),
                            Either::Abort(aborting(1_000)),
                        ],
                        2,
                    )
                    .await?;
                results.into_iter().collect::<Result<Vec<_>, _>>().map(drop)
            }
            Bug::Body => {
                if buggy(&input.log) {
                    std::process::abort();
                }
                ctx.step(aborting(0)).await
            }
            Bug::Cancelled => ctx.step(aborting(2_000)).await,
        }
    }
}

/// A branch of the fan-out: one of two step types, as one step kind.
#[derive(Clone, Debug, Serialize, Deserialize)]
enum Either {
    Park(Parking),
    Abort(Aborting),
}

impl Step for Either {
    const KIND: &'static str = "test.park-or-abort";
    type Output = ();

    async fn execute(&self, ctx: &StepContext) -> Result<(), StepError> {
        match self {
            Either::Park(step) => step.execute(ctx).await,
            Either::Abort(step) => step.execute(ctx).await,
        }
    }
}

/// Sleeps an hour.
struct Sleeper;

impl Workflow for Sleeper {
    const NAME: &'static str = "test.poison-sleeper";
    type Input = ();
    type Output = ();

    async fn run(ctx: &mut Ctx, _: ()) -> Result<(), WorkflowError> {
        ctx.sleep(Duration::from_secs(3600)).await
    }
}

async fn open(data: &Path) -> Engine {
    Engine::builder(data)
        .workflow::<AbortingFlow>()
        .workflow::<Sleeper>()
        .step::<Aborting>()
        .step::<Either>()
        .open()
        .await
        .unwrap()
}

fn bug_of(name: &str) -> Bug {
    match name {
        "step" => Bug::Step,
        "branch" => Bug::Branch,
        "body" => Bug::Body,
        "cancelled" => Bug::Cancelled,
        other => panic!("unknown bug {other}"),
    }
}

/// The child: start (idempotently) the sleeper, let it fall asleep, start the aborting run
/// and wait for it. It ends when the aborting run settles (poisoned), or dies with it.
fn child_main() {
    let dir = std::env::var("KEEL_DATA_DIR").expect("KEEL_DATA_DIR");
    let log = std::env::var("KEEL_EFFECT_LOG").expect("KEEL_EFFECT_LOG");
    let bug = bug_of(&std::env::var("KEEL_BUG").expect("KEEL_BUG"));
    keel_testkit::crash::runtime().block_on(async {
        let engine = open(Path::new(&dir)).await;
        engine.start::<Sleeper>("sleeper", ()).await.unwrap();
        keel_testkit::poll::until(&engine, "sleeper", |h| h.entries.len() == 1).await;
        let input = Input { log, bug };
        let aborting = engine.start::<AbortingFlow>("poison", input).await.unwrap();
        if std::env::var("KEEL_CANCEL").is_ok() {
            // Cancelled while its fifth attempt is in flight, which then kills the process.
            let started = |h: &keel::RunHistory| {
                h.entries
                    .iter()
                    .filter(|e| matches!(e.event, keel::Event::StepStarted { .. }))
                    .count()
                    == 5
            };
            keel_testkit::poll::until(&engine, "poison", started).await;
            engine.cancel("poison").await.unwrap();
        }
        let err = aborting.result().await.unwrap_err();
        // Poisoned, it is suspended; cancelled before, it compensates instead.
        let ends = match bug {
            Bug::Cancelled => RunStatus::Compensated,
            _ => RunStatus::Suspended,
        };
        assert!(
            matches!(&err, EngineError::RunEnded { status, .. } if *status == ends),
            "{err}"
        );
        engine.shutdown().await;
    });
}

/// Runs the child until it finishes, at most 8 times, the run cancelled in load `cancel_at`
/// (counted from 1); how each ended.
fn loads_until_finished(spec: &ChildSpec, cancel_at: Option<usize>) -> Vec<Ending> {
    let mut endings = Vec::new();
    for load in 1..=8 {
        let cancel = [("KEEL_CANCEL", String::new())];
        let extra: &[(&str, String)] = if cancel_at == Some(load) {
            &cancel
        } else {
            &[]
        };
        let ending = spec.run(extra, CHILD_TIMEOUT);
        endings.push(ending);
        if ending == Ending::Finished {
            break;
        }
    }
    endings
}

/// Runs the crash loop of `bug` to its end and checks it; returns the poisoned run's reason.
fn crash_loop(test_name: &str, bug: &str) -> String {
    keel_testkit::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let log = path_env(dir.path(), "effects.jsonl");
    std::fs::write(format!("{log}.abort"), "").unwrap();
    let spec = ChildSpec {
        test_name,
        env: vec![
            ("KEEL_DATA_DIR".into(), path_env(dir.path(), "data")),
            ("KEEL_EFFECT_LOG".into(), log.clone()),
            ("KEEL_BUG".into(), bug.into()),
        ],
    };
    let endings = loads_until_finished(&spec, None);
    assert_eq!(
        endings,
        [vec![Ending::Aborted; 5], vec![Ending::Finished]].concat(),
        "{bug}: five deaths, then the run is poisoned and the process lives"
    );
    let reason = keel_testkit::crash::runtime().block_on(async {
        let engine = open(&dir.path().join("data")).await;
        let poisoned = engine.status("poison").await.unwrap();
        assert_eq!(poisoned.status, RunStatus::Suspended);
        assert_eq!(
            engine.status("sleeper").await.unwrap().status,
            RunStatus::Running,
            "{bug}: the run asleep through every death is not poisoned"
        );
        std::fs::remove_file(format!("{log}.abort")).unwrap();
        engine.resume("poison").await.unwrap();
        let record = engine.wait("poison").await.unwrap();
        assert_eq!(
            record.status,
            RunStatus::Completed,
            "{bug}: {:?}",
            record.error
        );
        engine.shutdown().await;
        poisoned.error.unwrap_or_default()
    });
    assert!(reason.starts_with("poisoned: "), "{bug}: {reason}");
    reason
}

/// A step that aborts the process: five deaths during its attempts, then it is poisoned,
/// the reason naming the step; resumed after the fix, it runs once more and completes.
#[test]
fn a_step_that_kills_the_process_at_every_attempt_is_poisoned_after_five() {
    const NAME: &str = "a_step_that_kills_the_process_at_every_attempt_is_poisoned_after_five";
    if is_child() {
        return child_main();
    }
    let reason = crash_loop(NAME, "step");
    assert!(
        reason.contains("last 5 attempts of step #0 (test.aborting)"),
        "{reason}"
    );
}

/// A branch that aborts while its sibling parks on a backoff: the parking sibling must not
/// clear the evidence against it.
#[test]
fn a_branch_that_kills_the_process_while_its_sibling_parks_is_poisoned() {
    const NAME: &str = "a_branch_that_kills_the_process_while_its_sibling_parks_is_poisoned";
    if is_child() {
        return child_main();
    }
    let reason = crash_loop(NAME, "branch");
    assert!(
        reason.contains("last 5 attempts of step #2 (test.park-or-abort)"),
        "{reason}"
    );
}

/// Body code that aborts before any step: judged by the run's load count.
#[test]
fn a_body_that_kills_the_process_outside_its_steps_is_poisoned() {
    const NAME: &str = "a_body_that_kills_the_process_outside_its_steps_is_poisoned";
    if is_child() {
        return child_main();
    }
    let reason = crash_loop(NAME, "body");
    assert!(
        reason.contains("outside its steps") && reason.contains("last 5 loads"),
        "{reason}"
    );
}

/// A step that kills the process at every attempt, cancelled during its fifth: at the next
/// load the run is at the bound with the cancel standing, and it compensates as the cancel
/// asked instead of being suspended as poisoned (which took the cancel as done: a second
/// cancel changed nothing, and only a resume moved it on).
#[test]
fn a_poisoned_run_with_a_cancel_standing_compensates() {
    const NAME: &str = "a_poisoned_run_with_a_cancel_standing_compensates";
    if is_child() {
        return child_main();
    }
    keel_testkit::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let log = path_env(dir.path(), "effects.jsonl");
    std::fs::write(format!("{log}.abort"), "").unwrap();
    let spec = ChildSpec {
        test_name: NAME,
        env: vec![
            ("KEEL_DATA_DIR".into(), path_env(dir.path(), "data")),
            ("KEEL_EFFECT_LOG".into(), log.clone()),
            ("KEEL_BUG".into(), "cancelled".into()),
        ],
    };
    let endings = loads_until_finished(&spec, Some(5));
    assert_eq!(
        endings,
        [vec![Ending::Aborted; 5], vec![Ending::Finished]].concat(),
        "five deaths, the last one cancelled, then the run compensates and the process lives"
    );
    keel_testkit::crash::runtime().block_on(async {
        let engine = open(&dir.path().join("data")).await;
        let record = engine.status("poison").await.unwrap();
        assert_eq!(record.status, RunStatus::Compensated, "{:?}", record.error);
        let history = engine.history("poison").await.unwrap();
        assert!(
            history
                .entries
                .iter()
                .all(|e| !matches!(e.event, keel::Event::RunSuspended { .. })),
            "{:#?}",
            history.entries
        );
        engine.shutdown().await;
    });
}
