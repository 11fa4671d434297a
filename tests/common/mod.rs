//! What the engine suites split over several files share: one module per family of suites
//! (`start`, `effects`), and here what suites of different families share: a scratch space
//! with a data directory, a ground-truth log and a test clock, a step whose undo the test can
//! take down, and readers of what the saga did. Each test binary compiles all of it and uses
//! its part.

#![allow(dead_code)]

pub(crate) mod batch;
pub(crate) mod bodies;
pub(crate) mod effects;
pub(crate) mod start;

use std::path::{Path, PathBuf};

use keel::testing::TestClock;
use keel::{Compensation, Event, OperationIndex, RunHistory, Step, StepContext, StepError};
use keel_testkit::crash::path_env;
use keel_testkit::effects::{self as ground_truth, Action};
use serde::{Deserialize, Serialize};

/// The ground-truth log in `dir`, as a path string (steps carry it in their values).
pub(crate) fn log_in(dir: &Path) -> String {
    path_env(dir, "effects.jsonl")
}

/// A temporary directory with a data directory and a ground-truth log, and a test clock.
pub(crate) struct Scratch {
    _dir: tempfile::TempDir,
    /// The data directory.
    pub(crate) data: PathBuf,
    /// The ground-truth log.
    pub(crate) log: String,
    /// The clock of the engines the test opens.
    pub(crate) clock: TestClock,
}

impl Scratch {
    /// A fresh scratch space; the clock has not moved.
    pub(crate) fn new() -> Scratch {
        let dir = tempfile::tempdir().unwrap();
        Scratch {
            data: dir.path().join("data"),
            log: log_in(dir.path()),
            clock: TestClock::new(),
            _dir: dir,
        }
    }

    /// From now on [`Undoable`]'s undo fails retryably, to be retried an hour later.
    pub(crate) fn take_undo_down(&self) {
        std::fs::write(format!("{}.down", self.log), "").unwrap();
    }

    /// From now on [`Undoable`]'s undo works again.
    pub(crate) fn bring_undo_up(&self) {
        std::fs::remove_file(format!("{}.down", self.log)).unwrap();
    }

    /// From now on [`Undoable`]'s undo fails permanently.
    pub(crate) fn refuse_undo(&self) {
        std::fs::write(format!("{}.refuse", self.log), "").unwrap();
    }

    /// The operation numbers of the steps undone, in the order the ground-truth log holds them.
    pub(crate) fn undone(&self) -> Vec<u32> {
        ground_truth::read(Path::new(&self.log))
            .iter()
            .filter(|e| e.action == Action::Undo)
            .map(|e| e.step)
            .collect()
    }
}

/// Records its effect in the ground-truth log at `log`; its undo fails permanently while
/// `<log>.refuse` exists and retryably (retried an hour later) while `<log>.down` exists (see
/// [`Scratch`]).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Undoable {
    pub(crate) log: String,
}

impl Step for Undoable {
    const KIND: &'static str = "test.undoable";
    type Output = ();

    async fn execute(&self, ctx: &StepContext) -> Result<(), StepError> {
        ground_truth::record(&self.log, Action::Do, ctx)
    }

    async fn compensate(
        &self,
        ctx: &StepContext,
        _: Option<()>,
    ) -> Result<Compensation, StepError> {
        if Path::new(&format!("{}.refuse", self.log)).exists() {
            return Err(StepError::permanent("undo refused"));
        }
        if Path::new(&format!("{}.down", self.log)).exists() {
            return Err(StepError::retryable("undo target down").with_retry_after(effects::HOUR));
        }
        ground_truth::record(&self.log, Action::Undo, ctx)?;
        Ok(Compensation::Done)
    }
}

/// The history entries about operation `step`.
pub(crate) fn entries_of(history: &RunHistory, step: u32) -> Vec<&Event> {
    history
        .entries
        .iter()
        .map(|e| &e.event)
        .filter(|e| e.step() == Some(OperationIndex(step)))
        .collect()
}

/// Whether the saga touched operation `step` (started, skipped or finished an undo).
pub(crate) fn compensation_touched(history: &RunHistory, step: u32) -> bool {
    entries_of(history, step).iter().any(|e| {
        matches!(
            e,
            Event::StepCompensationStarted { .. }
                | Event::StepCompensationSkipped { .. }
                | Event::StepCompensated { .. }
                | Event::StepCompensationFailed { .. }
        )
    })
}

/// How many entries of `history` match `predicate`.
pub(crate) fn count(history: &RunHistory, predicate: impl Fn(&Event) -> bool) -> usize {
    history
        .entries
        .iter()
        .filter(|e| predicate(&e.event))
        .count()
}
