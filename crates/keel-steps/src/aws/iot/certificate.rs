//! `RegisterCertificate` (key material made locally) and `ActivateCertificate`.

use std::path::PathBuf;

use keel_engine::{RetryPolicy, Step, StepContext, StepError, Undo};
use serde::{Deserialize, Serialize};

use super::super::error::AwsFailure;
use super::super::x509::KeyStore;
use super::super::{clients, confirm_absence, retry_policy, undo_retry_policy};
use super::{
    detach_policy, detach_thing_principal, lag_if_missing, missing_ok, ALREADY_EXISTS, NOT_FOUND,
};

/// A registered certificate. The private key stays in its file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Certificate {
    /// Its id (SHA-256 of the DER).
    pub id: String,
    /// Its ARN.
    pub arn: String,
    /// The certificate (public).
    pub pem: String,
    /// The private key's file (mode 0600).
    pub key_path: PathBuf,
    /// SHA-256 of the public key.
    pub key_fingerprint: String,
}

/// Makes a key pair and a self-signed certificate locally (files named by the step's key,
/// see [`super::x509`]) and registers the certificate with RegisterCertificateWithoutCA,
/// inactive. Its id is known before the call, so a retry that meets
/// `ResourceAlreadyExistsException` adopts it: only the holder of the key file could have
/// registered that certificate.
///
/// Compensation: detaches it from things, detaches its policies, deactivates it, deletes it,
/// and removes the key files.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterCertificate {
    /// The certificate's common name (the device).
    pub subject: String,
}

impl Step for RegisterCertificate {
    const KIND: &'static str = "aws.iot.register-certificate";
    type Output = Certificate;

    async fn execute(&self, ctx: &StepContext) -> Result<Certificate, StepError> {
        let iot = &clients(ctx)?.iot;
        let material = KeyStore::of(ctx)?.material(&ctx.key(), &self.subject)?;
        let arn = match iot
            .register_certificate_without_ca()
            .certificate_pem(&material.certificate_pem)
            .status(aws_sdk_iot::types::CertificateStatus::Inactive)
            .send()
            .await
        {
            Ok(out) => {
                let id = out.certificate_id().unwrap_or_default();
                if id != material.certificate_id {
                    return Err(StepError::permanent(format!(
                        "IoT registered the certificate as {id}, expected {} (SHA-256 of its DER)",
                        material.certificate_id
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
                    .certificate_id(&material.certificate_id)
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
            id: material.certificate_id,
            arn,
            pem: material.certificate_pem,
            key_path: material.key_path,
            key_fingerprint: material.key_fingerprint,
        })
    }

    fn retry_policy(&self) -> RetryPolicy {
        retry_policy()
    }

    fn rate_limit(&self) -> Option<&str> {
        Some("iot")
    }

    async fn compensate(
        &self,
        ctx: &StepContext,
        output: Option<Certificate>,
    ) -> Result<Undo, StepError> {
        let iot = &clients(ctx)?.iot;
        let store = KeyStore::of(ctx)?;
        let key = ctx.key();
        // In doubt, the key files say which certificate it would be; without them nothing
        // was registered (the files are written before the call).
        let id = match output {
            Some(c) => c.id,
            None if !store.cert_path(&key).exists() => return Ok(Undo::Done),
            None => store.material(&key, &self.subject)?.certificate_id,
        };
        let arn = match iot.describe_certificate().certificate_id(&id).send().await {
            Ok(d) => d
                .certificate_description()
                .and_then(|d| d.certificate_arn())
                .unwrap_or_default()
                .to_string(),
            Err(e) => {
                let f = AwsFailure::new("iot:DescribeCertificate", &e);
                if f.is(NOT_FOUND) {
                    confirm_absence(ctx, "iot", "IoT certificate")?;
                    store.remove(&key)?;
                    return Ok(Undo::Done);
                }
                return Err(f.into());
            }
        };
        // A read that flaps (found, then not found) is lag, not a failure.
        let things = match iot.list_principal_things().principal(&arn).send().await {
            Ok(listed) => listed,
            Err(e) => {
                missing_ok(ctx, AwsFailure::new("iot:ListPrincipalThings", &e))?;
                store.remove(&key)?;
                return Ok(Undo::Done);
            }
        };
        for thing in things.things() {
            detach_thing_principal(ctx, iot, thing, &arn).await?;
        }
        let policies = match iot.list_attached_policies().target(&arn).send().await {
            Ok(listed) => listed,
            Err(e) => {
                missing_ok(ctx, AwsFailure::new("iot:ListAttachedPolicies", &e))?;
                store.remove(&key)?;
                return Ok(Undo::Done);
            }
        };
        for policy in policies.policies() {
            if let Some(name) = policy.policy_name() {
                detach_policy(ctx, iot, name, &arn).await?;
            }
        }
        if let Err(e) = iot
            .update_certificate()
            .certificate_id(&id)
            .new_status(aws_sdk_iot::types::CertificateStatus::Inactive)
            .send()
            .await
        {
            missing_ok(ctx, AwsFailure::new("iot:UpdateCertificate", &e))?;
        }
        if let Err(e) = iot.delete_certificate().certificate_id(&id).send().await {
            let f = AwsFailure::new("iot:DeleteCertificate", &e);
            if f.is("CertificateStateException") || f.is("DeleteConflictException") {
                return Err(f
                    .as_lag("an attachment or the status change is not visible yet")
                    .into());
            }
            missing_ok(ctx, f)?;
        }
        store.remove(&key)?;
        Ok(Undo::Done)
    }

    fn compensation_retry_policy(&self) -> RetryPolicy {
        undo_retry_policy()
    }
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

    async fn execute(&self, ctx: &StepContext) -> Result<(), StepError> {
        self.set(ctx, aws_sdk_iot::types::CertificateStatus::Active)
            .await?
            .map_err(|f| lag_if_missing(f).into())
    }

    fn retry_policy(&self) -> RetryPolicy {
        retry_policy()
    }

    fn rate_limit(&self) -> Option<&str> {
        Some("iot")
    }

    async fn compensate(&self, ctx: &StepContext, _output: Option<()>) -> Result<Undo, StepError> {
        // Gone (deleted by its own compensation): nothing to deactivate.
        match self
            .set(ctx, aws_sdk_iot::types::CertificateStatus::Inactive)
            .await?
        {
            Ok(()) => Ok(Undo::Done),
            Err(f) => missing_ok(ctx, f).map(|()| Undo::Done),
        }
    }

    fn compensation_retry_policy(&self) -> RetryPolicy {
        undo_retry_policy()
    }
}
