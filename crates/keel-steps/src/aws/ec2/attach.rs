//! Attachments of a volume to an instance: attach, detach, the attached probe.

use aws_sdk_ec2::types::VolumeAttachmentState;
use keel_engine::{Compensation, Probe, RetryPolicy, Step, StepContext, StepError};
use serde::{Deserialize, Serialize};

use super::volume::read_volume;
use super::{ATTACHMENT_NOT_FOUND, INSTANCE_NOT_FOUND, VOLUME_NOT_FOUND};
use crate::aws::error::AwsFailure;
use crate::aws::{clients, gone_after_lag, AWS_COMPENSATION_RETRY_POLICY, AWS_RETRY_POLICY};

/// Where a volume is attached: `(instance, device, state)` of each attachment.
fn attachments(volume: &aws_sdk_ec2::types::Volume) -> Vec<(String, String, String)> {
    volume
        .attachments()
        .iter()
        .map(|a| {
            (
                a.instance_id().unwrap_or_default().to_string(),
                a.device().unwrap_or_default().to_string(),
                a.state()
                    .map(|s| s.as_str().to_string())
                    .unwrap_or_default(),
            )
        })
        .collect()
}

/// Whether an attach or detach step changed anything: `false` when what it asked for was
/// already so before its first attempt (then its compensation leaves it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    /// Whether this step made the change (or may have).
    pub by_this_step: bool,
}

/// Attaches a volume to an instance at a device name. A "not found" for the volume or the
/// instance right after this workflow made them is lag, retried; a volume attached to another
/// instance is a conflict (nothing changed). On its first attempt it looks first: a volume
/// already attached to this instance is recorded as not this step's.
///
/// Compensation: detaches the volume (naming the instance: EC2 and moto both accept that).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachVolume {
    /// The volume.
    pub volume_id: String,
    /// The instance.
    pub instance_id: String,
    /// The device name, e.g. `/dev/sdf`.
    pub device: String,
}

impl AttachVolume {
    /// Where the volume is attached now: `Ok(Some(true))` to this instance (attaching or
    /// attached), `Ok(Some(false))` nowhere, a conflict if attached to another instance, a
    /// retryable error while an attachment is being detached; `Ok(None)` when the volume is
    /// not visible.
    async fn attached_here(&self, ec2: &aws_sdk_ec2::Client) -> Result<Option<bool>, StepError> {
        let Some(found) = read_volume(ec2, &self.volume_id).await? else {
            return Ok(None);
        };
        for (instance, device, state) in attachments(&found) {
            match state.as_str() {
                "detached" => {}
                "detaching" => {
                    return Err(StepError::retryable(format!(
                        "volume {} is being detached from instance {instance}; retried",
                        self.volume_id
                    )))
                }
                _ if instance == self.instance_id => return Ok(Some(true)),
                _ => {
                    return Err(StepError::permanent(format!(
                        "conflict: volume {} is attached to instance {instance} at {device}, not to {}; nothing was changed",
                        self.volume_id, self.instance_id
                    )))
                }
            }
        }
        Ok(Some(false))
    }
}

impl Step for AttachVolume {
    const KIND: &'static str = "aws.ec2.attach-volume";
    type Output = Attachment;
    const RETRY_POLICY: RetryPolicy = AWS_RETRY_POLICY;
    const RATE_LIMIT: Option<&'static str> = Some("ec2");
    const COMPENSATION_RETRY_POLICY: RetryPolicy = AWS_COMPENSATION_RETRY_POLICY;

    async fn execute(&self, ctx: &StepContext) -> Result<Attachment, StepError> {
        let ec2 = &clients(ctx)?.ec2;
        let first = ctx.attempt().0 == 1;
        match self.attached_here(ec2).await? {
            Some(true) => {
                return Ok(Attachment {
                    by_this_step: !first,
                })
            }
            Some(false) => {}
            None => {
                return Err(StepError::retryable(format!(
                    "volume {} is not visible yet after its creation; retried",
                    self.volume_id
                )))
            }
        }
        let attached = ec2
            .attach_volume()
            .volume_id(&self.volume_id)
            .instance_id(&self.instance_id)
            .device(&self.device)
            .send()
            .await;
        match attached {
            Ok(_) => Ok(Attachment { by_this_step: true }),
            Err(e) => {
                let f = AwsFailure::new("ec2:AttachVolume", &e);
                if f.is_any(&[VOLUME_NOT_FOUND, INSTANCE_NOT_FOUND]) {
                    Err(f
                        .as_lag("not visible yet after its creation; retried")
                        .into())
                } else if f.is("IncorrectState") {
                    Err(f
                        .as_lag("the instance or the volume is not ready yet")
                        .into())
                } else if f.is("VolumeInUse") {
                    // Attached meanwhile: by a lost earlier try of this step (ours), or
                    // elsewhere (a conflict, from attached_here); not visible yet is lag.
                    match self.attached_here(ec2).await? {
                        Some(true) => Ok(Attachment { by_this_step: true }),
                        _ => Err(f
                            .as_lag("in use, but its attachment is not visible yet")
                            .into()),
                    }
                } else {
                    Err(f.into())
                }
            }
        }
    }

    async fn compensate(
        &self,
        ctx: &StepContext,
        output: Option<Attachment>,
    ) -> Result<Compensation, StepError> {
        if output.is_some_and(|o| !o.by_this_step) {
            return Ok(Compensation::Done);
        }
        detach(ctx, &self.volume_id, &self.instance_id, &self.device).await?;
        Ok(Compensation::Done)
    }
}

