//! The sweep that finishes fast-path terminations, and its probe.

use aws_sdk_ec2::types::{Filter, InstanceStateName};
use keel_engine::{Compensation, Probe, RetryPolicy, Step, StepContext, StepError};
use serde::{Deserialize, Serialize};

use super::{INSTANCE_NOT_FOUND, LIVE_STATES, TO_BE_DELETED_TAG};
use crate::aws::error::{AwsFailure, Class};
use crate::aws::{clients, AWS_RETRY_POLICY};

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
            if f.class != Class::Permanent {
                return Err(f.into());
            }
            // One of them gone since the listing, or protected: one by one, so one instance
            // never holds back the others.
            for id in batch {
                if let Err(e) = ec2.terminate_instances().instance_ids(id).send().await {
                    let f = AwsFailure::new("ec2:TerminateInstances", &e);
                    if f.class != Class::Permanent {
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
