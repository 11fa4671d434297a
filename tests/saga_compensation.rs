//! Saga compensation: undo order, fallbacks, cancellation, failed compensations and operator
//! calls, compensation from the journal alone, in-doubt steps, and kills during compensation.

use std::path::{Path, PathBuf};
use std::time::Duration;

use keel::{
    Compensation, Ctx, Engine, EngineError, Event, OperationIndex, RunHistory, RunStatus, Step,
    StepContext, StepError, Workflow, WorkflowError,
};
use keel_testkit::check::{check_run, effects_at, read_store_blocking, Expect, Tally};
use keel_testkit::crash::{is_child, path_env, ChildSpec, Ending};
use keel_testkit::effects::{self, Action};
use keel_testkit::flows::{EffectFlow, EffectFlowInput, EffectStep, Fault};
use keel_testkit::poll::until;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// One step of a [`Plan`].
#[derive(Clone, Debug, Serialize, Deserialize)]
enum Planned {
    Effect(Fault),
    /// An effect step that takes this long (so it can be in flight when cancelled).
    Slow(u64),
    /// A durable sleep.
    Sleep(u64),
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Plan {
    steps: Vec<Planned>,
    /// Catch a permanent step failure and run a fallback step (n + 100) instead.
    fallback: bool,
    log: String,
}

/// Runs the plan's steps in order; the output is the sum of the step outputs.
struct PlanFlow;

impl Workflow for PlanFlow {
    const NAME: &'static str = "test.plan";
    type Input = Plan;
    type Output = u32;

    async fn run(ctx: &mut Ctx, plan: Plan) -> Result<u32, WorkflowError> {
        let mut sum = 0;
        for (n, planned) in plan.steps.iter().enumerate() {
            let n = n as u32;
            let log = plan.log.clone();
            match planned {
                Planned::Sleep(ms) => ctx.sleep(Duration::from_millis(*ms)).await?,
                Planned::Slow(ms) => {
                    sum += ctx
                        .step(SlowStep {
                            n,
                            millis: *ms,
                            log,
                        })
                        .await?
                }
                Planned::Effect(fault) => match ctx
                    .step(EffectStep {
                        n,
                        fault: *fault,
                        log: log.clone(),
                        jitter_ms: 0,
                    })
                    .await
                {
                    Ok(v) => sum += v,
                    Err(WorkflowError::Step { .. }) if plan.fallback => {
                        sum += ctx
                            .step(EffectStep {
                                n: n + 100,
                                fault: Fault::None,
                                log,
                                jitter_ms: 0,
                            })
                            .await?;
                    }
                    Err(e) => return Err(e),
                },
            }
        }
        Ok(sum)
    }
}

/// An effect that takes `millis` to complete.
#[derive(Serialize, Deserialize)]
struct SlowStep {
    n: u32,
    millis: u64,
    log: String,
}

impl Step for SlowStep {
    const KIND: &'static str = "test.slow";
    type Output = u32;

    async fn execute(&self, ctx: &StepContext) -> Result<u32, StepError> {
        effects::record(&self.log, Action::Do, ctx)?;
        tokio::time::sleep(Duration::from_millis(self.millis)).await;
        Ok(self.n * 10)
    }

