//! Journals stay readable: the JSON Lines journals under `tests/fixtures/` parse into
//! `keel::Entry` and serialise back to the very same lines (so a format change is caught),
//! fold into the expected run state, and, cut short and loaded into a store, are taken up by
//! the engine, which writes exactly the entries the fixture goes on with.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use keel::{
    Attempt, Compensation, Ctx, Engine, Entry, ErrorClass, ErrorRecord, Event, JournalIndex,
    OperationIndex, RunId, RunRecord, RunStatus, Step, StepContext, StepError, Workflow,
    WorkflowError,
};
use keel_engine::test_utilities::raw;
use keel_engine::test_utilities::replay::{
    step_action, undo_action, undo_input, CompensationAction, CompensationState, Op, RunState,
    StepAction, StepOp, StepOutcome,
};
use serde::{Deserialize, Serialize};
use serde_json::json;

/// The path of a fixture under `tests/fixtures/`.
fn fixture_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// Parses every line of a fixture into an entry, and checks that each entry serialises back
/// to exactly its line: the stored format and the fixtures agree byte for byte.
fn load_fixture(name: &str) -> Vec<Entry> {
    let path = fixture_path(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    assert!(text.ends_with('\n'), "{name}: ends with a newline");
    text.lines()
        .enumerate()
        .map(|(i, line)| {
            let entry: Entry = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{name}:{}: does not parse: {e}\n{line}", i + 1));
            let again = serde_json::to_string(&entry).unwrap();
            assert_eq!(again, line, "{name}:{}: re-serialises differently", i + 1);
            entry
        })
        .collect()
}

fn completed(output: serde_json::Value) -> StepOutcome {
    StepOutcome::Completed { output }
}

/// `completed_run.jsonl` (a step, a step retried once after throttling, a timer, a step, then
/// completion) parses, round-trips byte for byte, and folds into four finished operations
/// whose recorded outputs replay, with no compensation.
#[test]
fn completed_fixture_folds_to_its_state() {
    let entries = load_fixture("completed_run.jsonl");
    assert_eq!(entries.len(), 11);
    assert_eq!(
        entries.last().unwrap().event,
        Event::RunCompleted { output: json!(30) }
    );
    let state = RunState::from_entries(&entries).unwrap();
    assert_eq!(state.len, 11);
    assert_eq!(
        state.ops,
        vec![
            Op::Step(StepOp {
                kind: "fixture.add".into(),
                argument: json!({"n": 1}),
                attempt: Attempt(1),
                compensable: true,
                cut_off: 0,
                first_started_at_ms: 1_700_000_000_000,
                round_base: 0,
                last_at_ms: 1_700_000_000_012,
                outcome: completed(json!(10)),
            }),
            Op::Step(StepOp {
                kind: "fixture.add".into(),
                argument: json!({"n": 2}),
                attempt: Attempt(2),
                compensable: true,
                cut_off: 0,
                first_started_at_ms: 1_700_000_000_013,
                round_base: 0,
                last_at_ms: 1_700_000_000_420,
                outcome: completed(json!(20)),
            }),
            Op::Timer {
                wake_at_ms: 1_700_000_001_421,
                fired: true,
            },
            Op::Step(StepOp {
                kind: "fixture.notify".into(),
                argument: json!({"to": "ops", "message": "total 30"}),
                attempt: Attempt(1),
                compensable: true,
                cut_off: 0,
                first_started_at_ms: 1_700_000_001_423,
                round_base: 0,
                last_at_ms: 1_700_000_001_440,
                outcome: completed(json!("sent")),
            }),
        ]
    );
    assert!(!state.compensating);
    assert!(!state.cancel_requested);
    assert!(state.undo.is_empty(), "{:?}", state.undo);
    for (i, output) in [(0, json!(10)), (1, json!(20)), (3, json!("sent"))] {
        assert_eq!(
            step_action(state.step(OperationIndex(i))),
            StepAction::Replay(output)
        );
    }
    // `undo_action` is consulted only once a run compensates; for this completed run it
    // shows where a compensation would begin: the newest step, first attempt.
    assert_eq!(
        undo_action(&state),
        CompensationAction::Compensate {
            step: OperationIndex(3),
            attempt: Attempt(1),
            round_attempts: 0,
            not_before_ms: None,
        }
    );
}

/// `compensated_run.jsonl` (two steps, a third that fails permanently on its retry, then the
/// saga: the in-doubt third step undone, the second skipped, the first undone after one
/// failed undo attempt) parses, round-trips byte for byte, and folds into a state whose
/// compensation is finished.
#[test]
fn compensated_fixture_folds_to_its_state() {
    let entries = load_fixture("compensated_run.jsonl");
    assert_eq!(entries.len(), 18);
    assert_eq!(entries.last().unwrap().event, Event::RunCompensated);
    let state = RunState::from_entries(&entries).unwrap();
    assert_eq!(state.len, 18);
    assert_eq!(state.ops.len(), 3);
    assert_eq!(
        state.ops[2],
        Op::Step(StepOp {
            kind: "fixture.add".into(),
            argument: json!({"n": 2}),
            attempt: Attempt(2),
            compensable: true,
            cut_off: 0,
            first_started_at_ms: 1_700_000_100_031,
            round_base: 0,
            last_at_ms: 1_700_000_100_170,
            outcome: StepOutcome::FailedPermanently {
                error: ErrorRecord {
                    class: ErrorClass::Permanent,
                    message: "quota exceeded".into(),
                },
            },
        })
    );
    assert_eq!(
        state.step(OperationIndex(0)).unwrap().outcome,
        completed(json!(10))
    );
    assert_eq!(
        state.step(OperationIndex(1)).unwrap().outcome,
        completed(json!("sent"))
    );
    assert_eq!(
        undo_input(&state, OperationIndex(2)),
        Some(None),
        "a permanent failure after a retry is in doubt: undone without an output"
    );
    assert_eq!(
        undo_input(&state, OperationIndex(0)),
        Some(Some(&json!(10)))
    );
    assert!(state.compensating);
    assert_eq!(
        state.undo,
        BTreeMap::from([
            (OperationIndex(0), CompensationState::Done),
            (OperationIndex(1), CompensationState::Skipped),
            (OperationIndex(2), CompensationState::Done),
        ])
    );
    assert_eq!(undo_action(&state), CompensationAction::Finished);
    assert_eq!(
        step_action(state.step(OperationIndex(2))),
        StepAction::Fail(ErrorRecord {
            class: ErrorClass::Permanent,
            message: "quota exceeded".into(),
        })
    );
}

/// What the fixture steps ran, in this process: (run, what, operation number, attempt).
static FIXTURE_EFFECTS: Mutex<Vec<(String, &'static str, u32, u32)>> = Mutex::new(Vec::new());

fn fixture_effect(ctx: &StepContext, what: &'static str) {
    FIXTURE_EFFECTS.lock().unwrap().push((
        ctx.run_id().to_string(),
        what,
        ctx.step().0,
        ctx.attempt().0,
    ));
}

fn fixture_effects_of(run: &str) -> Vec<(&'static str, u32, u32)> {
    FIXTURE_EFFECTS
        .lock()
        .unwrap()
        .iter()
        .filter(|(r, ..)| r == run)
        .map(|(_, what, step, attempt)| (*what, *step, *attempt))
        .collect()
}

/// The fixtures' `fixture.add`: outputs `n * 10`; undone by recording the undo.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Add {
    n: u32,
}

impl Step for Add {
    const KIND: &'static str = "fixture.add";
    type Output = u32;

    async fn execute(&self, ctx: &StepContext) -> Result<u32, StepError> {
        fixture_effect(ctx, "add");
        Ok(self.n * 10)
    }

    async fn compensate(
        &self,
        ctx: &StepContext,
        _output: Option<u32>,
    ) -> Result<Compensation, StepError> {
        fixture_effect(ctx, "undo add");
        Ok(Compensation::Done)
    }
}

/// The fixtures' `fixture.notify`: outputs `"sent"`; has no compensation.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Notify {
    to: String,
    message: String,
}

