//! Child runs (`Ctx::child`, `Ctx::children`): each child is a run of its own with a
//! deterministic id; failing children compensate themselves without failing their siblings;
//! a compensating parent compensates its completed children (their own sagas) and leaves
//! the self-compensated ones alone; and SIGKILL at the child crash points and at random
//! moments never creates a child twice or loses one.

use std::path::Path;
use std::time::{Duration, Instant};

use keel::{child_id, Engine, OperationIndex, RunId, RunStatus};
use keel_engine::test_utilities::replay::{Op, RunState};
use keel_engine::{Event, RunHistory};
use keel_testkit::check::{check_run, effects_at, read_store_blocking, Expect, Tally};
use keel_testkit::crash::{is_child, path_env, ChildSpec, Ending};
use keel_testkit::flows::{ChildFlow, EffectStep, ParentFlow, ParentInput};
use keel_testkit::poll::CONDITION_TIMEOUT;
use rand::{Rng, SeedableRng};

const CHILD_TIMEOUT: Duration = Duration::from_secs(120);
const HOLD_MS: u64 = 3_600_000;

fn input(children: u32, fail: &[u32], hold_ms: u64, log: &Path) -> ParentInput {
    ParentInput {
        children,
        width: 8,
        fail: fail.to_vec(),
        hold_ms,
        jitter_ms: 5,
        log: log.to_string_lossy().into_owned(),
    }
}

async fn engine(dir: &Path) -> Engine {
    keel_testkit::store::builder(dir.join("data"))
        .workflow::<ParentFlow>()
        // The test's kills, not the run's code, end these loads: none may poison a run
        // (tests/crash_poison.rs tests poisoning).
        .poison_after_loads(u32::MAX)
        .workflow::<ChildFlow>()
        .step::<EffectStep>()
        .open()
        .await
        .unwrap()
}

/// The child run ids a parent's journal names, in operation order.
fn children_of(history: &RunHistory) -> Vec<RunId> {
    let state = RunState::from_entries(&history.entries).unwrap();
    state
        .ops
        .iter()
        .filter_map(|op| match op {
            Op::Child(op) => Some(op.child.clone()),
            _ => None,
        })
        .collect()
}

/// Checks parent `id` and every child against the journal and the effect log: `undone`
/// says whether the parent compensated (then every child must have left nothing).
async fn verify(engine: &Engine, id: &str, input: &ParentInput, log: &Path, undone: bool) -> Tally {
    let effects = effects_at(log);
    let parent = engine.history(id).await.unwrap();
    let children = children_of(&parent);
    assert_eq!(children.len() as u32, input.children, "children of {id}");
    let mut tally = Tally::default();
    for (n, child) in (1..).zip(&children) {
        let history = engine.history(child.as_str()).await.unwrap();
        assert_eq!(history.run.parent.as_ref().map(RunId::as_str), Some(id));
        let expect = if undone || input.fail.contains(&n) {
            Expect::Compensated
        } else {
            Expect::Completed((n * 100) * 10 + (n * 100 + 1) * 10)
        };
        check_run(&history, expect, &effects, &mut tally);
        // A child that compensated itself was not compensated again by its parent: one
        // compensation, no completion.
        if input.fail.contains(&n) {
            let starts = history
                .entries
                .iter()
                .filter(|e| matches!(e.event, Event::CompensationStarted { .. }))
                .count();
            assert_eq!(starts, 1, "child {child} compensated {starts} times");
        }
    }
    // No run exists that the parents do not know of.
    let runs = engine.list().await.unwrap();
    for run in &runs {
        if run.parent.as_ref().is_some_and(|p| p.as_str() == id) {
            assert!(children.contains(&run.id), "stray child {}", run.id);
        }
    }
    let expected_status = if undone {
        RunStatus::Compensated
    } else {
        RunStatus::Completed
    };
    assert_eq!(parent.run.status, expected_status, "{:?}", parent.run.error);
    if !undone {
        let output: keel_testkit::flows::ParentOutput =
            serde_json::from_value(parent.run.output.clone().unwrap()).unwrap();
        assert_eq!(output, ParentFlow::expected_output(input));
    }
    tally
}

