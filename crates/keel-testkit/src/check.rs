//! Checks of the engine's guarantees against ground truth: the effect log (what really ran)
//! and the journal (what the engine recorded). Every check panics with the run, the step and
//! what was seen.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use keel_engine::test_utilities::replay::{RunState, StepOutcome};
use keel_engine::{Engine, Event, IdempotencyKey, OperationIndex, RunHistory, RunId, RunStatus};

use crate::effects::{self, Action, Effect};

/// What a run is expected to end as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// Completed with this output.
    Completed(u32),
    /// Compensated: nothing of it is left.
    Compensated,
}

/// Totals over a checked set of runs, so a test can also assert that the scenario exercised
/// what it meant to.
#[derive(Debug, Default)]
pub struct Tally {
    /// Side effects that ran (every attempt).
    pub effects: usize,
    /// Steps whose effect ran more than once (re-run after a crash or a lost response).
    pub steps_rerun: usize,
    /// Undos that ran.
    pub undos: usize,
    /// Steps undone while their run went on (recreated resources).
    pub abandoned: usize,
}

/// Checks one run's history against the effect log lines of that run.
pub fn check_run(history: &RunHistory, expect: Expect, effects: &[Effect], tally: &mut Tally) {
    let run = &history.run;
    let id = run.id.as_str();
    check_one_terminal(history, expect);
    check_status(history, expect);
    let state = RunState::from_entries(&history.entries)
        .unwrap_or_else(|e| panic!("run {id}: journal: {e}"));
    let mine: Vec<&Effect> = effects.iter().filter(|e| e.run == id).collect();
    let run_id = RunId::new(id).expect("valid id");

    let abandoned = abandoned_steps(history);
    tally.abandoned += abandoned.len();
    let attempts = Attempts::of_effects(&run_id, &mine, &abandoned);
    check_done_attempts(id, &state, &attempts.done, tally);
    check_undo_attempts(history, &attempts.undo, tally);
    check_effects_left(history, expect, &state, &attempts, &abandoned);
}

/// Checks that the run has exactly one terminal entry; a completed child of a compensated
/// run has a second one, its compensation, which is the one that counts.
fn check_one_terminal(history: &RunHistory, expect: Expect) {
    let run = &history.run;
    let id = run.id.as_str();
    let mut terminal: Vec<&Event> = history
        .entries
        .iter()
        .map(|e| &e.event)
        .filter(|e| {
            matches!(
                e,
                Event::RunCompleted { .. }
                    | Event::RunCompensated
                    | Event::RunFailed { .. }
                    | Event::RunCompensationFailed { .. }
            )
        })
        .collect();
    // A child run that completed is compensated later when its parent compensates.
    if expect == Expect::Compensated
        && run.parent.is_some()
        && matches!(terminal.first(), Some(Event::RunCompleted { .. }))
    {
        terminal.remove(0);
    }
    assert_eq!(
        terminal.len(),
        1,
        "run {id}: expected exactly one terminal entry, found {terminal:?} (status {}, error {:?})",
        run.status,
        run.error
    );
}

/// Checks that the run ended with the status (and output) expected of it.
fn check_status(history: &RunHistory, expect: Expect) {
    let run = &history.run;
    let id = run.id.as_str();
    match expect {
        Expect::Completed(output) => {
            assert_eq!(
                run.status,
                RunStatus::Completed,
                "run {id}: {:?}",
                run.error
            );
            assert_eq!(
                run.output,
                Some(serde_json::json!(output)),
                "run {id} output"
            );
        }
        Expect::Compensated => assert_eq!(
            run.status,
            RunStatus::Compensated,
            "run {id}: {:?}",
            run.error
        ),
    }
}

/// Steps the run undid while going on (a recreated resource): their undo started before
/// compensation began, if it did.
fn abandoned_steps(history: &RunHistory) -> BTreeSet<u32> {
    history
        .entries
        .iter()
        .map(|e| &e.event)
        .take_while(|e| !matches!(e, Event::CompensationStarted { .. }))
        .filter_map(|e| match e {
            Event::StepCompensationStarted { step, .. } => Some(step.0),
            _ => None,
        })
        .collect()
}

/// The attempts of each step's effect and undo that ran, from the effect log.
struct Attempts {
    /// Attempt numbers of each step's effect, in the order they ran.
    done: BTreeMap<u32, Vec<u32>>,
    /// Attempt numbers of each step's undo, in the order they ran.
    undo: BTreeMap<u32, Vec<u32>>,
}

impl Attempts {
    /// Collects a run's effects by step, checking on the way that each ran with its step's
    /// idempotency key, that no step ran after compensation began and that compensation undid
    /// steps newest first, each once (undos of abandoned steps aside).
    fn of_effects(run_id: &RunId, mine: &[&Effect], abandoned: &BTreeSet<u32>) -> Self {
        let id = run_id.as_str();
        let mut done: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
        let mut undo: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
        let mut undo_order: Vec<u32> = Vec::new();
        for effect in mine {
            let key = IdempotencyKey::for_step(run_id, OperationIndex(effect.step)).to_string();
            assert_eq!(
                effect.key, key,
                "run {id} step {}: effect ran with another key",
                effect.step
            );
            match effect.action {
                Action::Do => {
                    assert!(
                        undo_order.is_empty(),
                        "run {id}: step {} ran after compensation began",
                        effect.step
                    );
                    done.entry(effect.step).or_default().push(effect.attempt);
                }
                Action::Undo => {
                    undo.entry(effect.step).or_default().push(effect.attempt);
                    if abandoned.contains(&effect.step) {
                        continue;
                    }
                    if let Some(last) = undo_order.last() {
                        assert!(
                            effect.step <= *last,
                            "run {id}: undo of step {} after undo of older step {last}: not newest first, or undone again",
                            effect.step
                        );
                    }
                    undo_order.push(effect.step);
                }
            }
        }
        Attempts { done, undo }
    }
}

