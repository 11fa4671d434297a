//! Creating an instance or a volume, with the step's idempotency key as client token (a retry
//! after a lost response or a crash gets the same resource back); undone by terminating or
//! deleting it, found by that token when the create's outcome is in doubt.

use std::time::Duration;

use keel_engine::{Compensation, RetryPolicy, Step, StepContext, StepError};
use serde::{Deserialize, Serialize};

use super::client::SimClient;
use super::wire::{Kind, Reply, Request};
use super::SERVICE;

/// The retry policy of every simulated-cloud call: generous, so that only a limiter that keeps
/// the caller throttled can exhaust it (12 attempts, backoff ceilings 100 ms doubling to 10 s).
pub const CALL_RETRY_POLICY: RetryPolicy = RetryPolicy::DEFAULT
    .with_attempts_max(12)
    .with_backoff(Duration::from_millis(100), Duration::from_secs(10));

/// Creates an instance; its output is the instance id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateInstance {
    /// Which generation of the run's instance (a tag on the resource).
    pub generation: u32,
}

impl Step for CreateInstance {
    const KIND: &'static str = "sim.create-instance";
    type Output = String;
    const RETRY_POLICY: RetryPolicy = CALL_RETRY_POLICY;
    const RATE_LIMIT: Option<&'static str> = Some(SERVICE);

    async fn execute(&self, ctx: &StepContext) -> Result<String, StepError> {
        create(ctx, Kind::Instance, self.generation).await
    }

    async fn compensate(
        &self,
        ctx: &StepContext,
        output: Option<String>,
    ) -> Result<Compensation, StepError> {
        delete(ctx, Kind::Instance, output).await
    }
}

/// Creates a volume; its output is the volume id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateVolume {
    /// Which generation of the run's volume (a tag on the resource).
    pub generation: u32,
}

impl Step for CreateVolume {
    const KIND: &'static str = "sim.create-volume";
    type Output = String;
    const RETRY_POLICY: RetryPolicy = CALL_RETRY_POLICY;
    const RATE_LIMIT: Option<&'static str> = Some(SERVICE);

    async fn execute(&self, ctx: &StepContext) -> Result<String, StepError> {
        create(ctx, Kind::Volume, self.generation).await
    }

    async fn compensate(
        &self,
        ctx: &StepContext,
        output: Option<String>,
    ) -> Result<Compensation, StepError> {
        delete(ctx, Kind::Volume, output).await
    }
}

async fn create(ctx: &StepContext, kind: Kind, generation: u32) -> Result<String, StepError> {
    let request = Request::Create {
        kind,
        token: ctx.key().to_string(),
        run: ctx.run_id().to_string(),
        generation,
    };
    match SimClient::of(ctx)?.call(&request).await? {
        Reply::Created { id } => Ok(id),
        other => Err(other.into_error(&format!("creating {kind}"))),
    }
}

/// Deletes the resource `output` names, or (in doubt) the one created with the step's key.
async fn delete(
    ctx: &StepContext,
    kind: Kind,
    output: Option<String>,
) -> Result<Compensation, StepError> {
    let client = SimClient::of(ctx)?;
    let id = match output {
        Some(id) => id,
        None => {
            let find = Request::FindByToken {
                kind,
                token: ctx.key().to_string(),
            };
            match client.call(&find).await? {
                Reply::Found { id: Some(id) } => id,
                // The create never took effect: nothing to undo.
                Reply::Found { id: None } => return Ok(Compensation::Done),
                other => return Err(other.into_error(&format!("finding the {kind} by token"))),
            }
        }
    };
    match client
        .call(&Request::Delete {
            kind,
            id: id.clone(),
        })
        .await?
    {
        Reply::Done | Reply::NotFound { .. } => Ok(Compensation::Done),
        other => Err(other.into_error(&format!("deleting {kind} {id}"))),
    }
}
