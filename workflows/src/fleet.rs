//! `iot.onboard-fleet`: many devices, one child run each.

use keel_engine::{Ctx, InvalidInput, Workflow, WorkflowError};
use serde::{Deserialize, Serialize};

use crate::iot::{DeviceInput, DeviceOutput, OnboardDevice};
use crate::validate;

/// Most devices in one fleet.
pub const FLEET_DEVICES_MAX: usize = 1_000;

/// Input of [`OnboardFleet`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetInput {
    /// The devices (1 to [`FLEET_DEVICES_MAX`], thing names distinct).
    pub devices: Vec<DeviceInput>,
    /// How many devices are onboarded at once (1 to 64).
    pub concurrency: u32,
}

/// One device's outcome.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetFailure {
    /// The thing name.
    pub thing_name: String,
    /// Why its onboarding did not complete (it compensated itself).
    pub error: String,
}

/// What [`OnboardFleet`] returns: the devices that completed and those that did not.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetOutput {
    /// Onboarded devices, in input order.
    pub onboarded: Vec<DeviceOutput>,
    /// Devices whose onboarding failed and was undone, in input order.
    pub failed: Vec<FleetFailure>,
}

/// Onboards every device as its own `iot.onboard-device` child run, `concurrency` at a
/// time: a device that fails compensates itself alone, and the fleet completes listing it.
/// Compensating the fleet (cancelling it) compensates every onboarded device.
pub struct OnboardFleet;

impl Workflow for OnboardFleet {
    const NAME: &'static str = "iot.onboard-fleet";
    type Input = FleetInput;
    type Output = FleetOutput;

    fn validate(input: &FleetInput) -> Result<(), InvalidInput> {
        validate::count("devices", input.devices.len(), 1, FLEET_DEVICES_MAX)?;
        validate::count("concurrency", input.concurrency as usize, 1, 64)?;
        let mut names = std::collections::BTreeSet::new();
        for (i, device) in input.devices.iter().enumerate() {
            OnboardDevice::check(&format!("devices[{i}]."), device)?;
            if !names.insert(&device.thing_name) {
                return Err(InvalidInput::new(
                    format!("devices[{i}].thing_name"),
                    format!("{:?} is listed twice", device.thing_name),
                ));
            }
        }
        Ok(())
    }

    async fn run(ctx: &mut Ctx, input: FleetInput) -> Result<FleetOutput, WorkflowError> {
        let results = ctx
            .children::<OnboardDevice>(input.devices.clone(), input.concurrency as usize)
            .await?;
        let mut output = FleetOutput {
            onboarded: Vec::new(),
            failed: Vec::new(),
        };
        for (device, result) in input.devices.iter().zip(results) {
            match result {
                Ok(done) => output.onboarded.push(done),
                Err(error @ WorkflowError::Child { .. }) => output.failed.push(FleetFailure {
                    thing_name: device.thing_name.clone(),
                    error: error.to_string(),
                }),
                Err(error) => return Err(error),
            }
        }
        Ok(output)
    }
}
