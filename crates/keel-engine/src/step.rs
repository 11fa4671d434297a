//! Steps: one side effect each, with a serialisable argument (the step value), an output, a
//! retry policy and optionally a compensation; and the settings of an effect
//! ([`EffectOptions`]), a step written as a closure, with nothing to undo.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::ids::{Attempt, IdempotencyKey, OperationIndex, RunId};
use crate::journal::{ErrorClass, ErrorRecord};
use crate::limits::ERROR_MESSAGE_BYTES_MAX;
use crate::resources::Resources;
use crate::retry::RetryPolicy;

/// One side effect of a workflow.
///
/// The step value is its argument: it is serialised into the journal before the step runs,
/// which is what lets compensation run from the journal alone, and what replay compares to
/// detect changed code.
pub trait Step: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The step kind, e.g. `iam.create-role`. Groups statistics; must never change once
    /// journals hold it.
    const KIND: &'static str;

    /// What the step returns; journaled when it succeeds.
    type Output: Serialize + DeserializeOwned + Send + 'static;

    /// Whether [`Step::compensate`] undoes anything. A step that only reads sets it to
    /// `false`: each start record says so, and the saga passes over the step without calling
    /// `compensate` and without needing its kind registered, so a run that compensates after
    /// a restart never fails for want of a read-only step's code. (With `false`, an
    /// overridden `compensate` is never called.)
    const COMPENSABLE: bool = true;

    /// How failed attempts are retried; [`Step::retry_policy`] returns it unless a step
    /// overrides that method to choose per value.
    const RETRY_POLICY: RetryPolicy = RetryPolicy::DEFAULT;

    /// The rate-limited service this step calls (`"iam"`, `"iot"`, ...), if any;
    /// [`Step::rate_limit`] returns it unless overridden.
    const RATE_LIMIT: Option<&'static str> = None;

    /// How failed compensation attempts are retried; [`Step::compensation_retry_policy`]
    /// returns it unless overridden.
    const COMPENSATION_RETRY_POLICY: RetryPolicy = RetryPolicy::COMPENSATION_DEFAULT;

    /// Performs the side effect. Must be idempotent under `ctx.key()`: an attempt after a
    /// lost response or a crash has to find and adopt what an earlier attempt did.
    fn execute(
        &self,
        ctx: &StepContext,
    ) -> impl Future<Output = Result<Self::Output, StepError>> + Send;

    /// How failed attempts of this value are retried: [`Step::RETRY_POLICY`] by default.
    fn retry_policy(&self) -> RetryPolicy {
        Self::RETRY_POLICY
    }

    /// The rate-limited service this value calls, if any ([`Step::RATE_LIMIT`] by default):
    /// each attempt then waits for a slot of the engine's limiter of that name, and reports
    /// throttling ([`StepError::throttled`]) or success back to it.
    fn rate_limit(&self) -> Option<&str> {
        Self::RATE_LIMIT
    }

    /// Undoes the step. `output` is the recorded output, or `None` when the step's outcome is
    /// in doubt (an attempt started and nothing was recorded): then the compensation must find
    /// out, by `ctx.key()`, whether the effect happened, and undo it if so. Must be
    /// idempotent. The default has nothing to undo and returns [`Compensation::NotCompensable`].
    fn compensate(
        &self,
        ctx: &StepContext,
        output: Option<Self::Output>,
    ) -> impl Future<Output = Result<Compensation, StepError>> + Send {
        let _ = (ctx, output);
        async { Ok(Compensation::NotCompensable) }
    }

    /// How failed compensation attempts of this value are retried:
    /// [`Step::COMPENSATION_RETRY_POLICY`] by default.
    fn compensation_retry_policy(&self) -> RetryPolicy {
        Self::COMPENSATION_RETRY_POLICY
    }
}

/// How [`crate::Ctx::effect`] runs an effect, a side effect with nothing to undo written as a
/// closure: the settings a [`Step`] has as constants, and the argument a step value would be.
///
/// Built like a step's constants, so a `const` can hold them (the argument, a JSON value, is
/// then `null`):
///
/// ```
/// use std::time::Duration;
/// use keel_engine::{EffectOptions, RetryPolicy};
///
/// const LOOKUP: EffectOptions = EffectOptions::DEFAULT
///     .rate_limit("iot")
///     .retry_policy(RetryPolicy::DEFAULT.with_attempts_max(4));
/// let options = LOOKUP.argument(serde_json::json!({ "region": "eu-west-1" }));
/// # let _ = options;
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct EffectOptions {
    pub(crate) retry_policy: RetryPolicy,
    pub(crate) rate_limit: Option<&'static str>,
    pub(crate) argument: Value,
}

impl EffectOptions {
    /// [`RetryPolicy::DEFAULT`], no rate limit, the argument `null`.
    pub const DEFAULT: EffectOptions = EffectOptions {
        retry_policy: RetryPolicy::DEFAULT,
        rate_limit: None,
        argument: Value::Null,
    };

    /// These options with failed attempts retried under `policy` (as [`Step::RETRY_POLICY`]).
    pub const fn retry_policy(mut self, policy: RetryPolicy) -> Self {
        self.retry_policy = policy;
        self
    }

