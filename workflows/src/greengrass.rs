//! `greengrass.provision-core`: a Greengrass (V1) core with its client devices, deployed,
//! and, when asked, checked in: the run waits for the `core-checked-in` event the core (or
//! whatever watches it) sends, and undoes everything if none comes in time.

use std::collections::BTreeMap;
use std::time::Duration;

use keel_engine::{Ctx, InvalidInput, Received, WaitPolicy, Workflow, WorkflowError};
use keel_steps::aws::greengrass::{
    AssociateRole, CreateCoreDefinition, CreateDeployment, CreateDeviceDefinition, CreateGroup,
    CreateGroupVersion, Definition, DeploymentSucceeded, Member,
};
use serde::{Deserialize, Serialize};

use crate::iam::{ServiceRole, ServiceRoleInput};
use crate::iot::{DeviceInput, DeviceOutput, OnboardDevice};
use crate::validate;

/// Most client devices of one core (Greengrass V1 allows 200 per group).
pub const CLIENT_DEVICES_MAX: usize = 200;

/// Longest wait for a deployment to succeed, `deployment_timeout_s` (seconds: 7 days).
pub const DEPLOYMENT_TIMEOUT_S_MAX: u64 = 7 * 24 * 3600;

/// Longest wait for the core to check in, `wait_for_check_in.within_s` (seconds: 7 days).
pub const CHECK_IN_WITHIN_S_MAX: u64 = 7 * 24 * 3600;

/// The event a core's check-in is sent as (`Engine::send`, `keel send ID core-checked-in`).
pub const CHECK_IN_EVENT: &str = "core-checked-in";

/// The name under which the run publishes its progress, a sentence (`Engine::published`,
/// `keel get ID progress`).
pub const PROGRESS: &str = "progress";

/// Largest check-in payload the output keeps (its JSON, in bytes). A larger one is left out
/// of the output (null) and stays in the run's history: the output's bound leaves no room
/// for the engine's largest event payload next to 200 client devices.
pub const CHECK_IN_PAYLOAD_BYTES_MAX: usize = 4 * 1024;

/// Input of [`ProvisionCore`]. A field it does not know, here or in the role or the core
/// device, is refused (a typo is not dropped).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoreInput {
    /// The prefix of the group's and definitions' names (1 to 64 of letters, digits, `:_-`).
    pub name: String,
    /// The group's service role.
    pub role: ServiceRoleInput,
    /// The core device.
    pub core: DeviceInput,
    /// The client devices' thing names (0 to [`CLIENT_DEVICES_MAX`]).
    #[serde(default)]
    pub client_devices: Vec<String>,
    /// The IoT policy document every client device's certificate gets (required when there
    /// are client devices).
    #[serde(default)]
    pub client_policy_document: String,
    /// How many client devices are onboarded at once (1 to 64).
    pub concurrency: u32,
    /// How long to wait for the deployment to succeed (seconds; default 300, 1 to
    /// [`DEPLOYMENT_TIMEOUT_S_MAX`]).
    #[serde(default)]
    pub deployment_timeout_s: Option<u64>,
    /// Once deployed, wait for the core's check-in (the [`CHECK_IN_EVENT`] event); none:
    /// the run completes when the deployment succeeds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_for_check_in: Option<CheckInWait>,
}

/// How long a deployed core has to check in. A field it does not know is refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckInWait {
    /// Seconds from the deployment's success (1 to [`CHECK_IN_WITHIN_S_MAX`]). The deadline
    /// is journaled as an absolute time: a restart of the worker neither shortens nor
    /// extends it. When it passes with no check-in, the run fails and compensates
    /// everything it made.
    pub within_s: u64,
}

/// The check-in a run waited for, as its output records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckedIn {
    /// The check-in event's id (its sender's idempotency key).
    pub event_id: String,
    /// The event's payload, any JSON; null when its JSON is longer than
    /// [`CHECK_IN_PAYLOAD_BYTES_MAX`] (the run's history keeps it whole).
    pub payload: serde_json::Value,
}

/// What [`ProvisionCore`] returns.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoreOutput {
    /// The group id.
    pub group_id: String,
    /// The group ARN.
    pub group_arn: String,
    /// The deployment id.
    pub deployment_id: String,
    /// The service role's ARN.
    pub role_arn: String,
    /// The core device.
    pub core: DeviceOutput,
    /// The client devices' thing names, in input order. Each one's certificate and key file
    /// are the output of its own `iot.onboard-device` child run (whose parent is this run).
    pub client_devices: Vec<String>,
    /// The core's check-in, when the input asked to wait for one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checked_in: Option<CheckedIn>,
}