/// Waits until every child of `id` has ended (the parent then holds on its timer), or the
/// parent is no longer running; panics after [`CONDITION_TIMEOUT`].
async fn children_ended(engine: &Engine, id: &str, children: usize) {
    let deadline = Instant::now() + CONDITION_TIMEOUT;
    loop {
        let history = engine.history(id).await.unwrap();
        let ended = history
            .entries
            .iter()
            .filter(|e| matches!(e.event, Event::ChildEnded { .. }))
            .count();
        if ended == children || history.run.status != RunStatus::Running {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{ended} of the {children} children of {id} ended within {CONDITION_TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Of fifty children three fail and compensate themselves while the parent completes with the
/// other 47; a parent held after the same children ended and then cancelled compensates the 47
/// completed children (both steps each) and leaves the self-compensated three alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_children_three_fail_then_cancelling_the_parent_compensates_the_other_47() {
    keel_testkit::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("effects.jsonl");
    let engine = engine(dir.path()).await;
    let failing = [7, 23, 41];

    // A parent that completes: its result lists the 47 and the 3.
    let done = input(50, &failing, 0, &log);
    let output = engine
        .start::<ParentFlow>("fleet", done.clone())
        .await
        .unwrap()
        .result()
        .await
        .unwrap();
    assert_eq!(output.completed.len(), 47);
    assert_eq!(output.failed, failing);
    verify(&engine, "fleet", &done, &log, false).await;
    assert_eq!(
        child_id(&RunId::new("fleet").unwrap(), OperationIndex(8)).as_str(),
        "fleet/8"
    );

    // The same, held after its children ended; then cancelled.
    let held = input(50, &failing, HOLD_MS, &log);
    engine
        .start::<ParentFlow>("held", held.clone())
        .await
        .unwrap();
    children_ended(&engine, "held", 50).await;
    let children = children_of(&engine.history("held").await.unwrap());
    let mut completed = 0;
    for child in &children {
        match engine.status(child.as_str()).await.unwrap().status {
            RunStatus::Completed => completed += 1,
            RunStatus::Compensated => {}
            other => panic!("child {child} is {other}"),
        }
    }
    assert_eq!(completed, 47);
    engine.cancel("held").await.unwrap();
    let record = engine.wait("held").await.unwrap();
    assert_eq!(record.status, RunStatus::Compensated, "{:?}", record.error);
    let tally = verify(&engine, "held", &held, &log, true).await;
    // 47 children undid both steps, 3 undid their first.
    assert_eq!(tally.undos, 47 * 2 + 3);
    engine.shutdown().await;
}

/// More parents than the engine drives at once (`runs_concurrent_max`), each awaiting its
/// children, with no parking: a parent gives its slot up while it awaits a child, so the
/// children run and every parent completes; cancelled, as many parents as slots compensate
/// their children. (Before: the parents held every slot and their children waited for one
/// for ever.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parents_filling_every_run_slot_still_get_their_children_run() {
    keel_testkit::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("effects.jsonl");
    let engine = keel_testkit::store::builder(dir.path().join("data"))
        .workflow::<ParentFlow>()
        .workflow::<ChildFlow>()
        .step::<EffectStep>()
        .runs_concurrent_max(2)
        .park_after(None)
        .open()
        .await
        .unwrap();
    let parents: Vec<String> = (0..4).map(|i| format!("parent-{i}")).collect();
    let mut inputs = Vec::new();
    for id in &parents {
        let mut parent = input(3, &[], 0, &log);
        parent.width = 2;
        engine
            .start::<ParentFlow>(id, parent.clone())
            .await
            .unwrap();
        inputs.push(parent);
    }
    for (id, parent) in parents.iter().zip(&inputs) {
        let record = tokio::time::timeout(CONDITION_TIMEOUT, engine.wait(id))
            .await
            .unwrap_or_else(|_| panic!("{id} never ended: its children got no run slot"))
            .unwrap();
        assert_eq!(record.status, RunStatus::Completed, "{:?}", record.error);
        verify(&engine, id, parent, &log, false).await;
    }

    // As many parents as slots, held after their children ended, then cancelled: each
    // compensates its children (their own sagas), which need slots too.
    let mut held = Vec::new();
    for i in 0..2 {
        let id = format!("held-{i}");
        let mut parent = input(3, &[], HOLD_MS, &log);
        parent.width = 2;
        engine
            .start::<ParentFlow>(&id, parent.clone())
            .await
            .unwrap();
        children_ended(&engine, &id, 3).await;
        held.push((id, parent));
    }
    for (id, _) in &held {
        engine.cancel(id).await.unwrap();
    }
    for (id, parent) in &held {
        let record = tokio::time::timeout(CONDITION_TIMEOUT, engine.wait(id))
            .await
            .unwrap_or_else(|_| panic!("{id} never compensated: its children got no run slot"))
            .unwrap();
        assert_eq!(record.status, RunStatus::Compensated, "{:?}", record.error);
        verify(&engine, id, parent, &log, true).await;
    }
    engine.shutdown().await;
}

/// An input the workflow's own check refuses is refused by the typed and the JSON start
/// alike, with the same message naming the field, and stores no run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_input_the_workflow_refuses_names_the_field_and_stores_nothing() {
    keel_testkit::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(dir.path()).await;
    let input = keel_testkit::flows::ChildInput {
        n: 0,
        fail: false,
        jitter_ms: 0,
        log: dir
            .path()
            .join("effects.jsonl")
            .to_string_lossy()
            .into_owned(),
    };
    let json = serde_json::to_value(&input).unwrap();
    let typed = engine
        .start::<ChildFlow>("zero", input)
        .await
        .err()
        .unwrap();
    let untyped = engine
        .start_json("test.child", "zero", json)
        .await
        .unwrap_err();
    for error in [typed, untyped] {
        assert_eq!(
            error.to_string(),
            "invalid input for workflow \"test.child\": field n: children are numbered from 1"
        );
    }
    assert!(engine.list().await.unwrap().is_empty());
    engine.shutdown().await;
}

/// A run under a child's id that is not that parent's child suspends the parent, naming
/// both. A caller can no longer make such a run (`/` is reserved for child runs'
/// ids: `tests/engine_run_ids.rs`), but a store from before that rule may hold one, so the
/// squatter is made here as such a store holds it: a run renamed in the closed store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_id_taken_by_another_run_suspends_the_parent_naming_it() {
    keel_testkit::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("effects.jsonl");
    // Operation 0 is the fork, so the first child is "squatted/1"; a run of the same
    // workflow and input exists there already, but not as a child of "squatted".
    let parent = input(2, &[], 0, &log);
    let squatter = keel_testkit::flows::ChildInput {
        n: 1,
        fail: false,
        jitter_ms: 5,
        log: parent.log.clone(),
    };
    {
        let engine = engine(dir.path()).await;
        let refused = engine
            .start::<ChildFlow>("squatted/1", squatter.clone())
            .await
            .expect_err("a caller cannot start a run under a child's id");
        assert!(
            matches!(refused, keel::EngineError::InvalidRunId { .. }),
            "{refused}"
        );
        engine
            .start::<ChildFlow>("squatter", squatter)
            .await
            .unwrap()
            .result()
            .await
            .unwrap();
        engine.shutdown().await;
    }
    assert!(keel_testkit::store::rename(&dir.path().join("data"), "squatter", "squatted/1") > 0);
    let engine = engine(dir.path()).await;
    let error = engine
        .start::<ParentFlow>("squatted", parent)
        .await
        .unwrap()
        .result()
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("suspended"), "{error}");
    assert!(error.contains("squatted/1"), "{error}");
    assert!(error.contains("as a child of run squatted"), "{error}");
    engine.shutdown().await;
}

