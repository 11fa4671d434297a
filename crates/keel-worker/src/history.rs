//! A run's journal folded into one row per operation, for `keel history`, the events
//! delivered to it, each with the receive that took it, and the runs it was rerun as.

use std::collections::BTreeMap;

use keel_engine::{Event, RunHistory, WaitOutcome};
use serde::Serialize;

use crate::client::utc_time;

/// One operation of a run: a step, a wait, a timer, a child run, a fan-out, a receive or a
/// publish.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub(crate) struct Row {
    /// Its index in the run.
    pub step: u32,
    /// `step`, `wait`, `timer`, `child`, `fork`, `receive` or `publish`.
    pub what: &'static str,
    /// The step or wait kind, the child's workflow and id, the fan-out's width, the names a
    /// receive takes, or the name of a published value.
    pub kind: String,
    /// Attempts started (steps).
    pub attempts: u32,
    /// From the first start to the outcome, in ms (empty while in flight).
    pub duration_ms: Option<u64>,
    /// `completed`, `failed: ...`, `retrying`, `in flight`, the child's status, the event a
    /// receive took, a published value (JSON), ...
    pub outcome: String,
    /// `compensated`, `skipped: ...`, `failed: ...`, `compensating`, or empty.
    pub compensation: String,
    #[serde(skip)]
    started_ms: u64,
}

/// An event delivered to a run.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub(crate) struct Delivery {
    /// When it was delivered (ms since the Unix epoch).
    pub at_ms: u64,
    /// Its name.
    pub name: String,
    /// Its id.
    pub event_id: String,
    /// The receive that took it, if one did.
    pub taken_by: Option<u32>,
}

/// A rerun of a run: an operator started it again as another run.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub(crate) struct RerunRow {
    /// When the rerun was started (ms since the Unix epoch).
    pub at_ms: u64,
    /// The new run.
    pub run: String,
}

/// The runs the run of `history` was rerun as, oldest first.
pub(crate) fn reruns(history: &RunHistory) -> Vec<RerunRow> {
    history
        .entries
        .iter()
        .filter_map(|entry| match &entry.event {
            Event::RerunStarted { run } => Some(RerunRow {
                at_ms: entry.at_ms,
                run: run.to_string(),
            }),
            _ => None,
        })
        .collect()
}

/// The rows of `history`, in operation order.
pub(crate) fn rows(history: &RunHistory) -> Vec<Row> {
    let mut rows: BTreeMap<u32, Row> = BTreeMap::new();
    let mut names: BTreeMap<&str, &str> = BTreeMap::new();
    for entry in &history.entries {
        if let Event::EventDelivered { name, event_id, .. } = &entry.event {
            names.insert(event_id, name);
        }
        step_event(&mut rows, &entry.event, entry.at_ms);
        operation_event(&mut rows, &entry.event, entry.at_ms);
        receive_or_publish_event(&mut rows, &names, &entry.event, entry.at_ms);
        compensation_event(&mut rows, &entry.event, entry.at_ms);
    }
    rows.into_values().collect()
}

