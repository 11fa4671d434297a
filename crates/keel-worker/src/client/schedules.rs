//! `keel schedule create|list|show|pause|resume|delete`: the schedules of a running worker
//! (docs/api.md "Schedules", docs/schedules.md).

use std::time::Duration;

use clap::Subcommand;
use keel_engine::limits::INPUT_BYTES_MAX;
use keel_engine::{CatchUp, Every, Overlap, Schedule, ScheduleSpec};
use serde_json::Value;

use super::{align, encode, read_json, utc_time, Client, ClientError, Result};
use crate::api::EmptyRequest;

/// The schedule verbs.
#[derive(Debug, Subcommand)]
pub(crate) enum ScheduleCommand {
    /// Creates a schedule (idempotent: the same definition again shows the existing one; a
    /// different one under the name is refused until it is deleted).
    Create {
        /// The schedule's name (letters, digits, . _ -).
        name: String,
        /// A five-field cron expression in UTC, e.g. "0 3 * * *".
        #[arg(long, conflicts_with = "every", required_unless_present = "every")]
        cron: Option<String>,
        /// An interval counted from the creation, e.g. 90s, 15m, 1h, 1d.
        #[arg(long, value_parser = interval_seconds)]
        every: Option<u64>,
        /// The workflow each fire starts.
        #[arg(long)]
        workflow: String,
        /// The input of each run: a JSON file, or `-` for standard input (default: null).
        #[arg(long)]
        input: Option<String>,
        /// Missed fires after a downtime: skip, latest, or all:N (the latest N).
        #[arg(long, default_value = "skip", value_parser = parse_catch_up)]
        catch_up: CatchUp,
        /// Whether a fire starts while the previous fire's run is unfinished: allow or skip.
        #[arg(long, default_value = "allow", value_parser = parse_overlap)]
        overlap: Overlap,
    },
    /// Every schedule.
    List,
    /// One schedule.
    Show {
        /// The schedule's name.
        name: String,
    },
    /// Pauses a schedule: it starts nothing until resumed.
    Pause {
        /// The schedule's name.
        name: String,
    },
    /// Resumes a schedule from now on (fires missed while paused are never caught up).
    Resume {
        /// The schedule's name.
        name: String,
    },
    /// Deletes a schedule (runs it started are kept).
    Delete {
        /// The schedule's name.
        name: String,
    },
}

/// `90s`, `15m`, `1h`, `1d`: whole seconds, at least one.
fn interval_seconds(text: &str) -> std::result::Result<u64, String> {
    let duration: Duration = humantime::parse_duration(text)
        .map_err(|e| format!("{text:?} is not a duration like 90s, 15m, 1h or 1d: {e}"))?;
    if duration.subsec_nanos() != 0 || duration.as_secs() == 0 {
        return Err(format!(
            "{text:?}: an interval is a whole number of seconds, at least 1"
        ));
    }
    Ok(duration.as_secs())
}

fn parse_catch_up(text: &str) -> std::result::Result<CatchUp, String> {
    match text {
        "skip" => Ok(CatchUp::Skip),
        "latest" => Ok(CatchUp::Latest),
        _ => text
            .strip_prefix("all:")
            .and_then(|n| n.parse().ok())
            .map(|max| CatchUp::All { max })
            .ok_or_else(|| format!("{text:?}: expected skip, latest or all:N")),
    }
}

fn parse_overlap(text: &str) -> std::result::Result<Overlap, String> {
    match text {
        "allow" => Ok(Overlap::Allow),
        "skip" => Ok(Overlap::Skip),
        _ => Err(format!("{text:?}: expected allow or skip")),
    }
}

