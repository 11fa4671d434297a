//! `CreatePolicy`: an IoT policy named from the step's key.

use keel_engine::{Compensation, RetryPolicy, Step, StepContext, StepError};
use serde::{Deserialize, Serialize};

use super::super::error::AwsFailure;
use super::super::{
    clients, confirm_absence, same_json, AWS_COMPENSATION_RETRY_POLICY, AWS_RETRY_POLICY,
};
use super::{detach_policy, lag_if_missing, missing_ok, ALREADY_EXISTS, NOT_FOUND};

/// A policy as created or adopted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// Its name: `<prefix>-<key>`.
    pub name: String,
    /// Its ARN.
    pub arn: String,
}

/// Creates an IoT policy named `<prefix>-<step key>`, so a retry finds it by name. (moto keeps
/// no tags on IoT policies, and a policy document has no place for a mark; a name derived
/// from the key is the mark.) An existing policy of that name with the same document is
/// adopted; one with another document is a conflict.
///
/// Compensation: detaches the policy from every target (as AWS requires) and deletes it;
/// `DeleteConflictException` right after a detach is lag (AWS documents up to five minutes)
/// and retried.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreatePolicy {
    /// The name's prefix.
    pub prefix: String,
    /// The policy document (JSON).
    pub document: String,
}

impl CreatePolicy {
    /// The policy's name under `key`.
    pub fn name(&self, key: &keel_engine::IdempotencyKey) -> String {
        format!("{}-{key}", self.prefix)
    }
}

impl Step for CreatePolicy {
    const KIND: &'static str = "aws.iot.create-policy";
    type Output = Policy;
    const RETRY_POLICY: RetryPolicy = AWS_RETRY_POLICY;
    const RATE_LIMIT: Option<&'static str> = Some("iot");
    const COMPENSATION_RETRY_POLICY: RetryPolicy = AWS_COMPENSATION_RETRY_POLICY;

    async fn execute(&self, ctx: &StepContext) -> Result<Policy, StepError> {
        let iot = &clients(ctx)?.iot;
        let name = self.name(&ctx.key());
        match iot
            .create_policy()
            .policy_name(&name)
            .policy_document(&self.document)
            .send()
            .await
        {
            Ok(out) => Ok(Policy {
                name: out.policy_name().unwrap_or(&name).to_string(),
                arn: out.policy_arn().unwrap_or_default().to_string(),
            }),
            Err(e) => {
                let f = AwsFailure::new("iot:CreatePolicy", &e);
                if !f.is(ALREADY_EXISTS) {
                    return Err(f.into());
                }
                let existing = iot
                    .get_policy()
                    .policy_name(&name)
                    .send()
                    .await
                    .map_err(|e| lag_if_missing(AwsFailure::new("iot:GetPolicy", &e)))?;
                let document = existing.policy_document().unwrap_or_default();
                if !same_json(document, &self.document) {
                    return Err(StepError::permanent(format!(
                        "conflict: IoT policy {name:?} already exists with another document; nothing was changed"
                    )));
                }
                Ok(Policy {
                    name,
                    arn: existing.policy_arn().unwrap_or_default().to_string(),
                })
            }
        }
    }

    async fn compensate(
        &self,
        ctx: &StepContext,
        _output: Option<Policy>,
    ) -> Result<Compensation, StepError> {
        let iot = &clients(ctx)?.iot;
        let name = self.name(&ctx.key());
        // The name is derived from the key, so a policy of that name with this document is
        // this step's; with another document, somebody else's (see the conflict in execute).
        match iot.get_policy().policy_name(&name).send().await {
            Ok(existing)
                if !same_json(
                    existing.policy_document().unwrap_or_default(),
                    &self.document,
                ) =>
            {
                tracing::warn!(policy = %name, "the policy has another document: not this step's; left alone");
                return Ok(Compensation::Done);
            }
            Ok(_) => {}
            Err(e) => {
                let f = AwsFailure::new("iot:GetPolicy", &e);
                if f.is(NOT_FOUND) {
                    confirm_absence(ctx, "iot", "IoT policy")?;
                    return Ok(Compensation::Done);
                }
                return Err(f.into());
            }
        }
        let targets = match iot
            .list_targets_for_policy()
            .policy_name(&name)
            .send()
            .await
        {
            Ok(t) => t.targets().to_vec(),
            Err(e) => {
                let f = AwsFailure::new("iot:ListTargetsForPolicy", &e);
                if f.is(NOT_FOUND) {
                    confirm_absence(ctx, "iot", "IoT policy")?;
                    return Ok(Compensation::Done);
                }
                return Err(f.into());
            }
        };
        for target in targets {
            detach_policy(ctx, iot, &name, &target).await?;
        }
        match iot.delete_policy().policy_name(&name).send().await {
            Ok(_) => Ok(Compensation::Done),
            Err(e) => {
                let f = AwsFailure::new("iot:DeletePolicy", &e);
                if f.is("DeleteConflictException") {
                    return Err(f
                        .as_lag("detached moments ago; AWS allows up to five minutes")
                        .into());
                }
                missing_ok(ctx, f)?;
                Ok(Compensation::Done)
            }
        }
    }
}
