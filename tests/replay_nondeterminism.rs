//! Replay is checked, and journals stay readable.
//!
//! - Non-determinism: a run journaled by one version of a workflow and replayed by code that
//!   asks for another step kind, another argument, a timer instead of a step, or fewer
//!   operations stops `Suspended` with an error naming what the journal holds and what the code
//!   asked for, and runs nothing; after the code is fixed, an operator resume completes it.
//! - Fixtures: the JSON Lines journals under `tests/fixtures/` parse into `keel::Entry` and
//!   serialise back to the very same lines (so a format change is caught), fold into the
//!   expected run state, and, cut short and loaded into a store, are taken up by the engine,
//!   which writes exactly the entries the fixture goes on with.
//! - A small builder of synthetic journals for cases no fixture covers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use keel::{
    Attempt, Ctx, Engine, Entry, ErrorClass, ErrorRecord, Event, JournalIndex, RunId, RunRecord,
    RunStatus, Step, StepContext, StepError, StepIndex, Undo, Workflow, WorkflowError,
};
use keel_engine::test_utilities::raw;
use keel_engine::test_utilities::replay::{
    step_action, undo_action, undo_input, Op, RunState, StepAction, StepOp, StepOutcome,
    UndoAction, UndoState,
};
use keel_testkit::effects::{self, Action, Effect};
use keel_testkit::poll::until;
use serde::{Deserialize, Serialize};
use serde_json::json;

// ---------------------------------------------------------------------------------------------
// Non-determinism
// ---------------------------------------------------------------------------------------------

/// Appends one line for a step's side effect to the ground-truth log at `log`.
fn record_effect(log: &str, ctx: &StepContext) -> Result<(), StepError> {
    let effect = Effect {
        action: Action::Do,
        run: ctx.run_id().to_string(),
        step: ctx.step().0,
        key: ctx.key().to_string(),
        attempt: ctx.attempt().0,
        pid: std::process::id(),
    };
    effects::append(Path::new(log), &effect)
        .map_err(|e| StepError::retryable("effect log not writable").with_source(e))
}

/// Step kind `test.x`; outputs `n * 10`.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct StepX {
    n: u32,
    log: String,
}

impl Step for StepX {
    const KIND: &'static str = "test.x";
    type Output = u32;

    async fn execute(&self, ctx: &StepContext) -> Result<u32, StepError> {
        record_effect(&self.log, ctx)?;
        Ok(self.n * 10)
    }
}

/// Step kind `test.y`; outputs `n * 100`.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct StepY {
    n: u32,
    log: String,
}

impl Step for StepY {
    const KIND: &'static str = "test.y";
    type Output = u32;

    async fn execute(&self, ctx: &StepContext) -> Result<u32, StepError> {
        record_effect(&self.log, ctx)?;
        Ok(self.n * 100)
    }
}

/// Input of every `test.changing` version.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct ChangingInput {
    sleep_ms: u64,
    log: String,
}

/// The original code of `test.changing`: step `test.x` with n = 1, then a durable sleep.
struct Original;

impl Workflow for Original {
    const NAME: &'static str = "test.changing";
    type Input = ChangingInput;
    type Output = u32;

    async fn run(ctx: &mut Ctx, input: ChangingInput) -> Result<u32, WorkflowError> {
        let x = ctx
            .step(StepX {
                n: 1,
                log: input.log,
            })
            .await?;
        ctx.sleep(Duration::from_millis(input.sleep_ms)).await?;
        Ok(x)
    }
}

/// Changed code: asks for step kind `test.y` first.
struct OtherKind;

impl Workflow for OtherKind {
    const NAME: &'static str = "test.changing";
    const VERSION: u32 = 2;
    type Input = ChangingInput;
    type Output = u32;

    async fn run(ctx: &mut Ctx, input: ChangingInput) -> Result<u32, WorkflowError> {
        let y = ctx
            .step(StepY {
                n: 1,
                log: input.log,
            })
            .await?;
        ctx.sleep(Duration::from_millis(input.sleep_ms)).await?;
        Ok(y)
    }
}

