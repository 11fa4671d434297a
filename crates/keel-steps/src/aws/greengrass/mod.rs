//! Greengrass (V1) steps: core and device definitions (each created with its first version),
//! a group, the group's role, a group version, a deployment and a wait on its status.
//!
//! AWS ended support for Greengrass V1 on 2026-10-07. These steps keep V1 because it is what
//! this project's users run and what the emulator supports; docs/steps.md says what a V2
//! step set would need.
//!
//! Ownership: Greengrass names are not unique, so every resource a create step makes is
//! named `<prefix>-<step key>` and found by that name; the key also goes in as the request's
//! `AmznClientToken` and as a `keel:key` tag (both for real AWS; moto ignores them). A
//! definition found under the name must also hold the step's members, else it is a conflict.
//!
//! Creates run with the SDK's own retries off: a create whose answer was replaced by a 5xx
//! would otherwise be sent again inside one `send()`, and where client tokens are not
//! honoured that makes a second resource of the same name. The engine's retry looks first.
//!
//! Removal order (AWS's): reset the group's deployments, disassociate its role, delete the
//! group, then its definitions. Compensation runs newest step first and a provisioning flow
//! creates in the opposite order, so this is the order the saga takes; the group's own
//! compensation also resets a group still deployed, in case its deployment step's undo was
//! skipped.

mod definition;
mod deployment;
mod group;

pub use definition::{CreateCoreDefinition, CreateDeviceDefinition, Definition, Member};
pub use deployment::{CreateDeployment, Deployment, DeploymentStatus, DeploymentSucceeded};
pub use group::{AssociateRole, CreateGroup, CreateGroupVersion, Group, GroupVersion};

use aws_sdk_greengrass::config::retry::RetryConfig;
use aws_sdk_greengrass::types::DeploymentType;
use keel_engine::StepError;

use super::error::AwsFailure;

/// Error codes meaning "no such group, definition, version or deployment".
const NOT_FOUND: &[&str] = &[
    "IdNotFoundException",
    "ResourceNotFoundException",
    "VersionNotFoundException",
    "NotFoundException",
];

fn is_missing(f: &AwsFailure) -> bool {
    f.is_any(NOT_FOUND) || f.status == Some(404)
}

fn missing_ok(f: AwsFailure) -> Result<(), StepError> {
    if is_missing(&f) {
        Ok(())
    } else {
        Err(f.into())
    }
}

fn lag_if_missing(f: AwsFailure) -> AwsFailure {
    if is_missing(&f) {
        f.as_lag("not visible yet after its creation; retried within the step's policy")
    } else {
        f
    }
}

/// SDK settings for a create: no retries inside `send()` (see the module's documentation).
fn single_attempt() -> aws_sdk_greengrass::config::Builder {
    aws_sdk_greengrass::config::Builder::default().retry_config(RetryConfig::disabled())
}

/// The name a create step gives its resource: `<prefix>-<key>`.
fn keyed_name(prefix: &str, key: &keel_engine::IdempotencyKey) -> String {
    format!("{prefix}-{key}")
}

/// Every item of a paginated listing: `page(token)` fetches one page and the next token.
async fn all_pages<T, F, Fut>(mut page: F) -> Result<Vec<T>, AwsFailure>
where
    F: FnMut(Option<String>) -> Fut,
    Fut: std::future::Future<Output = Result<(Vec<T>, Option<String>), AwsFailure>>,
{
    let mut all = Vec::new();
    let mut token = None;
    loop {
        let (items, next) = page(token).await?;
        all.extend(items);
        token = next;
        if token.is_none() {
            return Ok(all);
        }
    }
}

/// The group's deployments, oldest first (by creation time; the service's order for ties).
async fn deployments_of(
    gg: &aws_sdk_greengrass::Client,
    group_id: &str,
) -> Result<Vec<aws_sdk_greengrass::types::Deployment>, AwsFailure> {
    let mut all = all_pages(|token| async move {
        let page = gg
            .list_deployments()
            .group_id(group_id)
            .set_next_token(token)
            .send()
            .await
            .map_err(|e| AwsFailure::new("greengrass:ListDeployments", &e))?;
        Ok((
            page.deployments().to_vec(),
            page.next_token().map(str::to_string),
        ))
    })
    .await?;
    all.sort_by(|a, b| a.created_at().cmp(&b.created_at()));
    Ok(all)
}

fn is_reset(d: &aws_sdk_greengrass::types::Deployment) -> bool {
    matches!(
        d.deployment_type(),
        Some(DeploymentType::ResetDeployment | DeploymentType::ForceResetDeployment)
    )
}

/// Resets the group's deployments (force) unless it was never deployed or is reset already;
/// a group that is gone is done.
async fn reset_if_deployed(
    gg: &aws_sdk_greengrass::Client,
    group_id: &str,
) -> Result<(), StepError> {
    let deployments = match deployments_of(gg, group_id).await {
        Ok(d) => d,
        Err(f) => return missing_ok(f),
    };
    match deployments.last() {
        None => return Ok(()),
        Some(last) if is_reset(last) => return Ok(()),
        Some(_) => {}
    }
    match gg
        .reset_deployments()
        .group_id(group_id)
        .force(true)
        .send()
        .await
    {
        Ok(_) => Ok(()),
        // Also how the service answers "not deployed, or reset already": nothing to reset.
        Err(e) => missing_ok(AwsFailure::new("greengrass:ResetDeployments", &e)),
    }
}