/// Checks each step's effect attempts against the journal: no attempt number twice, and a
/// completed step ran at its recorded attempt and never after it.
fn check_done_attempts(
    id: &str,
    state: &RunState,
    done: &BTreeMap<u32, Vec<u32>>,
    tally: &mut Tally,
) {
    for (step, attempts) in done {
        tally.effects += attempts.len();
        if attempts.len() > 1 {
            tally.steps_rerun += 1;
        }
        let distinct: BTreeSet<u32> = attempts.iter().copied().collect();
        assert_eq!(
            distinct.len(),
            attempts.len(),
            "run {id} step {step}: an attempt number ran twice: {attempts:?}"
        );
        let op = state
            .step(OperationIndex(*step))
            .unwrap_or_else(|| panic!("run {id}: step {step} ran but is not journaled"));
        if let StepOutcome::Completed { .. } = op.outcome {
            // The outcome was recorded at op.attempt; a run of a later attempt would mean the
            // step ran again after its outcome was recorded.
            assert!(
                attempts.iter().all(|a| *a <= op.attempt.0),
                "run {id} step {step}: ran at attempts {attempts:?} after completing at attempt {}",
                op.attempt
            );
            assert!(
                attempts.contains(&op.attempt.0),
                "run {id} step {step}: recorded attempt {} never ran",
                op.attempt
            );
        }
    }
}

/// Checks each step's undo attempts against the journal: the undo is journaled, and no undo
/// ran at an attempt the journal had not started.
fn check_undo_attempts(history: &RunHistory, undo: &BTreeMap<u32, Vec<u32>>, tally: &mut Tally) {
    let id = history.run.id.as_str();
    for (step, attempts) in undo {
        tally.undos += attempts.len();
        let recorded = history.entries.iter().any(|e| {
            e.event
                == Event::StepCompensated {
                    step: OperationIndex(*step),
                }
        });
        assert!(
            recorded,
            "run {id} step {step}: undone but the undo is not journaled"
        );
        let last_started = history
            .entries
            .iter()
            .filter_map(|e| match &e.event {
                Event::StepCompensationStarted { step: s, attempt } if s.0 == *step => {
                    Some(attempt.0)
                }
                _ => None,
            })
            .max()
            .unwrap_or(0);
        assert!(
            attempts.iter().all(|a| *a <= last_started),
            "run {id} step {step}: undo ran at attempts {attempts:?}, journal started at most {last_started}"
        );
    }
}

/// Checks the external state the run left: a completed run's effects are exactly its
/// journaled completed steps (abandoned ones aside); a compensated run left nothing.
fn check_effects_left(
    history: &RunHistory,
    expect: Expect,
    state: &RunState,
    attempts: &Attempts,
    abandoned: &BTreeSet<u32>,
) {
    let id = history.run.id.as_str();
    // The external state: an effect exists if it ran and no undo ran after it.
    let left: BTreeSet<u32> = attempts
        .done
        .keys()
        .copied()
        .filter(|s| !attempts.undo.contains_key(s))
        .collect();
    match expect {
        Expect::Completed(_) => {
            let undone: BTreeSet<u32> = attempts.undo.keys().copied().collect();
            assert!(
                undone.is_subset(abandoned),
                "run {id}: completed run undid steps {undone:?}, of which it abandoned only {abandoned:?}"
            );
            // A step the body got a failure of (a losing select branch, a caught failure)
            // must have left nothing either, unless it was abandoned (undone) anyway.
            let journaled: BTreeSet<u32> = (0..state.ops.len() as u32)
                .filter(|s| {
                    state
                        .step(OperationIndex(*s))
                        .is_some_and(|op| matches!(op.outcome, StepOutcome::Completed { .. }))
                        && !abandoned.contains(s)
                })
                .collect();
            assert_eq!(
                left, journaled,
                "run {id}: effects left differ from the journaled completed steps"
            );
        }
        Expect::Compensated => assert!(
            left.is_empty(),
            "run {id}: compensated run left effects of steps {left:?}"
        ),
    }
}

/// Reads the effect log at `log`.
pub fn effects_at(log: &Path) -> Vec<Effect> {
    effects::read(log)
}

/// Opens the closed store at `data` to read it, hands the engine to `read`, shuts the engine
/// down and returns what `read` returned. No workflow or step kind is registered and the
/// engine is opened with `allow_unregistered`: it drives no run, so what a test reads is what
/// the store held. Waits (bounded) for the lock of an engine this process has just closed.
pub async fn read_store<T>(data: &Path, read: impl AsyncFnOnce(&Engine) -> T) -> T {
    let engine = crate::open_engine(|| crate::store::builder(data).allow_unregistered()).await;
    let out = read(&engine).await;
    engine.shutdown().await;
    out
}

/// [`read_store`] on a current-thread runtime of its own, for code that runs outside any
/// runtime (a crash test's parent, between its children).
pub fn read_store_blocking<T>(data: &Path, read: impl AsyncFnOnce(&Engine) -> T) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime to read the store on")
        .block_on(read_store(data, read))
}