    async fn compensate(
        &self,
        ctx: &StepContext,
        _output: Option<u32>,
    ) -> Result<Compensation, StepError> {
        effects::record(&self.log, Action::Undo, ctx)?;
        Ok(Compensation::Done)
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    data: PathBuf,
    log: String,
}

fn fixture() -> Fixture {
    keel_testkit::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log = path_env(dir.path(), "effects.jsonl");
    Fixture {
        _dir: dir,
        data,
        log,
    }
}

async fn open(data: &Path) -> Engine {
    keel_testkit::store::builder(data)
        .workflow::<PlanFlow>()
        .step::<EffectStep>()
        .step::<SlowStep>()
        .open()
        .await
        .unwrap()
}

fn plan(log: &str, steps: Vec<Planned>) -> Plan {
    Plan {
        steps,
        fallback: false,
        log: log.into(),
    }
}

/// The steps undone for `run`, in the order the undos ran.
fn undo_order(log: &str, run: &str) -> Vec<u32> {
    effects::read(Path::new(log))
        .into_iter()
        .filter(|e| e.run == run && e.action == Action::Undo)
        .map(|e| e.step)
        .collect()
}

fn has(history: &RunHistory, predicate: impl Fn(&Event) -> bool) -> bool {
    history.entries.iter().any(|e| predicate(&e.event))
}

/// A 5-step workflow whose 4th step fails permanently undoes steps 3, 2, 1 in that order
/// (ground truth: the effect log), ends Compensated, and its error names the 4th step's failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fourth_step_failure_undoes_three_two_one() {
    let f = fixture();
    let engine = open(&f.data).await;
    let steps = vec![
        Planned::Effect(Fault::None),
        Planned::Effect(Fault::LostResponseOnce),
        Planned::Effect(Fault::None),
        Planned::Effect(Fault::Permanent),
        Planned::Effect(Fault::None),
    ];
    let run = engine
        .start::<PlanFlow>("five", plan(&f.log, steps))
        .await
        .unwrap();
    let err = run.result().await.unwrap_err();
    let record = engine.status("five").await.unwrap();
    assert_eq!(record.status, RunStatus::Compensated);
    let error = record.error.unwrap();
    assert!(
        error.contains("step #3") && error.contains("refuses for good"),
        "{error}"
    );
    assert!(
        matches!(
            err,
            EngineError::RunEnded {
                status: RunStatus::Compensated,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(
        undo_order(&f.log, "five"),
        vec![2, 1, 0],
        "newest first, failed step not undone"
    );
    let history = engine.history("five").await.unwrap();
    assert!(
        !has(&history, |e| matches!(
            e,
            Event::StepStarted {
                step: OperationIndex(4),
                ..
            }
        )),
        "step 5 never ran"
    );
    // The metrics' counters saw the three undos and the one retry (of the lost response; the
    // permanent failure is not retried).
    let counters = engine.counters();
    assert_eq!((counters.compensations, counters.retries), (3, 1));
    engine.shutdown().await;
}

/// Workflow code can catch a step failure and take another path: the run completes and nothing
/// is compensated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caught_failure_takes_a_fallback_path() {
    let f = fixture();
    let engine = open(&f.data).await;
    let steps = vec![
        Planned::Effect(Fault::None),
        Planned::Effect(Fault::Permanent),
        Planned::Effect(Fault::None),
    ];
    let run = engine
        .start::<PlanFlow>(
            "fallback",
            Plan {
                fallback: true,
                ..plan(&f.log, steps)
            },
        )
        .await
        .unwrap();
    // Step 0 gives 0, the fallback for step 1 (n = 101) gives 1010, step 2 gives 20.
    assert_eq!(run.result().await.unwrap(), 1010 + 20);
    assert!(undo_order(&f.log, "fallback").is_empty());
    engine.shutdown().await;
}

/// Cancelling a run whose step is in flight lets the step finish and be recorded, then undoes
/// it and every earlier step; later steps never run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_running_step_finishes_then_compensates() {
    let f = fixture();
    let engine = open(&f.data).await;
    let steps = vec![
        Planned::Effect(Fault::None),
        Planned::Slow(600),
        Planned::Effect(Fault::None),
    ];
    engine
        .start::<PlanFlow>("busy", plan(&f.log, steps))
        .await
        .unwrap();
    until(&engine, "busy", |h| {
        has(h, |e| {
            matches!(
                e,
                Event::StepStarted {
                    step: OperationIndex(1),
                    ..
                }
            )
        })
    })
    .await;
    let record = engine.cancel("busy").await.unwrap();
    assert!(
        matches!(record.status, RunStatus::Running | RunStatus::Compensating),
        "{:?}",
        record.status
    );
    let record = engine.wait("busy").await.unwrap();
    assert_eq!(record.status, RunStatus::Compensated);
    assert_eq!(record.error.as_deref(), Some("cancelled by operator"));
    let history = engine.history("busy").await.unwrap();
    assert!(
        has(&history, |e| matches!(
            e,
            Event::StepCompleted {
                step: OperationIndex(1),
                ..
            }
        )),
        "in-flight step recorded"
    );
    assert!(
        !has(&history, |e| matches!(
            e,
            Event::StepStarted {
                step: OperationIndex(2),
                ..
            }
        )),
        "no step after cancel"
    );
    assert_eq!(undo_order(&f.log, "busy"), vec![1, 0]);
    engine.shutdown().await;
}

/// A run asleep on a long durable timer reacts to cancellation within a second (measured on
/// the journal's own timestamps) and compensates; another run is not touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_sleeping_run_reacts_and_touches_no_other() {
    let f = fixture();
    let engine = open(&f.data).await;
    let sleeping = vec![
        Planned::Effect(Fault::None),
        Planned::Sleep(60_000),
        Planned::Effect(Fault::None),
    ];
    let short = vec![
        Planned::Effect(Fault::None),
        Planned::Sleep(300),
        Planned::Effect(Fault::None),
    ];
    engine
        .start::<PlanFlow>("sleeper", plan(&f.log, sleeping))
        .await
        .unwrap();
    let other = engine
        .start::<PlanFlow>("other", plan(&f.log, short))
        .await
        .unwrap();
    until(&engine, "sleeper", |h| {
        has(h, |e| matches!(e, Event::TimerSet { .. }))
    })
    .await;
    engine.cancel("sleeper").await.unwrap();
    let record = engine.wait("sleeper").await.unwrap();
    assert_eq!(record.status, RunStatus::Compensated);
    let history = engine.history("sleeper").await.unwrap();
    let at = |pred: fn(&Event) -> bool| {
        history
            .entries
            .iter()
            .find(|e| pred(&e.event))
            .unwrap()
            .at_ms
    };
    let reacted_ms = at(|e| matches!(e, Event::CompensationStarted { .. }))
        - at(|e| matches!(e, Event::CancelRequested));
    assert!(
        reacted_ms < 1000,
        "took {reacted_ms} ms to react to the cancel"
    );
    assert_eq!(undo_order(&f.log, "sleeper"), vec![0]);
    assert_eq!(other.result().await.unwrap(), 20);
    assert!(
        undo_order(&f.log, "other").is_empty(),
        "cancel touched another run"
    );
    engine.shutdown().await;
}

/// Cancelling a finished run is a clear error and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_finished_run_is_an_error() {
    let f = fixture();
    let engine = open(&f.data).await;
    let run = engine
        .start::<PlanFlow>("done", plan(&f.log, vec![Planned::Effect(Fault::None)]))
        .await
        .unwrap();
    run.result().await.unwrap();
    let before = engine.history("done").await.unwrap();
    let err = engine.cancel("done").await.unwrap_err();
    assert!(matches!(err, EngineError::InvalidState { .. }), "{err}");
    assert_eq!(err.to_string(), "run done is completed: cannot cancel");
    assert_eq!(engine.history("done").await.unwrap(), before);
    let err = engine.cancel("no-such-run").await.unwrap_err();
    assert!(matches!(err, EngineError::RunNotFound { .. }), "{err}");
    engine.shutdown().await;
}