/// Changed code: the same kind with another argument (n = 2).
struct OtherArgument;

impl Workflow for OtherArgument {
    const NAME: &'static str = "test.changing";
    const VERSION: u32 = 2;
    type Input = ChangingInput;
    type Output = u32;

    async fn run(ctx: &mut Ctx, input: ChangingInput) -> Result<u32, WorkflowError> {
        let x = ctx
            .step(StepX {
                n: 2,
                log: input.log,
            })
            .await?;
        ctx.sleep(Duration::from_millis(input.sleep_ms)).await?;
        Ok(x)
    }
}

/// Changed code: returns after the step, without the sleep the journal holds.
struct ReturnsEarly;

impl Workflow for ReturnsEarly {
    const NAME: &'static str = "test.changing";
    const VERSION: u32 = 2;
    type Input = ChangingInput;
    type Output = u32;

    async fn run(ctx: &mut Ctx, input: ChangingInput) -> Result<u32, WorkflowError> {
        ctx.step(StepX {
            n: 1,
            log: input.log,
        })
        .await
    }
}

/// Changed code: sleeps first, where the journal holds a step.
struct SleepsFirst;

impl Workflow for SleepsFirst {
    const NAME: &'static str = "test.changing";
    const VERSION: u32 = 2;
    type Input = ChangingInput;
    type Output = u32;

    async fn run(ctx: &mut Ctx, input: ChangingInput) -> Result<u32, WorkflowError> {
        ctx.sleep(Duration::from_millis(input.sleep_ms)).await?;
        ctx.step(StepX {
            n: 1,
            log: input.log,
        })
        .await
    }
}

const HOUR_MS: u64 = 3_600_000;

struct Parked {
    _dir: tempfile::TempDir,
    data: PathBuf,
    log: PathBuf,
    /// Each parked run's journal at shutdown.
    journals: BTreeMap<String, Vec<Entry>>,
}

impl Parked {
    fn input(&self, sleep_ms: u64) -> ChangingInput {
        ChangingInput {
            sleep_ms,
            log: self.log.to_string_lossy().into_owned(),
        }
    }

    /// The side effects of `run` as (operation number, attempt).
    fn effects_of(&self, run: &str) -> Vec<(u32, u32)> {
        effects::read(&self.log)
            .into_iter()
            .filter(|e| e.run == run)
            .map(|e| (e.step, e.attempt))
            .collect()
    }
}

/// Runs the [`Original`] code for each `(id, sleep_ms)` until its timer is set (step
/// `test.x` done, sleeping), then shuts the engine down.
async fn park(runs: &[(&str, u64)]) -> Parked {
    let dir = tempfile::tempdir().unwrap();
    let mut parked = Parked {
        data: dir.path().join("data"),
        log: dir.path().join("effects.jsonl"),
        journals: BTreeMap::new(),
        _dir: dir,
    };
    let engine = keel_testkit::open_engine(|| {
        Engine::builder(&parked.data)
            .workflow::<Original>()
            .step::<StepX>()
            .step::<StepY>()
    })
    .await;
    for (id, sleep_ms) in runs {
        engine
            .start::<Original>(id, parked.input(*sleep_ms))
            .await
            .unwrap();
    }
    for (id, _) in runs {
        until(&engine, id, |h| {
            h.entries
                .iter()
                .any(|e| matches!(e.event, Event::TimerSet { .. }))
        })
        .await;
    }
    engine.shutdown().await;
    for (id, _) in runs {
        let history = engine.history(id).await.unwrap();
        assert_eq!(history.run.status, RunStatus::Running);
        parked.journals.insert(id.to_string(), history.entries);
        assert_eq!(parked.effects_of(id), vec![(0, 1)], "test.x ran once");
    }
    parked
}

