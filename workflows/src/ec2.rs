//! `ec2.machine-with-disk`: the BOSH AWS CPI's flow (an instance that runs, with a volume
//! attached), and `ec2.sweep`, which finishes the terminations the fast path left.

use std::collections::BTreeMap;
use std::time::Duration;

use keel_engine::{Ctx, InvalidInput, Workflow, WorkflowError};
use keel_steps::aws::ec2::{
    instance_running_policy, volume_attached_policy, volume_available_policy, AttachVolume,
    CreateVolume, InstanceRunning, InstancesTerminated, RunInstance, SweepInstances,
    VolumeAttached, VolumeAvailable,
};
use serde::{Deserialize, Serialize};

use crate::validate;

/// The instance's wait before it is replaced, until the statistics say otherwise
/// (`instance_wait_s`): the CPI's lesson, about 60 s.
pub const INSTANCE_WAIT_S_DEFAULT: u64 = 60;
/// The volume's wait before it is replaced (`volume_wait_s`): the CPI's lesson, about 10 s.
pub const VOLUME_WAIT_S_DEFAULT: u64 = 10;
/// The wait for the attachment (`attach_wait_s`); it cannot be replaced, and the CPI saw one
/// take 1,584 s.
pub const ATTACH_WAIT_S_DEFAULT: u64 = 1800;
/// Longest wait of any kind (seconds: 7 days, as every workflow's timeouts).
pub const WAIT_S_MAX: u64 = 7 * 24 * 3600;
/// Creations of each resource at most (`generations`), the first included.
pub const GENERATIONS_DEFAULT: u32 = 3;
/// Upper bound of `generations`.
pub const GENERATIONS_MAX: u32 = 10;
/// Largest disk (GiB), EC2's largest volume.
pub const DISK_GIB_MAX: u32 = 16_384;
/// The device name when `device` is not given.
pub const DEVICE_DEFAULT: &str = "/dev/sdf";

const VOLUME_TYPES: &[&str] = &["standard", "gp2", "gp3", "io1", "io2", "st1", "sc1"];

/// Input of [`MachineWithDisk`]. A field it does not know is refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineInput {
    /// The machine's name, its instance's and volume's `Name` tag (1 to 128 of letters,
    /// digits and `._-`).
    pub name: String,
    /// The image (`ami-` and 8 or 17 hex digits).
    pub image_id: String,
    /// The instance type, e.g. `t3.micro`.
    pub instance_type: String,
    /// Where to place the instance (the volume follows it); EC2 chooses when absent.
    #[serde(default)]
    pub availability_zone: Option<String>,
    /// The disk's size (GiB, 1 to [`DISK_GIB_MAX`]).
    pub disk_size_gib: u32,
    /// The disk's type (`standard`, `gp2`, `gp3`, `io1`, `io2`, `st1`, `sc1`); EC2's default
    /// when absent.
    #[serde(default)]
    pub disk_type: Option<String>,
    /// Where the disk is attached (`/dev/sd[f-p]` or `/dev/xvd[f-p]`; default `/dev/sdf`).
    #[serde(default)]
    pub device: Option<String>,
    /// Creations of the instance, and of the volume, at most (1 to [`GENERATIONS_MAX`],
    /// default [`GENERATIONS_DEFAULT`]).
    #[serde(default)]
    pub generations: Option<u32>,
    /// Seconds to wait for the instance to run before replacing it, until 20 samples of the
    /// wait exist (then twice their p90); default [`INSTANCE_WAIT_S_DEFAULT`].
    #[serde(default)]
    pub instance_wait_s: Option<u64>,
    /// The same for the volume; default [`VOLUME_WAIT_S_DEFAULT`].
    #[serde(default)]
    pub volume_wait_s: Option<u64>,
    /// Seconds to wait for the attachment; default [`ATTACH_WAIT_S_DEFAULT`].
    #[serde(default)]
    pub attach_wait_s: Option<u64>,
}

/// What [`MachineWithDisk`] returns: a usable machine.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Machine {
    /// The instance.
    pub instance_id: String,
    /// Its private IP address.
    pub private_ip: Option<String>,
    /// Its availability zone.
    pub availability_zone: String,
    /// The volume, attached to the instance.
    pub volume_id: String,
    /// The device it is attached at.
    pub device: String,
    /// Which instance became ready (0: the first; earlier ones were terminated).
    pub instance_generation: u32,
    /// Which volume became available (0: the first; earlier ones were deleted).
    pub volume_generation: u32,
}

/// Launches an instance and waits until it runs, creates a volume in its zone and waits until
/// it is available (each replaced when its wait passes its deadline, up to `generations`),
/// attaches the volume and waits until it reads attached. Waits learn their schedule from
/// the kind's statistics ([`keel_steps::aws::ec2::instance_running_policy`]). Compensation
/// detaches, deletes the volume and terminates the instance (not waited for: `ec2.sweep`).
#[derive(Debug)]
pub struct MachineWithDisk;

impl Workflow for MachineWithDisk {
    const NAME: &'static str = "ec2.machine-with-disk";
    type Input = MachineInput;
    type Output = Machine;

