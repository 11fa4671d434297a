//! Durable timers: the wake time is journaled as an absolute time when the timer is set, and
//! the timer is marked fired once the workflow went past it.

use super::{Op, RunState};
use crate::ids::OperationIndex;

impl RunState {
    /// `TimerSet`: a timer takes the next operation number.
    pub(super) fn timer_set(
        &mut self,
        step: OperationIndex,
        wake_at_ms: u64,
    ) -> Result<(), String> {
        if step.0 as usize != self.ops.len() {
            return Err(format!(
                "timer {step} set out of order (next is #{})",
                self.ops.len()
            ));
        }
        self.ops.push(Op::Timer {
            wake_at_ms,
            fired: false,
        });
        Ok(())
    }

    /// `TimerFired`: the workflow went past a timer.
    pub(super) fn timer_fired(&mut self, step: OperationIndex) -> Result<(), String> {
        match self.ops.get_mut(step.0 as usize) {
            Some(Op::Timer { fired, .. }) => {
                *fired = true;
                Ok(())
            }
            _ => Err(format!("timer_fired for {step}, which is not a timer")),
        }
    }
}
