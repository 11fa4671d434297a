//! AWS steps: IAM/STS, IoT, Greengrass (V1) and EC2, each idempotent by its step's key and
//! undoable.
//!
//! Steps are journaled values, so they cannot hold SDK clients: the clients are an engine
//! resource ([`AwsClients`], registered with `EngineBuilder::resource`) that every step reads
//! from its `StepContext`. Every step names its service's rate limiter (`iam`, `sts`, `iot`,
//! `greengrass`, `ec2`).
//!
//! Ownership: every resource a create step makes carries the step's idempotency key (an IAM
//! or EC2 tag, an IoT thing attribute, a name derived from the key, or for certificates the
//! certificate itself, made and journaled by the run before it is registered), and a step
//! adopts an existing resource only after reading that mark. Key files are never adopted
//! ([`x509`]).

/// EC2 steps.
pub mod ec2;
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
    /// EC2.
    pub ec2: aws_sdk_ec2::Client,
    /// How long each service's reads may miss a resource after it was made.
    pub visibility_lag: VisibilityLag,
}

impl AwsClients {
    /// Clients for `config` (region, credentials, endpoint, retries).
    pub fn new(config: &aws_config::SdkConfig) -> AwsClients {
        AwsClients {
            iam: aws_sdk_iam::Client::new(config),
            sts: aws_sdk_sts::Client::new(config),
            iot: aws_sdk_iot::Client::new(config),
            greengrass: aws_sdk_greengrass::Client::new(config),
            ec2: aws_sdk_ec2::Client::new(config),
            visibility_lag: VisibilityLag::default(),
        }
    }

    /// The same clients, with `lag` as the visibility lag of `service` (`iam`, `iot`,
    /// `greengrass`).
    pub fn with_visibility_lag(mut self, service: &str, lag: Duration) -> AwsClients {
        self.visibility_lag.set(service, lag);
        self
    }
}

/// How long, per service, a resource may read as missing after the call that made it
/// returned: AWS's control planes are eventually consistent. A compensation that finds
/// nothing concludes "absent" only once this much time has passed since the step's effect
/// can have been made (`StepContext::effect_by_ms`); until then "not found" is lag, retried.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VisibilityLag {
    lags: Vec<(String, Duration)>,
}

impl Default for VisibilityLag {
    /// IAM 10 s (its documented propagation takes seconds), IoT 5 s, Greengrass 5 s, EC2 5 s
    /// (a volume reads "not found" for a moment after its create); 5 s for any other service. Floors, set above what the services are seen to take: a slower
    /// compensation costs seconds, a wrong "absent" leaks the resource.
    fn default() -> Self {
        let s = Duration::from_secs;
        Self {
            lags: vec![
                ("iam".into(), s(10)),
                ("iot".into(), s(5)),
                ("greengrass".into(), s(5)),
                ("ec2".into(), s(5)),
            ],
        }
    }
}

impl VisibilityLag {
    /// The lag of `service`.
    pub fn of(&self, service: &str) -> Duration {
        self.lags
            .iter()
            .find(|(name, _)| name == service)
            .map_or(Duration::from_secs(5), |(_, lag)| *lag)
    }

    /// Sets the lag of `service`.
    pub fn set(&mut self, service: &str, lag: Duration) {
        self.lags.retain(|(name, _)| name != service);
        self.lags.push((service.into(), lag));
    }
}

/// Every step of [`iam`], [`iot`], [`greengrass`] and [`ec2`], for `EngineBuilder::steps`, so a run
/// that resumes in compensation after a restart (its body does not run again) can undo them
/// from the journal. A test checks that every `impl Step` of this crate is in a set.
pub const STEPS: &[StepType] = &[
    StepType::of::<iam::CreateRole>(),
    StepType::of::<iam::AttachRolePolicy>(),
    StepType::of::<iam::PutRolePolicy>(),
    StepType::of::<iot::CreateThing>(),
    StepType::of::<iot::CreatePolicy>(),
    StepType::of::<iot::CreateKeyMaterial>(),
    StepType::of::<iot::RegisterCertificate>(),
    StepType::of::<iot::LegacyRegisterCertificate>(),
    StepType::of::<iot::ActivateCertificate>(),
    StepType::of::<iot::AttachPolicy>(),
    StepType::of::<iot::AttachThingPrincipal>(),
    // An effect now; its kind stays for runs journaled before start records said that it has
    // nothing to undo.
    StepType::effect(iot::DATA_ENDPOINT),
    StepType::of::<greengrass::CreateCoreDefinition>(),
    StepType::of::<greengrass::CreateDeviceDefinition>(),
    StepType::of::<greengrass::CreateGroup>(),
    StepType::of::<greengrass::AssociateRole>(),
    StepType::of::<greengrass::CreateGroupVersion>(),
    StepType::of::<greengrass::CreateDeployment>(),
    StepType::of::<ec2::RunInstance>(),
    StepType::of::<ec2::CreateVolume>(),
    StepType::of::<ec2::AttachVolume>(),
    StepType::of::<ec2::DetachVolume>(),
    StepType::of::<ec2::SweepInstances>(),
];

/// Registers [`STEPS`]: `Engine::builder(dir).aws_steps()`.
pub trait AwsSteps {
    /// Registers every step of [`iam`], [`iot`], [`greengrass`] and [`ec2`].
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
pub(crate) const AWS_RETRY_POLICY: RetryPolicy = RetryPolicy::DEFAULT
    .with_attempts_max(12)
    .with_backoff(Duration::from_millis(100), Duration::from_secs(10));

/// The compensation retry policy of AWS steps: it may wait out a detached IoT policy's
/// five-minute delete window.
pub(crate) const AWS_COMPENSATION_RETRY_POLICY: RetryPolicy = RetryPolicy::DEFAULT
    .with_attempts_max(40)
    .with_backoff(Duration::from_millis(100), Duration::from_secs(15));

/// For a compensation that found no `what` of `service`: `Ok` (absent) once the service's
/// visibility lag has passed since the step's effect can have been made
/// (`StepContext::effect_by_ms`), a retryable error before, retried when the lag is over. A
/// resource whose output is journaled did exist: a "not found" inside the lag is its
/// invisibility, never its absence, however many reads say so.
pub(crate) fn confirm_absence(
    ctx: &StepContext,
    service: &str,
    what: &str,
) -> Result<(), StepError> {
    let lag = clients(ctx)?.visibility_lag.of(service);
    let now = ctx.now_ms();
    let made_by = ctx.effect_by_ms().unwrap_or(now);
    let absent_from = made_by.saturating_add(lag.as_millis() as u64);
    if now >= absent_from {
        return Ok(());
    }
    Err(StepError::retryable(format!(
        "{what} not found {} ms after it may have been made; {service} reads may miss a resource for {} ms, so its absence is confirmed from then on",
        now.saturating_sub(made_by),
        lag.as_millis()
    ))
    .with_retry_after(Duration::from_millis(absent_from - now)))
}

/// `failure`, from a call in a compensation: when `missing` (it said "not found"), absence
/// once confirmed ([`confirm_absence`]), lag before; otherwise the failure.
pub(crate) fn gone_after_lag(
    ctx: &StepContext,
    service: &str,
    failure: error::AwsFailure,
    missing: bool,
) -> Result<(), StepError> {
    if !missing {
        return Err(failure.into());
    }
    let what = format!(
        "the resource ({} answered {})",
        failure.operation,
        failure.code.as_deref().unwrap_or("not found")
    );
    confirm_absence(ctx, service, &what)
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