/// The service role (an `iam.service-role` child run), the core device and the client
/// devices (`iot.onboard-device` child runs, the clients concurrently), the core and device
/// definitions, the group with its role, a group version, a deployment, and a wait until
/// the deployment succeeds; then, if the input asks, a wait for the core's check-in event.
/// Any failure (a device, the deployment, no check-in in time) compensates the whole chain,
/// children included, newest first.
///
/// Progress is published under [`PROGRESS`] once the deployment succeeded (and again when
/// the core checked in); earlier publishes would change the journal of runs already under
/// way when this version was deployed.
#[derive(Debug)]
pub struct ProvisionCore;

impl Workflow for ProvisionCore {
    const NAME: &'static str = "greengrass.provision-core";
    type Input = CoreInput;
    type Output = CoreOutput;

    fn validate(input: &CoreInput) -> Result<(), InvalidInput> {
        validate::thing_name("name", &input.name, 64)?;
        <ServiceRole as Workflow>::validate(&input.role).map_err(|e| InvalidInput {
            field: format!("role.{}", e.field),
            reason: e.reason,
        })?;
        OnboardDevice::check("core.", &input.core)?;
        validate::count(
            "client_devices",
            input.client_devices.len(),
            0,
            CLIENT_DEVICES_MAX,
        )?;
        validate::count("concurrency", input.concurrency as usize, 1, 64)?;
        if !input.client_devices.is_empty() {
            validate::policy_document("client_policy_document", &input.client_policy_document)?;
        }
        let mut names = std::collections::BTreeSet::from([&input.core.thing_name]);
        for (i, name) in input.client_devices.iter().enumerate() {
            validate::thing_name(&format!("client_devices[{i}]"), name, 128)?;
            if !names.insert(name) {
                return Err(InvalidInput::new(
                    format!("client_devices[{i}]"),
                    format!("{name:?} is used twice"),
                ));
            }
        }
        validate::timeout_s(
            "deployment_timeout_s",
            input.deployment_timeout_s,
            DEPLOYMENT_TIMEOUT_S_MAX,
        )?;
        if let Some(wait) = &input.wait_for_check_in {
            validate::timeout_s(
                "wait_for_check_in.within_s",
                Some(wait.within_s),
                CHECK_IN_WITHIN_S_MAX,
            )?;
        }
        Ok(())
    }

    async fn run(ctx: &mut Ctx, input: CoreInput) -> Result<CoreOutput, WorkflowError> {
        let role = ctx.child::<ServiceRole>(input.role.clone()).await?;
        let core = ctx.child::<OnboardDevice>(input.core.clone()).await?;
        let client_devices = onboard_clients(ctx, &input).await?;
        let (cores, devices) = define(ctx, &input.name, &core, &client_devices).await?;
        let group = ctx
            .step(CreateGroup {
                prefix: input.name.clone(),
                tags: Default::default(),
            })
            .await?;
        ctx.step(AssociateRole {
            group_id: group.id.clone(),
            role_arn: role.arn.clone(),
        })
        .await?;
        let version = ctx
            .step(CreateGroupVersion {
                group_id: group.id.clone(),
                core_definition_version_arn: cores.version_arn.clone(),
                device_definition_version_arn: devices.map(|d| d.version_arn),
            })
            .await?;
        let deployment = ctx
            .step(CreateDeployment {
                group_id: group.id.clone(),
                group_version_id: version.version_id.clone(),
            })
            .await?;
        let timeout = Duration::from_secs(input.deployment_timeout_s.unwrap_or(300));
        ctx.wait(
            DeploymentSucceeded {
                group_id: group.id.clone(),
                deployment_id: deployment.id.clone(),
            },
            WaitPolicy::every(Duration::from_millis(250), timeout),
        )
        .await?;
        let checked_in = match &input.wait_for_check_in {
            Some(wait) => Some(check_in(ctx, &core.thing_name, wait).await?),
            None => {
                ctx.publish(PROGRESS, &"deployed").await?;
                None
            }
        };
        Ok(CoreOutput {
            group_id: group.id,
            group_arn: group.arn,
            deployment_id: deployment.id,
            role_arn: role.arn,
            core,
            client_devices: client_devices.into_iter().map(|d| d.thing_name).collect(),
            checked_in,
        })
    }
}

