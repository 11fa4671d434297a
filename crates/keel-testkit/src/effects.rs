//! A ground-truth log of side effects, outside the process under test.
//!
//! Each side effect appends one line with a single `write(2)` to a file opened with
//! `O_APPEND`, and the page cache keeps it when the process dies, so after the child is gone
//! the file says which effects ran. One write can still be torn: Linux copies a write page by
//! page and stops at a pending SIGKILL, so a line that spans a page boundary may end at it,
//! with the next process's line glued on. [`read`] takes such a record as the effect in
//! flight at the kill: kept when what was written names it (action, run, step and key, the
//! first four fields), with attempt and pid 0 ("unknown") when the cut came before them, so a
//! checker still counts it; a record cut before its key names nothing and is dropped.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// What a line records.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// A step's side effect ran.
    Do,
    /// A compensation ran and removed the effect (if it existed).
    Undo,
}

/// One line of the log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Effect {
    /// Do or undo.
    pub action: Action,
    /// The run.
    pub run: String,
    /// The step's operation number.
    pub step: u32,
    /// The idempotency key the step was given.
    pub key: String,
    /// The attempt number (of the step, or of the compensation).
    pub attempt: u32,
    /// The process that ran it.
    pub pid: u32,
    /// When it was recorded, by the wall clock, in microseconds since the Unix epoch (absent
    /// from logs written before the field existed): to set an effect beside log lines and
    /// database rows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at_us: Option<u64>,
}

/// Appends `effect` to the log at `path` in one write.
pub fn append(path: &Path, effect: &Effect) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(effect).map_err(std::io::Error::other)?;
    line.push(b'\n');
    let mut file = OpenOptions::new().create(true).append(true).open(path)?;
    file.write_all(&line)
}

/// Reads every record of the log (an absent log is empty); a record torn by a kill counts as
/// described in the module's documentation.
pub fn read(path: &Path) -> Vec<Effect> {
    match std::fs::read_to_string(path) {
        Ok(text) => text.lines().flat_map(records).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => panic!("reading effect log {}: {e}", path.display()),
    }
}

/// The records of one line: one, or, after a torn write, the torn record (if it names its
/// effect) and the whole one glued to it.
fn records(line: &str) -> Vec<Effect> {
    if let Ok(effect) = serde_json::from_str(line) {
        return vec![effect];
    }
    let starts: Vec<usize> = line.match_indices("{\"action\":").map(|(i, _)| i).collect();
    let mut out = Vec::new();
    for (n, start) in starts.iter().enumerate() {
        let end = starts.get(n + 1).copied().unwrap_or(line.len());
        let piece = &line[*start..end];
        match serde_json::from_str(piece) {
            Ok(effect) => out.push(effect),
            Err(_) => out.extend(torn(piece)),
        }
    }
    assert!(
        starts.first() == Some(&0),
        "effect line {line:?} is neither a record nor a torn one"
    );
    out
}

/// What a torn record may hold: the fields up to the key always, the rest perhaps.
#[derive(Deserialize)]
struct Torn {
    action: Action,
    run: String,
    step: u32,
    key: String,
    attempt: Option<u32>,
    pid: Option<u32>,
}

/// A torn record cut back to its last whole field, if that names the effect (attempt and
/// pid 0 when they were cut off, the time absent).
fn torn(piece: &str) -> Option<Effect> {
    let mut cut = piece;
    while let Some(comma) = cut.rfind(',') {
        cut = &cut[..comma];
        if let Ok(t) = serde_json::from_str::<Torn>(&format!("{cut}}}")) {
            return Some(Effect {
                action: t.action,
                run: t.run,
                step: t.step,
                key: t.key,
                attempt: t.attempt.unwrap_or(0),
                pid: t.pid.unwrap_or(0),
                at_us: None,
            });
        }
    }
    None
}

/// This machine's clock in microseconds since the Unix epoch, as [`Effect::at_us`] holds it
/// (0 before the epoch).
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_micros() as u64)
}

/// Records that a step (or its compensation) ran `action` in the attempt described by `ctx`,
/// in the log at `log`. A log that cannot be written is a retryable step error.
pub fn record(
    log: &str,
    action: Action,
    ctx: &keel_engine::StepContext,
) -> Result<(), keel_engine::StepError> {
    let effect = Effect {
        action,
        run: ctx.run_id().to_string(),
        step: ctx.step().0,
        key: ctx.key().to_string(),
        attempt: ctx.attempt().0,
        pid: std::process::id(),
        at_us: Some(now_us()),
    };
    append(Path::new(log), &effect)
        .map_err(|e| keel_engine::StepError::retryable("effect log not writable").with_source(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn effect(attempt: u32, at_us: Option<u64>) -> Effect {
        Effect {
            action: Action::Undo,
            run: "r".into(),
            step: 59,
            key: "k".into(),
            attempt,
            pid: 7,
            at_us,
        }
    }

    /// A record torn by a kill (as seen under CI: cut inside its time, the next process's
    /// record glued on) is kept when it names its effect, with what was cut off unknown; one
    /// cut before its key is dropped.
    #[test]
    fn a_torn_record_is_kept_when_it_names_its_effect() {
        let whole = serde_json::to_string(&effect(2, Some(5))).unwrap();
        let first = serde_json::to_string(&effect(1, Some(123_456))).unwrap();
        let cut = &first[..first.find("\"at_us\":").unwrap() + 5];
        assert_eq!(
            records(&format!("{cut}{whole}")),
            vec![effect(1, None), effect(2, Some(5))]
        );
        let before_attempt = &first[..first.find("\"attempt\"").unwrap() + 3];
        let unknown = Effect {
            attempt: 0,
            pid: 0,
            ..effect(1, None)
        };
        assert_eq!(
            records(&format!("{before_attempt}{whole}")),
            vec![unknown, effect(2, Some(5))]
        );
        let before_key = &first[..first.find("\"key\"").unwrap() + 3];
        assert_eq!(
            records(&format!("{before_key}{whole}")),
            vec![effect(2, Some(5))]
        );
        assert_eq!(records(&whole), vec![effect(2, Some(5))]);
    }
}
