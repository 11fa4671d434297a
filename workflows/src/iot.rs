//! `iot.onboard-device`: a thing with an active certificate and a policy.

use std::collections::BTreeMap;
use std::path::PathBuf;

use keel_engine::{Ctx, InvalidInput, Workflow, WorkflowError};
use keel_steps::aws::iot::{
    self, ActivateCertificate, AttachPolicy, AttachThingPrincipal, CreateKeyMaterial, CreatePolicy,
    CreateThing, RegisterCertificate,
};
use serde::{Deserialize, Serialize};

use crate::validate;

/// Input of [`OnboardDevice`]. A field it does not know is refused (a typo is not dropped).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceInput {
    /// The thing name (1 to 128 of letters, digits and `:_-`).
    pub thing_name: String,
    /// The IoT policy document attached to the device's certificate.
    pub policy_document: String,
    /// Thing attributes (the step adds its key as `keel_key`).
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
}

/// What [`OnboardDevice`] returns.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceOutput {
    /// The thing name.
    pub thing_name: String,
    /// The thing ARN.
    pub thing_arn: String,
    /// The certificate id.
    pub certificate_id: String,
    /// The certificate ARN.
    pub certificate_arn: String,
    /// Where the private key was written (owner-only; never in the journal).
    pub key_file: PathBuf,
    /// The account's IoT data endpoint.
    pub data_endpoint: String,
}

/// Thing, key material (the key written to the engine's key store, its path and fingerprint
/// journaled), certificate, policy, policy on the certificate, certificate on the thing,
/// activation, and the data endpoint the device connects to. Compensation detaches,
/// deactivates and deletes, newest first, and removes the key files.
#[derive(Debug)]
pub struct OnboardDevice;

impl OnboardDevice {
    pub(crate) fn check(field: &str, input: &DeviceInput) -> Result<(), InvalidInput> {
        validate::thing_name(&format!("{field}thing_name"), &input.thing_name, 128)?;
        validate::policy_document(&format!("{field}policy_document"), &input.policy_document)?;
        validate::count(&format!("{field}attributes"), input.attributes.len(), 0, 2)
    }
}

impl Workflow for OnboardDevice {
    const NAME: &'static str = "iot.onboard-device";
    /// 2: key material became a step of its own (`CreateKeyMaterial`) before the
    /// certificate's registration.
    const VERSION: u32 = 2;
    type Input = DeviceInput;
    type Output = DeviceOutput;

    fn validate(input: &DeviceInput) -> Result<(), InvalidInput> {
        OnboardDevice::check("", input)
    }

    async fn run(ctx: &mut Ctx, input: DeviceInput) -> Result<DeviceOutput, WorkflowError> {
        let thing = ctx
            .step(CreateThing {
                name: input.thing_name.clone(),
                attributes: input.attributes.clone(),
            })
            .await?;
        let material = ctx
            .step(CreateKeyMaterial {
                subject: thing.name.clone(),
            })
            .await?;
        let certificate = ctx
            .step(RegisterCertificate {
                certificate_pem: material.certificate_pem,
            })
            .await?;
        let policy = ctx
            .step(CreatePolicy {
                prefix: input.thing_name.clone(),
                document: input.policy_document.clone(),
            })
            .await?;
        ctx.step(AttachPolicy {
            policy_name: policy.name.clone(),
            target: certificate.arn.clone(),
        })
        .await?;
        ctx.step(AttachThingPrincipal {
            thing: thing.name.clone(),
            principal: certificate.arn.clone(),
        })
        .await?;
        ctx.step(ActivateCertificate {
            certificate_id: certificate.id.clone(),
        })
        .await?;
        let data_endpoint = iot::data_endpoint(ctx).await?;
        Ok(DeviceOutput {
            thing_name: thing.name,
            thing_arn: thing.arn,
            certificate_id: certificate.id,
            certificate_arn: certificate.arn,
            key_file: material.key_path,
            data_endpoint,
        })
    }
}