/// Waits up to `wait.within_s` for the deployed core `thing_name` to check in. No check-in
/// in time is a permanent failure: the run compensates, since a core that never came up is
/// not worth keeping half-made.
async fn check_in(
    ctx: &mut Ctx,
    thing_name: &str,
    wait: &CheckInWait,
) -> Result<CheckedIn, WorkflowError> {
    let within_s = wait.within_s;
    ctx.publish(
        PROGRESS,
        &format!("deployed; waiting for check-in of {thing_name} (up to {within_s} s)"),
    )
    .await?;
    // Any JSON is a check-in, so a payload never fails to decode; only its size matters.
    let received: Received<serde_json::Value> = match ctx
        .receive_event(&[CHECK_IN_EVENT], Some(Duration::from_secs(within_s)))
        .await
    {
        Ok(received) => received,
        Err(WorkflowError::EventTimedOut { .. }) => {
            return Err(WorkflowError::failed(format!(
                "core {thing_name} never checked in: no {CHECK_IN_EVENT:?} event within \
                 {within_s} s of its deployment"
            )))
        }
        Err(other) => return Err(other),
    };
    ctx.publish(
        PROGRESS,
        &format!("checked in ({thing_name}, event {:?})", received.event_id),
    )
    .await?;
    let bytes = received.payload.to_string().len();
    let payload = if bytes <= CHECK_IN_PAYLOAD_BYTES_MAX {
        received.payload
    } else {
        serde_json::Value::Null
    };
    Ok(CheckedIn {
        event_id: received.event_id,
        payload,
    })
}

/// Onboards the group's client devices as child runs, `concurrency` at a time; the first
/// that did not complete fails the group.
async fn onboard_clients(
    ctx: &mut Ctx,
    input: &CoreInput,
) -> Result<Vec<DeviceOutput>, WorkflowError> {
    if input.client_devices.is_empty() {
        return Ok(Vec::new());
    }
    let inputs = input
        .client_devices
        .iter()
        .map(|name| DeviceInput {
            thing_name: name.clone(),
            policy_document: input.client_policy_document.clone(),
            attributes: BTreeMap::new(),
        })
        .collect();
    let results = ctx
        .children::<OnboardDevice>(inputs, input.concurrency as usize)
        .await?;
    results.into_iter().collect()
}

/// The group's core definition and, when it has client devices, its device definition.
async fn define(
    ctx: &mut Ctx,
    name: &str,
    core: &DeviceOutput,
    client_devices: &[DeviceOutput],
) -> Result<(Definition, Option<Definition>), WorkflowError> {
    let member = |device: &DeviceOutput| Member {
        id: device.thing_name.clone(),
        thing_arn: device.thing_arn.clone(),
        certificate_arn: device.certificate_arn.clone(),
        sync_shadow: false,
    };
    let cores = ctx
        .step(CreateCoreDefinition {
            prefix: format!("{name}-cores"),
            cores: vec![member(core)],
        })
        .await?;
    let devices = if client_devices.is_empty() {
        None
    } else {
        Some(
            ctx.step(CreateDeviceDefinition {
                prefix: format!("{name}-devices"),
                devices: client_devices.iter().map(member).collect(),
            })
            .await?,
        )
    };
    Ok((cores, devices))
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_engine::limits::{INPUT_BYTES_MAX, OUTPUT_BYTES_MAX};

    /// A core with the most client devices, every name at its longest, and the largest
    /// check-in its output keeps, fits the engine's input and output bounds.
    #[test]
    fn the_largest_core_fits_the_engines_bounds() {
        let mut input = crate::sample::core("c", CLIENT_DEVICES_MAX);
        input.wait_for_check_in = Some(CheckInWait {
            within_s: CHECK_IN_WITHIN_S_MAX,
        });
        for (i, name) in input.client_devices.iter_mut().enumerate() {
            *name = format!("{i:0>128}");
        }
        assert!(ProvisionCore::validate(&input).is_ok());
        assert!(serde_json::to_vec(&input).unwrap().len() <= INPUT_BYTES_MAX);
        let long = "x".repeat(256);
        let output = CoreOutput {
            group_id: long.clone(),
            group_arn: long.clone(),
            deployment_id: long.clone(),
            role_arn: long.clone(),
            core: DeviceOutput {
                thing_name: long.clone(),
                thing_arn: long.clone(),
                certificate_id: long.clone(),
                certificate_arn: long.clone(),
                key_file: long.clone().into(),
                data_endpoint: long,
            },
            client_devices: input.client_devices,
            checked_in: Some(CheckedIn {
                event_id: "e".repeat(keel_engine::limits::EVENT_ID_LEN_MAX),
                payload: serde_json::Value::String("p".repeat(CHECK_IN_PAYLOAD_BYTES_MAX - 2)),
            }),
        };
        let bytes = serde_json::to_vec(&output).unwrap().len();
        assert!(bytes <= OUTPUT_BYTES_MAX, "{bytes}");
    }
}
