//! A ground-truth log of side effects, outside the process under test.
//!
//! Each side effect appends one line with a single `write(2)` to a file opened with
//! `O_APPEND`; a SIGKILL cannot tear such a line, and the page cache keeps it when the process
//! dies, so after the child is gone the file says exactly which effects ran.

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

/// Reads every line of the log (an absent log is empty).
pub fn read(path: &Path) -> Vec<Effect> {
    match std::fs::read_to_string(path) {
        Ok(text) => text
            .lines()
            .map(|line| {
                serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("torn effect line {line:?}: {e}"))
            })
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => panic!("reading effect log {}: {e}", path.display()),
    }
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
        at_us: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()
            .map(|since| since.as_micros() as u64),
    };
    append(Path::new(log), &effect)
        .map_err(|e| keel_engine::StepError::retryable("effect log not writable").with_source(e))
}