/// Cancelling a run that was cancelled and has since compensated is an error too (the run is
/// finished), not a repeat of the first cancel: an operator who cancels a run another one
/// cancelled is told it has ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_after_a_cancelled_run_compensated_is_an_error() {
    let f = fixture();
    let engine = open(&f.data).await;
    let sleeping = vec![Planned::Effect(Fault::None), Planned::Sleep(60_000)];
    engine
        .start::<PlanFlow>("cancelled", plan(&f.log, sleeping))
        .await
        .unwrap();
    until(&engine, "cancelled", |h| {
        has(h, |e| matches!(e, Event::TimerSet { .. }))
    })
    .await;
    engine.cancel("cancelled").await.unwrap();
    let record = engine.wait("cancelled").await.unwrap();
    assert_eq!(record.status, RunStatus::Compensated);
    let before = engine.history("cancelled").await.unwrap();
    let err = engine.cancel("cancelled").await.unwrap_err();
    assert!(matches!(err, EngineError::InvalidState { .. }), "{err}");
    assert_eq!(
        err.to_string(),
        "run cancelled is compensated: cannot cancel"
    );
    assert_eq!(engine.history("cancelled").await.unwrap(), before);
    engine.shutdown().await;
}

/// A compensation that fails permanently leaves the run CompensationFailed, naming the step;
/// an operator retry (after the cause is fixed) compensates it; another such run can be
/// resolved instead, which is terminal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_compensation_then_operator_retry_or_resolve() {
    let f = fixture();
    std::fs::write(format!("{}.refuse-undo", f.log), b"").unwrap();
    let engine = open(&f.data).await;
    let steps = vec![
        Planned::Effect(Fault::UndoRefused),
        Planned::Effect(Fault::None),
        Planned::Effect(Fault::Permanent),
    ];
    for id in ["stuck-1", "stuck-2"] {
        engine
            .start::<PlanFlow>(id, plan(&f.log, steps.clone()))
            .await
            .unwrap();
        let record = engine.wait(id).await.unwrap();
        assert_eq!(record.status, RunStatus::CompensationFailed);
        let error = record.error.unwrap();
        assert!(
            error.contains("step #0") && error.contains("refused"),
            "{error}"
        );
        assert_eq!(
            undo_order(&f.log, id),
            vec![1],
            "step 1 undone, step 0 refused"
        );
    }
    std::fs::remove_file(format!("{}.refuse-undo", f.log)).unwrap();
    engine.retry_compensation("stuck-1").await.unwrap();
    assert_eq!(
        engine.wait("stuck-1").await.unwrap().status,
        RunStatus::Compensated
    );
    assert_eq!(
        undo_order(&f.log, "stuck-1"),
        vec![1, 0],
        "step 1 is not undone twice"
    );
    let record = engine.resolve("stuck-2", "removed by hand").await.unwrap();
    assert_eq!(record.status, RunStatus::Resolved);
    let err = engine.retry_compensation("stuck-2").await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "run stuck-2 is resolved: cannot retry compensation"
    );
    let history = engine.history("stuck-2").await.unwrap();
    assert!(has(
        &history,
        |e| matches!(e, Event::RunResolved { note } if note == "removed by hand")
    ));
    engine.shutdown().await;
}

