//! Parallel fan-outs: the fork is one operation and its branches the operations right after
//! it, reserved when the fork starts (as [`Op::Branch`]) so that every branch keeps its
//! number whatever order the branches start in; a branch becomes a step or a child run when
//! its first attempt starts (`step.rs`, `child.rs`).

use super::{Op, RunState};
use crate::ids::OperationIndex;

impl RunState {
    /// `ForkStarted`: the fork takes the next operation number, its branches the ones after.
    pub(super) fn fork_started(
        &mut self,
        step: OperationIndex,
        branches: u32,
    ) -> Result<(), String> {
        if step.0 as usize != self.ops.len() {
            return Err(format!(
                "fork {step} started where operation {} was expected",
                self.ops.len()
            ));
        }
        self.ops.push(Op::Fork {
            branches,
            selected: None,
        });
        self.ops
            .extend(std::iter::repeat_n(Op::Branch, branches as usize));
        Ok(())
    }

    /// `ForkSelected`: the winner of a `select`, chosen once and among the fork's branches.
    pub(super) fn fork_selected(
        &mut self,
        step: OperationIndex,
        branch: u32,
    ) -> Result<(), String> {
        match self.ops.get_mut(step.0 as usize) {
            Some(Op::Fork {
                branches,
                selected: selected @ None,
            }) if branch < *branches => {
                *selected = Some(branch);
                Ok(())
            }
            other => Err(format!(
                "branch {branch} of {step} selected, which is {other:?}"
            )),
        }
    }
}
