//! Parallel steps (`Ctx::join`): bounded width, results in list order, stable step numbers
//! and keys across restarts, compensation of every branch, limits; and SIGKILL of a child
//! process at random moments and at crash points during a 100-branch fan-out.

use std::path::Path;
use std::time::Duration;

use keel::{Engine, OperationIndex, RunStatus};
use keel_engine::limits::FAN_OUT_MAX;
use keel_engine::test_utilities::replay::{Op, RunState, StepOutcome};
use keel_engine::{Event, RunHistory};
use keel_testkit::check::{check_run, effects_at, read_store_blocking, Expect, Tally};
use keel_testkit::crash::{is_child, path_env, ChildSpec, Ending};
use keel_testkit::flows::{EffectStep, FanOutFlow, FanOutInput};
use rand::{Rng, SeedableRng};

const CHILD_TIMEOUT: Duration = Duration::from_secs(120);

fn input(branches: u32, width: u32, fail_at: Option<u32>, log: &Path) -> FanOutInput {
    FanOutInput {
        branches,
        width,
        fail_at,
        jitter_ms: 10,
        log: log.to_string_lossy().into_owned(),
    }
}

async fn engine(dir: &Path) -> Engine {
    keel_testkit::store::builder(dir.join("data"))
        .workflow::<FanOutFlow>()
        // The test's kills, not the run's code, end these loads: none may poison a run
        // (tests/crash_poison.rs tests poisoning).
        .poison_after_loads(u32::MAX)
        .step::<EffectStep>()
        .open()
        .await
        .unwrap()
}

/// The most branch steps in flight at once, read from the journal's order.
fn widest(history: &RunHistory) -> usize {
    let mut in_flight = std::collections::BTreeSet::new();
    let mut widest = 0;
    for entry in &history.entries {
        match &entry.event {
            Event::StepStarted { step, .. } => {
                in_flight.insert(*step);
            }
            Event::StepCompleted { step, .. } | Event::StepFailed { step, .. } => {
                in_flight.remove(step);
            }
            _ => {}
        }
        widest = widest.max(in_flight.len());
    }
    widest
}

/// Per operation: the step's number in the flow and its recorded output (None: no step).
fn folded(history: &RunHistory) -> Vec<Option<(u64, Option<serde_json::Value>)>> {
    let state = RunState::from_entries(&history.entries).unwrap();
    (0..state.ops.len())
        .map(|i| {
            state.step(OperationIndex(i as u32)).map(|op| {
                let output = match &op.outcome {
                    StepOutcome::Completed { output } => Some(output.clone()),
                    _ => None,
                };
                (op.argument["n"].as_u64().unwrap(), output)
            })
        })
        .collect()
}

/// A 24-branch fan-out 4 wide never has more than 4 branches in flight, gives branch n
/// operation n + 1 whatever order they end in, and returns the results in list order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn branches_run_at_most_width_at_once_and_join_in_list_order() {
    keel_testkit::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("effects.jsonl");
    let engine = engine(dir.path()).await;
    let input = input(24, 4, None, &log);
    let output = engine
        .start::<FanOutFlow>("wide", input.clone())
        .await
        .unwrap()
        .result()
        .await
        .unwrap();
    assert_eq!(output, FanOutFlow::expected_output(&input));
    let history = engine.history("wide").await.unwrap();
    check_run(
        &history,
        Expect::Completed(output),
        &effects_at(&log),
        &mut Tally::default(),
    );
    assert_eq!(widest(&history), 4, "branches in flight at once");
    // Operation 1 is the fork; branch n is operation n + 1, whatever order they ended in.
    let state = RunState::from_entries(&history.entries).unwrap();
    assert!(matches!(state.ops[1], Op::Fork { branches: 24, .. }));
    let ops = folded(&history);
    for n in 1..=24u64 {
        assert_eq!(
            ops[n as usize + 1],
            Some((n, Some(serde_json::json!(n * 10))))
        );
    }
    let completed: Vec<u32> = history
        .entries
        .iter()
        .filter_map(|e| match e.event {
            Event::StepCompleted { step, .. } => Some(step.0),
            _ => None,
        })
        .collect();
    assert!(
        completed.windows(2).any(|w| w[0] > w[1]),
        "branches never finished out of list order: {completed:?}"
    );
    engine.shutdown().await;
}

/// A branch that fails permanently lets every other branch finish before compensation
/// begins, and then every step that took effect (step 0 and the 11 other branches) is undone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_branch_lets_the_others_finish_then_every_branch_is_undone() {
    keel_testkit::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("effects.jsonl");
    let engine = engine(dir.path()).await;
    let result = engine
        .start::<FanOutFlow>("failing", input(12, 3, Some(5), &log))
        .await
        .unwrap()
        .result()
        .await;
    assert!(result.is_err());
    let history = engine.history("failing").await.unwrap();
    assert_eq!(history.run.status, RunStatus::Compensated);
    let mut tally = Tally::default();
    check_run(&history, Expect::Compensated, &effects_at(&log), &mut tally);
    // Step 0 and the 11 branches that succeeded were done and undone.
    assert_eq!(tally.undos, 12);
    let before_compensation: Vec<&Event> = history
        .entries
        .iter()
        .map(|e| &e.event)
        .take_while(|e| !matches!(e, Event::CompensationStarted { .. }))
        .collect();
    let completed = before_compensation
        .iter()
        .filter(|e| matches!(e, Event::StepCompleted { .. }))
        .count();
    assert_eq!(
        completed, 12,
        "every other branch finished before compensation"
    );
    engine.shutdown().await;
}

