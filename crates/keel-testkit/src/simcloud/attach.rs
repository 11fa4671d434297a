//! Attaching a volume to an instance; undone by detaching it. The cloud refuses an attach
//! while either resource is not really ready (a wait may have been fooled by a lying read):
//! that refusal is retryable, as EC2's `IncorrectState` is.

use keel_engine::{Compensation, RetryPolicy, Step, StepContext, StepError};
use serde::{Deserialize, Serialize};

use super::client::SimClient;
use super::create::CALL_RETRY_POLICY;
use super::wire::{Reply, Request};
use super::SERVICE;

/// Attaches `volume` to `instance`; idempotent (attaching again what is attached succeeds).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachVolume {
    /// The instance id.
    pub instance: String,
    /// The volume id.
    pub volume: String,
}

impl Step for AttachVolume {
    const KIND: &'static str = "sim.attach-volume";
    type Output = ();
    const RETRY_POLICY: RetryPolicy = CALL_RETRY_POLICY;
    const RATE_LIMIT: Option<&'static str> = Some(SERVICE);

    async fn execute(&self, ctx: &StepContext) -> Result<(), StepError> {
        let request = Request::Attach {
            volume: self.volume.clone(),
            instance: self.instance.clone(),
        };
        match SimClient::of(ctx)?.call(&request).await? {
            Reply::Done => Ok(()),
            other => {
                Err(other.into_error(&format!("attaching {} to {}", self.volume, self.instance)))
            }
        }
    }

    async fn compensate(
        &self,
        ctx: &StepContext,
        _output: Option<()>,
    ) -> Result<Compensation, StepError> {
        let request = Request::Detach {
            volume: self.volume.clone(),
            instance: self.instance.clone(),
        };
        match SimClient::of(ctx)?.call(&request).await? {
            Reply::Done | Reply::NotFound { .. } => Ok(Compensation::Done),
            other => {
                Err(other.into_error(&format!("detaching {} from {}", self.volume, self.instance)))
            }
        }
    }
}
