//! The provisioning workflows Keel's users came for, written as plain sequential Rust on the
//! engine and the AWS step library:
//!
//! | workflow | what it makes |
//! |---|---|
//! | [`iam::ServiceRole`] (`iam.service-role`) | an IAM role with its trust policy and policies, waited for until STS can assume it |
//! | [`iot::OnboardDevice`] (`iot.onboard-device`) | a thing, a certificate (key file written locally), a policy, the attachments, the activation |
//! | [`fleet::OnboardFleet`] (`iot.onboard-fleet`) | one `iot.onboard-device` child run per device, with bounded concurrency |
//! | [`greengrass::ProvisionCore`] (`greengrass.provision-core`) | a service role, a core device, client devices, definitions, a group, a deployment, waited for |
//! | [`ec2::MachineWithDisk`] (`ec2.machine-with-disk`) | an instance that runs, a volume in its zone, attached (each replaced when its wait passes the learned deadline) |
//! | [`ec2::Sweep`] (`ec2.sweep`) | nothing: it finishes the terminations compensation asked for and did not wait for |
//! | [`files::S3ToSftp`] (`files.s3-to-sftp`) | an S3 object delivered over SFTP, under its final name only complete and verified |
//!
//! Every input is checked by [`keel_engine::Workflow::validate`] before anything is stored
//! or created, with errors that name the field. Register the provisioning ones with
//! [`KeelWorkflows::provisioning_workflows`], and the delivery (whose input names local paths,
//! so it is for embedders that trust their callers) with [`KeelWorkflows::delivery_workflows`].

pub mod ec2;
pub mod files;
pub mod fleet;
pub mod greengrass;
pub mod iam;
pub mod iot;
pub mod sample;
mod validate;

use keel_steps::aws::AwsSteps;

/// Registers every provisioning workflow, and every AWS step kind (so compensation after a
/// restart can undo them), with an engine.
pub trait KeelWorkflows {
    /// `Engine::builder(dir).provisioning_workflows()`.
    fn provisioning_workflows(self) -> Self;

    /// `files.s3-to-sftp` and the steps it makes (`s3.download-to-file`, `files.publish`,
    /// `sftp.upload`). Its steps need a [`keel_steps::s3::S3Client`] resource.
    fn delivery_workflows(self) -> Self;
}

impl KeelWorkflows for keel_engine::EngineBuilder {
    fn provisioning_workflows(self) -> Self {
        self.aws_steps()
            .workflow::<iam::ServiceRole>()
            .workflow::<iot::OnboardDevice>()
            .workflow::<fleet::OnboardFleet>()
            .workflow::<greengrass::ProvisionCore>()
            .workflow::<ec2::MachineWithDisk>()
            .workflow::<ec2::Sweep>()
    }

    fn delivery_workflows(self) -> Self {
        self.steps(keel_steps::s3::STEPS)
            .steps(keel_steps::files::STEPS)
            .steps(keel_steps::sftp::STEPS)
            .workflow::<files::S3ToSftp>()
    }
}