fn child_main() {
    let dir = std::env::var("KEEL_DATA_DIR").expect("KEEL_DATA_DIR");
    let log = std::path::PathBuf::from(std::env::var("KEEL_EFFECT_LOG").expect("KEEL_EFFECT_LOG"));
    let runtime = keel_testkit::crash::runtime();
    runtime.block_on(async {
        let engine = engine(Path::new(&dir)).await;
        let done = engine
            .start::<ParentFlow>("done", input(20, &[4, 13], 0, &log))
            .await
            .unwrap();
        engine
            .start::<ParentFlow>("undone", input(20, &[9], HOLD_MS, &log))
            .await
            .unwrap();
        children_ended(&engine, "undone", 20).await;
        // Idempotent across restarts: a run already compensating or compensated is left.
        let _ = engine.cancel("undone").await;
        let _ = engine.wait("undone").await;
        let _ = done.result().await;
        engine.shutdown().await;
    });
}

fn spec<'a>(test_name: &'a str, dir: &Path) -> ChildSpec<'a> {
    ChildSpec {
        test_name,
        env: vec![
            ("KEEL_DATA_DIR".into(), dir.to_string_lossy().into_owned()),
            ("KEEL_EFFECT_LOG".into(), path_env(dir, "effects.jsonl")),
        ],
    }
}

/// Checks both parents and their children against the effect log: "done" completed, "undone"
/// compensated with every child.
fn verify_both(dir: &Path) -> Tally {
    let log = dir.join("effects.jsonl");
    read_store_blocking(&dir.join("data"), async |engine| {
        let mut tally = verify(engine, "done", &input(20, &[4, 13], 0, &log), &log, false).await;
        let undone = verify(
            engine,
            "undone",
            &input(20, &[9], HOLD_MS, &log),
            &log,
            true,
        )
        .await;
        tally.steps_rerun += undone.steps_rerun;
        tally.undos += undone.undos;
        tally
    })
}

/// SIGKILL at the child-run and saga crash points (at a seeded early hit), then at 30 seeded
/// random moments: each time, restarted until both parents finish, every child exists
/// once, the completed parent's children hold their effects, and the cancelled parent's
/// children left nothing.
#[test]
fn sigkill_while_parents_start_await_and_compensate_children() {
    const NAME: &str = "sigkill_while_parents_start_await_and_compensate_children";
    if is_child() {
        return child_main();
    }
    keel_testkit::init_tracing();
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    for point in [
        "child.after_started",
        "child.after_created",
        "child.after_ended",
        "saga.after_compensation_started",
        "saga.after_undo_started",
        "saga.after_undo",
        "saga.after_undo_recorded",
        "run.after_terminal",
    ] {
        let dir = tempfile::tempdir().unwrap();
        let spec = spec(NAME, dir.path());
        let skip = rng.gen_range(0..3u32);
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
        verify_both(dir.path());
    }
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(NAME, dir.path());
    spec.kill_repeatedly(
        30,
        || Duration::from_millis(rng.gen_range(30..300)),
        CHILD_TIMEOUT,
        || {
            verify_both(dir.path());
            keel_testkit::store::wipe(&dir.path().join("data"));
            std::fs::remove_file(dir.path().join("effects.jsonl")).unwrap();
        },
    );
    spec.run_until_finished(CHILD_TIMEOUT);
    verify_both(dir.path());
}
