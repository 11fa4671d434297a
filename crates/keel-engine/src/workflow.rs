//! Workflows: named, versioned async functions from an input to an output, deterministic given
//! their journal because all I/O goes through steps.

use std::future::Future;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::ctx::Ctx;
use crate::ids::{RunId, StepIndex};
use crate::journal::{ErrorRecord, RunStatus};

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

/// Why a workflow body returned without an output.
#[derive(Debug, thiserror::Error)]
pub enum WorkflowError {
    /// A step failed for good (permanent error, or its retry policy ran out). Workflow code
    /// may catch this and take another path; propagated, it makes the run compensate.
    #[error("step {step} ({kind}) failed: {}", error.message)]
    Step {
        /// The operation number.
        step: StepIndex,
        /// The step kind.
        kind: String,
        /// The recorded error.
        error: ErrorRecord,
    },
    /// A wait's deadline passed before its probe held. Workflow code may catch this (say, to
    /// recreate the resource); propagated, it makes the run compensate.
    #[error("wait {step} ({kind}) timed out after {polls} polls")]
    WaitTimedOut {
        /// The operation number.
        step: StepIndex,
        /// The wait kind.
        kind: String,
        /// Polls made since the wait (or its last resumption) began.
        polls: u32,
    },
    /// The compensation of a resource the run recreated while going on (see
    /// [`crate::Ctx::create_and_wait`]) failed for good.
    #[error("compensation of step {step} ({kind}) failed: {}", error.message)]
    CompensationFailed {
        /// The operation number.
        step: StepIndex,
        /// The step kind.
        kind: String,
        /// The recorded error.
        error: ErrorRecord,
    },
    /// A child run did not complete: it failed, compensated itself, or was resolved by an
    /// operator. Its own saga undid what it did.
    #[error("child run {child} ({workflow}) ended {status}: {error}")]
    Child {
        /// The parent's operation number.
        step: StepIndex,
        /// The child's workflow.
        workflow: String,
        /// The child's run id.
        child: RunId,
        /// How it ended.
        status: RunStatus,
        /// Why.
        error: String,
    },
    /// No branch of a `select` succeeded.
    #[error("no branch of select {fork} succeeded: {}", errors.join("; "))]
    NoneSucceeded {
        /// The fork's operation number.
        fork: StepIndex,
        /// Each branch's error, in list order.
        errors: Vec<String>,
    },
    /// The workflow decided to fail (business logic).
    #[error("{0}")]
    Failed(String),
    /// The engine stopped the run (cancellation, shutdown, non-determinism, storage failure).
    /// Workflow code should propagate it; the engine acts on the cause whatever is returned.
    #[error("run interrupted by the engine")]
    Interrupted,
}

impl WorkflowError {
    /// A business failure with this message.
    pub fn failed(message: impl Into<String>) -> Self {
        WorkflowError::Failed(message.into())
    }
}