impl Step for Notify {
    const KIND: &'static str = "fixture.notify";
    type Output = String;

    async fn execute(&self, ctx: &StepContext) -> Result<String, StepError> {
        fixture_effect(ctx, "notify");
        Ok("sent".into())
    }
}

/// The code that wrote `completed_run.jsonl`.
struct FixtureFlow;

impl Workflow for FixtureFlow {
    const NAME: &'static str = "fixture.flow";
    type Input = u64;
    type Output = u32;

    async fn run(ctx: &mut Ctx, sleep_ms: u64) -> Result<u32, WorkflowError> {
        let a = ctx.step(Add { n: 1 }).await?;
        let b = ctx.step(Add { n: 2 }).await?;
        ctx.sleep(Duration::from_millis(sleep_ms)).await?;
        ctx.step(Notify {
            to: "ops".into(),
            message: format!("total {}", a + b),
        })
        .await?;
        Ok(a + b)
    }
}

/// Writes a run record and `entries` as its journal into a fresh, closed store at `data`,
/// as the engine would have left them.
fn install_run(data: &Path, record: &RunRecord, entries: &[Entry]) {
    let db = keel_testkit::raw::open(data);
    db.insert(
        raw::run_key_of(&record.id),
        serde_json::to_vec(record).unwrap(),
    )
    .unwrap();
    for (i, entry) in entries.iter().enumerate() {
        db.insert(
            raw::journal_key_of(&record.id, JournalIndex(i as u32)),
            serde_json::to_vec(entry).unwrap(),
        )
        .unwrap();
    }
    db.flush().unwrap();
}

