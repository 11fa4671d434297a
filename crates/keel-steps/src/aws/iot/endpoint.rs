//! The account's IoT data endpoint, which devices connect to.

use keel_engine::{RetryPolicy, Step, StepContext, StepError};
use serde::{Deserialize, Serialize};

use super::super::error::AwsFailure;
use super::super::{clients, AWS_RETRY_POLICY};

/// Reads the account's IoT data endpoint (`iot:Data-ATS`). It only reads, so there is
/// nothing to undo.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DescribeDataEndpoint {}

impl Step for DescribeDataEndpoint {
    const KIND: &'static str = "aws.iot.describe-data-endpoint";
    type Output = String;
    const RETRY_POLICY: RetryPolicy = AWS_RETRY_POLICY;
    const RATE_LIMIT: Option<&'static str> = Some("iot");
    const COMPENSABLE: bool = false;

    async fn execute(&self, ctx: &StepContext) -> Result<String, StepError> {
        let iot = &clients(ctx)?.iot;
        let answer = iot
            .describe_endpoint()
            .endpoint_type("iot:Data-ATS")
            .send()
            .await
            .map_err(|e| StepError::from(AwsFailure::new("iot:DescribeEndpoint", &e)))?;
        answer
            .endpoint_address
            .filter(|address| !address.is_empty())
            .ok_or_else(|| StepError::permanent("iot:DescribeEndpoint returned no address"))
    }
}
