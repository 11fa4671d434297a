//! Instances: launch (the key as `ClientToken` and tag), fast-path termination, the running probe.

use std::collections::BTreeMap;

use aws_sdk_ec2::types::{Filter, InstanceStateName, InstanceType, Placement, ResourceType};
use keel_engine::{Compensation, Probe, RetryPolicy, Step, StepContext, StepError};
use serde::{Deserialize, Serialize};

use super::{tag, tags, INSTANCE_NOT_FOUND, LIVE_STATES, TO_BE_DELETED_TAG};
use crate::aws::error::{AwsFailure, Class};
use crate::aws::{
    clients, confirm_absence, gone_after_lag, AWS_COMPENSATION_RETRY_POLICY, AWS_RETRY_POLICY,
    KEY_TAG,
};

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
        if f.class != Class::Permanent {
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