    fn validate(input: &MachineInput) -> Result<(), InvalidInput> {
        validate::ec2_name("name", &input.name)?;
        validate::image_id("image_id", &input.image_id)?;
        validate::instance_type("instance_type", &input.instance_type)?;
        if let Some(zone) = &input.availability_zone {
            validate::availability_zone("availability_zone", zone)?;
        }
        validate::count(
            "disk_size_gib",
            input.disk_size_gib as usize,
            1,
            DISK_GIB_MAX as usize,
        )?;
        if let Some(kind) = &input.disk_type {
            if !VOLUME_TYPES.contains(&kind.as_str()) {
                return Err(InvalidInput::new(
                    "disk_type",
                    format!("{kind:?} is not one of {}", VOLUME_TYPES.join(", ")),
                ));
            }
        }
        if let Some(device) = &input.device {
            validate::device("device", device)?;
        }
        if let Some(generations) = input.generations {
            validate::count(
                "generations",
                generations as usize,
                1,
                GENERATIONS_MAX as usize,
            )?;
        }
        validate::timeout_s("instance_wait_s", input.instance_wait_s, WAIT_S_MAX)?;
        validate::timeout_s("volume_wait_s", input.volume_wait_s, WAIT_S_MAX)?;
        validate::timeout_s("attach_wait_s", input.attach_wait_s, WAIT_S_MAX)
    }

    async fn run(ctx: &mut Ctx, input: MachineInput) -> Result<Machine, WorkflowError> {
        let seconds = |given: Option<u64>, default| Duration::from_secs(given.unwrap_or(default));
        let generations = input.generations.unwrap_or(GENERATIONS_DEFAULT);
        let device = input
            .device
            .clone()
            .unwrap_or_else(|| DEVICE_DEFAULT.to_string());
        let tags = |generation: u32| {
            BTreeMap::from([
                ("Name".to_string(), input.name.clone()),
                (
                    MACHINE_TAG.to_string(),
                    format!("{} generation {generation}", input.name),
                ),
            ])
        };
        let instance = ctx
            .create_and_wait(
                generations,
                |generation| RunInstance {
                    image_id: input.image_id.clone(),
                    instance_type: input.instance_type.clone(),
                    availability_zone: input.availability_zone.clone(),
                    tags: tags(generation),
                },
                |instance| InstanceRunning {
                    instance_id: instance.instance_id.clone(),
                },
                instance_running_policy(seconds(input.instance_wait_s, INSTANCE_WAIT_S_DEFAULT)),
            )
            .await?;
        let zone = instance.resource.availability_zone.clone();
        let volume = ctx
            .create_and_wait(
                generations,
                |generation| CreateVolume {
                    availability_zone: zone.clone(),
                    size_gib: input.disk_size_gib,
                    volume_type: input.disk_type.clone(),
                    tags: tags(generation),
                },
                |volume| VolumeAvailable {
                    volume_id: volume.volume_id.clone(),
                },
                volume_available_policy(seconds(input.volume_wait_s, VOLUME_WAIT_S_DEFAULT)),
            )
            .await?;
        let instance_id = instance.resource.instance_id.clone();
        let volume_id = volume.resource.volume_id.clone();
        ctx.step(AttachVolume {
            volume_id: volume_id.clone(),
            instance_id: instance_id.clone(),
            device: device.clone(),
        })
        .await?;
        let device = ctx
            .wait(
                VolumeAttached {
                    volume_id: volume_id.clone(),
                    instance_id: instance_id.clone(),
                },
                volume_attached_policy(seconds(input.attach_wait_s, ATTACH_WAIT_S_DEFAULT)),
            )
            .await?;
        Ok(Machine {
            instance_id,
            private_ip: instance.ready.private_ip,
            availability_zone: zone,
            volume_id,
            device,
            instance_generation: instance.generation,
            volume_generation: volume.generation,
        })
    }
}

/// The tag naming a machine's resource and its generation: `<name> generation <n>`.
pub const MACHINE_TAG: &str = "keel:machine";

/// Input of [`Sweep`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SweepInput {
    /// Seconds to wait until what it terminated reads `terminated` (1 to [`WAIT_S_MAX`];
    /// default 600).
    #[serde(default)]
    pub wait_s: Option<u64>,
}

/// What [`Sweep`] returns.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SweepOutput {
    /// The instances it asked EC2 to terminate, all terminated by its end.
    pub terminated: Vec<String>,
    /// The instances EC2 refused to terminate (termination protection, a deny), with its
    /// answer: for an operator.
    #[serde(default)]
    pub refused: Vec<(String, String)>,
}

/// Finishes the fast path's terminations: terminates every instance tagged
/// `keel:to-be-deleted` short of `terminated`, and waits until they all are. Run it on a
/// schedule (`keel schedule create sweep --every 1h --workflow ec2.sweep --input -`).
#[derive(Debug)]
pub struct Sweep;

impl Workflow for Sweep {
    const NAME: &'static str = "ec2.sweep";
    type Input = SweepInput;
    type Output = SweepOutput;

    fn validate(input: &SweepInput) -> Result<(), InvalidInput> {
        validate::timeout_s("wait_s", input.wait_s, WAIT_S_MAX)
    }

    async fn run(ctx: &mut Ctx, input: SweepInput) -> Result<SweepOutput, WorkflowError> {
        let swept = ctx.step(SweepInstances {}).await?;
        ctx.wait(
            InstancesTerminated {
                instance_ids: swept.instance_ids.clone(),
            },
            keel_engine::WaitPolicy::every(
                Duration::from_secs(2),
                Duration::from_secs(input.wait_s.unwrap_or(600)),
            ),
        )
        .await?;
        Ok(SweepOutput {
            terminated: swept.instance_ids,
            refused: swept.refused,
        })
    }
}