    /// These options with each attempt in a slot of the engine's limiter of `service`
    /// (`"iam"`, `"iot"`, ...), reporting throttling ([`StepError::throttled`]) or success back
    /// to it (as [`Step::RATE_LIMIT`]).
    pub const fn rate_limit(mut self, service: &'static str) -> Self {
        self.rate_limit = Some(service);
        self
    }

    /// These options with the effect journaled with `argument` (`null` by default): what it
    /// depends on, so that replay tells changed code from the journal, as it compares a step's
    /// value. A step turned into an effect passes the JSON its value serialised to, and its
    /// runs journaled before replay as they did.
    pub fn argument(self, argument: Value) -> Self {
        EffectOptions { argument, ..self }
    }
}

impl Default for EffectOptions {
    fn default() -> Self {
        EffectOptions::DEFAULT
    }
}

/// What a compensation did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compensation {
    /// The effect is gone (or never happened).
    Done,
    /// The step has no compensation; journaled as skipped.
    NotCompensable,
}

/// What a step (or its compensation) knows about the attempt it runs in.
#[derive(Clone, Debug)]
pub struct StepContext {
    pub(crate) run_id: RunId,
    pub(crate) step: OperationIndex,
    pub(crate) key: IdempotencyKey,
    pub(crate) attempt: Attempt,
    pub(crate) resources: Arc<Resources>,
    pub(crate) clock: crate::clock::Clock,
    /// For a compensation: by when the step's effect was made, if it was.
    pub(crate) effect_by_ms: Option<u64>,
}

impl StepContext {
    /// The resource of type `T` registered with [`crate::EngineBuilder::resource`] (an SDK
    /// client, say), if any.
    pub fn resource<T: Send + Sync + 'static>(&self) -> Option<Arc<T>> {
        self.resources.get::<T>()
    }

    /// The run this step belongs to.
    pub fn run_id(&self) -> &RunId {
        &self.run_id
    }

    /// The step's operation number within the run.
    pub fn step(&self) -> OperationIndex {
        self.step
    }

    /// The step's idempotency key: the same on every attempt, after every crash, and for the
    /// compensation.
    pub fn key(&self) -> IdempotencyKey {
        self.key
    }

    /// The attempt number, from 1 (for a compensation: the compensation's attempt).
    pub fn attempt(&self) -> Attempt {
        self.attempt
    }

    /// The engine clock's time (ms since the Unix epoch): the clock journal times are in.
    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// For a compensation: the latest time at which the step's effect can have been made, if
    /// it was. When the step's last attempt recorded an outcome, that record's time; when the
    /// outcome is in doubt (the process died during the attempt), the time compensation of
    /// the step began. A resource made by then is visible to reads once the service's
    /// visibility lag has passed after it, so "not found" only means "absent" from
    /// `effect_by_ms + lag` on. `None` for a step's own attempts and for probes.
    pub fn effect_by_ms(&self) -> Option<u64> {
        self.effect_by_ms
    }
}

/// A step failure, classified: the class drives retries and the saga.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct StepError {
    class: ErrorClass,
    message: String,
    retry_after: Option<Duration>,
    throttled: bool,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl StepError {
    /// Trying again may succeed (throttling, timeouts, 5xx, eventual consistency).
    pub fn retryable(message: impl Into<String>) -> Self {
        StepError {
            class: ErrorClass::Retryable,
            message: message.into(),
            retry_after: None,
            throttled: false,
            source: None,
        }
    }

    /// Trying again will fail the same way, and the step had no effect.
    pub fn permanent(message: impl Into<String>) -> Self {
        StepError {
            class: ErrorClass::Permanent,
            message: message.into(),
            retry_after: None,
            throttled: false,
            source: None,
        }
    }

    /// The service throttled the call: retryable, and the step's rate limiter slows down.
    pub fn throttled(message: impl Into<String>) -> Self {
        StepError {
            throttled: true,
            ..StepError::retryable(message)
        }
    }

    /// Whether the service throttled the call.
    pub fn is_throttled(&self) -> bool {
        self.throttled
    }

    /// Asks for the next attempt no sooner than `after` (a server's retry-after hint).
    pub fn with_retry_after(self, after: Duration) -> Self {
        StepError {
            retry_after: Some(after),
            ..self
        }
    }

    /// Keeps the underlying error as the source.
    pub fn with_source(self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        StepError {
            source: Some(Box::new(source)),
            ..self
        }
    }

    /// Retryable or permanent.
    pub fn class(&self) -> ErrorClass {
        self.class
    }

    /// The retry-after hint, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    /// The journaled form: class and message (with its sources), cut to the limit.
    pub fn to_record(&self) -> ErrorRecord {
        let mut message = self.message.clone();
        let mut source = std::error::Error::source(self);
        while let Some(s) = source {
            message.push_str(": ");
            message.push_str(&s.to_string());
            source = s.source();
        }
        ErrorRecord {
            class: self.class,
            message: truncate(message),
        }
    }
}

/// Cuts a message to `ERROR_MESSAGE_BYTES_MAX` at a char boundary, marking the cut.
pub(crate) fn truncate(mut message: String) -> String {
    if message.len() > ERROR_MESSAGE_BYTES_MAX {
        let mut cut = ERROR_MESSAGE_BYTES_MAX - 16;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
        message.push_str(" ...(truncated)");
    }
    message
}