fn child_env(dir: &Path) -> Vec<(String, String)> {
    vec![
        ("KEEL_DATA_DIR".into(), path_env(dir, "data")),
        ("KEEL_EFFECT_LOG".into(), path_env(dir, "effects.jsonl")),
    ]
}

/// Child for the in-doubt and journal-only tests: start one plan run and wait for it.
fn plan_child(steps: Vec<Planned>) {
    let data = std::env::var("KEEL_DATA_DIR").unwrap();
    let log = std::env::var("KEEL_EFFECT_LOG").unwrap();
    let runtime = keel_testkit::crash::runtime();
    runtime.block_on(async {
        let engine = open(Path::new(&data)).await;
        let run = engine
            .start::<PlanFlow>("child-run", plan(&log, steps))
            .await
            .unwrap();
        let _ = run.result().await;
        engine.shutdown().await;
    });
}

/// A crash after a step's side effect but before its outcome is recorded, then a permanent
/// failure of its retry: the compensation finds the effect by key and removes it.
#[test]
fn in_doubt_step_is_found_by_key_and_undone() {
    let steps = vec![
        Planned::Effect(Fault::None),
        Planned::Effect(Fault::PermanentOnRetry),
        Planned::Effect(Fault::None),
    ];
    if is_child() {
        return plan_child(steps);
    }
    let dir = tempfile::tempdir().unwrap();
    let spec = ChildSpec {
        test_name: "in_doubt_step_is_found_by_key_and_undone",
        env: child_env(dir.path()),
    };
    // The second `step.after_effect` is step 1's first attempt.
    let armed = [
        ("KEEL_CRASH_AT", "step.after_effect".to_string()),
        ("KEEL_CRASH_SKIP", "1".to_string()),
    ];
    assert_eq!(spec.run(&armed, Duration::from_secs(60)), Ending::Killed);
    assert_eq!(spec.run(&[], Duration::from_secs(60)), Ending::Finished);
    read_store_blocking(&dir.path().join("data"), async |engine| {
        let history = engine.history("child-run").await.unwrap();
        assert_eq!(history.run.status, RunStatus::Compensated);
        assert!(
            has(&history, |e| matches!(
                e,
                Event::StepCompensationStarted {
                    step: OperationIndex(1),
                    ..
                }
            )),
            "in-doubt step compensated"
        );
        let log = path_env(dir.path(), "effects.jsonl");
        assert_eq!(undo_order(&log, "child-run"), vec![1, 0]);
        let mut tally = Tally::default();
        check_run(
            &history,
            Expect::Compensated,
            &effects_at(Path::new(&log)),
            &mut tally,
        );
    });
}