fn record_of(id: &str, workflow: &str, input: serde_json::Value, status: RunStatus) -> RunRecord {
    RunRecord {
        id: RunId::new(id).unwrap(),
        workflow: workflow.into(),
        version: 1,
        input,
        status,
        created_at_ms: 1_700_000_000_000,
        updated_at_ms: 1_700_000_000_000,
        finished_at_ms: None,
        output: None,
        error: None,
        parent: None,
        rerun_of: None,
    }
}

fn events(entries: &[Entry]) -> Vec<Event> {
    entries.iter().map(|e| e.event.clone()).collect()
}

/// `completed_run.jsonl` cut after its timer was set, stored as a running run, is taken up by
/// the engine: the two recorded steps replay without running, the past-due timer fires, the
/// last step runs once, and the entries the engine writes are exactly the fixture's remaining
/// events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_takes_up_the_completed_fixture_cut_short() {
    const ID: &str = "fixture-completed";
    const CUT: usize = 7;
    let fixture = load_fixture("completed_run.jsonl");
    assert!(matches!(fixture[CUT - 1].event, Event::TimerSet { .. }));
    let dir = tempfile::tempdir().unwrap();
    let record = record_of(ID, FixtureFlow::NAME, json!(1000), RunStatus::Running);
    install_run(dir.path(), &record, &fixture[..CUT]);

    let engine = keel_testkit::open_engine(|| {
        Engine::builder(dir.path())
            .workflow::<FixtureFlow>()
            .step::<Add>()
            .step::<Notify>()
    })
    .await;
    let settled = engine.wait(ID).await.unwrap();
    assert_eq!(settled.status, RunStatus::Completed, "{:?}", settled.error);
    assert_eq!(settled.output, Some(json!(30)));
    let history = engine.history(ID).await.unwrap();
    assert_eq!(
        history.entries[..CUT],
        fixture[..CUT],
        "the stored part is kept"
    );
    assert_eq!(events(&history.entries[CUT..]), events(&fixture[CUT..]));
    assert_eq!(
        fixture_effects_of(ID),
        vec![("notify", 3, 1)],
        "only the step after the timer ran"
    );
    engine.shutdown().await;
}

/// `compensated_run.jsonl` cut after the first undo attempt of step 0 failed, stored as a
/// compensating run, is taken up by the engine from the journal alone (no workflow
/// registered): it undoes step 0 at attempt 2 and writes exactly the fixture's remaining
/// events; nothing else runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_takes_up_the_compensated_fixture_cut_short() {
    const ID: &str = "fixture-compensated";
    const CUT: usize = 15;
    let fixture = load_fixture("compensated_run.jsonl");
    assert!(matches!(
        fixture[CUT - 1].event,
        Event::StepCompensationFailed { .. }
    ));
    let dir = tempfile::tempdir().unwrap();
    let mut record = record_of(ID, "fixture.saga", json!(null), RunStatus::Compensating);
    record.error = Some("step #2 (fixture.add) failed: quota exceeded".into());
    install_run(dir.path(), &record, &fixture[..CUT]);

    let engine =
        keel_testkit::open_engine(|| Engine::builder(dir.path()).step::<Add>().step::<Notify>())
            .await;
    let settled = engine.wait(ID).await.unwrap();
    assert_eq!(
        settled.status,
        RunStatus::Compensated,
        "{:?}",
        settled.error
    );
    let history = engine.history(ID).await.unwrap();
    assert_eq!(
        history.entries[..CUT],
        fixture[..CUT],
        "the stored part is kept"
    );
    assert_eq!(events(&history.entries[CUT..]), events(&fixture[CUT..]));
    assert_eq!(fixture_effects_of(ID), vec![("undo add", 0, 2)]);
    engine.shutdown().await;
}
