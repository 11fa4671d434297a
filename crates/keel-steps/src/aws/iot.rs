//! IoT steps: things (carrying the key as an attribute), policies (named from the key),
//! certificates (made locally, registered without a CA), attachments and activation.
//!
//! AWS ordering for removal: detach the certificate from things, detach its policies,
//! deactivate it, delete it, delete the thing, delete the policy. Compensation runs newest
//! step first, and the steps of a device come in the opposite order, so the attachments go
//! first; each removal step also clears what would block it (a certificate's remaining
//! attachments, a thing's remaining principals), but only on a resource that is its own.

use std::collections::BTreeMap;
use std::path::PathBuf;

use keel_engine::{RetryPolicy, Step, StepContext, StepError, Undo};
use serde::{Deserialize, Serialize};

use super::error::{conflict, AwsFailure};
use super::x509::KeyStore;
use super::{clients, confirm_absence, retry_policy, same_json, undo_retry_policy, KEY_ATTRIBUTE};

const NOT_FOUND: &str = "ResourceNotFoundException";
const ALREADY_EXISTS: &str = "ResourceAlreadyExistsException";

fn missing_ok(f: AwsFailure) -> Result<(), StepError> {
    if f.is(NOT_FOUND) {
        Ok(())
    } else {
        Err(f.into())
    }
}

fn lag_if_missing(f: AwsFailure) -> AwsFailure {
    if f.is(NOT_FOUND) {
        f.as_lag("not visible yet after its creation; retried within the step's policy")
    } else {
        f
    }
}

/// A thing as created or adopted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Thing {
    /// Its name.
    pub name: String,
    /// Its ARN.
    pub arn: String,
    /// Its id.
    pub id: String,
}

/// Creates a thing whose attribute `keel_key` is the step's key. It reads before it writes
/// (moto, unlike AWS, replaces an existing thing on CreateThing): an existing thing with this
/// key is adopted, one with another key or none is a conflict (nothing changed).
///
/// Compensation: detaches the thing's principals and deletes it, if it carries this key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateThing {
    /// The thing name.
    pub name: String,
    /// Attributes (the key attribute is added; AWS allows three on a thing without a type).
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
}

/// The thing `name`: `None` if it does not exist (or is not visible yet).
async fn describe_thing(
    iot: &aws_sdk_iot::Client,
    name: &str,
) -> Result<Option<(Thing, Option<String>)>, AwsFailure> {
    match iot.describe_thing().thing_name(name).send().await {
        Ok(t) => {
            let key = t.attributes().and_then(|a| a.get(KEY_ATTRIBUTE)).cloned();
            Ok(Some((
                Thing {
                    name: t.thing_name().unwrap_or(name).to_string(),
                    arn: t.thing_arn().unwrap_or_default().to_string(),
                    id: t.thing_id().unwrap_or_default().to_string(),
                },
                key,
            )))
        }
        Err(e) => {
            let f = AwsFailure::new("iot:DescribeThing", &e);
            if f.is(NOT_FOUND) {
                Ok(None)
            } else {
                Err(f)
            }
        }
    }
}

impl Step for CreateThing {
    const KIND: &'static str = "aws.iot.create-thing";
    type Output = Thing;

