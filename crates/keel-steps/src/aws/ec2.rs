//! EC2 steps: launch an instance, create a volume, attach and detach it, and the probes that
//! tell when each is usable, as the BOSH AWS CPI does it.
//!
//! Idempotency: `RunInstances` and `CreateVolume` carry the step's key as their
//! `ClientToken`, so EC2 itself answers a retry (after a lost response, a throttled SDK retry
//! or a crash) with the instance or volume the first call made; the same token with other
//! parameters is `IdempotentParameterMismatch`, a permanent conflict naming both. Every
//! instance and volume also carries the key in the tag `keel:key`: a retry looks it up first,
//! and a compensation in doubt finds it there.
//!
//! Reads lag and flap: right after a create, "not found" is the resource not being visible
//! yet (retried, never taken as absence before the service's visibility lag has passed), and
//! an instance may read running, missing, running. The probes answer "not yet" to a miss, so a
//! wait with two confirmations needs two running reads in a row.
//!
//! Termination takes the CPI's fast path: the compensation tags the instance
//! `keel:to-be-deleted`, asks EC2 to terminate it and does not wait (EC2 takes about 50 s, at
//! worst minutes). The sweep ([`SweepInstances`], workflow `ec2.sweep`) terminates again
//! whatever carries the tag and is not terminated.

use std::collections::BTreeMap;
use std::time::Duration;

use aws_sdk_ec2::types::{
    Filter, InstanceStateName, InstanceType, Placement, ResourceType, Tag, TagSpecification,
    VolumeAttachmentState, VolumeState, VolumeType,
};
use keel_engine::{
    Compensation, LearnedDeadline, Probe, RetryPolicy, Step, StepContext, StepError, WaitPolicy,
};
use serde::{Deserialize, Serialize};

use super::error::AwsFailure;
use super::{
    clients, confirm_absence, gone_after_lag, AWS_COMPENSATION_RETRY_POLICY, AWS_RETRY_POLICY,
    KEY_TAG,
};

/// The tag the fast-path termination puts on an instance before it asks EC2 to terminate it;
/// its value is the key of the step whose compensation did.
pub const TO_BE_DELETED_TAG: &str = "keel:to-be-deleted";

const INSTANCE_NOT_FOUND: &str = "InvalidInstanceID.NotFound";
const VOLUME_NOT_FOUND: &str = "InvalidVolume.NotFound";
const ATTACHMENT_NOT_FOUND: &str = "InvalidAttachment.NotFound";

/// Instance states in which an instance still exists for its owner (not shutting down or
/// terminated).
const LIVE_STATES: &[&str] = &["pending", "running", "stopping", "stopped"];

/// The wait for an instance to run, as the CPI learned it: poll every second (growing to 5 s),
/// two running reads in a row (reads flap), give up at `deadline` (the CPI's lesson: about
/// 60 s) while the kind has fewer than 20 samples, then at twice the learned p90 (a fresh
/// instance usually runs in about p50, so replacing one that is past the usual tail costs
/// less than waiting on it: [`LearnedDeadline::UsualTail`]).
pub fn instance_running_policy(deadline: Duration) -> WaitPolicy {
    recreatable(Duration::from_secs(1), Duration::from_secs(5), deadline)
}

/// The wait for a volume to be available: as [`instance_running_policy`], polling from
/// 250 ms (the CPI's lesson for the deadline: about 10 s).
pub fn volume_available_policy(deadline: Duration) -> WaitPolicy {
    recreatable(Duration::from_millis(250), Duration::from_secs(2), deadline)
}

/// The wait for an attachment: it cannot be recreated, so the learned deadline stays at the
/// far tail; polls from 500 ms.
pub fn volume_attached_policy(deadline: Duration) -> WaitPolicy {
    let mut policy = WaitPolicy::every(Duration::from_millis(500), deadline)
        .confirmations(2)
        .learned();
    policy.interval_max = Duration::from_secs(5);
    policy
}

fn recreatable(interval: Duration, interval_max: Duration, deadline: Duration) -> WaitPolicy {
    let mut policy = WaitPolicy::every(interval, deadline)
        .confirmations(2)
        .learned()
        .learned_deadline(LearnedDeadline::UsualTail);
    policy.interval_max = interval_max;
    policy
}

