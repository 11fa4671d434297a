//! IAM and STS steps: create a role (tagged with the step's key), attach a managed policy,
//! put an inline policy, and a probe that the role can be assumed through STS.

use std::collections::BTreeMap;

use keel_engine::{Compensation, Probe, RetryPolicy, Step, StepContext, StepError};
use serde::{Deserialize, Serialize};

use super::error::{conflict, AwsFailure};
use super::{
    clients, confirm_absence, gone_after_lag, same_json, AWS_COMPENSATION_RETRY_POLICY,
    AWS_RETRY_POLICY, KEY_TAG,
};

const NO_SUCH_ENTITY: &str = "NoSuchEntity";

/// A role as created or adopted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Role {
    /// Its name.
    pub name: String,
    /// Its ARN.
    pub arn: String,
    /// Its unique id (`AROA...`).
    pub role_id: String,
}

/// Creates an IAM role with a trust policy and tags; the role carries the step's key in the
/// tag `keel:key`. A retry (after a lost response, a 5xx retried inside the SDK, or a crash)
/// meets `EntityAlreadyExists`, reads the role's tags and adopts it if the key is this
/// step's; a role of the same name with another key or none is a conflict (nothing changed).
///
/// Compensation: detaches every managed policy and deletes every inline policy of the role
/// (a role cannot be deleted with either), then deletes it; only a role carrying this step's
/// key is touched.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateRole {
    /// The role name.
    pub name: String,
    /// The trust policy (JSON).
    pub trust_policy: String,
    /// Extra tags (the key tag is added).
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// The role's description.
    #[serde(default)]
    pub description: Option<String>,
}

impl CreateRole {
    /// The role's `keel:key` tag, or `None` if it has none; `Err` if it is not there (lag
    /// or deleted: `NoSuchEntity`).
    async fn key_of(iam: &aws_sdk_iam::Client, name: &str) -> Result<Option<String>, AwsFailure> {
        let tags = iam
            .list_role_tags()
            .role_name(name)
            .send()
            .await
            .map_err(|e| AwsFailure::new("iam:ListRoleTags", &e))?;
        Ok(tags
            .tags()
            .iter()
            .find(|t| t.key() == KEY_TAG)
            .map(|t| t.value().to_string()))
    }

    async fn adopt(&self, ctx: &StepContext) -> Result<Role, StepError> {
        let iam = &clients(ctx)?.iam;
        let key = ctx.key().to_string();
        let found = match Self::key_of(iam, &self.name).await {
            Ok(found) => found,
            // It exists (the create said so) but cannot be read yet: lag.
            Err(e) if e.is(NO_SUCH_ENTITY) => {
                return Err(e.as_lag("the role exists but is not readable yet").into())
            }
            Err(e) => return Err(e.into()),
        };
        if found.as_deref() != Some(key.as_str()) {
            return Err(conflict("IAM role", &self.name, found.as_deref()));
        }
        let role = iam
            .get_role()
            .role_name(&self.name)
            .send()
            .await
            .map_err(|e| {
                let f = AwsFailure::new("iam:GetRole", &e);
                if f.is(NO_SUCH_ENTITY) {
                    f.as_lag("the role exists but is not readable yet")
                } else {
                    f
                }
            })?;
        let role = role
            .role()
            .ok_or_else(|| StepError::retryable("iam:GetRole returned no role"))?;
        tracing::info!(role = %self.name, "adopted the role a lost attempt created");
        Ok(Role {
            name: role.role_name().to_string(),
            arn: role.arn().to_string(),
            role_id: role.role_id().to_string(),
        })
    }
}

impl Step for CreateRole {
    const KIND: &'static str = "aws.iam.create-role";
    type Output = Role;
    const RETRY_POLICY: RetryPolicy = AWS_RETRY_POLICY;
    const RATE_LIMIT: Option<&'static str> = Some("iam");
    const COMPENSATION_RETRY_POLICY: RetryPolicy = AWS_COMPENSATION_RETRY_POLICY;

    async fn execute(&self, ctx: &StepContext) -> Result<Role, StepError> {
        let iam = &clients(ctx)?.iam;
        let mut request = iam
            .create_role()
            .role_name(&self.name)
            .assume_role_policy_document(&self.trust_policy)
            .set_description(self.description.clone())
            .tags(tag(KEY_TAG, &ctx.key().to_string())?);
        for (k, v) in &self.tags {
            request = request.tags(tag(k, v)?);
        }
        match request.send().await {
            Ok(out) => {
                let role = out
                    .role()
                    .ok_or_else(|| StepError::retryable("iam:CreateRole returned no role"))?;
                Ok(Role {
                    name: role.role_name().to_string(),
                    arn: role.arn().to_string(),
                    role_id: role.role_id().to_string(),
                })
            }
            Err(e) => {
                let failure = AwsFailure::new("iam:CreateRole", &e);
                if failure.is("EntityAlreadyExists") {
                    self.adopt(ctx).await
                } else {
                    Err(failure.into())
                }
            }
        }
    }

