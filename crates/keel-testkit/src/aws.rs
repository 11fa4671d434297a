//! The one place that builds an AWS SDK configuration for tests and the demo.

use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region, SdkConfig};

/// The region every test uses.
pub const TEST_REGION: &str = "us-east-1";

/// Static credentials (moto accepts any signature; the access key selects the account).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The access key id.
    pub access_key_id: String,
    /// The secret key.
    pub secret_access_key: String,
    /// The session token, for credentials from STS.
    pub session_token: Option<String>,
}

/// Options for [`sdk_config`].
#[derive(Debug, Clone)]
pub struct SdkOptions {
    /// The SDK's own retries. Tests that want to see each fault as it happens use
    /// [`RetryConfig::disabled`].
    pub retry: RetryConfig,
    /// Time allowed for one attempt (a lost response is seen at once, as a closed connection;
    /// this bounds a hung upstream).
    pub attempt_timeout: Duration,
}

impl Default for SdkOptions {
    fn default() -> Self {
        Self {
            retry: RetryConfig::standard().with_max_attempts(3),
            attempt_timeout: Duration::from_secs(30),
        }
    }
}

impl SdkOptions {
    /// No SDK retries: every fault reaches the caller.
    pub fn no_retries() -> Self {
        Self {
            retry: RetryConfig::disabled(),
            ..Self::default()
        }
    }
}

/// An SDK configuration for `endpoint` (moto, or a fault proxy in front of it) with static
/// credentials, the test region and the given retry and timeout settings. Nothing is read from
/// the environment or from `~/.aws`.
pub async fn sdk_config(
    endpoint: &str,
    credentials: &Credentials,
    options: SdkOptions,
) -> SdkConfig {
    let credentials = aws_sdk_sts::config::Credentials::new(
        &credentials.access_key_id,
        &credentials.secret_access_key,
        credentials.session_token.clone(),
        None,
        "keel-testkit",
    );
    aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(TEST_REGION))
        .credentials_provider(credentials)
        .endpoint_url(endpoint)
        .retry_config(options.retry)
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(5))
                .operation_attempt_timeout(options.attempt_timeout)
                .build(),
        )
        .load()
        .await
}
