//! The BOSH-like workflow: a usable machine is an instance that runs with a volume attached.

use std::time::Duration;

use keel_engine::{Ctx, LearnedDeadline, StepType, WaitPolicy, Workflow, WorkflowError};
use serde::{Deserialize, Serialize};

use super::attach::AttachVolume;
use super::create::{CreateInstance, CreateVolume};
use super::probes::{InstanceRunning, VolumeAvailable};

/// Every step kind of the simulated cloud, for [`keel_engine::EngineBuilder::steps`].
pub const STEPS: &[StepType] = &[
    StepType::of::<CreateInstance>(),
    StepType::of::<CreateVolume>(),
    StepType::of::<AttachVolume>(),
];

/// How a run waits: the same for the instance and the volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineSpec {
    /// Creations of each resource at most (the first included).
    pub generations: u32,
    /// Consecutive "ready" reads a wait needs.
    pub confirmations: u32,
    /// The explicit policy's (fixed) interval between polls.
    pub poll_interval_ms: u64,
    /// The explicit policy's deadline, from the wait's start.
    pub wait_timeout_ms: u64,
    /// Learn the schedule from the wait kind's statistics once this many samples exist,
    /// with the deadline of a recreatable resource ([`LearnedDeadline::UsualTail`]); `None`:
    /// always the explicit policy.
    pub learn_after: Option<u64>,
}

impl MachineSpec {
    /// The wait policy of both waits.
    pub fn policy(&self) -> WaitPolicy {
        let policy = WaitPolicy::every(
            Duration::from_millis(self.poll_interval_ms),
            Duration::from_millis(self.wait_timeout_ms),
        )
        .growth(1.0)
        .confirmations(self.confirmations)
        .learned_deadline(LearnedDeadline::UsualTail);
        match self.learn_after {
            Some(samples) => policy.learn_after(samples),
            None => policy,
        }
    }
}

/// A usable machine.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Machine {
    /// The instance id.
    pub instance: String,
    /// The volume id, attached to the instance.
    pub volume: String,
    /// Which generation of the instance became ready (0: the first).
    pub instance_generation: u32,
    /// Which generation of the volume became ready.
    pub volume_generation: u32,
}

/// Creates an instance and waits until it runs, creates a volume and waits until it is
/// available (each recreated when its wait times out, up to `generations`), attaches them.
#[derive(Debug)]
pub struct ProvisionMachine;

impl Workflow for ProvisionMachine {
    const NAME: &'static str = "sim.provision-machine";
    type Input = MachineSpec;
    type Output = Machine;

    async fn run(ctx: &mut Ctx, spec: MachineSpec) -> Result<Machine, WorkflowError> {
        let policy = spec.policy();
        let instance = ctx
            .create_and_wait(
                spec.generations,
                |generation| CreateInstance { generation },
                |id: &String| InstanceRunning {
                    instance: id.clone(),
                },
                policy.clone(),
            )
            .await?;
        let volume = ctx
            .create_and_wait(
                spec.generations,
                |generation| CreateVolume { generation },
                |id: &String| VolumeAvailable { volume: id.clone() },
                policy,
            )
            .await?;
        ctx.step(AttachVolume {
            instance: instance.resource.clone(),
            volume: volume.resource.clone(),
        })
        .await?;
        Ok(Machine {
            instance: instance.resource,
            volume: volume.resource,
            instance_generation: instance.generation,
            volume_generation: volume.generation,
        })
    }
}