    async fn execute(&self, ctx: &StepContext) -> Result<Thing, StepError> {
        let iot = &clients(ctx)?.iot;
        let key = ctx.key().to_string();
        if let Some((thing, found)) = describe_thing(iot, &self.name).await? {
            if found.as_deref() == Some(key.as_str()) {
                return Ok(thing);
            }
            return Err(conflict("IoT thing", &self.name, found.as_deref()));
        }
        let mut attributes = self.attributes.clone();
        attributes.insert(KEY_ATTRIBUTE.to_string(), key.clone());
        let payload = aws_sdk_iot::types::AttributePayload::builder()
            .set_attributes(Some(attributes.into_iter().collect()))
            .build();
        match iot
            .create_thing()
            .thing_name(&self.name)
            .attribute_payload(payload)
            .send()
            .await
        {
            Ok(out) => Ok(Thing {
                name: out.thing_name().unwrap_or(&self.name).to_string(),
                arn: out.thing_arn().unwrap_or_default().to_string(),
                id: out.thing_id().unwrap_or_default().to_string(),
            }),
            Err(e) => {
                let f = AwsFailure::new("iot:CreateThing", &e);
                if !f.is(ALREADY_EXISTS) {
                    return Err(f.into());
                }
                // Made meanwhile (by a lost attempt retried inside the SDK, or by someone
                // else): read the key.
                match describe_thing(iot, &self.name).await? {
                    Some((thing, found)) if found.as_deref() == Some(key.as_str()) => Ok(thing),
                    Some((_, found)) => Err(conflict("IoT thing", &self.name, found.as_deref())),
                    None => Err(f.as_lag("exists but is not readable yet").into()),
                }
            }
        }
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
        _output: Option<Thing>,
    ) -> Result<Undo, StepError> {
        let iot = &clients(ctx)?.iot;
        let key = ctx.key().to_string();
        match describe_thing(iot, &self.name).await? {
            None => {
                confirm_absence(ctx, "IoT thing")?;
                return Ok(Undo::Done);
            }
            Some((_, found)) if found.as_deref() != Some(key.as_str()) => {
                tracing::warn!(thing = %self.name, ?found, "the thing is not this step's; left alone");
                return Ok(Undo::Done);
            }
            Some(_) => {}
        }
        let principals = iot
            .list_thing_principals()
            .thing_name(&self.name)
            .send()
            .await
            .map_err(|e| AwsFailure::new("iot:ListThingPrincipals", &e))?;
        for principal in principals.principals() {
            if let Err(e) = iot
                .detach_thing_principal()
                .thing_name(&self.name)
                .principal(principal)
                .send()
                .await
            {
                missing_ok(AwsFailure::new("iot:DetachThingPrincipal", &e))?;
            }
        }
        match iot.delete_thing().thing_name(&self.name).send().await {
            Ok(_) => Ok(Undo::Done),
            Err(e) => {
                missing_ok(AwsFailure::new("iot:DeleteThing", &e))?;
                Ok(Undo::Done)
            }
        }
    }

    fn compensation_retry_policy(&self) -> RetryPolicy {
        undo_retry_policy()
    }
}

/// A policy as created or adopted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// Its name: `<prefix>-<key>`.
    pub name: String,
    /// Its ARN.
    pub arn: String,
}

/// Creates an IoT policy named `<prefix>-<step key>`, so a retry finds it by name. (moto keeps
/// no tags on IoT policies, and a policy document has no place for a mark; a name derived
/// from the key is the mark.) An existing policy of that name with the same document is
/// adopted; one with another document is a conflict.
///
/// Compensation: detaches the policy from every target (as AWS requires) and deletes it;
/// `DeleteConflictException` right after a detach is lag (AWS documents up to five minutes)
/// and retried.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreatePolicy {
    /// The name's prefix.
    pub prefix: String,
    /// The policy document (JSON).
    pub document: String,
}

impl CreatePolicy {
    /// The policy's name under `key`.
    pub fn name(&self, key: &keel_engine::IdempotencyKey) -> String {
        format!("{}-{key}", self.prefix)
    }
}

impl Step for CreatePolicy {
    const KIND: &'static str = "aws.iot.create-policy";
    type Output = Policy;

