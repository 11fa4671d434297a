//! `RegisterCertificate` (of key material made by `CreateKeyMaterial`), its predecessor kept
//! for old journals, and `ActivateCertificate`.

use keel_engine::{Compensation, RetryPolicy, Step, StepContext, StepError};
use serde::{Deserialize, Serialize};

use super::super::error::AwsFailure;
use super::super::x509::{certificate_id, KeyStore};
use super::super::{clients, confirm_absence, AWS_COMPENSATION_RETRY_POLICY, AWS_RETRY_POLICY};
use super::{
    detach_policy, detach_thing_principal, lag_if_missing, missing_ok, ALREADY_EXISTS, NOT_FOUND,
};
use crate::files::blocking;

/// A registered certificate. The private key stays in its file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Certificate {
    /// Its id (SHA-256 of the DER).
    pub id: String,
    /// Its ARN.
    pub arn: String,
    /// The certificate (public).
    pub pem: String,
}

/// Registers a certificate that [`super::CreateKeyMaterial`] made (its
/// `certificate_pem`) with RegisterCertificateWithoutCA, inactive. The certificate's id, the
/// SHA-256 of its DER, follows from the PEM, so a retry registers the same certificate and
/// adopts it when IoT answers `ResourceAlreadyExistsException`: only the holder of its
/// private key could have made it, and the journaled key material says this run holds it.
/// The step never reads a key file.
///
/// Compensation: detaches it from things, detaches its policies, deactivates it, deletes it.
/// In doubt, the id comes from the step's own argument. The key files are the key material
/// step's to remove.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterCertificate {
    /// The certificate (PEM), as the key material step returned it.
    pub certificate_pem: String,
}

impl RegisterCertificate {
    /// The certificate's IoT id, or `None` when the PEM holds no certificate.
    fn certificate_id(&self) -> Option<String> {
        certificate_id(&self.certificate_pem)
    }
}

impl Step for RegisterCertificate {
    const KIND: &'static str = "aws.iot.register-certificate-pem";
    type Output = Certificate;
    const RETRY_POLICY: RetryPolicy = AWS_RETRY_POLICY;
    const RATE_LIMIT: Option<&'static str> = Some("iot");
    const COMPENSATION_RETRY_POLICY: RetryPolicy = AWS_COMPENSATION_RETRY_POLICY;

    async fn execute(&self, ctx: &StepContext) -> Result<Certificate, StepError> {
        let iot = &clients(ctx)?.iot;
        let id = self.certificate_id().ok_or_else(|| {
            StepError::permanent(
                "the certificate_pem given to RegisterCertificate holds no PEM certificate",
            )
        })?;
        let arn = match iot
            .register_certificate_without_ca()
            .certificate_pem(&self.certificate_pem)
            .status(aws_sdk_iot::types::CertificateStatus::Inactive)
            .send()
            .await
        {
            Ok(out) => {
                let registered = out.certificate_id().unwrap_or_default();
                if registered != id {
                    return Err(StepError::permanent(format!(
                        "IoT registered the certificate as {registered}, expected {id} (SHA-256 of its DER)"
                    )));
                }
                out.certificate_arn().unwrap_or_default().to_string()
            }
            Err(e) => {
                let f = AwsFailure::new("iot:RegisterCertificateWithoutCA", &e);
                if !f.is(ALREADY_EXISTS) {
                    return Err(f.into());
                }
                let described = iot
                    .describe_certificate()
                    .certificate_id(&id)
                    .send()
                    .await
                    .map_err(|e| lag_if_missing(AwsFailure::new("iot:DescribeCertificate", &e)))?;
                described
                    .certificate_description()
                    .and_then(|d| d.certificate_arn())
                    .unwrap_or_default()
                    .to_string()
            }
        };
        Ok(Certificate {
            id,
            arn,
            pem: self.certificate_pem.clone(),
        })
    }

    async fn compensate(
        &self,
        ctx: &StepContext,
        output: Option<Certificate>,
    ) -> Result<Compensation, StepError> {
        // A PEM without a certificate was refused before any call: nothing to undo.
        let Some(id) = output.map(|c| c.id).or_else(|| self.certificate_id()) else {
            return Ok(Compensation::Done);
        };
        remove_certificate(ctx, &id).await?;
        Ok(Compensation::Done)
    }
}

/// The step of kind `aws.iot.register-certificate`, which made key material (under the
/// predictable names `<key>.key.pem` and `<key>.cert.pem`, reused when found) and registered
/// it in one step. Kept only so that runs journaled before [`super::CreateKeyMaterial`]
/// existed can still be compensated; executing it is refused.
///
/// Compensation: as [`RegisterCertificate`]'s; in doubt, the certificate id comes from the
/// `<key>.cert.pem` file such a run wrote (in a directory that passes [`KeyStore::check`],
/// read without following a link), and no file means nothing was registered. Then removes
/// the step's key files.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LegacyRegisterCertificate {
    /// The certificate's common name (the device).
    pub subject: String,
}

impl Step for LegacyRegisterCertificate {
    const KIND: &'static str = "aws.iot.register-certificate";
    type Output = Certificate;
    const RATE_LIMIT: Option<&'static str> = Some("iot");
    const COMPENSATION_RETRY_POLICY: RetryPolicy = AWS_COMPENSATION_RETRY_POLICY;