/// Compensation is driven by the journal alone: a run killed once its compensation is durably
/// under way is finished by an engine that has the step kinds registered but not the workflow.
#[test]
fn compensation_resumes_from_the_journal_alone() {
    let steps = vec![
        Planned::Effect(Fault::None),
        Planned::Effect(Fault::None),
        Planned::Effect(Fault::Permanent),
    ];
    if is_child() {
        return plan_child(steps);
    }
    let dir = tempfile::tempdir().unwrap();
    let spec = ChildSpec {
        test_name: "compensation_resumes_from_the_journal_alone",
        env: child_env(dir.path()),
    };
    let armed = [("KEEL_CRASH_AT", "saga.after_undo_started".to_string())];
    assert_eq!(spec.run(&armed, Duration::from_secs(60)), Ending::Killed);
    let runtime = keel_testkit::crash::runtime();
    runtime.block_on(async {
        let engine = keel_testkit::store::builder(dir.path().join("data"))
            .step::<EffectStep>()
            .open()
            .await
            .unwrap();
        let record = engine.wait("child-run").await.unwrap();
        assert_eq!(record.status, RunStatus::Compensated);
        assert_eq!(
            undo_order(&path_env(dir.path(), "effects.jsonl"), "child-run"),
            vec![1, 0]
        );
        engine.shutdown().await;
    });
}

const SAGA_RUNS: u32 = 5;

fn saga_input(log: &str) -> EffectFlowInput {
    EffectFlowInput {
        steps: 6,
        fail_at: Some(5),
        sleep_ms: 5,
        log: log.into(),
    }
}

/// SIGKILL at seeded random moments, mostly during compensation (every run fails at its last
/// step), 25 times per seed over 4 seeds (100 kills): every run ends Compensated and nothing
/// it did is left.
#[test]
fn saga_kills_at_random_moments() {
    if is_child() {
        let data = std::env::var("KEEL_DATA_DIR").unwrap();
        let log = std::env::var("KEEL_EFFECT_LOG").unwrap();
        let runtime = keel_testkit::crash::runtime();
        return runtime.block_on(async {
            let engine = keel_testkit::store::builder(&data)
                .workflow::<EffectFlow>()
                // The test's kills, not the run's code, end these loads: none may poison a run
                // (tests/crash_poison.rs tests poisoning).
                .poison_after_loads(u32::MAX)
                .step::<EffectStep>()
                .open()
                .await
                .unwrap();
            let mut runs = Vec::new();
            for i in 0..SAGA_RUNS {
                runs.push(
                    engine
                        .start::<EffectFlow>(&format!("saga-{i}"), saga_input(&log))
                        .await
                        .unwrap(),
                );
            }
            for run in runs {
                let _ = run.result().await;
            }
            engine.shutdown().await;
        });
    }
    keel_testkit::init_tracing();
    for seed in 0..4u64 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1000 + seed);
        let dir = tempfile::tempdir().unwrap();
        let spec = ChildSpec {
            test_name: "saga_kills_at_random_moments",
            env: child_env(dir.path()),
        };
        spec.kill_repeatedly(
            25,
            || Duration::from_millis(rng.gen_range(1..120)),
            Duration::from_secs(60),
            || {
                keel_testkit::store::wipe(&dir.path().join("data"));
                let _ = std::fs::remove_file(dir.path().join("effects.jsonl"));
            },
        );
        spec.run_until_finished(Duration::from_secs(60));
        let log = path_env(dir.path(), "effects.jsonl");
        let effects = effects_at(Path::new(&log));
        read_store_blocking(&dir.path().join("data"), async |engine| {
            let mut tally = Tally::default();
            for i in 0..SAGA_RUNS {
                check_run(
                    &engine.history(&format!("saga-{i}")).await.unwrap(),
                    Expect::Compensated,
                    &effects,
                    &mut tally,
                );
            }
            assert!(tally.undos >= (SAGA_RUNS * 5) as usize);
        });
    }
}