    async fn execute(&self, ctx: &StepContext) -> Result<Policy, StepError> {
        let iot = &clients(ctx)?.iot;
        let name = self.name(&ctx.key());
        match iot
            .create_policy()
            .policy_name(&name)
            .policy_document(&self.document)
            .send()
            .await
        {
            Ok(out) => Ok(Policy {
                name: out.policy_name().unwrap_or(&name).to_string(),
                arn: out.policy_arn().unwrap_or_default().to_string(),
            }),
            Err(e) => {
                let f = AwsFailure::new("iot:CreatePolicy", &e);
                if !f.is(ALREADY_EXISTS) {
                    return Err(f.into());
                }
                let existing = iot
                    .get_policy()
                    .policy_name(&name)
                    .send()
                    .await
                    .map_err(|e| lag_if_missing(AwsFailure::new("iot:GetPolicy", &e)))?;
                let document = existing.policy_document().unwrap_or_default();
                if !same_json(document, &self.document) {
                    return Err(StepError::permanent(format!(
                        "conflict: IoT policy {name:?} already exists with another document; nothing was changed"
                    )));
                }
                Ok(Policy {
                    name,
                    arn: existing.policy_arn().unwrap_or_default().to_string(),
                })
            }
        }
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
        _output: Option<Policy>,
    ) -> Result<Undo, StepError> {
        let iot = &clients(ctx)?.iot;
        let name = self.name(&ctx.key());
        // The name is derived from the key, so a policy of that name with this document is
        // this step's; with another document, somebody else's (see the conflict in execute).
        match iot.get_policy().policy_name(&name).send().await {
            Ok(existing)
                if !same_json(
                    existing.policy_document().unwrap_or_default(),
                    &self.document,
                ) =>
            {
                tracing::warn!(policy = %name, "the policy has another document: not this step's; left alone");
                return Ok(Undo::Done);
            }
            Ok(_) => {}
            Err(e) => {
                let f = AwsFailure::new("iot:GetPolicy", &e);
                if f.is(NOT_FOUND) {
                    confirm_absence(ctx, "IoT policy")?;
                    return Ok(Undo::Done);
                }
                return Err(f.into());
            }
        }
        let targets = match iot
            .list_targets_for_policy()
            .policy_name(&name)
            .send()
            .await
        {
            Ok(t) => t.targets().to_vec(),
            Err(e) => {
                let f = AwsFailure::new("iot:ListTargetsForPolicy", &e);
                if f.is(NOT_FOUND) {
                    confirm_absence(ctx, "IoT policy")?;
                    return Ok(Undo::Done);
                }
                return Err(f.into());
            }
        };
        for target in targets {
            if let Err(e) = iot
                .detach_policy()
                .policy_name(&name)
                .target(&target)
                .send()
                .await
            {
                missing_ok(AwsFailure::new("iot:DetachPolicy", &e))?;
            }
        }
        match iot.delete_policy().policy_name(&name).send().await {
            Ok(_) => Ok(Undo::Done),
            Err(e) => {
                let f = AwsFailure::new("iot:DeletePolicy", &e);
                if f.is("DeleteConflictException") {
                    return Err(f
                        .as_lag("detached moments ago; AWS allows up to five minutes")
                        .into());
                }
                missing_ok(f)?;
                Ok(Undo::Done)
            }
        }
    }

    fn compensation_retry_policy(&self) -> RetryPolicy {
        undo_retry_policy()
    }
}

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
                    confirm_absence(ctx, "IoT certificate")?;
                    store.remove(&key)?;
                    return Ok(Undo::Done);
                }
                return Err(f.into());
            }
        };
        let things = iot
            .list_principal_things()
            .principal(&arn)
            .send()
            .await
            .map_err(|e| AwsFailure::new("iot:ListPrincipalThings", &e))?;
        for thing in things.things() {
            if let Err(e) = iot
                .detach_thing_principal()
                .thing_name(thing)
                .principal(&arn)
                .send()
                .await
            {
                missing_ok(AwsFailure::new("iot:DetachThingPrincipal", &e))?;
            }
        }
        let policies = iot
            .list_attached_policies()
            .target(&arn)
            .send()
            .await
            .map_err(|e| AwsFailure::new("iot:ListAttachedPolicies", &e))?;
        for policy in policies.policies() {
            if let Some(name) = policy.policy_name() {
                if let Err(e) = iot
                    .detach_policy()
                    .policy_name(name)
                    .target(&arn)
                    .send()
                    .await
                {
                    missing_ok(AwsFailure::new("iot:DetachPolicy", &e))?;
                }
            }
        }
        if let Err(e) = iot
            .update_certificate()
            .certificate_id(&id)
            .new_status(aws_sdk_iot::types::CertificateStatus::Inactive)
            .send()
            .await
        {
            missing_ok(AwsFailure::new("iot:UpdateCertificate", &e))?;
        }
        if let Err(e) = iot.delete_certificate().certificate_id(&id).send().await {
            let f = AwsFailure::new("iot:DeleteCertificate", &e);
            if f.is("CertificateStateException") || f.is("DeleteConflictException") {
                return Err(f
                    .as_lag("an attachment or the status change is not visible yet")
                    .into());
            }
            missing_ok(f)?;
        }
        store.remove(&key)?;
        Ok(Undo::Done)
    }

    fn compensation_retry_policy(&self) -> RetryPolicy {
        undo_retry_policy()
    }
}