    async fn execute(&self, _ctx: &StepContext) -> Result<Certificate, StepError> {
        Err(StepError::permanent(format!(
            "{} is kept only to compensate old runs: make key material with {} and register it with {}",
            Self::KIND,
            super::CreateKeyMaterial::KIND,
            RegisterCertificate::KIND
        )))
    }

    async fn compensate(
        &self,
        ctx: &StepContext,
        output: Option<Certificate>,
    ) -> Result<Compensation, StepError> {
        let store = KeyStore::of(ctx)?;
        let key = ctx.key();
        let id = match output {
            Some(c) => Some(c.id),
            None => {
                let store = std::sync::Arc::clone(&store);
                blocking(move || Ok(store.legacy_certificate_id(&key)?)).await?
            }
        };
        if let Some(id) = id {
            remove_certificate(ctx, &id).await?;
        }
        blocking(move || Ok(store.remove(&key)?)).await?;
        Ok(Compensation::Done)
    }
}

/// Removes certificate `id` the way AWS requires: detaches it from things, detaches its
/// policies, deactivates it, deletes it. A certificate not found is gone once IoT's
/// visibility lag is over.
async fn remove_certificate(ctx: &StepContext, id: &str) -> Result<(), StepError> {
    let iot = &clients(ctx)?.iot;
    let arn = match iot.describe_certificate().certificate_id(id).send().await {
        Ok(d) => d
            .certificate_description()
            .and_then(|d| d.certificate_arn())
            .unwrap_or_default()
            .to_string(),
        Err(e) => {
            let f = AwsFailure::new("iot:DescribeCertificate", &e);
            if f.is(NOT_FOUND) {
                return confirm_absence(ctx, "iot", "IoT certificate");
            }
            return Err(f.into());
        }
    };
    // A read that flaps (found, then not found) is lag, not a failure.
    let things = match iot.list_principal_things().principal(&arn).send().await {
        Ok(listed) => listed,
        Err(e) => return missing_ok(ctx, AwsFailure::new("iot:ListPrincipalThings", &e)),
    };
    for thing in things.things() {
        detach_thing_principal(ctx, iot, thing, &arn).await?;
    }
    let policies = match iot.list_attached_policies().target(&arn).send().await {
        Ok(listed) => listed,
        Err(e) => return missing_ok(ctx, AwsFailure::new("iot:ListAttachedPolicies", &e)),
    };
    for policy in policies.policies() {
        if let Some(name) = policy.policy_name() {
            detach_policy(ctx, iot, name, &arn).await?;
        }
    }
    if let Err(e) = iot
        .update_certificate()
        .certificate_id(id)
        .new_status(aws_sdk_iot::types::CertificateStatus::Inactive)
        .send()
        .await
    {
        missing_ok(ctx, AwsFailure::new("iot:UpdateCertificate", &e))?;
    }
    if let Err(e) = iot.delete_certificate().certificate_id(id).send().await {
        let f = AwsFailure::new("iot:DeleteCertificate", &e);
        if f.is("CertificateStateException") || f.is("DeleteConflictException") {
            return Err(f
                .as_lag("an attachment or the status change is not visible yet")
                .into());
        }
        missing_ok(ctx, f)?;
    }
    Ok(())
}

/// Sets a certificate ACTIVE. Compensation sets it INACTIVE (a missing certificate is done).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActivateCertificate {
    /// The certificate id.
    pub certificate_id: String,
}

impl ActivateCertificate {
    async fn set(
        &self,
        ctx: &StepContext,
        status: aws_sdk_iot::types::CertificateStatus,
    ) -> Result<Result<(), AwsFailure>, StepError> {
        let iot = &clients(ctx)?.iot;
        Ok(iot
            .update_certificate()
            .certificate_id(&self.certificate_id)
            .new_status(status)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| AwsFailure::new("iot:UpdateCertificate", &e)))
    }
}

impl Step for ActivateCertificate {
    const KIND: &'static str = "aws.iot.activate-certificate";
    type Output = ();
    const RETRY_POLICY: RetryPolicy = AWS_RETRY_POLICY;
    const RATE_LIMIT: Option<&'static str> = Some("iot");
    const COMPENSATION_RETRY_POLICY: RetryPolicy = AWS_COMPENSATION_RETRY_POLICY;

    async fn execute(&self, ctx: &StepContext) -> Result<(), StepError> {
        self.set(ctx, aws_sdk_iot::types::CertificateStatus::Active)
            .await?
            .map_err(|f| lag_if_missing(f).into())
    }

    async fn compensate(
        &self,
        ctx: &StepContext,
        _output: Option<()>,
    ) -> Result<Compensation, StepError> {
        // Gone (deleted by its own compensation): nothing to deactivate.
        match self
            .set(ctx, aws_sdk_iot::types::CertificateStatus::Inactive)
            .await?
        {
            Ok(()) => Ok(Compensation::Done),
            Err(f) => missing_ok(ctx, f).map(|()| Compensation::Done),
        }
    }
}