/// The events delivered to the run of `history`, in the order they arrived.
pub(crate) fn deliveries(history: &RunHistory) -> Vec<Delivery> {
    let mut deliveries: Vec<Delivery> = Vec::new();
    for entry in &history.entries {
        match &entry.event {
            Event::EventDelivered { name, event_id, .. } => deliveries.push(Delivery {
                at_ms: entry.at_ms,
                name: name.clone(),
                event_id: event_id.clone(),
                taken_by: None,
            }),
            Event::EventReceived { step, event_id } => {
                if let Some(d) = deliveries.iter_mut().find(|d| d.event_id == *event_id) {
                    d.taken_by = Some(step.0);
                }
            }
            _ => {}
        }
    }
    deliveries
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
        Event::WaitParked { step, polls, .. } => {
            let r = row(rows, *step, "wait", at);
            r.outcome = format!("waiting: {} polls so far, parked", polls.sent);
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

/// Folds a receive's or a publish's entry into its row; `names` maps the ids of the events
/// delivered so far to their names.
fn receive_or_publish_event(
    rows: &mut BTreeMap<u32, Row>,
    names: &BTreeMap<&str, &str>,
    event: &Event,
    at: u64,
) {
    match event {
        Event::ReceiveStarted {
            step,
            names: receives,
            deadline_ms,
        } => {
            let r = row(rows, *step, "receive", at);
            r.kind = receives.join(" or ");
            r.outcome = match deadline_ms {
                Some(deadline) => format!("waiting until {} UTC", utc_time(*deadline)),
                None => "waiting".into(),
            };
        }
        Event::EventReceived { step, event_id } => {
            let r = row(rows, *step, "receive", at);
            r.outcome = match names.get(event_id.as_str()) {
                Some(name) => format!("took {event_id} ({name})"),
                None => format!("took {event_id}"),
            };
            r.duration_ms = Some(at.saturating_sub(r.started_ms));
        }
        Event::ReceiveTimedOut { step } => {
            let r = row(rows, *step, "receive", at);
            r.outcome = "timed out".into();
            r.duration_ms = Some(at.saturating_sub(r.started_ms));
        }
        Event::ValuePublished { step, name, value } => {
            let r = row(rows, *step, "publish", at);
            r.kind = name.clone();
            r.outcome = value.to_string();
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
    if let Some(of) = &run.rerun_of {
        out += &format!("\nrerun of {of}");
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
    out += &crate::client::align(&header, &body);
    let reruns = reruns(history);
    if !reruns.is_empty() {
        out += "\nrerun as:\n";
        let header = ["started (UTC)", "run"];
        let body: Vec<[String; 2]> = reruns
            .into_iter()
            .map(|r| [utc_time(r.at_ms), r.run])
            .collect();
        out += &crate::client::align(&header, &body);
    }
    let deliveries = deliveries(history);
    if deliveries.is_empty() {
        return out;
    }
    out += "\nevents delivered:\n";
    let header = ["delivered (UTC)", "name", "event id", "taken by"];
    let body: Vec<[String; 4]> = deliveries
        .into_iter()
        .map(|d| {
            [
                utc_time(d.at_ms),
                d.name,
                cut(&d.event_id, 48),
                d.taken_by
                    .map(|step| format!("#{step}"))
                    .unwrap_or_else(|| "not taken".into()),
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

#[cfg(test)]
mod tests {
    use keel_engine::{Entry, Event, OperationIndex, RunHistory};
    use serde_json::json;

    fn history(events: Vec<Event>) -> RunHistory {
        let run = serde_json::from_value(json!({
            "id": "inbox", "workflow": "sample.inbox", "version": 1, "input": {},
            "status": "running", "created_at_ms": 0, "updated_at_ms": 0,
            "finished_at_ms": null, "output": null, "error": null
        }))
        .unwrap();
        let entries = events
            .into_iter()
            .enumerate()
            .map(|(i, event)| Entry {
                at_ms: 1000 * i as u64,
                event,
            })
            .collect();
        RunHistory { run, entries }
    }

    /// Receives show their names, deadline and the event they took or their time-out;
    /// publishes their name and value; deliveries the receive that took each, in arrival
    /// order, whether or not one took it.
    #[test]
    fn receives_publishes_and_deliveries_are_shown_with_what_took_what() {
        let delivered = |name: &str, id: &str| Event::EventDelivered {
            name: name.into(),
            event_id: id.into(),
            payload: json!({}),
        };
        let h = history(vec![
            delivered("go", "e-1"),
            Event::ReceiveStarted {
                step: OperationIndex(0),
                names: vec!["go".into(), "stop".into()],
                deadline_ms: None,
            },
            Event::EventReceived {
                step: OperationIndex(0),
                event_id: "e-1".into(),
            },
            Event::ValuePublished {
                step: OperationIndex(1),
                name: "progress".into(),
                value: json!({"done": 1}),
            },
            Event::ReceiveStarted {
                step: OperationIndex(2),
                names: vec!["go".into()],
                deadline_ms: Some(86_400_000),
            },
            delivered("stop", "e-2"),
            Event::ReceiveTimedOut {
                step: OperationIndex(2),
            },
        ]);
        let rows = super::rows(&h);
        let shown: Vec<(&str, &str, &str, Option<u64>)> = rows
            .iter()
            .map(|r| (r.what, r.kind.as_str(), r.outcome.as_str(), r.duration_ms))
            .collect();
        assert_eq!(
            shown,
            [
                ("receive", "go or stop", "took e-1 (go)", Some(1000)),
                ("publish", "progress", r#"{"done":1}"#, None),
                ("receive", "go", "timed out", Some(2000)),
            ]
        );
        let taken: Vec<(String, Option<u32>)> = super::deliveries(&h)
            .into_iter()
            .map(|d| (d.event_id, d.taken_by))
            .collect();
        assert_eq!(taken, [("e-1".into(), Some(0)), ("e-2".into(), None)]);
        let table = super::table(&h);
        assert!(table.contains("events delivered:"), "{table}");
        assert!(table.contains("e-2       not taken"), "{table}");

        // While it waits, a receive shows its deadline.
        let waiting = history(vec![Event::ReceiveStarted {
            step: OperationIndex(0),
            names: vec!["go".into()],
            deadline_ms: Some(86_400_000),
        }]);
        assert_eq!(
            super::rows(&waiting)[0].outcome,
            "waiting until 1970-01-02 00:00:00 UTC"
        );
    }
}
