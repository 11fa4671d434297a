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
    let state = RunState::from_entries(&history.entries)
        .unwrap_or_else(|e| panic!("run {id}: journal: {e}"));
    let mine: Vec<&Effect> = effects.iter().filter(|e| e.run == id).collect();
    let run_id = RunId::new(id).expect("valid id");

    // Steps the run undid while going on (a recreated resource): their undo started before
    // compensation began, if it did.
    let abandoned: BTreeSet<u32> = history
        .entries
        .iter()
        .map(|e| &e.event)
        .take_while(|e| !matches!(e, Event::CompensationStarted { .. }))
        .filter_map(|e| match e {
            Event::StepCompensationStarted { step, .. } => Some(step.0),
            _ => None,
        })
        .collect();
    tally.abandoned += abandoned.len();

    let mut done_attempts: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    let mut undo_attempts: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    let mut undo_order: Vec<u32> = Vec::new();
    for effect in &mine {
        let key = IdempotencyKey::for_step(&run_id, OperationIndex(effect.step)).to_string();
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
                done_attempts
                    .entry(effect.step)
                    .or_default()
                    .push(effect.attempt);
            }
            Action::Undo => {
                undo_attempts
                    .entry(effect.step)
                    .or_default()
                    .push(effect.attempt);
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

    for (step, attempts) in &done_attempts {
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
    for (step, attempts) in &undo_attempts {
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

    // The external state: an effect exists if it ran and no undo ran after it.
    let left: BTreeSet<u32> = done_attempts
        .keys()
        .copied()
        .filter(|s| !undo_attempts.contains_key(s))
        .collect();
    match expect {
        Expect::Completed(_) => {
            let undone: BTreeSet<u32> = undo_attempts.keys().copied().collect();
            assert!(
                undone.is_subset(&abandoned),
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
    let engine = crate::open_engine(|| Engine::builder(data).allow_unregistered()).await;
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
