//! `CreateDeployment` and the `DeploymentSucceeded` probe.

use aws_sdk_greengrass::types::DeploymentType;
use keel_engine::{Compensation, Probe, RetryPolicy, Step, StepContext, StepError};
use serde::{Deserialize, Serialize};

use super::super::error::AwsFailure;
use super::super::{clients, AWS_COMPENSATION_RETRY_POLICY, AWS_RETRY_POLICY};
use super::{deployments_of, is_reset, lag_if_missing, reset_if_deployed, single_attempt};

/// A deployment as created or adopted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deployment {
    /// The group's id.
    pub group_id: String,
    /// The deployment's id.
    pub id: String,
    /// Its ARN.
    pub arn: String,
}

/// Deploys a group version (`NewDeployment`). The group's latest deployment, if it deploys
/// this version and is not reset, is adopted: it is what a lost attempt made, or an
/// equivalent one.
///
/// Compensation: resets the group's deployments with `Force` (the core may be offline), unless
/// the group is reset already or gone.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateDeployment {
    /// The group's id.
    pub group_id: String,
    /// The group version to deploy.
    pub group_version_id: String,
}

impl Step for CreateDeployment {
    const KIND: &'static str = "aws.greengrass.create-deployment";
    type Output = Deployment;
    const RETRY_POLICY: RetryPolicy = AWS_RETRY_POLICY;
    const RATE_LIMIT: Option<&'static str> = Some("greengrass");
    const COMPENSATION_RETRY_POLICY: RetryPolicy = AWS_COMPENSATION_RETRY_POLICY;

    async fn execute(&self, ctx: &StepContext) -> Result<Deployment, StepError> {
        let gg = &clients(ctx)?.greengrass;
        let deployments = deployments_of(gg, &self.group_id)
            .await
            .map_err(lag_if_missing)?;
        let version_suffix = format!("/versions/{}", self.group_version_id);
        if let Some(last) = deployments.last() {
            if !is_reset(last)
                && last
                    .group_arn()
                    .is_some_and(|arn| arn.ends_with(&version_suffix))
            {
                return Ok(Deployment {
                    group_id: self.group_id.clone(),
                    id: last.deployment_id().unwrap_or_default().to_string(),
                    arn: last.deployment_arn().unwrap_or_default().to_string(),
                });
            }
        }
        let out = gg
            .create_deployment()
            .group_id(&self.group_id)
            .group_version_id(&self.group_version_id)
            .deployment_type(DeploymentType::NewDeployment)
            .amzn_client_token(ctx.key().to_string())
            .customize()
            .config_override(single_attempt())
            .send()
            .await
            .map_err(|e| lag_if_missing(AwsFailure::new("greengrass:CreateDeployment", &e)))?;
        Ok(Deployment {
            group_id: self.group_id.clone(),
            id: out.deployment_id().unwrap_or_default().to_string(),
            arn: out.deployment_arn().unwrap_or_default().to_string(),
        })
    }

    async fn compensate(
        &self,
        ctx: &StepContext,
        _output: Option<Deployment>,
    ) -> Result<Compensation, StepError> {
        reset_if_deployed(&clients(ctx)?.greengrass, &self.group_id).await?;
        Ok(Compensation::Done)
    }
}

/// What a finished deployment reported.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentStatus {
    /// `Success`.
    pub status: String,
    /// When the status was last updated, as the service reports it.
    pub updated_at: Option<String>,
}

/// Polls a deployment's status: ready on `Success`, not yet while `Building` or `InProgress`,
/// and a permanent error on `Failure` (with the service's message and error details), so a
/// failed deployment fails the wait and the workflow can compensate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentSucceeded {
    /// The group's id.
    pub group_id: String,
    /// The deployment's id.
    pub deployment_id: String,
}

impl Probe for DeploymentSucceeded {
    const KIND: &'static str = "aws.greengrass.deployment-succeeded";
    type Output = DeploymentStatus;

    async fn probe(&self, ctx: &StepContext) -> Result<Option<DeploymentStatus>, StepError> {
        let gg = &clients(ctx)?.greengrass;
        let out = gg
            .get_deployment_status()
            .group_id(&self.group_id)
            .deployment_id(&self.deployment_id)
            .send()
            .await
            .map_err(|e| lag_if_missing(AwsFailure::new("greengrass:GetDeploymentStatus", &e)))?;
        match out.deployment_status() {
            Some("Success") => Ok(Some(DeploymentStatus {
                status: "Success".into(),
                updated_at: out.updated_at().map(str::to_string),
            })),
            Some("Building" | "InProgress") => Ok(None),
            Some("Failure") => {
                let details: Vec<String> = out
                    .error_details()
                    .iter()
                    .map(|d| {
                        format!(
                            "{}: {}",
                            d.detailed_error_code().unwrap_or("?"),
                            d.detailed_error_message().unwrap_or("")
                        )
                    })
                    .collect();
                Err(StepError::permanent(format!(
                    "Greengrass deployment {} of group {} failed: {}{}",
                    self.deployment_id,
                    self.group_id,
                    out.error_message().unwrap_or("no message"),
                    if details.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", details.join("; "))
                    }
                )))
            }
            other => Err(StepError::permanent(format!(
                "Greengrass deployment {} of group {} reports an unknown status {other:?}",
                self.deployment_id, self.group_id
            ))),
        }
    }

    fn rate_limit(&self) -> Option<&str> {
        Some("greengrass")
    }
}
