//! `CreateThing`: a thing carrying the step's key as an attribute.

use std::collections::BTreeMap;

use keel_engine::{Compensation, RetryPolicy, Step, StepContext, StepError};
use serde::{Deserialize, Serialize};

use super::super::error::{conflict, AwsFailure};
use super::super::{
    clients, confirm_absence, AWS_COMPENSATION_RETRY_POLICY, AWS_RETRY_POLICY, KEY_ATTRIBUTE,
};
use super::{detach_thing_principal, missing_ok, ALREADY_EXISTS, NOT_FOUND};

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
    const RETRY_POLICY: RetryPolicy = AWS_RETRY_POLICY;
    const RATE_LIMIT: Option<&'static str> = Some("iot");
    const COMPENSATION_RETRY_POLICY: RetryPolicy = AWS_COMPENSATION_RETRY_POLICY;

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

    async fn compensate(
        &self,
        ctx: &StepContext,
        _output: Option<Thing>,
    ) -> Result<Compensation, StepError> {
        let iot = &clients(ctx)?.iot;
        let key = ctx.key().to_string();
        match describe_thing(iot, &self.name).await? {
            None => {
                confirm_absence(ctx, "iot", "IoT thing")?;
                return Ok(Compensation::Done);
            }
            Some((_, found)) if found.as_deref() != Some(key.as_str()) => {
                tracing::warn!(thing = %self.name, ?found, "the thing is not this step's; left alone");
                return Ok(Compensation::Done);
            }
            Some(_) => {}
        }
        // A read that flaps (found, then not found) is lag, not a failure: absent only
        // once the lag is over.
        let principals = match iot
            .list_thing_principals()
            .thing_name(&self.name)
            .send()
            .await
        {
            Ok(listed) => listed,
            Err(e) => {
                missing_ok(ctx, AwsFailure::new("iot:ListThingPrincipals", &e))?;
                return Ok(Compensation::Done);
            }
        };
        for principal in principals.principals() {
            detach_thing_principal(ctx, iot, &self.name, principal).await?;
        }
        match iot.delete_thing().thing_name(&self.name).send().await {
            Ok(_) => Ok(Compensation::Done),
            Err(e) => {
                missing_ok(ctx, AwsFailure::new("iot:DeleteThing", &e))?;
                Ok(Compensation::Done)
            }
        }
    }
}
