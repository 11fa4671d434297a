//! A run's journal folded into one row per operation, for `keel history`.

use std::collections::BTreeMap;

use keel_engine::{Event, RunHistory, WaitOutcome};
use serde::Serialize;

/// One operation of a run: a step, a wait, a timer, a child run or a fan-out.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub(crate) struct Row {
    /// Its index in the run.
    pub step: u32,
    /// `step`, `wait`, `timer`, `child` or `fork`.
    pub what: &'static str,
    /// The step or wait kind, the child's workflow and id, or the fan-out's width.
    pub kind: String,
    /// Attempts started (steps).
    pub attempts: u32,
    /// From the first start to the outcome, in ms (empty while in flight).
    pub duration_ms: Option<u64>,
    /// `completed`, `failed: ...`, `retrying`, `in flight`, the child's status, ...
    pub outcome: String,
    /// `compensated`, `skipped: ...`, `failed: ...`, `compensating`, or empty.
    pub compensation: String,
    #[serde(skip)]
    started_ms: u64,
}

/// The rows of `history`, in operation order.
pub(crate) fn rows(history: &RunHistory) -> Vec<Row> {
    let mut rows: BTreeMap<u32, Row> = BTreeMap::new();
    for entry in &history.entries {
        step_event(&mut rows, &entry.event, entry.at_ms);
        operation_event(&mut rows, &entry.event, entry.at_ms);
        compensation_event(&mut rows, &entry.event, entry.at_ms);
    }
    rows.into_values().collect()
}

/// Folds a step's start or outcome into its row.
fn step_event(rows: &mut BTreeMap<u32, Row>, event: &Event, at: u64) {
    match event {
        Event::StepStarted {
            step,
            kind,
            attempt,
            ..
        } => {
            let r = row(rows, *step, "step", at);
            r.kind = kind.clone();
            r.attempts = r.attempts.max(attempt.0);
            r.outcome = "in flight".into();
        }
        Event::StepCompleted { step, .. } => {
            let r = row(rows, *step, "step", at);
            r.outcome = "completed".into();
            r.duration_ms = Some(at.saturating_sub(r.started_ms));
        }
        Event::StepFailed {
            step,
            error,
            retry_at_ms,
            ..
        } => {
            let r = row(rows, *step, "step", at);
            if retry_at_ms.is_some() {
                r.outcome = format!("retrying: {}", error.message);
            } else {
                r.outcome = format!("failed: {}", error.message);
                r.duration_ms = Some(at.saturating_sub(r.started_ms));
            }
        }
        Event::StepOutputRejected { step, error, .. } => {
            let r = row(rows, *step, "step", at);
            r.outcome = format!("output rejected: {}", error.message);
            r.duration_ms = Some(at.saturating_sub(r.started_ms));
        }
        _ => {}
    }
}

/// Folds a wait's, a timer's, a child run's or a fan-out's entry into its row.
fn operation_event(rows: &mut BTreeMap<u32, Row>, event: &Event, at: u64) {
    match event {
        Event::WaitStarted { step, kind, .. } => {
            let r = row(rows, *step, "wait", at);
            r.kind = kind.clone();
            r.outcome = "waiting".into();
        }
        Event::WaitEnded { step, outcome } => {
            let r = row(rows, *step, "wait", at);
            r.outcome = match outcome {
                WaitOutcome::Ready { polls, .. } => format!("ready after {polls} polls"),
                WaitOutcome::TimedOut { polls } => format!("timed out after {polls} polls"),
                WaitOutcome::Failed { error, .. } => format!("failed: {}", error.message),
            };
            r.duration_ms = Some(at.saturating_sub(r.started_ms));
        }
        Event::TimerSet { step, wake_at_ms } => {
            let r = row(rows, *step, "timer", at);
            r.kind = "sleep".into();
            r.outcome = format!("until {wake_at_ms} ms");
        }
        Event::TimerFired { step } => {
            let r = row(rows, *step, "timer", at);
            r.outcome = "fired".into();
            r.duration_ms = Some(at.saturating_sub(r.started_ms));
        }
        Event::ChildStarted {
            step,
            workflow,
            child,
            ..
        } => {
            let r = row(rows, *step, "child", at);
            r.kind = format!("{workflow} {child}");
            r.outcome = "running".into();
        }
        Event::ChildEnded {
            step,
            status,
            error,
            ..
        } => {
            let r = row(rows, *step, "child", at);
            r.outcome = match error {
                Some(error) => format!("{status}: {error}"),
                None => status.to_string(),
            };
            r.duration_ms = Some(at.saturating_sub(r.started_ms));
        }
        Event::ForkStarted { step, branches } => {
            let r = row(rows, *step, "fork", at);
            r.kind = format!("{branches} branches");
            r.outcome = "started".into();
        }
        Event::ForkSelected { step, branch } => {
            row(rows, *step, "fork", at).outcome = format!("branch {branch} won");
        }
        _ => {}
    }
}

/// Folds a compensation's entry into its step's row.
fn compensation_event(rows: &mut BTreeMap<u32, Row>, event: &Event, at: u64) {
    match event {
        Event::StepCompensationStarted { step, .. } => {
            row(rows, *step, "step", at).compensation = "compensating".into();
        }
        Event::StepCompensated { step } => {
            row(rows, *step, "step", at).compensation = "compensated".into();
        }
        Event::StepCompensationSkipped { step, reason } => {
            row(rows, *step, "step", at).compensation = format!("skipped: {reason}");
        }
        Event::StepCompensationFailed {
            step,
            error,
            retry_at_ms,
            ..
        } => {
            let word = if retry_at_ms.is_some() {
                "retrying"
            } else {
                "failed"
            };
            row(rows, *step, "step", at).compensation = format!("{word}: {}", error.message);
        }
        _ => {}
    }
}

/// The row of operation `step`, made at its first entry.
fn row<'a>(
    rows: &'a mut BTreeMap<u32, Row>,
    step: keel_engine::OperationIndex,
    what: &'static str,
    at: u64,
) -> &'a mut Row {
    rows.entry(step.0).or_insert_with(|| Row {
        step: step.0,
        what,
        started_ms: at,
        ..Row::default()
    })
}

/// The rows as an aligned table; long texts are cut to keep one line per operation.
pub(crate) fn table(history: &RunHistory) -> String {
    let run = &history.run;
    let mut out = format!(
        "run {} ({} v{}): {}",
        run.id, run.workflow, run.version, run.status
    );
    if let Some(error) = &run.error {
        out += &format!(": {}", cut(error, 160));
    }
    out += "\n\n";
    let header = [
        "#",
        "what",
        "kind",
        "attempts",
        "duration",
        "outcome",
        "compensation",
    ];
    let body: Vec<[String; 7]> = rows(history)
        .into_iter()
        .map(|r| {
            [
                r.step.to_string(),
                r.what.to_string(),
                cut(&r.kind, 48),
                if r.attempts == 0 {
                    String::new()
                } else {
                    r.attempts.to_string()
                },
                r.duration_ms.map(|d| format!("{d} ms")).unwrap_or_default(),
                cut(&r.outcome, 60),
                cut(&r.compensation, 40),
            ]
        })
        .collect();
    out + &crate::client::align(&header, &body)
}

fn cut(text: &str, max: usize) -> String {
    let line = text.lines().next().unwrap_or_default();
    if line.chars().count() <= max {
        line.to_string()
    } else {
        let mut s: String = line.chars().take(max - 3).collect();
        s += "...";
        s
    }
}