/// Opens the parked store with workflow code `W`, waits for run `id` to settle, and checks
/// that it is Suspended, that its journal only gained the suspension (whose reason is the
/// run's error), and that nothing ran. Returns the error.
async fn suspended_under<W: Workflow>(parked: &Parked, id: &str) -> String {
    // The new code's engine registers every step kind its runs may have to undo.
    let engine = keel_testkit::open_engine(|| {
        Engine::builder(&parked.data)
            .workflow::<W>()
            .step::<StepX>()
            .step::<StepY>()
    })
    .await;
    let record = engine.wait(id).await.unwrap();
    assert_eq!(record.status, RunStatus::Suspended, "{:?}", record.error);
    assert_eq!(record.output, None);
    let error = record.error.clone().expect("a suspended run says why");
    let history = engine.history(id).await.unwrap();
    let before = &parked.journals[id];
    assert_eq!(
        history.entries[..before.len()],
        before[..],
        "the journal is kept"
    );
    let added: Vec<&Event> = history.entries[before.len()..]
        .iter()
        .map(|e| &e.event)
        .collect();
    assert_eq!(
        added,
        vec![&Event::RunSuspended {
            reason: error.clone()
        }],
        "only the suspension was journaled"
    );
    assert_eq!(parked.effects_of(id), vec![(0, 1)], "nothing ran on replay");
    engine.shutdown().await;
    error
}

/// Code that asks for step kind `test.y` where the journal holds `test.x` suspends the run
/// with an error naming both kinds, and runs nothing. With the original code registered again,
/// the run stays suspended across the reopen; an operator resume takes it up, the recorded
/// step is replayed (not re-run), the timer keeps its journaled wake time, and it completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_step_kind_suspends_and_fixed_code_resumes() {
    let parked = park(&[("parked", HOUR_MS), ("fixable", 1200)]).await;
    let error = suspended_under::<OtherKind>(&parked, "parked").await;
    assert!(
        error.contains("\"test.x\"") && error.contains("\"test.y\""),
        "the error names both kinds: {error}"
    );
    assert!(error.contains("step #0"), "and the operation: {error}");

    let engine = keel_testkit::open_engine(|| {
        Engine::builder(&parked.data)
            .workflow::<Original>()
            .step::<StepX>()
            .step::<StepY>()
    })
    .await;
    let fixable = engine.status("fixable").await.unwrap();
    assert_eq!(fixable.status, RunStatus::Suspended, "{:?}", fixable.error);
    assert!(fixable.error.unwrap().contains("\"test.y\""));
    assert_eq!(
        engine.status("parked").await.unwrap().status,
        RunStatus::Suspended,
        "a suspended run stays suspended when fixed code is opened"
    );

    let resumed = engine.resume("fixable").await.unwrap();
    assert_eq!(resumed.status, RunStatus::Running);
    assert_eq!(resumed.error, None, "the resume clears the error");
    let record = engine.wait("fixable").await.unwrap();
    assert_eq!(record.status, RunStatus::Completed, "{:?}", record.error);
    assert_eq!(
        record.output,
        Some(json!(10)),
        "the recorded output of test.x"
    );
    assert_eq!(
        parked.effects_of("fixable"),
        vec![(0, 1)],
        "test.x not re-run"
    );

    let history = engine.history("fixable").await.unwrap();
    let before = &parked.journals["fixable"];
    let Event::TimerSet { wake_at_ms, .. } = before.last().unwrap().event else {
        panic!("{before:?}")
    };
    let added: Vec<&Event> = history.entries[before.len()..]
        .iter()
        .map(|e| &e.event)
        .collect();
    assert!(
        matches!(
            added[..],
            [
                Event::RunSuspended { .. },
                Event::RunResumed,
                Event::TimerFired { .. },
                Event::RunCompleted { .. }
            ]
        ),
        "{added:?}"
    );
    let fired_at_ms = history
        .entries
        .iter()
        .find(|e| matches!(e.event, Event::TimerFired { .. }))
        .unwrap()
        .at_ms;
    assert!(fired_at_ms >= wake_at_ms, "the timer kept its wake time");

    // The parked run resumes too, and sleeps on under its one-hour timer.
    engine.resume("parked").await.unwrap();
    until(&engine, "parked", |h| {
        h.entries
            .last()
            .is_some_and(|e| e.event == Event::RunResumed)
    })
    .await;
    assert_eq!(
        engine.status("parked").await.unwrap().status,
        RunStatus::Running
    );
    engine.shutdown().await;
    assert_eq!(
        parked.effects_of("parked"),
        vec![(0, 1)],
        "test.x not re-run"
    );
}