/// An instance as launched or adopted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    /// Its id (`i-...`).
    pub instance_id: String,
    /// Its availability zone (a volume for it must be made there).
    pub availability_zone: String,
    /// The image it runs.
    pub image_id: String,
    /// Its type.
    pub instance_type: String,
}

/// Launches one instance with the step's key as its `ClientToken` and in its `keel:key` tag.
/// A retry first looks the key up by tag and adopts what it finds if it has this step's image
/// and type (a conflict naming both otherwise); then it launches with the same token, which
/// EC2 answers with the instance the token already made.
///
/// Compensation (the CPI's fast path): tags the instance `keel:to-be-deleted`, asks EC2 to
/// terminate it, and does not wait for `terminated`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunInstance {
    /// The image (`ami-...`).
    pub image_id: String,
    /// The instance type, e.g. `t3.micro`.
    pub instance_type: String,
    /// Where to place it; EC2 chooses when `None`.
    #[serde(default)]
    pub availability_zone: Option<String>,
    /// Extra tags (the key tag is added).
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
}

impl RunInstance {
    fn instance_of(&self, found: &aws_sdk_ec2::types::Instance) -> Result<Instance, StepError> {
        let instance_id = found
            .instance_id()
            .ok_or_else(|| StepError::retryable("EC2 returned an instance without an id"))?;
        Ok(Instance {
            instance_id: instance_id.to_string(),
            availability_zone: found
                .placement()
                .and_then(|p| p.availability_zone())
                .unwrap_or_default()
                .to_string(),
            image_id: found.image_id().unwrap_or_default().to_string(),
            instance_type: found
                .instance_type()
                .map(|t| t.as_str().to_string())
                .unwrap_or_default(),
        })
    }

    /// Whether `found` is what this step asks for: its image, type and (when given) zone.
    fn matches(&self, found: &Instance) -> bool {
        found.image_id == self.image_id
            && found.instance_type == self.instance_type
            && self
                .availability_zone
                .as_ref()
                .is_none_or(|az| *az == found.availability_zone)
    }

    /// The conflict when the key already launched an instance with other parameters.
    fn mismatch(&self, key: &str, existing: Option<&Instance>) -> StepError {
        let existing = match existing {
            Some(i) => format!(
                "instance {} (image {}, type {})",
                i.instance_id, i.image_id, i.instance_type
            ),
            None => "an instance not readable yet".to_string(),
        };
        StepError::permanent(format!(
            "conflict: the key {key} already launched {existing}; this step asks for image {}, type {}; nothing was changed",
            self.image_id, self.instance_type
        ))
    }
}

impl Step for RunInstance {
    const KIND: &'static str = "aws.ec2.run-instance";
    type Output = Instance;
    const RETRY_POLICY: RetryPolicy = AWS_RETRY_POLICY;
    const RATE_LIMIT: Option<&'static str> = Some("ec2");
    const COMPENSATION_RETRY_POLICY: RetryPolicy = AWS_COMPENSATION_RETRY_POLICY;

