//! Why the engine stops a workflow body: the cause an interrupted `ctx` call leaves for the
//! executor. Its own module so that the body's context, its lanes and the executor share it
//! without depending on each other for it.

use crate::error::EngineError;
use crate::ids::OperationIndex;

/// Why the engine stopped a workflow body. Once set, every later `ctx` call returns
/// [`WorkflowError::Interrupted`] and the executor acts on this cause, whatever the body
/// returns.
#[derive(Debug)]
pub(crate) enum Interrupt {
    Cancelled,
    ShutDown,
    /// The run parked while its body waited (`engine/parking.rs`): its cell is detached
    /// already, and it is loaded again when its wait ends.
    Parked,
    /// An operator paused the run, or a step ran out of retries (`exhausted`).
    Paused {
        reason: String,
        exhausted: bool,
    },
    /// A `select` branch stopped because another branch won; never leaves the select.
    Stopped,
    NonDeterminism {
        index: OperationIndex,
        detail: String,
    },
    Engine(EngineError),
}