/// Whether an attachment step made its change; `false` when it was there before.
pub use super::iam::Attached;

/// Attaches a policy to a target (a certificate ARN). Idempotent in IoT; its first attempt
/// looks first and records an attachment that was already there as not this step's. A
/// `ResourceNotFoundException` (the certificate or policy this workflow just created not
/// visible yet) is retried.
///
/// Compensation: detaches it (a missing attachment is done).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachPolicy {
    /// The policy name.
    pub policy_name: String,
    /// The target's ARN.
    pub target: String,
}

impl Step for AttachPolicy {
    const KIND: &'static str = "aws.iot.attach-policy";
    type Output = Attached;

    async fn execute(&self, ctx: &StepContext) -> Result<Attached, StepError> {
        let iot = &clients(ctx)?.iot;
        if ctx.attempt().0 == 1 {
            let attached = iot
                .list_attached_policies()
                .target(&self.target)
                .send()
                .await
                .map_err(|e| lag_if_missing(AwsFailure::new("iot:ListAttachedPolicies", &e)))?;
            if attached
                .policies()
                .iter()
                .any(|p| p.policy_name() == Some(self.policy_name.as_str()))
            {
                return Ok(Attached {
                    by_this_step: false,
                });
            }
        }
        iot.attach_policy()
            .policy_name(&self.policy_name)
            .target(&self.target)
            .send()
            .await
            .map_err(|e| lag_if_missing(AwsFailure::new("iot:AttachPolicy", &e)))?;
        Ok(Attached { by_this_step: true })
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
        output: Option<Attached>,
    ) -> Result<Undo, StepError> {
        if output.is_some_and(|o| !o.by_this_step) {
            return Ok(Undo::Done);
        }
        let iot = &clients(ctx)?.iot;
        if let Err(e) = iot
            .detach_policy()
            .policy_name(&self.policy_name)
            .target(&self.target)
            .send()
            .await
        {
            missing_ok(AwsFailure::new("iot:DetachPolicy", &e))?;
        }
        Ok(Undo::Done)
    }

    fn compensation_retry_policy(&self) -> RetryPolicy {
        undo_retry_policy()
    }
}

/// Attaches a principal (a certificate ARN) to a thing. Idempotent in IoT; the first attempt
/// looks first, as [`AttachPolicy`] does.
///
/// Compensation: detaches it (a missing attachment is done).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachThingPrincipal {
    /// The thing name.
    pub thing: String,
    /// The principal's ARN.
    pub principal: String,
}

impl Step for AttachThingPrincipal {
    const KIND: &'static str = "aws.iot.attach-thing-principal";
    type Output = Attached;

    async fn execute(&self, ctx: &StepContext) -> Result<Attached, StepError> {
        let iot = &clients(ctx)?.iot;
        if ctx.attempt().0 == 1 {
            let principals = iot
                .list_thing_principals()
                .thing_name(&self.thing)
                .send()
                .await
                .map_err(|e| lag_if_missing(AwsFailure::new("iot:ListThingPrincipals", &e)))?;
            if principals.principals().contains(&self.principal) {
                return Ok(Attached {
                    by_this_step: false,
                });
            }
        }
        iot.attach_thing_principal()
            .thing_name(&self.thing)
            .principal(&self.principal)
            .send()
            .await
            .map_err(|e| lag_if_missing(AwsFailure::new("iot:AttachThingPrincipal", &e)))?;
        Ok(Attached { by_this_step: true })
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
        output: Option<Attached>,
    ) -> Result<Undo, StepError> {
        if output.is_some_and(|o| !o.by_this_step) {
            return Ok(Undo::Done);
        }
        let iot = &clients(ctx)?.iot;
        if let Err(e) = iot
            .detach_thing_principal()
            .thing_name(&self.thing)
            .principal(&self.principal)
            .send()
            .await
        {
            missing_ok(AwsFailure::new("iot:DetachThingPrincipal", &e))?;
        }
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
            Err(f) => missing_ok(f).map(|()| Undo::Done),
        }
    }

    fn compensation_retry_policy(&self) -> RetryPolicy {
        undo_retry_policy()
    }
}