impl Client {
    /// `keel schedule ...`.
    pub(crate) fn schedule(&self, command: ScheduleCommand) -> Result<()> {
        let path = |name: &str| format!("/v1/schedules/{}", encode(name));
        match command {
            ScheduleCommand::Create {
                name,
                cron,
                every,
                workflow,
                input,
                catch_up,
                overlap,
            } => {
                let every = match (cron, every) {
                    (Some(expression), None) => Every::Cron(expression),
                    (None, Some(seconds)) => Every::Interval { seconds },
                    _ => return Err(ClientError::Usage("give one of --cron and --every".into())),
                };
                let input = match input {
                    Some(source) => read_json(&source, "input", INPUT_BYTES_MAX)?,
                    None => Value::Null,
                };
                let spec = ScheduleSpec {
                    name,
                    workflow,
                    input,
                    every,
                    catch_up,
                    overlap,
                };
                let schedule: Schedule = self.post("/v1/schedules", &spec)?;
                self.show_schedules(std::slice::from_ref(&schedule), &schedule);
            }
            ScheduleCommand::List => {
                let schedules: Vec<Schedule> = self.get("/v1/schedules")?;
                self.show_schedules(&schedules, &schedules);
            }
            ScheduleCommand::Show { name } => {
                let schedule: Schedule = self.get(&path(&name))?;
                self.show_schedules(std::slice::from_ref(&schedule), &schedule);
            }
            ScheduleCommand::Pause { name } => {
                let schedule: Schedule =
                    self.post(&format!("{}/pause", path(&name)), &EmptyRequest {})?;
                self.show_schedules(std::slice::from_ref(&schedule), &schedule);
            }
            ScheduleCommand::Resume { name } => {
                let schedule: Schedule =
                    self.post(&format!("{}/resume", path(&name)), &EmptyRequest {})?;
                self.show_schedules(std::slice::from_ref(&schedule), &schedule);
            }
            ScheduleCommand::Delete { name } => {
                let request = self.request("DELETE", &path(&name));
                let schedule: Schedule = self.answer(request.send_json(EmptyRequest {}))?;
                self.show_schedules(std::slice::from_ref(&schedule), &schedule);
            }
        }
        Ok(())
    }

    /// `value` as JSON with `--json`, else `schedules` as a table.
    fn show_schedules<T: serde::Serialize>(&self, schedules: &[Schedule], value: &T) {
        self.print(value, || schedule_table(schedules));
    }
}

fn schedule_table(schedules: &[Schedule]) -> String {
    let header = [
        "name",
        "workflow",
        "every",
        "catch-up",
        "overlap",
        "state",
        "next fire (UTC)",
        "last run",
        "fires",
        "skipped",
        "failed",
    ];
    let rows: Vec<[String; 11]> = schedules
        .iter()
        .map(|s| {
            [
                s.spec.name.clone(),
                s.spec.workflow.clone(),
                match &s.spec.every {
                    Every::Cron(expression) => format!("cron {expression}"),
                    Every::Interval { seconds } => format!("{seconds}s"),
                },
                match s.spec.catch_up {
                    CatchUp::Skip => "skip".into(),
                    CatchUp::Latest => "latest".into(),
                    CatchUp::All { max } => format!("all:{max}"),
                },
                match s.spec.overlap {
                    Overlap::Allow => "allow".into(),
                    Overlap::Skip => "skip".into(),
                },
                if s.paused { "paused" } else { "active" }.into(),
                s.next_fire_ms.map(utc_time).unwrap_or_else(|| "-".into()),
                s.last_run.clone().unwrap_or_else(|| "-".into()),
                s.fires.to_string(),
                s.skipped.to_string(),
                s.failed.to_string(),
            ]
        })
        .collect();
    align(&header, &rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse_to_the_definition() {
        assert_eq!(interval_seconds("1h"), Ok(3600));
        assert_eq!(interval_seconds("90s"), Ok(90));
        assert!(interval_seconds("0s").is_err());
        assert!(interval_seconds("1500ms").is_err());
        assert_eq!(parse_catch_up("all:5"), Ok(CatchUp::All { max: 5 }));
        assert_eq!(parse_catch_up("latest"), Ok(CatchUp::Latest));
        assert!(parse_catch_up("all:").is_err());
        assert_eq!(parse_overlap("skip"), Ok(Overlap::Skip));
        assert!(parse_overlap("never").is_err());
    }
}
