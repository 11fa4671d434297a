//! What an operator asks of a run (cancel, pause, resume) and the run's own pauses: state
//! of the run as a whole, not of one operation.

use super::step::StepOutcome;
use super::{Op, RunState};

impl RunState {
    /// `CancelRequested`: the run is to be cancelled (it compensates).
    pub(super) fn request_cancel(&mut self) -> Result<(), String> {
        self.cancel_requested = true;
        Ok(())
    }

    /// `PauseRequested`: the run is to pause once its in-flight steps end.
    pub(super) fn request_pause(&mut self) -> Result<(), String> {
        self.pause_requested = true;
        Ok(())
    }

    /// `RunPaused`: the run stopped for an operator, perhaps because a step ran out of
    /// retries.
    pub(super) fn run_paused(&mut self, exhausted: bool) -> Result<(), String> {
        self.paused_exhausted = exhausted;
        Ok(())
    }

    /// `RunResumed`: an operator took the run up again (or withdrew a pause request).
    pub(super) fn run_resumed(&mut self, at_ms: u64) -> Result<(), String> {
        self.pause_requested = false;
        // An operator took the run up: deaths before count no more (`poison.rs`).
        for op in &mut self.ops {
            if let Op::Step(op) = op {
                op.cut_off = 0;
            }
        }
        if std::mem::take(&mut self.paused_exhausted) {
            // A new round of attempts, timed from the resume.
            for op in &mut self.ops {
                if let Op::Step(op) = op {
                    if let StepOutcome::GaveUp { .. } = op.outcome {
                        op.outcome = StepOutcome::RetryScheduled { at_ms: 0 };
                        op.round_base = op.attempt.0;
                        op.first_started_at_ms = at_ms;
                    }
                }
            }
        }
        Ok(())
    }
}
