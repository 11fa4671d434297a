//! Attachments: a policy to a certificate, a certificate to a thing.

use keel_engine::{Compensation, RetryPolicy, Step, StepContext, StepError};
use serde::{Deserialize, Serialize};

use super::super::error::AwsFailure;
use super::super::{clients, AWS_COMPENSATION_RETRY_POLICY, AWS_RETRY_POLICY};
use super::{detach_policy, detach_thing_principal, lag_if_missing, Attached};

/// Attaches a policy to a target (a certificate ARN). Idempotent in IoT; its first attempt
/// looks first and records an attachment that was already there as not this step's. A
/// `ResourceNotFoundException` (the certificate or policy this workflow just created not
/// visible yet) is retried.
///
/// Compensation: detaches it (a missing attachment is done).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachPolicy {
    /// The policy name.
    pub policy_name: String,
    /// The target's ARN.
    pub target: String,
}

impl Step for AttachPolicy {
    const KIND: &'static str = "aws.iot.attach-policy";
    type Output = Attached;
    const RETRY_POLICY: RetryPolicy = AWS_RETRY_POLICY;
    const RATE_LIMIT: Option<&'static str> = Some("iot");
    const COMPENSATION_RETRY_POLICY: RetryPolicy = AWS_COMPENSATION_RETRY_POLICY;

    async fn execute(&self, ctx: &StepContext) -> Result<Attached, StepError> {
        let iot = &clients(ctx)?.iot;
        if ctx.attempt().0 == 1 {
            let attached = iot
                .list_attached_policies()
                .target(&self.target)
                .send()
                .await
                .map_err(|e| lag_if_missing(AwsFailure::new("iot:ListAttachedPolicies", &e)))?;
            if attached
                .policies()
                .iter()
                .any(|p| p.policy_name() == Some(self.policy_name.as_str()))
            {
                return Ok(Attached {
                    by_this_step: false,
                });
            }
        }
        iot.attach_policy()
            .policy_name(&self.policy_name)
            .target(&self.target)
            .send()
            .await
            .map_err(|e| lag_if_missing(AwsFailure::new("iot:AttachPolicy", &e)))?;
        Ok(Attached { by_this_step: true })
    }

    async fn compensate(
        &self,
        ctx: &StepContext,
        output: Option<Attached>,
    ) -> Result<Compensation, StepError> {
        if output.is_some_and(|o| !o.by_this_step) {
            return Ok(Compensation::Done);
        }
        detach_policy(ctx, &clients(ctx)?.iot, &self.policy_name, &self.target).await?;
        Ok(Compensation::Done)
    }
}

/// Attaches a principal (a certificate ARN) to a thing. Idempotent in IoT; the first attempt
/// looks first, as [`AttachPolicy`] does.
///
/// Compensation: detaches it (a missing attachment is done).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachThingPrincipal {
    /// The thing name.
    pub thing: String,
    /// The principal's ARN.
    pub principal: String,
}

impl Step for AttachThingPrincipal {
    const KIND: &'static str = "aws.iot.attach-thing-principal";
    type Output = Attached;
    const RETRY_POLICY: RetryPolicy = AWS_RETRY_POLICY;
    const RATE_LIMIT: Option<&'static str> = Some("iot");
    const COMPENSATION_RETRY_POLICY: RetryPolicy = AWS_COMPENSATION_RETRY_POLICY;

    async fn execute(&self, ctx: &StepContext) -> Result<Attached, StepError> {
        let iot = &clients(ctx)?.iot;
        if ctx.attempt().0 == 1 {
            let principals = iot
                .list_thing_principals()
                .thing_name(&self.thing)
                .send()
                .await
                .map_err(|e| lag_if_missing(AwsFailure::new("iot:ListThingPrincipals", &e)))?;
            if principals.principals().contains(&self.principal) {
                return Ok(Attached {
                    by_this_step: false,
                });
            }
        }
        iot.attach_thing_principal()
            .thing_name(&self.thing)
            .principal(&self.principal)
            .send()
            .await
            .map_err(|e| lag_if_missing(AwsFailure::new("iot:AttachThingPrincipal", &e)))?;
        Ok(Attached { by_this_step: true })
    }

    async fn compensate(
        &self,
        ctx: &StepContext,
        output: Option<Attached>,
    ) -> Result<Compensation, StepError> {
        if output.is_some_and(|o| !o.by_this_step) {
            return Ok(Compensation::Done);
        }
        detach_thing_principal(ctx, &clients(ctx)?.iot, &self.thing, &self.principal).await?;
        Ok(Compensation::Done)
    }
}
