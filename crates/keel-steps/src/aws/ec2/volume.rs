//! Volumes: create (the key as `ClientToken` and tag), delete, the available probe.

use std::collections::BTreeMap;

use aws_sdk_ec2::types::{Filter, ResourceType, VolumeState, VolumeType};
use keel_engine::{Compensation, Probe, RetryPolicy, Step, StepContext, StepError};
use serde::{Deserialize, Serialize};

use super::{tags, VOLUME_NOT_FOUND};
use crate::aws::error::AwsFailure;
use crate::aws::{
    clients, confirm_absence, gone_after_lag, AWS_COMPENSATION_RETRY_POLICY, AWS_RETRY_POLICY,
    KEY_TAG,
};

/// A volume as created or adopted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    /// Its id (`vol-...`).
    pub volume_id: String,
    /// Its availability zone.
    pub availability_zone: String,
    /// Its size (GiB).
    pub size_gib: u32,
}

/// Creates a volume with the step's key as its `ClientToken` and in its `keel:key` tag; a
/// retry adopts the volume carrying the key if it has this step's zone and size (a conflict
/// naming both otherwise), then creates with the same token.
///
/// Compensation: deletes the volume. `VolumeInUse` (its detach not finished yet) and
/// `IncorrectState` (still being created) are retried.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateVolume {
    /// The availability zone (the instance's).
    pub availability_zone: String,
    /// Size in GiB.
    pub size_gib: u32,
    /// `gp3`, `gp2`, `io1`, ...; EC2's default when `None`.
    #[serde(default)]
    pub volume_type: Option<String>,
    /// Extra tags (the key tag is added).
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
}

impl CreateVolume {
    /// Whether `found` is what this step asks for: its zone and size.
    fn matches(&self, found: &Volume) -> bool {
        found.availability_zone == self.availability_zone && found.size_gib == self.size_gib
    }

    fn mismatch(&self, key: &str, existing: Option<&Volume>) -> StepError {
        let existing = match existing {
            Some(v) => format!(
                "volume {} ({} GiB in {})",
                v.volume_id, v.size_gib, v.availability_zone
            ),
            None => "a volume not readable yet".to_string(),
        };
        StepError::permanent(format!(
            "conflict: the key {key} already created {existing}; this step asks for {} GiB in {}; nothing was changed",
            self.size_gib, self.availability_zone
        ))
    }
}

fn volume_of(found: &aws_sdk_ec2::types::Volume) -> Result<Volume, StepError> {
    Ok(Volume {
        volume_id: found
            .volume_id()
            .ok_or_else(|| StepError::retryable("EC2 returned a volume without an id"))?
            .to_string(),
        availability_zone: found.availability_zone().unwrap_or_default().to_string(),
        size_gib: found.size().unwrap_or_default().max(0) as u32,
    })
}

impl Step for CreateVolume {
    const KIND: &'static str = "aws.ec2.create-volume";
    type Output = Volume;
    const RETRY_POLICY: RetryPolicy = AWS_RETRY_POLICY;
    const RATE_LIMIT: Option<&'static str> = Some("ec2");
    const COMPENSATION_RETRY_POLICY: RetryPolicy = AWS_COMPENSATION_RETRY_POLICY;

    async fn execute(&self, ctx: &StepContext) -> Result<Volume, StepError> {
        let ec2 = &clients(ctx)?.ec2;
        let key = ctx.key().to_string();
        if ctx.attempt().0 > 1 {
            if let Some(found) = volume_by_key(ec2, &key).await? {
                let found = volume_of(&found)?;
                if !self.matches(&found) {
                    return Err(self.mismatch(&key, Some(&found)));
                }
                tracing::info!(volume = %found.volume_id, "adopted the volume an earlier attempt created");
                return Ok(found);
            }
        }
        let size = i32::try_from(self.size_gib).map_err(|_| {
            StepError::permanent(format!("size_gib {} is too large", self.size_gib))
        })?;
        let created = ec2
            .create_volume()
            .availability_zone(&self.availability_zone)
            .size(size)
            .set_volume_type(self.volume_type.as_deref().map(VolumeType::from))
            .client_token(&key)
            .tag_specifications(tags(ResourceType::Volume, &key, &self.tags))
            .send()
            .await;
        match created {
            Ok(out) => Ok(Volume {
                volume_id: out
                    .volume_id()
                    .ok_or_else(|| StepError::retryable("ec2:CreateVolume returned no volume id"))?
                    .to_string(),
                availability_zone: out
                    .availability_zone()
                    .unwrap_or(&self.availability_zone)
                    .to_string(),
                size_gib: out.size().map_or(self.size_gib, |s| s.max(0) as u32),
            }),
            Err(e) => {
                let f = AwsFailure::new("ec2:CreateVolume", &e);
                if f.is("IdempotentParameterMismatch") {
                    let existing = match volume_by_key(ec2, &key).await {
                        Ok(found) => found.as_ref().map(volume_of).transpose()?,
                        Err(_) => None,
                    };
                    return Err(self.mismatch(&key, existing.as_ref()));
                }
                Err(f.into())
            }
        }
    }