/// A fan-out of width 0, or of more branches than `FAN_OUT_MAX`, suspends the run with an
/// error naming the bound, and journals nothing of the fan-out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn width_zero_and_too_many_branches_suspend_the_run_naming_the_bound() {
    keel_testkit::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("effects.jsonl");
    let engine = engine(dir.path()).await;
    for (id, input, expected) in [
        ("zero", input(3, 0, None, &log), "width 0".to_string()),
        (
            "huge",
            input(FAN_OUT_MAX + 1, 8, None, &log),
            format!(
                "limit reached: fan-out of {} test.effect steps (limit {FAN_OUT_MAX})",
                FAN_OUT_MAX + 1
            ),
        ),
    ] {
        let handle = engine.start::<FanOutFlow>(id, input).await.unwrap();
        let error = handle.result().await.unwrap_err().to_string();
        assert!(error.contains(&expected), "{id}: {error}");
        let history = engine.history(id).await.unwrap();
        assert_eq!(history.run.status, RunStatus::Suspended, "{id}");
        // Nothing of the fan-out was journaled: only the first step.
        let state = RunState::from_entries(&history.entries).unwrap();
        assert_eq!(state.ops.len(), 1, "{id}");
    }
    engine.shutdown().await;
}

/// The child: one completing and one compensating 100-branch fan-out, 8 wide.
fn child_main() {
    let dir = std::env::var("KEEL_DATA_DIR").expect("KEEL_DATA_DIR");
    let log = std::path::PathBuf::from(std::env::var("KEEL_EFFECT_LOG").expect("KEEL_EFFECT_LOG"));
    let runtime = keel_testkit::crash::runtime();
    runtime.block_on(async {
        let engine = engine(Path::new(&dir)).await;
        let mut runs = Vec::new();
        for (id, fail_at) in RUNS {
            let handle = engine
                .start::<FanOutFlow>(id, input(100, 8, fail_at, &log))
                .await
                .unwrap();
            runs.push(handle);
        }
        for run in runs {
            let _ = run.result().await;
        }
        engine.shutdown().await;
    });
}

const RUNS: [(&str, Option<u32>); 2] = [("fan-ok", None), ("fan-undone", Some(77))];

fn spec<'a>(test_name: &'a str, dir: &Path) -> ChildSpec<'a> {
    ChildSpec {
        test_name,
        env: vec![
            ("KEEL_DATA_DIR".into(), dir.to_string_lossy().into_owned()),
            ("KEEL_EFFECT_LOG".into(), path_env(dir, "effects.jsonl")),
        ],
    }
}

/// Checks both runs against the effect log, and the completed run's folded journal against
/// the one an uninterrupted run produces.
fn verify(dir: &Path) -> Tally {
    let log = dir.join("effects.jsonl");
    let effects = effects_at(&log);
    read_store_blocking(&dir.join("data"), async |engine| {
        let mut tally = Tally::default();
        for (id, fail_at) in RUNS {
            let history = engine.history(id).await.unwrap();
            let expect = match fail_at {
                Some(_) => Expect::Compensated,
                None => Expect::Completed(FanOutFlow::expected_output(&input(100, 8, None, &log))),
            };
            check_run(&history, expect, &effects, &mut tally);
            if fail_at.is_none() {
                let mut expected = vec![Some((0, Some(serde_json::json!(0)))), None];
                expected.extend((1..=101u64).map(|n| Some((n, Some(serde_json::json!(n * 10))))));
                assert_eq!(folded(&history), expected, "the journal folds differently");
                assert!(widest(&history) <= 8);
            }
        }
        tally
    })
}

/// SIGKILL at seeded random moments, 30 times per scenario over 4 scenarios (120 kills),
/// then restarts until the runs finish: no completed branch step runs again, none is lost,
/// the compensated run leaves nothing, and the journal folds to the same operations.
#[test]
fn sigkill_at_random_moments_during_a_100_branch_fan_out() {
    const NAME: &str = "sigkill_at_random_moments_during_a_100_branch_fan_out";
    if is_child() {
        return child_main();
    }
    keel_testkit::init_tracing();
    let mut rerun = 0;
    for seed in 0..4u64 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let dir = tempfile::tempdir().unwrap();
        let spec = spec(NAME, dir.path());
        spec.kill_repeatedly(
            30,
            || Duration::from_millis(rng.gen_range(20..200)),
            CHILD_TIMEOUT,
            || {
                verify(dir.path());
                keel_testkit::store::wipe(&dir.path().join("data"));
                std::fs::remove_file(dir.path().join("effects.jsonl")).unwrap();
            },
        );
        spec.run_until_finished(CHILD_TIMEOUT);
        rerun += verify(dir.path()).steps_rerun;
    }
    assert!(rerun > 0, "no branch was ever cut off mid-step");
}

