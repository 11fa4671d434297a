//! Child runs as the parent's journal tells them: started (with the child's id and input)
//! and, once the child settled, how it ended. The child's own journal is its own; the
//! parent's saga undoes a child through it (`compensation.rs`).

use serde_json::Value;

use super::{Op, RunState};
use crate::ids::{OperationIndex, RunId};
use crate::journal::RunStatus;

/// A child run as the parent's journal tells it.
#[derive(Clone, Debug, PartialEq)]
pub struct ChildOp {
    /// The child's workflow.
    pub workflow: String,
    /// The child's run id.
    pub child: RunId,
    /// The child's input.
    pub input: Value,
    /// How the child settled, once it did.
    pub end: Option<ChildEnd>,
}

/// How a child run settled.
#[derive(Clone, Debug, PartialEq)]
pub struct ChildEnd {
    /// Completed, failed, compensated or resolved.
    pub status: RunStatus,
    /// Its output, if it completed.
    pub output: Option<Value>,
    /// Why it did not complete.
    pub error: Option<String>,
}

impl RunState {
    /// `ChildStarted`: a child run takes the next operation number, or a fan-out's branch.
    pub(super) fn child_started(
        &mut self,
        step: OperationIndex,
        workflow: &str,
        child: &RunId,
        input: &Value,
    ) -> Result<(), String> {
        let op = Op::Child(ChildOp {
            workflow: workflow.to_owned(),
            child: child.clone(),
            input: input.clone(),
            end: None,
        });
        let index = step.0 as usize;
        if index == self.ops.len() {
            self.ops.push(op);
        } else if let Some(slot @ Op::Branch) = self.ops.get_mut(index) {
            *slot = op;
        } else {
            return Err(format!(
                "child {step} started where operation {} was expected",
                self.ops.len()
            ));
        }
        self.children += 1;
        Ok(())
    }

    /// `ChildEnded`: a started child run settled, once.
    pub(super) fn child_ended(
        &mut self,
        step: OperationIndex,
        status: RunStatus,
        output: &Option<Value>,
        error: &Option<String>,
    ) -> Result<(), String> {
        match self.ops.get_mut(step.0 as usize) {
            Some(Op::Child(op)) if op.end.is_none() => {
                op.end = Some(ChildEnd {
                    status,
                    output: output.clone(),
                    error: error.clone(),
                });
                Ok(())
            }
            other => Err(format!("child_ended for {step} in state {other:?}")),
        }
    }
}