    async fn execute(&self, ctx: &StepContext) -> Result<Instance, StepError> {
        let ec2 = &clients(ctx)?.ec2;
        let key = ctx.key().to_string();
        if ctx.attempt().0 > 1 {
            if let Some(found) = instance_by_key(ec2, &key, LIVE_STATES).await? {
                let found = self.instance_of(&found)?;
                if !self.matches(&found) {
                    return Err(self.mismatch(&key, Some(&found)));
                }
                tracing::info!(instance = %found.instance_id, "adopted the instance an earlier attempt launched");
                return Ok(found);
            }
        }
        let placement = self
            .availability_zone
            .as_ref()
            .map(|az| Placement::builder().availability_zone(az).build());
        let launched = ec2
            .run_instances()
            .image_id(&self.image_id)
            .instance_type(InstanceType::from(self.instance_type.as_str()))
            .min_count(1)
            .max_count(1)
            .client_token(&key)
            .set_placement(placement)
            .tag_specifications(tags(ResourceType::Instance, &key, &self.tags))
            .send()
            .await;
        match launched {
            Ok(out) => {
                let found = out
                    .instances()
                    .first()
                    .ok_or_else(|| StepError::retryable("ec2:RunInstances returned no instance"))?;
                self.instance_of(found)
            }
            Err(e) => {
                let f = AwsFailure::new("ec2:RunInstances", &e);
                if f.is("IdempotentParameterMismatch") {
                    let existing = match instance_by_key(ec2, &key, &[]).await {
                        Ok(found) => found.map(|i| self.instance_of(&i)).transpose()?,
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
        output: Option<Instance>,
    ) -> Result<Compensation, StepError> {
        let ec2 = &clients(ctx)?.ec2;
        let key = ctx.key().to_string();
        let id = match output {
            Some(instance) => instance.instance_id,
            None => match instance_by_key(ec2, &key, LIVE_STATES).await? {
                // In doubt, only what this step would have made is its own: an instance of
                // the key with other parameters belongs to whoever made it with that key (a
                // conflict this step refused), and is left alone.
                Some(found) => {
                    let found = self.instance_of(&found)?;
                    if !self.matches(&found) {
                        tracing::warn!(instance = %found.instance_id, "the key's instance has other parameters: not this step's; left alone");
                        return Ok(Compensation::Done);
                    }
                    found.instance_id
                }
                None => {
                    confirm_absence(ctx, "ec2", "EC2 instance")?;
                    return Ok(Compensation::Done);
                }
            },
        };
        terminate_fast(ctx, &id, &key).await?;
        Ok(Compensation::Done)
    }
}

/// The fast path: tag `id` `keel:to-be-deleted`, ask EC2 to terminate it, do not wait.
async fn terminate_fast(ctx: &StepContext, id: &str, key: &str) -> Result<(), StepError> {
    let ec2 = &clients(ctx)?.ec2;
    let tagged = ec2
        .create_tags()
        .resources(id)
        .tags(tag(TO_BE_DELETED_TAG, key))
        .send()
        .await;
    if let Err(e) = tagged {
        let f = AwsFailure::new("ec2:CreateTags", &e);
        // Throttled or transient: try again. Anything else (a read that flapped to "not
        // found", a tag limit, a tag-only deny) must not keep the terminate from being asked.
        if f.class != super::error::Class::Permanent {
            return Err(f.into());
        }
        tracing::warn!(instance = %id, error = %f, "could not tag the instance to be deleted; terminating it anyway");
    }
    match ec2.terminate_instances().instance_ids(id).send().await {
        Ok(_) => {
            tracing::info!(instance = %id, "termination requested; not waited for (the sweep finishes what is left)");
            Ok(())
        }
        Err(e) => {
            let f = AwsFailure::new("ec2:TerminateInstances", &e);
            if !f.is(INSTANCE_NOT_FOUND) {
                return Err(f.into());
            }
            // EC2 keeps a terminated instance visible for about an hour, so "not found" for
            // an id it gave is lag or a flapping read: absent only when, past the lag, a read
            // by filter (which never fails for a missing id) does not show it live.
            gone_after_lag(ctx, "ec2", f, true)?;
            let live = ec2
                .describe_instances()
                .filters(Filter::builder().name("instance-id").values(id).build())
                .filters(state_filter(LIVE_STATES))
                .send()
                .await
                .map_err(|e| AwsFailure::new("ec2:DescribeInstances", &e))?
                .reservations()
                .iter()
                .any(|r| !r.instances().is_empty());
            if live {
                return Err(StepError::retryable(format!(
                    "ec2:TerminateInstances answered {INSTANCE_NOT_FOUND} for {id}, which still reads live: a flapping read; retried"
                )));
            }
            Ok(())
        }
    }
}

/// A filter on the instance state names `states`.
fn state_filter(states: &[&str]) -> Filter {
    let mut filter = Filter::builder().name("instance-state-name");
    for state in states {
        filter = filter.values(*state);
    }
    filter.build()
}

/// The instance carrying `key` in its `keel:key` tag, in one of `states` (any state when
/// empty); the most recently launched if several do.
async fn instance_by_key(
    ec2: &aws_sdk_ec2::Client,
    key: &str,
    states: &[&str],
) -> Result<Option<aws_sdk_ec2::types::Instance>, AwsFailure> {
    let mut request = ec2.describe_instances().filters(
        Filter::builder()
            .name(format!("tag:{KEY_TAG}"))
            .values(key)
            .build(),
    );
    if !states.is_empty() {
        request = request.filters(state_filter(states));
    }
    let out = request
        .send()
        .await
        .map_err(|e| AwsFailure::new("ec2:DescribeInstances", &e))?;
    Ok(out
        .reservations()
        .iter()
        .flat_map(|r| r.instances())
        .max_by_key(|i| i.launch_time().map(|t| (t.secs(), t.subsec_nanos())))
        .cloned())
}

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
async fn volume(
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
        let Some(found) = volume(ec2, &self.volume_id).await? else {
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
    Ok(volume(ec2, volume_id).await?.is_some_and(|found| {
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
        if volume(ec2, &self.volume_id).await?.is_none() {
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

/// An instance that reads `running`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Running {
    /// Its id.
    pub instance_id: String,
    /// Its private IP address, once it has one.
    pub private_ip: Option<String>,
}

/// Holds when the instance reads `running`. "Not found" (lag right after the launch, or a
/// flapping read) and `pending` are "not yet"; so are `shutting-down` and `terminated` (gone
/// at launch: the wait's deadline lets `Ctx::create_and_wait` make another); `stopping` and
/// `stopped` end the wait as failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRunning {
    /// The instance.
    pub instance_id: String,
}

impl Probe for InstanceRunning {
    const KIND: &'static str = "aws.ec2.instance-running";
    type Output = Running;

    async fn probe(&self, ctx: &StepContext) -> Result<Option<Running>, StepError> {
        let ec2 = &clients(ctx)?.ec2;
        let out = match ec2
            .describe_instances()
            .instance_ids(&self.instance_id)
            .send()
            .await
        {
            Ok(out) => out,
            Err(e) => {
                let f = AwsFailure::new("ec2:DescribeInstances", &e);
                if f.is(INSTANCE_NOT_FOUND) {
                    tracing::debug!(instance = %self.instance_id, "not found: lag or a flapping read");
                    return Ok(None);
                }
                return Err(f.into());
            }
        };
        let Some(found) = out
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .find(|i| i.instance_id() == Some(self.instance_id.as_str()))
        else {
            return Ok(None);
        };
        match found.state().and_then(|s| s.name()) {
            Some(InstanceStateName::Running) => Ok(Some(Running {
                instance_id: self.instance_id.clone(),
                private_ip: found.private_ip_address().map(str::to_string),
            })),
            Some(InstanceStateName::Pending) | None => Ok(None),
            // Gone at launch (capacity, a volume limit): it will never run, and the wait's
            // deadline lets `create_and_wait` make another.
            Some(InstanceStateName::ShuttingDown | InstanceStateName::Terminated) => {
                tracing::warn!(instance = %self.instance_id, "terminated before it ran; waiting out the deadline so that another can be made");
                Ok(None)
            }
            Some(other) => Err(StepError::permanent(format!(
                "instance {} is {}: it will not run",
                self.instance_id,
                other.as_str()
            ))),
        }
    }

    fn rate_limit(&self) -> Option<&str> {
        Some("ec2")
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
        let Some(found) = volume(ec2, &self.volume_id).await? else {
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
        let Some(found) = volume(ec2, &self.volume_id).await? else {
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

/// What a sweep asked EC2 to terminate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Swept {
    /// The instances it asked EC2 to terminate (again).
    pub instance_ids: Vec<String>,
    /// The instances EC2 refused to terminate for good (termination protection, a deny),
    /// with its answer: left for an operator; the sweep goes on with the others.
    #[serde(default)]
    pub refused: Vec<(String, String)>,
}

/// Finishes the fast path's terminations: asks EC2 to terminate every instance tagged
/// `keel:to-be-deleted` that has not reached `terminated` (terminating one that is shutting
/// down already is harmless). Nothing to undo.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SweepInstances {}

/// Instances per `TerminateInstances` call.
const TERMINATE_BATCH: usize = 500;

impl Step for SweepInstances {
    const KIND: &'static str = "aws.ec2.sweep-instances";
    type Output = Swept;
    const RETRY_POLICY: RetryPolicy = AWS_RETRY_POLICY;
    const RATE_LIMIT: Option<&'static str> = Some("ec2");

    async fn execute(&self, ctx: &StepContext) -> Result<Swept, StepError> {
        let ec2 = &clients(ctx)?.ec2;
        let ids = to_be_deleted(ec2).await?;
        let mut refused = Vec::new();
        for batch in ids.chunks(TERMINATE_BATCH) {
            let Err(e) = ec2
                .terminate_instances()
                .set_instance_ids(Some(batch.to_vec()))
                .send()
                .await
            else {
                continue;
            };
            let f = AwsFailure::new("ec2:TerminateInstances", &e);
            if f.class != super::error::Class::Permanent {
                return Err(f.into());
            }
            // One of them gone since the listing, or protected: one by one, so one instance
            // never holds back the others.
            for id in batch {
                if let Err(e) = ec2.terminate_instances().instance_ids(id).send().await {
                    let f = AwsFailure::new("ec2:TerminateInstances", &e);
                    if f.class != super::error::Class::Permanent {
                        return Err(f.into());
                    }
                    if !f.is(INSTANCE_NOT_FOUND) {
                        tracing::warn!(instance = %id, error = %f, "sweep: EC2 refused to terminate it");
                        refused.push((id.clone(), f.to_string()));
                    }
                }
            }
        }
        if !ids.is_empty() {
            tracing::info!(
                instances = ids.len(),
                refused = refused.len(),
                "sweep: termination requested"
            );
        }
        let instance_ids = ids
            .into_iter()
            .filter(|id| !refused.iter().any(|(r, _)| r == id))
            .collect();
        Ok(Swept {
            instance_ids,
            refused,
        })
    }

    async fn compensate(
        &self,
        _ctx: &StepContext,
        _output: Option<Swept>,
    ) -> Result<Compensation, StepError> {
        Ok(Compensation::Done)
    }
}

/// Instances tagged `keel:to-be-deleted` and not terminated.
async fn to_be_deleted(ec2: &aws_sdk_ec2::Client) -> Result<Vec<String>, AwsFailure> {
    let mut ids = Vec::new();
    let mut pages = ec2
        .describe_instances()
        .filters(
            Filter::builder()
                .name("tag-key")
                .values(TO_BE_DELETED_TAG)
                .build(),
        )
        .filters(
            Filter::builder()
                .name("instance-state-name")
                .set_values(Some(
                    LIVE_STATES
                        .iter()
                        .chain(&["shutting-down"])
                        .map(|s| s.to_string())
                        .collect(),
                ))
                .build(),
        )
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| AwsFailure::new("ec2:DescribeInstances", &e))?;
        for instance in page.reservations().iter().flat_map(|r| r.instances()) {
            if let Some(id) = instance.instance_id() {
                ids.push(id.to_string());
            }
        }
    }
    ids.sort();
    Ok(ids)
}

/// Holds when none of the instances is left short of `terminated` (one that reads "not
/// found" is gone).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstancesTerminated {
    /// The instances.
    pub instance_ids: Vec<String>,
}

impl Probe for InstancesTerminated {
    const KIND: &'static str = "aws.ec2.instances-terminated";
    type Output = ();

    async fn probe(&self, ctx: &StepContext) -> Result<Option<()>, StepError> {
        if self.instance_ids.is_empty() {
            return Ok(Some(()));
        }
        let ec2 = &clients(ctx)?.ec2;
        let mut pages = ec2
            .describe_instances()
            .filters(
                Filter::builder()
                    .name("instance-id")
                    .set_values(Some(self.instance_ids.clone()))
                    .build(),
            )
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| AwsFailure::new("ec2:DescribeInstances", &e))?;
            let left = page
                .reservations()
                .iter()
                .flat_map(|r| r.instances())
                .any(|i| i.state().and_then(|s| s.name()) != Some(&InstanceStateName::Terminated));
            if left {
                return Ok(None);
            }
        }
        Ok(Some(()))
    }

    fn rate_limit(&self) -> Option<&str> {
        Some("ec2")
    }
}

/// The tag specification of a create: the key tag and `extra`.
fn tags(resource: ResourceType, key: &str, extra: &BTreeMap<String, String>) -> TagSpecification {
    let mut spec = TagSpecification::builder()
        .resource_type(resource)
        .tags(tag(KEY_TAG, key));
    for (k, v) in extra {
        spec = spec.tags(tag(k, v));
    }
    spec.build()
}

fn tag(key: &str, value: &str) -> Tag {
    Tag::builder().key(key).value(value).build()
}
