//! `iam.service-role`: an IAM role with a trust policy and policies, usable through STS.

use std::collections::BTreeMap;
use std::time::Duration;

use keel_engine::{Ctx, InvalidInput, WaitPolicy, Workflow, WorkflowError};
use keel_steps::aws::iam::{AttachRolePolicy, CreateRole, PutRolePolicy, RoleAssumable};
use serde::{Deserialize, Serialize};

use crate::validate;

/// Longest wait for STS to accept a role, `assume_timeout_s` (seconds: 7 days).
pub const ASSUME_TIMEOUT_S_MAX: u64 = 7 * 24 * 3600;

/// Input of [`ServiceRole`]. A field it does not know is refused (a typo is not dropped).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceRoleInput {
    /// The role name (1 to 64 of letters, digits and `+=,.@_-`).
    pub name: String,
    /// The trust policy document. It must let the provisioning credentials assume the role
    /// too, or the wait for STS never ends (moto lets anyone assume any role).
    pub trust_policy: String,
    /// Managed policies to attach, by ARN.
    #[serde(default)]
    pub managed_policy_arns: Vec<String>,
    /// Inline policies to put, by name.
    #[serde(default)]
    pub inline_policies: BTreeMap<String, String>,
    /// How long to wait for STS to accept the role (seconds; default 120, 1 to
    /// [`ASSUME_TIMEOUT_S_MAX`]).
    #[serde(default)]
    pub assume_timeout_s: Option<u64>,
}

/// What [`ServiceRole`] returns.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceRoleOutput {
    /// The role name.
    pub name: String,
    /// The role ARN.
    pub arn: String,
}

/// Creates the role, attaches and puts its policies, then waits (polling STS, never a fixed
/// sleep) until the role can be assumed. Compensation deletes what it made, newest first.
#[derive(Debug)]
pub struct ServiceRole;

impl Workflow for ServiceRole {
    const NAME: &'static str = "iam.service-role";
    type Input = ServiceRoleInput;
    type Output = ServiceRoleOutput;

    fn validate(input: &ServiceRoleInput) -> Result<(), InvalidInput> {
        validate::role_name("name", &input.name, 64)?;
        validate::policy_document("trust_policy", &input.trust_policy)?;
        validate::count(
            "managed_policy_arns",
            input.managed_policy_arns.len(),
            0,
            20,
        )?;
        for (i, arn) in input.managed_policy_arns.iter().enumerate() {
            if !arn.starts_with("arn:aws:iam::") || !arn.contains(":policy/") {
                return Err(InvalidInput::new(
                    format!("managed_policy_arns[{i}]"),
                    format!("{arn:?} is not an IAM policy ARN"),
                ));
            }
        }
        for (name, document) in &input.inline_policies {
            validate::role_name(&format!("inline_policies.{name}"), name, 128)?;
            validate::policy_document(&format!("inline_policies.{name}"), document)?;
        }
        validate::timeout_s(
            "assume_timeout_s",
            input.assume_timeout_s,
            ASSUME_TIMEOUT_S_MAX,
        )
    }

    async fn run(
        ctx: &mut Ctx,
        input: ServiceRoleInput,
    ) -> Result<ServiceRoleOutput, WorkflowError> {
        let role = ctx
            .step(CreateRole {
                name: input.name.clone(),
                trust_policy: input.trust_policy.clone(),
                tags: BTreeMap::new(),
                description: Some("made by keel's iam.service-role".into()),
            })
            .await?;
        for policy_arn in &input.managed_policy_arns {
            ctx.step(AttachRolePolicy {
                role: role.name.clone(),
                policy_arn: policy_arn.clone(),
            })
            .await?;
        }
        for (policy_name, document) in &input.inline_policies {
            ctx.step(PutRolePolicy {
                role: role.name.clone(),
                policy_name: policy_name.clone(),
                document: document.clone(),
            })
            .await?;
        }
        let timeout = Duration::from_secs(input.assume_timeout_s.unwrap_or(120));
        ctx.wait(
            RoleAssumable {
                role_arn: role.arn.clone(),
                session_name: "keel-service-role-check".into(),
            },
            WaitPolicy::every(Duration::from_millis(250), timeout).confirmations(2),
        )
        .await?;
        Ok(ServiceRoleOutput {
            name: role.name,
            arn: role.arn,
        })
    }
}