    async fn compensate(
        &self,
        ctx: &StepContext,
        _output: Option<Role>,
    ) -> Result<Compensation, StepError> {
        let iam = &clients(ctx)?.iam;
        let key = ctx.key().to_string();
        match Self::key_of(iam, &self.name).await {
            Err(e) if e.is(NO_SUCH_ENTITY) => {
                confirm_absence(ctx, "iam", "IAM role")?;
                return Ok(Compensation::Done);
            }
            Err(e) => return Err(e.into()),
            Ok(found) if found.as_deref() != Some(key.as_str()) => {
                tracing::warn!(role = %self.name, ?found, "the role is not this step's; left alone");
                return Ok(Compensation::Done);
            }
            Ok(_) => {}
        }
        let attached = iam
            .list_attached_role_policies()
            .role_name(&self.name)
            .send()
            .await
            .map_err(|e| AwsFailure::new("iam:ListAttachedRolePolicies", &e))?;
        for policy in attached.attached_policies() {
            if let Some(arn) = policy.policy_arn() {
                detach(iam, &self.name, arn).await?;
            }
        }
        let inline = iam
            .list_role_policies()
            .role_name(&self.name)
            .send()
            .await
            .map_err(|e| AwsFailure::new("iam:ListRolePolicies", &e))?;
        for name in inline.policy_names() {
            delete_inline(iam, &self.name, name).await?;
        }
        match iam.delete_role().role_name(&self.name).send().await {
            Ok(_) => Ok(Compensation::Done),
            Err(e) => {
                let f = AwsFailure::new("iam:DeleteRole", &e);
                if f.is(NO_SUCH_ENTITY) {
                    // Gone, unless it is not visible yet.
                    gone_after_lag(ctx, "iam", f, true).map(|()| Compensation::Done)
                } else if f.is("DeleteConflict") {
                    // A policy attached or put after the listing: list again.
                    Err(f.as_lag("a policy is still attached").into())
                } else {
                    Err(f.into())
                }
            }
        }
    }
}

fn tag(key: &str, value: &str) -> Result<aws_sdk_iam::types::Tag, StepError> {
    aws_sdk_iam::types::Tag::builder()
        .key(key)
        .value(value)
        .build()
        .map_err(|e| StepError::permanent(format!("tag {key:?}: {e}")))
}

async fn detach(iam: &aws_sdk_iam::Client, role: &str, policy_arn: &str) -> Result<(), StepError> {
    match iam
        .detach_role_policy()
        .role_name(role)
        .policy_arn(policy_arn)
        .send()
        .await
    {
        Ok(_) => Ok(()),
        Err(e) => {
            let f = AwsFailure::new("iam:DetachRolePolicy", &e);
            if f.is(NO_SUCH_ENTITY) {
                Ok(())
            } else {
                Err(f.into())
            }
        }
    }
}

async fn delete_inline(iam: &aws_sdk_iam::Client, role: &str, name: &str) -> Result<(), StepError> {
    match iam
        .delete_role_policy()
        .role_name(role)
        .policy_name(name)
        .send()
        .await
    {
        Ok(_) => Ok(()),
        Err(e) => {
            let f = AwsFailure::new("iam:DeleteRolePolicy", &e);
            if f.is(NO_SUCH_ENTITY) {
                Ok(())
            } else {
                Err(f.into())
            }
        }
    }
}

/// Whether an attachment step changed anything: `false` when what it asked for was already
/// there before its first attempt (then its compensation leaves it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attached {
    /// Whether this step made the change (or may have).
    pub by_this_step: bool,
}

/// Attaches a managed policy to a role. Idempotent in IAM. On its first attempt it looks
/// first: a policy already attached is recorded as not this step's, and its compensation
/// leaves it. A `NoSuchEntity` (the role or the policy not visible yet after this workflow
/// created it) is retried.
///
/// Compensation: detaches the policy (a missing attachment is done).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachRolePolicy {
    /// The role name.
    pub role: String,
    /// The managed policy's ARN.
    pub policy_arn: String,
}

impl Step for AttachRolePolicy {
    const KIND: &'static str = "aws.iam.attach-role-policy";
    type Output = Attached;
    const RETRY_POLICY: RetryPolicy = AWS_RETRY_POLICY;
    const RATE_LIMIT: Option<&'static str> = Some("iam");
    const COMPENSATION_RETRY_POLICY: RetryPolicy = AWS_COMPENSATION_RETRY_POLICY;

