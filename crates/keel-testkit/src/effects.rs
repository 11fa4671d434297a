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
use std::future::Future;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

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
    /// database rows. A step that records through [`PollClock`] gives the time its poll that
    /// recorded began instead (see there).
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

/// The time at which the latest poll of a future began, for an effect's [`Effect::at_us`].
///
/// The engine checks a step's lease before each poll of it, and a worker stopped (SIGSTOP)
/// inside a poll runs that poll on once continued. An effect timed when it is written cannot
/// tell such a poll from one the engine began after the continue (which its lease must
/// refuse): a stop between the engine's check and the clock's read, in a poll that had begun
/// before it, would time the effect after the continue. Timed at the start of the poll, the
/// effect carries when that poll began; only a stop between the engine's check and this
/// clock's read is still timed late: a few nested polls, the step's span and panic guard,
/// and for a compensation the decoding of its step and output.
#[derive(Debug, Default)]
pub struct PollClock(AtomicU64);

impl PollClock {
    /// Drives `body`, reading the clock at the start of each of its polls.
    pub async fn drive<F: Future>(&self, body: F) -> F::Output {
        let mut body = std::pin::pin!(body);
        std::future::poll_fn(|cx| {
            self.0.store(now_us(), Ordering::Relaxed);
            body.as_mut().poll(cx)
        })
        .await
    }

    /// When the current (or latest) poll of the driven future began, as [`now_us`] reads it.
    pub fn began_us(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Records that a step (or its compensation) ran `action` in the attempt described by `ctx`,
/// in the log at `log`. A log that cannot be written is a retryable step error.
pub fn record(
    log: &str,
    action: Action,
    ctx: &keel_engine::StepContext,
) -> Result<(), keel_engine::StepError> {
    record_at(log, action, ctx, now_us())
}

/// [`record`], with the effect's time given (a [`PollClock`]'s).
pub fn record_at(
    log: &str,
    action: Action,
    ctx: &keel_engine::StepContext,
    at_us: u64,
) -> Result<(), keel_engine::StepError> {
    let effect = Effect {
        action,
        run: ctx.run_id().to_string(),
        step: ctx.step().0,
        key: ctx.key().to_string(),
        attempt: ctx.attempt().0,
        pid: std::process::id(),
        at_us: Some(at_us),
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

    /// A poll held up inside (as by a SIGSTOP between the engine's lease check and the write)
    /// still carries the time it began; a later poll carries its own.
    #[tokio::test]
    async fn a_poll_clock_reads_when_each_poll_began() {
        let clock = PollClock::default();
        let (first, held) = clock
            .drive(async {
                let first = clock.began_us();
                std::thread::sleep(std::time::Duration::from_millis(5));
                tokio::task::yield_now().await;
                let began = clock.began_us();
                let before = now_us();
                std::thread::sleep(std::time::Duration::from_millis(50));
                (first, (began, before, clock.began_us()))
            })
            .await;
        let (began, before, after_hold) = held;
        assert!(
            first > 0 && began >= first + 5_000,
            "the first poll began at {first}, the second at {began}"
        );
        assert!(
            began <= before,
            "the second poll began at {began}, after {before}"
        );
        assert_eq!(after_hold, began, "the hold moved the poll's time");
        assert!(now_us() >= began + 50_000);
    }
}