    async fn compensate(
        &self,
        ctx: &StepContext,
        output: Option<Volume>,
    ) -> Result<Compensation, StepError> {
        let ec2 = &clients(ctx)?.ec2;
        let id = match output {
            Some(volume) => volume.volume_id,
            None => match volume_by_key(ec2, &ctx.key().to_string()).await? {
                // In doubt, only a volume this step would have made is its own (as for an
                // instance).
                Some(found) => {
                    let found = volume_of(&found)?;
                    if !self.matches(&found) {
                        tracing::warn!(volume = %found.volume_id, "the key's volume has other parameters: not this step's; left alone");
                        return Ok(Compensation::Done);
                    }
                    found.volume_id
                }
                None => {
                    confirm_absence(ctx, "ec2", "EC2 volume")?;
                    return Ok(Compensation::Done);
                }
            },
        };
        match ec2.delete_volume().volume_id(&id).send().await {
            Ok(_) => Ok(Compensation::Done),
            Err(e) => {
                let f = AwsFailure::new("ec2:DeleteVolume", &e);
                if f.is_any(&["VolumeInUse", "IncorrectState"]) {
                    Err(f
                        .as_lag("the volume is still attached or still being created")
                        .into())
                } else {
                    let missing = f.is(VOLUME_NOT_FOUND);
                    gone_after_lag(ctx, "ec2", f, missing).map(|()| Compensation::Done)
                }
            }
        }
    }
}

/// The volume carrying `key` in its `keel:key` tag.
async fn volume_by_key(
    ec2: &aws_sdk_ec2::Client,
    key: &str,
) -> Result<Option<aws_sdk_ec2::types::Volume>, AwsFailure> {
    let out = ec2
        .describe_volumes()
        .filters(
            Filter::builder()
                .name(format!("tag:{KEY_TAG}"))
                .values(key)
                .build(),
        )
        .send()
        .await
        .map_err(|e| AwsFailure::new("ec2:DescribeVolumes", &e))?;
    Ok(out.volumes().first().cloned())
}

/// The volume `id`, or `None` when EC2 says it does not exist (which may be lag).
pub(super) async fn read_volume(
    ec2: &aws_sdk_ec2::Client,
    id: &str,
) -> Result<Option<aws_sdk_ec2::types::Volume>, AwsFailure> {
    match ec2.describe_volumes().volume_ids(id).send().await {
        Ok(out) => Ok(out.volumes().first().cloned()),
        Err(e) => {
            let f = AwsFailure::new("ec2:DescribeVolumes", &e);
            if f.is(VOLUME_NOT_FOUND) {
                Ok(None)
            } else {
                Err(f)
            }
        }
    }
}

/// Holds when the volume reads `available`. "Not found" and `creating` are "not yet";
/// `in-use`, `deleting`, `deleted` and `error` end the wait as failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeAvailable {
    /// The volume.
    pub volume_id: String,
}

impl Probe for VolumeAvailable {
    const KIND: &'static str = "aws.ec2.volume-available";
    type Output = ();

    async fn probe(&self, ctx: &StepContext) -> Result<Option<()>, StepError> {
        let ec2 = &clients(ctx)?.ec2;
        let Some(found) = read_volume(ec2, &self.volume_id).await? else {
            tracing::debug!(volume = %self.volume_id, "not found: lag after its creation");
            return Ok(None);
        };
        match found.state() {
            Some(VolumeState::Available) => Ok(Some(())),
            Some(VolumeState::Creating) | None => Ok(None),
            Some(other) => Err(StepError::permanent(format!(
                "volume {} is {}: it will not become available",
                self.volume_id,
                other.as_str()
            ))),
        }
    }

    fn rate_limit(&self) -> Option<&str> {
        Some("ec2")
    }
}