/// Code that asks for the same step kind with another argument suspends the run with an error
/// naming both arguments, and runs nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_step_argument_suspends_naming_both_arguments() {
    let parked = park(&[("argument", HOUR_MS)]).await;
    let error = suspended_under::<OtherArgument>(&parked, "argument").await;
    assert!(
        error.contains("\"n\":1") && error.contains("\"n\":2"),
        "the error names both arguments: {error}"
    );
    assert!(error.contains("test.x"), "and the kind: {error}");
}

/// Code that returns after fewer operations than the journal holds suspends the run (it must
/// not complete as if the journaled timer had never been set).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn returning_after_fewer_operations_suspends() {
    let parked = park(&[("early", HOUR_MS)]).await;
    let error = suspended_under::<ReturnsEarly>(&parked, "early").await;
    assert!(
        error.contains("returned after 1 operations") && error.contains("journal holds 2"),
        "the error counts both: {error}"
    );
}

/// Code that asks for a timer where the journal holds a step suspends the run naming the
/// step kind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timer_where_the_journal_holds_a_step_suspends() {
    let parked = park(&[("timer", HOUR_MS)]).await;
    let error = suspended_under::<SleepsFirst>(&parked, "timer").await;
    assert!(
        error.contains("\"test.x\"") && error.contains("timer"),
        "the error names the step and the timer: {error}"
    );
}

