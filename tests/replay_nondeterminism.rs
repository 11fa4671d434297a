//! Replay is checked: a run journaled by one version of a workflow and replayed by code that
//! asks for another step kind, another argument, a timer instead of a step, or fewer
//! operations stops `Suspended` with an error naming what the journal holds and what the code
//! asked for, and runs nothing; after the code is fixed, an operator resume completes it.
//!
//! The journal fixtures are in `replay_fixtures.rs`, synthetic journals in
//! `replay_synthetic.rs`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use keel::{Ctx, Entry, Event, RunStatus, Step, StepContext, StepError, Workflow, WorkflowError};
use keel_testkit::effects::{self, Action};
use keel_testkit::poll::until;
use serde::{Deserialize, Serialize};
use serde_json::json;

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
        effects::record(&self.log, Action::Do, ctx)?;
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
        effects::record(&self.log, Action::Do, ctx)?;
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
/// `test.x` done, sleeping), then shuts the engine down. The runs sleep loaded (they never
/// park), so the next open replays them at once: a parked run replays under the new code when
/// it wakes (`tests/engine_effects_replay.rs`).
async fn park(runs: &[(&str, u64)]) -> Parked {
    let dir = tempfile::tempdir().unwrap();
    let mut parked = Parked {
        data: dir.path().join("data"),
        log: dir.path().join("effects.jsonl"),
        journals: BTreeMap::new(),
        _dir: dir,
    };
    let engine = keel_testkit::open_engine(|| {
        keel_testkit::store::builder(&parked.data)
            .park_after(None)
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
        keel_testkit::store::builder(&parked.data)
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
    assert!(error.contains("operation #0"), "and the operation: {error}");

    let engine = keel_testkit::open_engine(|| {
        keel_testkit::store::builder(&parked.data)
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