/// SIGKILL at the step and saga crash points, at a seeded hit among the 100 branches.
#[test]
fn sigkill_at_crash_points_inside_the_fan_out() {
    const NAME: &str = "sigkill_at_crash_points_inside_the_fan_out";
    if is_child() {
        return child_main();
    }
    keel_testkit::init_tracing();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for point in [
        "step.before_started",
        "step.after_started",
        "step.after_effect",
        "step.after_outcome",
        "step.after_failure",
        "commit.before_sync",
        "saga.after_undo_started",
        "saga.after_undo",
        "saga.after_undo_recorded",
    ] {
        let dir = tempfile::tempdir().unwrap();
        let spec = spec(NAME, dir.path());
        let skip = rng.gen_range(0..20u32);
        let env = [
            ("KEEL_CRASH_AT", point.to_string()),
            ("KEEL_CRASH_SKIP", skip.to_string()),
        ];
        assert_eq!(
            spec.run(&env, CHILD_TIMEOUT),
            Ending::Killed,
            "{point} (skip {skip}) was never reached"
        );
        spec.run_until_finished(CHILD_TIMEOUT);
        verify(dir.path());
    }
}

/// Input of [`SelectFlow`].
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct SelectInput {
    /// Whether every branch fails.
    fail_all: bool,
    log: String,
}

/// One step, then a select among four (one fails permanently, one loses its first
/// response); output: the winner's output.
struct SelectFlow;

impl keel::Workflow for SelectFlow {
    const NAME: &'static str = "test.select";
    type Input = SelectInput;
    type Output = u32;

    async fn run(ctx: &mut keel::Ctx, input: SelectInput) -> Result<u32, keel::WorkflowError> {
        use keel_testkit::flows::Fault;
        let effect = |n: u32, fault: Fault| EffectStep {
            n,
            fault: if input.fail_all && n > 0 {
                Fault::Permanent
            } else {
                fault
            },
            log: input.log.clone(),
            jitter_ms: 60,
        };
        ctx.step(effect(0, Fault::None)).await?;
        let (_, output) = ctx
            .select(vec![
                effect(1, Fault::None),
                effect(2, Fault::Permanent),
                effect(3, Fault::None),
                effect(4, Fault::LostResponseOnce),
            ])
            .await?;
        Ok(output)
    }
}

/// `select` returns the output of the branch journaled as the winner, which is never the
/// failing one, and undoes every losing branch that took effect; when no branch succeeds, the
/// body gets every error and the run compensates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn select_returns_the_first_success_and_undoes_every_loser_that_took_effect() {
    keel_testkit::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("effects.jsonl");
    let engine = keel_testkit::store::builder(dir.path().join("data"))
        .workflow::<SelectFlow>()
        .step::<EffectStep>()
        .open()
        .await
        .unwrap();
    let mut winners = std::collections::BTreeSet::new();
    for round in 0..6 {
        let id = format!("select-{round}");
        let input = SelectInput {
            fail_all: false,
            log: log.to_string_lossy().into_owned(),
        };
        let output = engine
            .start::<SelectFlow>(&id, input)
            .await
            .unwrap()
            .result()
            .await
            .unwrap();
        let history = engine.history(&id).await.unwrap();
        let effects = effects_at(&log);
        check_run(
            &history,
            Expect::Completed(output),
            &effects,
            &mut Tally::default(),
        );
        // The journaled winner is the one whose output the body got (branch i is step i + 2).
        let selected = history
            .entries
            .iter()
            .find_map(|e| match e.event {
                Event::ForkSelected { branch, .. } => Some(branch),
                _ => None,
            })
            .expect("a winner is journaled");
        assert_eq!(output, (selected + 1) * 10);
        winners.insert(selected);
        // Every loser that took effect was undone; the winner and step 0 were not.
        let mine: Vec<_> = effects.iter().filter(|e| e.run == id).collect();
        for step in 2..6u32 {
            let done = mine
                .iter()
                .any(|e| e.step == step && e.action == keel_testkit::effects::Action::Do);
            let undone = mine
                .iter()
                .any(|e| e.step == step && e.action == keel_testkit::effects::Action::Undo);
            if step == selected + 2 {
                assert!(done && !undone, "{id}: the winner");
            } else {
                assert_eq!(done, undone, "{id}: loser step {step}");
            }
        }
    }
    assert!(!winners.contains(&1), "the failing branch never wins");

    // No branch succeeds: the body gets every error, and the run compensates step 0.
    let input = SelectInput {
        fail_all: true,
        log: log.to_string_lossy().into_owned(),
    };
    let error = engine
        .start::<SelectFlow>("select-none", input)
        .await
        .unwrap()
        .result()
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("no branch of select #1 succeeded"),
        "{error}"
    );
    let history = engine.history("select-none").await.unwrap();
    check_run(
        &history,
        Expect::Compensated,
        &effects_at(&log),
        &mut Tally::default(),
    );
    engine.shutdown().await;
}