// ---------------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------------

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
            step_action(state.step(StepIndex(i))),
            StepAction::Replay(output)
        );
    }
    // `undo_action` is consulted only once a run compensates; for this completed run it
    // shows where a compensation would begin: the newest step, first attempt.
    assert_eq!(
        undo_action(&state),
        UndoAction::Undo {
            step: StepIndex(3),
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
        state.step(StepIndex(0)).unwrap().outcome,
        completed(json!(10))
    );
    assert_eq!(
        state.step(StepIndex(1)).unwrap().outcome,
        completed(json!("sent"))
    );
    assert_eq!(
        undo_input(&state, StepIndex(2)),
        Some(None),
        "a permanent failure after a retry is in doubt: undone without an output"
    );
    assert_eq!(undo_input(&state, StepIndex(0)), Some(Some(&json!(10))));
    assert!(state.compensating);
    assert_eq!(
        state.undo,
        BTreeMap::from([
            (StepIndex(0), UndoState::Done),
            (StepIndex(1), UndoState::Skipped),
            (StepIndex(2), UndoState::Done),
        ])
    );
    assert_eq!(undo_action(&state), UndoAction::Finished);
    assert_eq!(
        step_action(state.step(StepIndex(2))),
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

    async fn compensate(&self, ctx: &StepContext, _output: Option<u32>) -> Result<Undo, StepError> {
        fixture_effect(ctx, "undo add");
        Ok(Undo::Done)
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

// ---------------------------------------------------------------------------------------------
// Synthetic journals
// ---------------------------------------------------------------------------------------------

/// The step kind of synthetic journals.
const SYNTHETIC_KIND: &str = "synthetic.step";

/// Builds a journal from a compact description: whitespace-separated tokens, each a letter
/// followed, for step events, by the operation number. Attempt numbers, outputs (`n * 10`),
/// arguments (`{"n": n}`), timestamps (10 ms apart from 1000) and retry times (100 ms after
/// the entry) are filled in.
///
/// | token | entry                                  |
/// |-------|----------------------------------------|
/// | `sN`  | step N started (its next attempt)      |
/// | `cN`  | step N completed                       |
/// | `rN`  | step N failed retryably, retry later   |
/// | `gN`  | step N failed retryably, gave up       |
/// | `pN`  | step N failed permanently              |
/// | `tN`  | timer N set (wakes 50 ms later)        |
/// | `fN`  | timer N fired                          |
/// | `uN`  | undo of step N started (next attempt)  |
/// | `dN`  | step N undone                          |
/// | `kN`  | undo of step N skipped                 |
/// | `qN`  | undo of step N failed, retry later     |
/// | `eN`  | undo of step N failed for good         |
/// | `X`   | compensation started                   |
/// | `~`   | cancel requested                       |
/// | `!`   | run completed (output: the step count) |
/// | `$`   | run compensated                        |
fn journal(description: &str) -> Vec<Entry> {
    let mut attempts: BTreeMap<u32, u32> = BTreeMap::new();
    let mut undo_attempts: BTreeMap<u32, u32> = BTreeMap::new();
    let mut entries = Vec::new();
    for token in description.split_whitespace() {
        let at_ms = 1000 + 10 * entries.len() as u64;
        let (letter, number) = token.split_at(1);
        let n: u32 = match number {
            "" => 0,
            digits => digits
                .parse()
                .unwrap_or_else(|_| panic!("token {token:?}: bad step number")),
        };
        let step = StepIndex(n);
        let attempt = Attempt(attempts.get(&n).copied().unwrap_or(0));
        let undo_attempt = Attempt(undo_attempts.get(&n).copied().unwrap_or(0));
        let error = |class, message: &str| ErrorRecord {
            class,
            message: message.into(),
        };
        let event = match letter {
            "s" => {
                let next = attempts.entry(n).or_insert(0);
                *next += 1;
                Event::StepStarted {
                    step,
                    kind: SYNTHETIC_KIND.into(),
                    argument: json!({"n": n}),
                    attempt: Attempt(*next),
                    compensable: true,
                }
            }
            "c" => Event::StepCompleted {
                step,
                attempt,
                output: json!(n * 10),
            },
            "r" => Event::StepFailed {
                step,
                attempt,
                error: error(ErrorClass::Retryable, "busy"),
                retry_at_ms: Some(at_ms + 100),
            },
            "g" => Event::StepFailed {
                step,
                attempt,
                error: error(ErrorClass::Retryable, "still busy"),
                retry_at_ms: None,
            },
            "p" => Event::StepFailed {
                step,
                attempt,
                error: error(ErrorClass::Permanent, "refused"),
                retry_at_ms: None,
            },
            "t" => Event::TimerSet {
                step,
                wake_at_ms: at_ms + 50,
            },
            "f" => Event::TimerFired { step },
            "u" => {
                let next = undo_attempts.entry(n).or_insert(0);
                *next += 1;
                Event::StepCompensationStarted {
                    step,
                    attempt: Attempt(*next),
                }
            }
            "d" => Event::StepCompensated { step },
            "k" => Event::StepCompensationSkipped {
                step,
                reason: "step has no compensation".into(),
            },
            "q" => Event::StepCompensationFailed {
                step,
                attempt: undo_attempt,
                error: error(ErrorClass::Retryable, "undo busy"),
                retry_at_ms: Some(at_ms + 100),
            },
            "e" => Event::StepCompensationFailed {
                step,
                attempt: undo_attempt,
                error: error(ErrorClass::Permanent, "undo refused"),
                retry_at_ms: None,
            },
            "X" => Event::CompensationStarted {
                reason: "synthetic failure".into(),
            },
            "~" => Event::CancelRequested,
            "!" => Event::RunCompleted {
                output: json!(attempts.len()),
            },
            "$" => Event::RunCompensated,
            _ => panic!("unknown token {token:?}"),
        };
        entries.push(Entry { at_ms, event });
    }
    entries
}

/// Synthetic journals fold as their descriptions say: a compensation cut off with an undo in
/// flight resumes that undo at its next attempt; a scheduled undo retry keeps its time; a
/// permanent first-attempt failure and a timer need no undo; a cancel with a step in flight
/// undoes that step; an entry that breaks the state machine is rejected with its position;
/// and built entries survive a JSON round trip.
#[test]
fn synthetic_journals_fold_as_described() {
    // Step 1 gave up after two attempts (in doubt); compensation undid it and was cut off
    // while undoing step 0.
    let cut_off = journal("s0 c0 s1 r1 s1 g1 X u1 d1 u0");
    let state = RunState::from_entries(&cut_off).unwrap();
    assert!(matches!(
        &state.step(StepIndex(1)).unwrap().outcome,
        StepOutcome::GaveUp { .. }
    ));
    assert_eq!(state.step(StepIndex(1)).unwrap().attempt, Attempt(2));
    assert_eq!(undo_input(&state, StepIndex(1)), Some(None), "in doubt");
    assert_eq!(
        undo_action(&state),
        UndoAction::Undo {
            step: StepIndex(0),
            attempt: Attempt(2),
            round_attempts: 1,
            not_before_ms: None,
        }
    );
    let finished = journal("s0 c0 s1 r1 s1 g1 X u1 d1 u0 u0 d0 $");
    let state = RunState::from_entries(&finished).unwrap();
    assert_eq!(undo_action(&state), UndoAction::Finished);
    assert_eq!(
        state.undo,
        BTreeMap::from([
            (StepIndex(0), UndoState::Done),
            (StepIndex(1), UndoState::Done)
        ])
    );

    // Step 2 failed permanently at its first attempt (no effect), step 1 is a timer: only
    // step 0 needs undoing, and its retry keeps its journaled time.
    let retrying = journal("s0 c0 t1 f1 s2 p2 X u0 q0");
    let state = RunState::from_entries(&retrying).unwrap();
    assert_eq!(undo_input(&state, StepIndex(2)), None);
    assert_eq!(undo_input(&state, StepIndex(1)), None);
    let Event::StepCompensationFailed {
        retry_at_ms: Some(retry_at_ms),
        ..
    } = retrying.last().unwrap().event
    else {
        unreachable!()
    };
    assert_eq!(
        undo_action(&state),
        UndoAction::Undo {
            step: StepIndex(0),
            attempt: Attempt(2),
            round_attempts: 1,
            not_before_ms: Some(retry_at_ms),
        }
    );
    let stuck = RunState::from_entries(&journal("s0 c0 t1 f1 s2 p2 X u0 e0")).unwrap();
    assert!(matches!(
        undo_action(&stuck),
        UndoAction::Stuck {
            step: StepIndex(0),
            ..
        }
    ));

    // Cancelled with step 1 in flight: it is in doubt, and undone first.
    let cancelled = RunState::from_entries(&journal("s0 c0 s1 ~")).unwrap();
    assert!(cancelled.cancel_requested);
    assert!(cancelled.has_effects());
    assert_eq!(
        step_action(cancelled.step(StepIndex(1))),
        StepAction::Run {
            attempt: Attempt(2),
            not_before_ms: None,
        }
    );
    assert!(matches!(
        undo_action(&cancelled),
        UndoAction::Undo {
            step: StepIndex(1),
            attempt: Attempt(1),
            ..
        }
    ));

    // A step completed twice: rejected at the offending entry.
    let err = RunState::from_entries(&journal("s0 c0 c0")).unwrap_err();
    assert!(err.starts_with("entry 2:"), "{err}");
    // A step that skips an operation number.
    let err = RunState::from_entries(&journal("s0 c0 s2")).unwrap_err();
    assert!(err.starts_with("entry 2:"), "{err}");

    let completed = journal("s0 r0 s0 c0 t1 f1 s2 k2 !");
    for entry in &completed {
        let text = serde_json::to_string(entry).unwrap();
        assert_eq!(
            &serde_json::from_str::<Entry>(&text).unwrap(),
            entry,
            "{text}"
        );
    }
}
