//! Classification of AWS SDK errors into the engine's classes, with the AWS error code kept.
//!
//! | what came back                                              | class                |
//! |-------------------------------------------------------------|----------------------|
//! | throttling codes (`Throttling`, `ThrottlingException`, ...) | retryable, throttled |
//! | HTTP 5xx, `ServiceUnavailable`, `InternalFailure`, ...      | retryable            |
//! | timeout, dispatch failure (connection refused or reset)     | retryable            |
//! | response error (no code: the response was lost or cut)     | retryable            |
//! | any other service error (validation, conflict, permission)  | permanent            |
//! | request construction failure                                | permanent            |
//!
//! Steps refine this by code where the meaning depends on context: a not-found right after
//! this workflow's own create is lag (retryable), a `DeleteConflict` on a policy detached
//! moments ago is lag, an "already exists" is a cue to adopt after checking the key.

use std::fmt;

use aws_sdk_iam::error::{ProvideErrorMetadata, SdkError};
use keel_engine::StepError;

/// The HTTP response type every AWS SDK crate shares.
type HttpResponse = aws_sdk_iam::config::http::HttpResponse;

/// Error codes that mean "slow down".
const THROTTLING: &[&str] = &[
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "TooManyRequestsException",
    "RequestLimitExceeded",
    "RequestThrottled",
    "RequestThrottledException",
    "SlowDown",
];

/// Error codes of a transient server-side failure.
const TRANSIENT: &[&str] = &[
    "ServiceUnavailable",
    "ServiceUnavailableException",
    "ServiceFailure",
    "InternalFailure",
    "InternalFailureException",
    "InternalServerException",
    "InternalServerError",
    "InternalError",
    "RequestTimeout",
    "RequestTimeoutException",
];

/// How an AWS call failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// Slow down and retry.
    Throttled,
    /// Retry (transient, or the response was lost: the call may have taken effect).
    Retryable,
    /// Retrying will not help.
    Permanent,
}

/// A failed AWS call: the operation, the AWS error code (if the service sent one), the HTTP
/// status, the message and its class.
#[derive(Debug, Clone)]
pub struct AwsFailure {
    /// `service:Operation`, e.g. `iam:CreateRole`.
    pub operation: String,
    /// The AWS error code.
    pub code: Option<String>,
    /// The HTTP status, if a response came back.
    pub status: Option<u16>,
    /// What happened.
    pub message: String,
    /// The class.
    pub class: Class,
}

impl AwsFailure {
    /// Classifies an SDK error of `operation`.
    pub fn new<E>(operation: &str, error: &SdkError<E, HttpResponse>) -> AwsFailure
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        let status = error.raw_response().map(|r| r.status().as_u16());
        let (code, message, class) = match error {
            SdkError::ServiceError(e) => {
                let inner = e.err();
                let code = inner.code().map(str::to_string);
                let message = inner.message().unwrap_or("no message").to_string();
                let class = match code.as_deref() {
                    Some(c) if THROTTLING.contains(&c) => Class::Throttled,
                    Some(c) if TRANSIENT.contains(&c) => Class::Retryable,
                    _ if status == Some(429) => Class::Throttled,
                    _ if status.is_some_and(|s| s >= 500) => Class::Retryable,
                    _ => Class::Permanent,
                };
                (code, message, class)
            }
            SdkError::TimeoutError(_) => (None, "timed out".to_string(), Class::Retryable),
            SdkError::DispatchFailure(e) => {
                (None, format!("dispatch failure: {e:?}"), Class::Retryable)
            }
            SdkError::ResponseError(_) => (
                None,
                "the response was lost or could not be read (the call may have taken effect)"
                    .to_string(),
                Class::Retryable,
            ),
            SdkError::ConstructionFailure(e) => (
                None,
                format!("request could not be built: {e:?}"),
                Class::Permanent,
            ),
            other => (None, format!("{other:?}"), Class::Permanent),
        };
        AwsFailure {
            operation: operation.to_string(),
            code,
            status,
            message,
            class,
        }
    }

    /// Whether the AWS error code is `code`.
    pub fn is(&self, code: &str) -> bool {
        self.code.as_deref() == Some(code)
    }

    /// Whether the code is one of `codes`.
    pub fn is_any(&self, codes: &[&str]) -> bool {
        self.code.as_deref().is_some_and(|c| codes.contains(&c))
    }

    /// The same failure, retryable: for answers that are known to be lag in their context.
    pub fn as_lag(mut self, why: &str) -> AwsFailure {
        self.class = Class::Retryable;
        self.message = format!("{} ({why})", self.message);
        self
    }

    /// The same failure, permanent.
    pub fn as_permanent(mut self) -> AwsFailure {
        self.class = Class::Permanent;
        self
    }
}

impl fmt::Display for AwsFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} failed", self.operation)?;
        if let Some(code) = &self.code {
            write!(f, " with {code}")?;
        }
        if let Some(status) = self.status {
            write!(f, " (HTTP {status})")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl From<AwsFailure> for StepError {
    fn from(failure: AwsFailure) -> StepError {
        let message = failure.to_string();
        match failure.class {
            Class::Throttled => StepError::throttled(message),
            Class::Retryable => StepError::retryable(message),
            Class::Permanent => StepError::permanent(message),
        }
    }
}

/// A resource exists under the name this step wants, and it is not this step's: another key,
/// or no key at all (made by another tool). Permanent; nothing was changed.
pub fn conflict(what: &str, name: &str, found: Option<&str>) -> StepError {
    let owner = match found {
        Some(other) => format!("it carries the key {other}"),
        None => "it carries no Keel key (made by another tool)".to_string(),
    };
    StepError::permanent(format!(
        "conflict: {what} {name:?} already exists and is not this step's: {owner}; nothing was changed"
    ))
}
