//! Workflows: named, versioned async functions from an input to an output, deterministic given
//! their journal because all I/O goes through steps.

use std::future::Future;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::ctx::Ctx;

mod registry;

pub use crate::error::WorkflowError;

pub(crate) use registry::{BodyError, WorkflowEntry, Workflows};

/// A workflow type. Register it with [`crate::EngineBuilder::workflow`] so that unfinished
/// runs resume when the engine opens.
pub trait Workflow: Send + Sync + 'static {
    /// The workflow name, e.g. `iot.onboard-device`. Stored with every run.
    const NAME: &'static str;

    /// The version of the code; stored with every run for operators.
    const VERSION: u32 = 1;

    /// What a run does when a step keeps failing with retryable errors past its retry
    /// policy: hand the failure to the body (default), or pause for an operator.
    const ON_RETRIES_EXHAUSTED: OnRetriesExhausted = OnRetriesExhausted::Fail;

    /// How long finished runs of this workflow are kept before garbage collection, when not
    /// the engine's retention ([`crate::EngineBuilder::retention`]); an operator's
    /// [`crate::EngineBuilder::retention_for`] overrides both.
    const RETENTION: Option<std::time::Duration> = None;

    /// The input, journaled by `start`.
    type Input: Serialize + DeserializeOwned + Send + 'static;

    /// The output, journaled when the run completes.
    type Output: Serialize + DeserializeOwned + Send + 'static;

    /// Checks an input before anything is stored or created: [`crate::Engine::start`] (and
    /// the start of a child run) refuses an input this rejects, naming the field. The
    /// default accepts every input that decodes.
    fn validate(input: &Self::Input) -> Result<(), InvalidInput> {
        let _ = input;
        Ok(())
    }

    /// The workflow body. All side effects go through `ctx` (steps, timers).
    fn run(
        ctx: &mut Ctx,
        input: Self::Input,
    ) -> impl Future<Output = Result<Self::Output, WorkflowError>> + Send;
}

/// Why [`Workflow::validate`] refused an input: the field (a path such as `devices[3].name`)
/// and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("field {field}: {reason}")]
pub struct InvalidInput {
    /// The path of the offending field.
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

impl InvalidInput {
    /// `field` is wrong because of `reason`.
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        InvalidInput {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// What a run does when a step runs out of retries on retryable errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnRetriesExhausted {
    /// The step fails with [`WorkflowError::Step`]; the body decides (propagated, the run
    /// compensates).
    Fail,
    /// The run pauses (status `paused`) with the step's last error. An operator who fixed
    /// the cause resumes it, and the step gets a new round of attempts under its policy; or
    /// cancels it, and it compensates. The body never sees the failure.
    Pause,
}
