//! `CreateGroup`, `AssociateRole` and `CreateGroupVersion`.

use std::collections::BTreeMap;

use aws_sdk_greengrass::types::GroupInformation;
use keel_engine::{Compensation, RetryPolicy, Step, StepContext, StepError};
use serde::{Deserialize, Serialize};

use super::super::error::AwsFailure;
use super::super::iam::Attached;
use super::super::{
    clients, confirm_absence, gone_after_lag, AWS_COMPENSATION_RETRY_POLICY, AWS_RETRY_POLICY,
    KEY_TAG,
};
use super::{
    all_pages, is_missing, keyed_name, lag_if_missing, missing_ok, reset_if_deployed,
    single_attempt,
};

/// A group as created or adopted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    /// Its id.
    pub id: String,
    /// Its ARN.
    pub arn: String,
    /// Its name: `<prefix>-<key>`.
    pub name: String,
}

/// Creates a Greengrass group named `<prefix>-<step key>`, tagged with `tags` and the key. A
/// group of that name is adopted: the name comes from the key, which no other step has (the
/// tags cannot be checked on the emulator, which keeps none).
///
/// Compensation: resets the group's deployments (force) if it is still deployed, then deletes
/// every group of that name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateGroup {
    /// The name's prefix.
    pub prefix: String,
    /// Tags (the key's tag is added).
    pub tags: BTreeMap<String, String>,
}

async fn groups_named(
    gg: &aws_sdk_greengrass::Client,
    name: &str,
) -> Result<Vec<GroupInformation>, AwsFailure> {
    let groups = all_pages(|token| async move {
        let page = gg
            .list_groups()
            .set_next_token(token)
            .send()
            .await
            .map_err(|e| AwsFailure::new("greengrass:ListGroups", &e))?;
        Ok((
            page.groups().to_vec(),
            page.next_token().map(str::to_string),
        ))
    })
    .await?;
    Ok(groups
        .into_iter()
        .filter(|g| g.name() == Some(name))
        .collect())
}

impl Step for CreateGroup {
    const KIND: &'static str = "aws.greengrass.create-group";
    type Output = Group;
    const RETRY_POLICY: RetryPolicy = AWS_RETRY_POLICY;
    const RATE_LIMIT: Option<&'static str> = Some("greengrass");
    const COMPENSATION_RETRY_POLICY: RetryPolicy = AWS_COMPENSATION_RETRY_POLICY;

    async fn execute(&self, ctx: &StepContext) -> Result<Group, StepError> {
        let gg = &clients(ctx)?.greengrass;
        let key = ctx.key().to_string();
        let name = keyed_name(&self.prefix, &ctx.key());
        let found = groups_named(gg, &name).await?;
        if found.len() > 1 {
            tracing::warn!(group = %name, count = found.len(), "several groups carry this step's name; adopting the first, compensation removes all");
        }
        if let Some(group) = found.first() {
            return Ok(Group {
                id: group.id().unwrap_or_default().to_string(),
                arn: group.arn().unwrap_or_default().to_string(),
                name,
            });
        }
        let mut request = gg
            .create_group()
            .name(&name)
            .amzn_client_token(&key)
            .tags(KEY_TAG, &key);
        for (k, v) in &self.tags {
            request = request.tags(k, v);
        }
        let out = request
            .customize()
            .config_override(single_attempt())
            .send()
            .await
            .map_err(|e| AwsFailure::new("greengrass:CreateGroup", &e))?;
        Ok(Group {
            id: out.id().unwrap_or_default().to_string(),
            arn: out.arn().unwrap_or_default().to_string(),
            name,
        })
    }

    async fn compensate(
        &self,
        ctx: &StepContext,
        _output: Option<Group>,
    ) -> Result<Compensation, StepError> {
        let gg = &clients(ctx)?.greengrass;
        let name = keyed_name(&self.prefix, &ctx.key());
        let found = groups_named(gg, &name).await?;
        if found.is_empty() {
            confirm_absence(ctx, "greengrass", "Greengrass group")?;
            return Ok(Compensation::Done);
        }
        for group in found {
            let id = group.id().unwrap_or_default();
            reset_if_deployed(gg, id).await?;
            if let Err(e) = gg.delete_group().group_id(id).send().await {
                let f = AwsFailure::new("greengrass:DeleteGroup", &e);
                let missing = is_missing(&f);
                gone_after_lag(ctx, "greengrass", f, missing)?;
            }
        }
        Ok(Compensation::Done)
    }
}

/// Associates an IAM role with a group (what the group's core assumes to reach AWS). On its
/// first attempt it looks first: the role already associated is recorded as not this step's,
/// and its compensation leaves it. A missing group (just created, not visible yet) is retried.
///
/// Compensation: disassociates the role if it is still this role.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssociateRole {
    /// The group's id.
    pub group_id: String,
    /// The role's ARN.
    pub role_arn: String,
}

/// The role associated with the group: `None` when there is none (or no group).
async fn associated_role(
    gg: &aws_sdk_greengrass::Client,
    group_id: &str,
) -> Result<Option<String>, StepError> {
    match gg.get_associated_role().group_id(group_id).send().await {
        Ok(out) => Ok(out.role_arn().map(str::to_string)),
        Err(e) => {
            let f = AwsFailure::new("greengrass:GetAssociatedRole", &e);
            // moto answers "no role" with the code "404" and status 400.
            if is_missing(&f) || f.is("404") {
                Ok(None)
            } else {
                Err(f.into())
            }
        }
    }
}

