//! IoT steps: things (carrying the key as an attribute), policies (named from the key),
//! certificates (key material made locally as a step of its own, then registered without a
//! CA), attachments and activation; and the account's data endpoint, an effect.
//!
//! AWS ordering for removal: detach the certificate from things, detach its policies,
//! deactivate it, delete it, delete the thing, delete the policy. Compensation runs newest
//! step first, and the steps of a device come in the opposite order, so the attachments go
//! first; each removal step also clears what would block it (a certificate's remaining
//! attachments, a thing's remaining principals), but only on a resource that is its own.

mod attach;
mod certificate;
mod endpoint;
mod key_material;
mod policy;
mod thing;

pub use attach::{AttachPolicy, AttachThingPrincipal};
pub use certificate::{
    ActivateCertificate, Certificate, LegacyRegisterCertificate, RegisterCertificate,
};
pub use endpoint::{data_endpoint, DATA_ENDPOINT};
pub use key_material::CreateKeyMaterial;
pub use policy::{CreatePolicy, Policy};
pub use thing::{CreateThing, Thing};

/// Whether an attachment step made its change; `false` when it was there before.
pub use super::iam::Attached;

use keel_engine::{StepContext, StepError};

use super::error::AwsFailure;
use super::gone_after_lag;

const NOT_FOUND: &str = "ResourceNotFoundException";
const ALREADY_EXISTS: &str = "ResourceAlreadyExistsException";

/// In a compensation: a "not found" from `f` is absence once IoT's visibility lag has
/// passed since the step's effect, lag before.
fn missing_ok(ctx: &StepContext, f: AwsFailure) -> Result<(), StepError> {
    let missing = f.is(NOT_FOUND);
    gone_after_lag(ctx, "iot", f, missing)
}

fn lag_if_missing(f: AwsFailure) -> AwsFailure {
    if f.is(NOT_FOUND) {
        f.as_lag("not visible yet after its creation; retried within the step's policy")
    } else {
        f
    }
}

/// Detaches `principal` from `thing`; an attachment already gone is done (once IoT's
/// visibility lag is over).
async fn detach_thing_principal(
    ctx: &StepContext,
    iot: &aws_sdk_iot::Client,
    thing: &str,
    principal: &str,
) -> Result<(), StepError> {
    match iot
        .detach_thing_principal()
        .thing_name(thing)
        .principal(principal)
        .send()
        .await
    {
        Ok(_) => Ok(()),
        Err(e) => missing_ok(ctx, AwsFailure::new("iot:DetachThingPrincipal", &e)),
    }
}

/// Detaches `policy` from `target`; an attachment already gone is done (once IoT's
/// visibility lag is over).
async fn detach_policy(
    ctx: &StepContext,
    iot: &aws_sdk_iot::Client,
    policy: &str,
    target: &str,
) -> Result<(), StepError> {
    match iot
        .detach_policy()
        .policy_name(policy)
        .target(target)
        .send()
        .await
    {
        Ok(_) => Ok(()),
        Err(e) => missing_ok(ctx, AwsFailure::new("iot:DetachPolicy", &e)),
    }
}