async fn detach(
    ctx: &StepContext,
    volume_id: &str,
    instance_id: &str,
    device: &str,
) -> Result<(), StepError> {
    let ec2 = &clients(ctx)?.ec2;
    match ec2
        .detach_volume()
        .volume_id(volume_id)
        .instance_id(instance_id)
        .device(device)
        .send()
        .await
    {
        Ok(_) => Ok(()),
        Err(e) => {
            let f = AwsFailure::new("ec2:DetachVolume", &e);
            if f.is("IncorrectState") {
                // EC2's answer to a detach of a volume detaching or detached already (a
                // retry after a lost answer): done unless it still reads attached here.
                return match still_attached(ec2, volume_id, instance_id).await? {
                    false => Ok(()),
                    true => Err(f.as_lag("the volume still reads attached").into()),
                };
            }
            let missing = f.is_any(&[ATTACHMENT_NOT_FOUND, VOLUME_NOT_FOUND, INSTANCE_NOT_FOUND]);
            gone_after_lag(ctx, "ec2", f, missing)
        }
    }
}

/// Whether the volume reads attaching or attached to the instance (a volume not visible does
/// not).
async fn still_attached(
    ec2: &aws_sdk_ec2::Client,
    volume_id: &str,
    instance_id: &str,
) -> Result<bool, AwsFailure> {
    Ok(read_volume(ec2, volume_id).await?.is_some_and(|found| {
        attachments(&found)
            .iter()
            .any(|(i, _, state)| i == instance_id && (state == "attaching" || state == "attached"))
    }))
}

/// Detaches a volume from an instance. On its first attempt it looks first: a volume not
/// attached to the instance is recorded as not this step's.
///
/// Compensation: attaches it again at the same device, if this step detached it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DetachVolume {
    /// The volume.
    pub volume_id: String,
    /// The instance.
    pub instance_id: String,
    /// The device name it is attached at.
    pub device: String,
}

impl Step for DetachVolume {
    const KIND: &'static str = "aws.ec2.detach-volume";
    type Output = Attachment;
    const RETRY_POLICY: RetryPolicy = AWS_RETRY_POLICY;
    const RATE_LIMIT: Option<&'static str> = Some("ec2");
    const COMPENSATION_RETRY_POLICY: RetryPolicy = AWS_COMPENSATION_RETRY_POLICY;

    async fn execute(&self, ctx: &StepContext) -> Result<Attachment, StepError> {
        let ec2 = &clients(ctx)?.ec2;
        let first = ctx.attempt().0 == 1;
        if read_volume(ec2, &self.volume_id).await?.is_none() {
            return Err(StepError::retryable(format!(
                "volume {} is not visible (lag after its creation, or it does not exist); retried",
                self.volume_id
            )));
        }
        if !still_attached(ec2, &self.volume_id, &self.instance_id).await? {
            return Ok(Attachment {
                by_this_step: !first,
            });
        }
        match ec2
            .detach_volume()
            .volume_id(&self.volume_id)
            .instance_id(&self.instance_id)
            .device(&self.device)
            .send()
            .await
        {
            Ok(_) => Ok(Attachment { by_this_step: true }),
            Err(e) => {
                let f = AwsFailure::new("ec2:DetachVolume", &e);
                if f.is_any(&[ATTACHMENT_NOT_FOUND, "IncorrectState"]) {
                    // Detaching or detached meanwhile, by a lost earlier try of this step.
                    Ok(Attachment { by_this_step: true })
                } else {
                    Err(f.into())
                }
            }
        }
    }

    async fn compensate(
        &self,
        ctx: &StepContext,
        output: Option<Attachment>,
    ) -> Result<Compensation, StepError> {
        if output.is_some_and(|o| !o.by_this_step) {
            return Ok(Compensation::Done);
        }
        let again = AttachVolume {
            volume_id: self.volume_id.clone(),
            instance_id: self.instance_id.clone(),
            device: self.device.clone(),
        };
        let ec2 = &clients(ctx)?.ec2;
        if again.attached_here(ec2).await? == Some(true) {
            return Ok(Compensation::Done);
        }
        ec2.attach_volume()
            .volume_id(&self.volume_id)
            .instance_id(&self.instance_id)
            .device(&self.device)
            .send()
            .await
            .map_err(|e| AwsFailure::new("ec2:AttachVolume", &e))?;
        Ok(Compensation::Done)
    }
}

/// Holds when the volume reads attached to the instance (`attaching` is "not yet").
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeAttached {
    /// The volume.
    pub volume_id: String,
    /// The instance.
    pub instance_id: String,
}

impl Probe for VolumeAttached {
    const KIND: &'static str = "aws.ec2.volume-attached";
    /// The device name it is attached at.
    type Output = String;

    async fn probe(&self, ctx: &StepContext) -> Result<Option<String>, StepError> {
        let ec2 = &clients(ctx)?.ec2;
        let Some(found) = read_volume(ec2, &self.volume_id).await? else {
            return Ok(None);
        };
        Ok(found
            .attachments()
            .iter()
            .find(|a| {
                a.instance_id() == Some(self.instance_id.as_str())
                    && a.state() == Some(&VolumeAttachmentState::Attached)
            })
            .map(|a| a.device().unwrap_or_default().to_string()))
    }

    fn rate_limit(&self) -> Option<&str> {
        Some("ec2")
    }
}