impl Step for AssociateRole {
    const KIND: &'static str = "aws.greengrass.associate-role";
    type Output = Attached;
    const RETRY_POLICY: RetryPolicy = AWS_RETRY_POLICY;
    const RATE_LIMIT: Option<&'static str> = Some("greengrass");
    const COMPENSATION_RETRY_POLICY: RetryPolicy = AWS_COMPENSATION_RETRY_POLICY;

    async fn execute(&self, ctx: &StepContext) -> Result<Attached, StepError> {
        let gg = &clients(ctx)?.greengrass;
        if ctx.attempt().0 == 1
            && associated_role(gg, &self.group_id).await?.as_deref() == Some(self.role_arn.as_str())
        {
            return Ok(Attached {
                by_this_step: false,
            });
        }
        gg.associate_role_to_group()
            .group_id(&self.group_id)
            .role_arn(&self.role_arn)
            .send()
            .await
            .map_err(|e| lag_if_missing(AwsFailure::new("greengrass:AssociateRoleToGroup", &e)))?;
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
        let gg = &clients(ctx)?.greengrass;
        match associated_role(gg, &self.group_id).await? {
            Some(role) if role == self.role_arn => {
                if let Err(e) = gg
                    .disassociate_role_from_group()
                    .group_id(&self.group_id)
                    .send()
                    .await
                {
                    missing_ok(AwsFailure::new("greengrass:DisassociateRoleFromGroup", &e))?;
                }
            }
            Some(other) => {
                tracing::warn!(group = %self.group_id, role = %other, "another role is associated now; left alone");
            }
            None => {}
        }
        Ok(Compensation::Done)
    }
}

/// A group version as created or adopted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupVersion {
    /// The group's id.
    pub group_id: String,
    /// The version's id (what a deployment names).
    pub version_id: String,
    /// Its ARN.
    pub arn: String,
}

/// Creates a version of a group from a core definition version and, optionally, a device
/// definition version. A version of the group with exactly these definitions is adopted (a
/// version is immutable, so an identical one is as good as a new one).
///
/// No compensation of its own: a group version cannot be deleted alone; deleting the group
/// (the [`CreateGroup`] compensation) removes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateGroupVersion {
    /// The group's id.
    pub group_id: String,
    /// The core definition version's ARN.
    pub core_definition_version_arn: String,
    /// The device definition version's ARN, if the group has client devices.
    pub device_definition_version_arn: Option<String>,
}

impl CreateGroupVersion {
    fn matches(&self, v: &aws_sdk_greengrass::types::GroupVersion) -> bool {
        v.core_definition_version_arn() == Some(self.core_definition_version_arn.as_str())
            && v.device_definition_version_arn() == self.device_definition_version_arn.as_deref()
            && v.function_definition_version_arn().is_none()
            && v.resource_definition_version_arn().is_none()
            && v.subscription_definition_version_arn().is_none()
            && v.logger_definition_version_arn().is_none()
            && v.connector_definition_version_arn().is_none()
    }

    /// The newest existing version of the group with these definitions.
    async fn existing(
        &self,
        gg: &aws_sdk_greengrass::Client,
    ) -> Result<Option<GroupVersion>, AwsFailure> {
        let group_id = self.group_id.as_str();
        let mut versions = all_pages(|token| async move {
            let page = gg
                .list_group_versions()
                .group_id(group_id)
                .set_next_token(token)
                .send()
                .await
                .map_err(|e| lag_if_missing(AwsFailure::new("greengrass:ListGroupVersions", &e)))?;
            Ok((
                page.versions().to_vec(),
                page.next_token().map(str::to_string),
            ))
        })
        .await?;
        versions.sort_by(|a, b| b.creation_timestamp().cmp(&a.creation_timestamp()));
        for v in versions {
            let version_id = v.version().unwrap_or_default();
            let detail = gg
                .get_group_version()
                .group_id(&self.group_id)
                .group_version_id(version_id)
                .send()
                .await
                .map_err(|e| lag_if_missing(AwsFailure::new("greengrass:GetGroupVersion", &e)))?;
            if detail.definition().is_some_and(|d| self.matches(d)) {
                return Ok(Some(GroupVersion {
                    group_id: self.group_id.clone(),
                    version_id: version_id.to_string(),
                    arn: v.arn().unwrap_or_default().to_string(),
                }));
            }
        }
        Ok(None)
    }
}

impl Step for CreateGroupVersion {
    const KIND: &'static str = "aws.greengrass.create-group-version";
    type Output = GroupVersion;
    const RETRY_POLICY: RetryPolicy = AWS_RETRY_POLICY;
    const RATE_LIMIT: Option<&'static str> = Some("greengrass");
    // A group version lives and dies with its group (`CreateGroup`'s compensation deletes
    // both): nothing of its own to undo.
    const COMPENSABLE: bool = false;

    async fn execute(&self, ctx: &StepContext) -> Result<GroupVersion, StepError> {
        let gg = &clients(ctx)?.greengrass;
        if let Some(existing) = self.existing(gg).await? {
            return Ok(existing);
        }
        let out = gg
            .create_group_version()
            .group_id(&self.group_id)
            .amzn_client_token(ctx.key().to_string())
            .core_definition_version_arn(&self.core_definition_version_arn)
            .set_device_definition_version_arn(self.device_definition_version_arn.clone())
            .customize()
            .config_override(single_attempt())
            .send()
            .await
            .map_err(|e| lag_if_missing(AwsFailure::new("greengrass:CreateGroupVersion", &e)))?;
        Ok(GroupVersion {
            group_id: self.group_id.clone(),
            version_id: out.version().unwrap_or_default().to_string(),
            arn: out.arn().unwrap_or_default().to_string(),
        })
    }
}
