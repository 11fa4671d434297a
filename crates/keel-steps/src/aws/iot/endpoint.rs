//! The account's IoT data endpoint, which devices connect to: a read with nothing to undo, so
//! an effect ([`Ctx::effect`]), not a step type.

use keel_engine::{Ctx, EffectOptions, StepError, WorkflowError};

use super::super::error::AwsFailure;
use super::super::{clients, AWS_RETRY_POLICY};

/// The kind of [`data_endpoint`]'s effect: the kind of the `DescribeDataEndpoint` step it
/// was before, so runs journaled by that step replay.
pub const DATA_ENDPOINT: &str = "aws.iot.describe-data-endpoint";

/// Reads the account's IoT data endpoint (`iot:Data-ATS`), as an effect of the run.
pub async fn data_endpoint(ctx: &mut Ctx) -> Result<String, WorkflowError> {
    // `{}`: what the `DescribeDataEndpoint {}` step value was journaled as.
    let options = EffectOptions::DEFAULT
        .retry_policy(AWS_RETRY_POLICY)
        .rate_limit("iot")
        .argument(serde_json::json!({}));
    ctx.effect(DATA_ENDPOINT, options, |sctx| async move {
        let answer = clients(&sctx)?
            .iot
            .describe_endpoint()
            .endpoint_type("iot:Data-ATS")
            .send()
            .await
            .map_err(|e| StepError::from(AwsFailure::new("iot:DescribeEndpoint", &e)))?;
        answer
            .endpoint_address
            .filter(|address| !address.is_empty())
            .ok_or_else(|| StepError::permanent("iot:DescribeEndpoint returned no address"))
    })
    .await
}
