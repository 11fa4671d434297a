//! AWS steps: IAM/STS, IoT and Greengrass (V1), each idempotent by its step's key and undoable.
//!
//! Steps are journaled values, so they cannot hold SDK clients: the clients are an engine
//! resource ([`AwsClients`], registered with `EngineBuilder::resource`) that every step reads
//! from its `StepContext`. Every step names its service's rate limiter (`iam`, `sts`, `iot`, `greengrass`).
//!
//! Ownership: every resource a create step makes carries the step's idempotency key (an IAM
//! tag, an IoT thing attribute, a name derived from the key, or for certificates the key
//! material itself), and a step adopts an existing resource only after reading that mark.

/// SDK error classification.
pub mod error;
/// Greengrass (V1) steps.
pub mod greengrass;
/// IAM and STS steps.
pub mod iam;
/// IoT steps.
pub mod iot;
/// Local key material for certificates.
pub mod x509;

use std::sync::Arc;
use std::time::Duration;

use keel_engine::{RetryPolicy, StepContext, StepError, StepType};

/// The tag (IAM) under which a resource carries the key of the step that made it.
pub const KEY_TAG: &str = "keel:key";

/// The IoT thing attribute carrying the key (attribute names allow no `:`).
pub const KEY_ATTRIBUTE: &str = "keel_key";

/// The SDK clients the AWS steps use, built from one `SdkConfig`.
#[derive(Clone, Debug)]
pub struct AwsClients {
    /// IAM.
    pub iam: aws_sdk_iam::Client,
    /// STS.
    pub sts: aws_sdk_sts::Client,
    /// IoT.
    pub iot: aws_sdk_iot::Client,
    /// Greengrass (V1).
    pub greengrass: aws_sdk_greengrass::Client,
}

impl AwsClients {
    /// Clients for `config` (region, credentials, endpoint, retries).
    pub fn new(config: &aws_config::SdkConfig) -> AwsClients {
        AwsClients {
            iam: aws_sdk_iam::Client::new(config),
            sts: aws_sdk_sts::Client::new(config),
            iot: aws_sdk_iot::Client::new(config),
            greengrass: aws_sdk_greengrass::Client::new(config),
        }
    }
}

/// Every step of [`iam`], [`iot`] and [`greengrass`], for `EngineBuilder::steps`, so a run
/// that resumes in compensation after a restart (its body does not run again) can undo them
/// from the journal. A test checks that every `impl Step` of this crate is in a set.
pub const STEPS: &[StepType] = &[
    StepType::of::<iam::CreateRole>(),
    StepType::of::<iam::AttachRolePolicy>(),
    StepType::of::<iam::PutRolePolicy>(),
    StepType::of::<iot::CreateThing>(),
    StepType::of::<iot::CreatePolicy>(),
    StepType::of::<iot::RegisterCertificate>(),
    StepType::of::<iot::ActivateCertificate>(),
    StepType::of::<iot::AttachPolicy>(),
    StepType::of::<iot::AttachThingPrincipal>(),
    StepType::of::<iot::DescribeDataEndpoint>(),
    StepType::of::<greengrass::CreateCoreDefinition>(),
    StepType::of::<greengrass::CreateDeviceDefinition>(),
    StepType::of::<greengrass::CreateGroup>(),
    StepType::of::<greengrass::AssociateRole>(),
    StepType::of::<greengrass::CreateGroupVersion>(),
    StepType::of::<greengrass::CreateDeployment>(),
];

/// Registers [`STEPS`]: `Engine::builder(dir).aws_steps()`.
pub trait AwsSteps {
    /// Registers every step of [`iam`], [`iot`] and [`greengrass`].
    fn aws_steps(self) -> Self;
}

impl AwsSteps for keel_engine::EngineBuilder {
    fn aws_steps(self) -> Self {
        self.steps(STEPS)
    }
}

/// The engine's [`AwsClients`], or a permanent error saying how to register them.
pub(crate) fn clients(ctx: &StepContext) -> Result<Arc<AwsClients>, StepError> {
    ctx.resource::<AwsClients>().ok_or_else(|| {
        StepError::permanent(
            "no AWS clients registered with the engine: add EngineBuilder::resource(AwsClients::new(&sdk_config))",
        )
    })
}

/// The retry policy of AWS steps: enough attempts and time to ride out throttling and the
/// eventual-consistency window after this workflow's own creates (IAM documents seconds,
/// IoT policy deletion up to five minutes after a detach).
pub(crate) fn retry_policy() -> RetryPolicy {
    RetryPolicy::default()
        .with_attempts_max(12)
        .with_backoff(Duration::from_millis(100), Duration::from_secs(10))
}

/// Compensations may wait out a detached IoT policy's five-minute delete window.
pub(crate) fn undo_retry_policy() -> RetryPolicy {
    RetryPolicy::default()
        .with_attempts_max(40)
        .with_backoff(Duration::from_millis(100), Duration::from_secs(15))
}

/// How many compensation attempts must see a resource missing before an in-doubt undo
/// concludes that it never existed (a resource made moments ago may not be readable yet).
pub(crate) const ABSENCE_CONFIRMATIONS: u32 = 3;

/// For an in-doubt compensation that found nothing: `Ok` once absence is confirmed, a
/// retryable error before.
pub(crate) fn confirm_absence(ctx: &StepContext, what: &str) -> Result<(), StepError> {
    if ctx.attempt().0 >= ABSENCE_CONFIRMATIONS {
        Ok(())
    } else {
        Err(StepError::retryable(format!(
            "{what} not found; confirming its absence ({} of {ABSENCE_CONFIRMATIONS}) in case it is not visible yet",
            ctx.attempt().0
        )))
    }
}

/// Whether two JSON documents are equal as values (whitespace and key order aside).
pub(crate) fn same_json(a: &str, b: &str) -> bool {
    match (
        serde_json::from_str::<serde_json::Value>(a),
        serde_json::from_str::<serde_json::Value>(b),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}
