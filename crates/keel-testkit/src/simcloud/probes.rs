//! Readiness probes: an instance running, a volume available. A read answering "missing" or
//! "pending" is not ready yet; a resource that is gone will never be ready (permanent).

use keel_engine::{Probe, StepContext, StepError};
use serde::{Deserialize, Serialize};

use super::client::SimClient;
use super::wire::{Kind, Observed, Reply, Request};
use super::SERVICE;

/// Holds once the instance reads as running.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRunning {
    /// The instance id.
    pub instance: String,
}

impl Probe for InstanceRunning {
    const KIND: &'static str = "sim.instance-running";
    type Output = ();

    async fn probe(&self, ctx: &StepContext) -> Result<Option<()>, StepError> {
        read(ctx, Kind::Instance, &self.instance).await
    }

    fn rate_limit(&self) -> Option<&str> {
        Some(SERVICE)
    }
}

/// Holds once the volume reads as available.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeAvailable {
    /// The volume id.
    pub volume: String,
}

impl Probe for VolumeAvailable {
    const KIND: &'static str = "sim.volume-available";
    type Output = ();

    async fn probe(&self, ctx: &StepContext) -> Result<Option<()>, StepError> {
        read(ctx, Kind::Volume, &self.volume).await
    }

    fn rate_limit(&self) -> Option<&str> {
        Some(SERVICE)
    }
}

async fn read(ctx: &StepContext, kind: Kind, id: &str) -> Result<Option<()>, StepError> {
    let request = Request::Describe {
        kind,
        id: id.to_string(),
    };
    match SimClient::of(ctx)?.call(&request).await? {
        Reply::State {
            state: Observed::Ready,
        } => Ok(Some(())),
        Reply::State {
            state: Observed::Pending | Observed::Missing,
        }
        // Right after a create the id may not be known yet: lag, not absence.
        | Reply::NotFound { .. } => Ok(None),
        Reply::State {
            state: Observed::Gone,
        } => Err(StepError::permanent(format!("{kind} {id} is gone"))),
        other => Err(other.into_error(&format!("describing {kind} {id}"))),
    }
}