    async fn execute(&self, ctx: &StepContext) -> Result<Attached, StepError> {
        let iam = &clients(ctx)?.iam;
        if ctx.attempt().0 == 1 {
            let attached = iam
                .list_attached_role_policies()
                .role_name(&self.role)
                .send()
                .await
                .map_err(|e| lag_if_missing(AwsFailure::new("iam:ListAttachedRolePolicies", &e)))?;
            if attached
                .attached_policies()
                .iter()
                .any(|p| p.policy_arn() == Some(self.policy_arn.as_str()))
            {
                return Ok(Attached {
                    by_this_step: false,
                });
            }
        }
        iam.attach_role_policy()
            .role_name(&self.role)
            .policy_arn(&self.policy_arn)
            .send()
            .await
            .map_err(|e| lag_if_missing(AwsFailure::new("iam:AttachRolePolicy", &e)))?;
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
        detach(&clients(ctx)?.iam, &self.role, &self.policy_arn).await?;
        Ok(Compensation::Done)
    }
}

/// Puts an inline policy on a role. On its first attempt it looks first: an inline policy of
/// that name with another document is a conflict (nothing changed), one with the same
/// document is recorded as not this step's.
///
/// Compensation: deletes the inline policy (a missing one is done).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutRolePolicy {
    /// The role name.
    pub role: String,
    /// The inline policy's name.
    pub policy_name: String,
    /// The policy document (JSON).
    pub document: String,
}

impl Step for PutRolePolicy {
    const KIND: &'static str = "aws.iam.put-role-policy";
    type Output = Attached;
    const RETRY_POLICY: RetryPolicy = AWS_RETRY_POLICY;
    const RATE_LIMIT: Option<&'static str> = Some("iam");
    const COMPENSATION_RETRY_POLICY: RetryPolicy = AWS_COMPENSATION_RETRY_POLICY;

    async fn execute(&self, ctx: &StepContext) -> Result<Attached, StepError> {
        let iam = &clients(ctx)?.iam;
        if ctx.attempt().0 == 1 {
            match iam
                .get_role_policy()
                .role_name(&self.role)
                .policy_name(&self.policy_name)
                .send()
                .await
            {
                Ok(existing) => {
                    let document = decode_policy(existing.policy_document());
                    if same_json(&document, &self.document) {
                        return Ok(Attached {
                            by_this_step: false,
                        });
                    }
                    return Err(StepError::permanent(format!(
                        "conflict: role {:?} already has an inline policy {:?} with another document; nothing was changed",
                        self.role, self.policy_name
                    )));
                }
                Err(e) => {
                    let f = AwsFailure::new("iam:GetRolePolicy", &e);
                    // Missing policy: go on and put it. A missing role is lag or a mistake:
                    // the put below tells which.
                    if !f.is(NO_SUCH_ENTITY) {
                        return Err(f.into());
                    }
                }
            }
        }
        iam.put_role_policy()
            .role_name(&self.role)
            .policy_name(&self.policy_name)
            .policy_document(&self.document)
            .send()
            .await
            .map_err(|e| lag_if_missing(AwsFailure::new("iam:PutRolePolicy", &e)))?;
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
        delete_inline(&clients(ctx)?.iam, &self.role, &self.policy_name).await?;
        Ok(Compensation::Done)
    }
}

/// `NoSuchEntity` from an operation on a role this workflow just created is lag.
fn lag_if_missing(f: AwsFailure) -> AwsFailure {
    if f.is(NO_SUCH_ENTITY) {
        f.as_lag("not visible yet after its creation; retried within the step's policy")
    } else {
        f
    }
}

/// IAM returns policy documents percent-encoded (RFC 3986); a document that is not is
/// returned as it is.
fn decode_policy(document: &str) -> String {
    let bytes = document.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%' && i + 3 <= bytes.len())
            .then(|| document.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(b) => {
                out.push(b);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Holds when STS lets the caller assume the role: the test that matters after creating a
/// role, since IAM changes take seconds to reach STS. `AccessDenied` is "not yet".
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleAssumable {
    /// The role's ARN.
    pub role_arn: String,
    /// The session name used for the probe.
    pub session_name: String,
}

/// What a successful AssumeRole probe saw.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assumed {
    /// The assumed role's ARN as STS reports it.
    pub assumed_role_arn: String,
}

impl Probe for RoleAssumable {
    const KIND: &'static str = "aws.sts.role-assumable";
    type Output = Assumed;

    async fn probe(&self, ctx: &StepContext) -> Result<Option<Assumed>, StepError> {
        let sts = &clients(ctx)?.sts;
        match sts
            .assume_role()
            .role_arn(&self.role_arn)
            .role_session_name(&self.session_name)
            .duration_seconds(900)
            .send()
            .await
        {
            Ok(out) => Ok(Some(Assumed {
                assumed_role_arn: out
                    .assumed_role_user()
                    .map(|u| u.arn().to_string())
                    .unwrap_or_default(),
            })),
            Err(e) => {
                let f = AwsFailure::new("sts:AssumeRole", &e);
                if f.is("AccessDenied") {
                    tracing::debug!(role = %self.role_arn, "not assumable yet");
                    Ok(None)
                } else {
                    Err(f.into())
                }
            }
        }
    }

    fn rate_limit(&self) -> Option<&str> {
        Some("sts")
    }
}
