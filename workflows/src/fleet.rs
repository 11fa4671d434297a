//! `iot.onboard-fleet`: many devices, one child run each; a fleet above the size its input
//! names waits for an operator's `approve` or `reject` event before it creates anything.

use std::collections::BTreeMap;

use keel_engine::{Ctx, InvalidInput, Received, Workflow, WorkflowError};
use serde::{Deserialize, Serialize};

use crate::iot::{DeviceInput, OnboardDevice};
use crate::validate;

/// Most devices in one fleet.
pub const FLEET_DEVICES_MAX: usize = 1_000;

/// Most bytes of thing names (JSON-encoded) one fleet may list: its output lists them again,
/// and a run's output is bounded (`keel_engine::limits::OUTPUT_BYTES_MAX`).
pub const FLEET_NAMES_BYTES_MAX: usize = 32 * 1024;

/// Failures whose error the fleet's output carries (each cut to
/// [`FLEET_ERROR_BYTES_MAX`]); every failure's full error stays in its device's run.
pub const FLEET_ERRORS_KEPT: usize = 20;

/// Longest error text per failure in the fleet's output.
pub const FLEET_ERROR_BYTES_MAX: usize = 500;

/// The event that lets a fleet waiting for approval go on (any payload).
pub const APPROVE_EVENT: &str = "approve";

/// The event that ends a fleet waiting for approval, with nothing made; its payload may give
/// the reason, as `{"reason": "..."}` or a JSON string.
pub const REJECT_EVENT: &str = "reject";

/// The name under which the fleet publishes its progress, a sentence (`Engine::published`,
/// `keel get ID progress`).
pub const PROGRESS: &str = "progress";

/// Input of [`OnboardFleet`]: many devices that share a policy and attributes. A field it
/// does not know is refused (a typo is not dropped).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetInput {
    /// The IoT policy document attached to every device's certificate.
    pub policy_document: String,
    /// The devices' thing names (1 to [`FLEET_DEVICES_MAX`], distinct, at most
    /// [`FLEET_NAMES_BYTES_MAX`] together).
    pub thing_names: Vec<String>,
    /// Attributes every thing gets (at most 2).
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    /// How many devices are onboarded at once (1 to 64).
    pub concurrency: u32,
    /// Above how many devices the fleet waits, before it creates anything, for an operator's
    /// [`APPROVE_EVENT`] (it goes on) or [`REJECT_EVENT`] (it fails, nothing made); 0 to
    /// [`FLEET_DEVICES_MAX`] - 1. None: it never waits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval_above: Option<usize>,
}

impl FleetInput {
    /// The input of device `i`'s `iot.onboard-device` run.
    fn device(&self, i: usize) -> DeviceInput {
        DeviceInput {
            thing_name: self.thing_names[i].clone(),
            policy_document: self.policy_document.clone(),
            attributes: self.attributes.clone(),
        }
    }
}

/// A device whose onboarding failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetFailure {
    /// The thing name.
    pub thing_name: String,
    /// Why its onboarding did not complete (it compensated itself), cut to
    /// [`FLEET_ERROR_BYTES_MAX`].
    pub error: String,
}

/// What [`OnboardFleet`] returns: the devices that completed and those that did not. Each
/// device's certificate, key file and data endpoint are the output of its own
/// `iot.onboard-device` child run (the runs whose parent is the fleet).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetOutput {
    /// Thing names onboarded, in input order.
    pub onboarded: Vec<String>,
    /// Thing names whose onboarding failed and was undone, in input order.
    pub failed: Vec<String>,
    /// The first [`FLEET_ERRORS_KEPT`] failures with their errors.
    pub errors: Vec<FleetFailure>,
    /// The id of the [`APPROVE_EVENT`] the fleet waited for, when it was above
    /// `approval_above`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval_event_id: Option<String>,
}

/// Onboards every device as its own `iot.onboard-device` child run, `concurrency` at a
/// time: a device that fails compensates itself alone, and the fleet completes listing it.
/// Compensating the fleet (cancelling it) compensates every onboarded device.
///
/// Progress is published under [`PROGRESS`]: while it awaits approval, once approved, as
/// each device ends ("12 of 200 devices onboarded", reported by the fan-out,
/// [`Ctx::children_reporting`]), and when every device has ended.
#[derive(Debug)]
pub struct OnboardFleet;

impl Workflow for OnboardFleet {
    const NAME: &'static str = "iot.onboard-fleet";
    type Input = FleetInput;
    type Output = FleetOutput;

    fn validate(input: &FleetInput) -> Result<(), InvalidInput> {
        validate::count("thing_names", input.thing_names.len(), 1, FLEET_DEVICES_MAX)?;
        validate::count("concurrency", input.concurrency as usize, 1, 64)?;
        validate::policy_document("policy_document", &input.policy_document)?;
        validate::count("attributes", input.attributes.len(), 0, 2)?;
        let bytes = serde_json::to_vec(&input.thing_names).map_or(usize::MAX, |v| v.len());
        if bytes > FLEET_NAMES_BYTES_MAX {
            return Err(InvalidInput::new(
                "thing_names",
                format!(
                    "{bytes} bytes of names, over the {FLEET_NAMES_BYTES_MAX} a fleet's output can \
                     list: use shorter names or split the fleet"
                ),
            ));
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, name) in input.thing_names.iter().enumerate() {
            validate::thing_name(&format!("thing_names[{i}]"), name, 128)?;
            if !names.insert(name) {
                return Err(InvalidInput::new(
                    format!("thing_names[{i}]"),
                    format!("{name:?} is listed twice"),
                ));
            }
        }
        if let Some(above) = input.approval_above {
            // A bound of FLEET_DEVICES_MAX or more could never ask: it is a mistake.
            validate::count("approval_above", above, 0, FLEET_DEVICES_MAX - 1)?;
        }
        Ok(())
    }

    async fn run(ctx: &mut Ctx, input: FleetInput) -> Result<FleetOutput, WorkflowError> {
        let count = input.thing_names.len();
        let approval_event_id = match input.approval_above {
            Some(above) if count > above => Some(approval(ctx, count, above).await?),
            _ => None,
        };
        let devices = (0..input.thing_names.len())
            .map(|i| input.device(i))
            .collect();
        let results = ctx
            .children_reporting::<OnboardDevice, _>(
                devices,
                input.concurrency as usize,
                PROGRESS,
                |progress| {
                    let failed = progress.ended - progress.completed;
                    let mut text = format!(
                        "{} of {} devices onboarded",
                        progress.completed, progress.total
                    );
                    if failed > 0 {
                        text += &format!(", {failed} failed and undone");
                    }
                    text
                },
            )
            .await?;
        let mut output = FleetOutput {
            onboarded: Vec::new(),
            failed: Vec::new(),
            errors: Vec::new(),
            approval_event_id,
        };
        for (name, result) in input.thing_names.iter().zip(results) {
            match result {
                Ok(done) => output.onboarded.push(done.thing_name),
                Err(error @ WorkflowError::Child { .. }) => {
                    output.failed.push(name.clone());
                    if output.errors.len() < FLEET_ERRORS_KEPT {
                        output.errors.push(FleetFailure {
                            thing_name: name.clone(),
                            error: cut(error.to_string(), FLEET_ERROR_BYTES_MAX),
                        });
                    }
                }
                Err(error) => return Err(error),
            }
        }
        let mut progress = format!("{} of {count} devices onboarded", output.onboarded.len());
        if !output.failed.is_empty() {
            progress += &format!(", {} failed and undone", output.failed.len());
        }
        ctx.publish(PROGRESS, &progress).await?;
        Ok(output)
    }
}

/// Publishes that the fleet of `count` devices (more than `above`) awaits approval, and waits
/// for the first [`APPROVE_EVENT`] or [`REJECT_EVENT`]: the approval's event id, or the
/// rejection as [`WorkflowError::Failed`] (nothing has been made, so the run ends `failed`).
async fn approval(ctx: &mut Ctx, count: usize, above: usize) -> Result<String, WorkflowError> {
    ctx.publish(
        PROGRESS,
        &format!(
            "awaiting approval: {count} devices, more than approval_above ({above}); send \
             {APPROVE_EVENT:?} or {REJECT_EVENT:?}"
        ),
    )
    .await?;
    // Any JSON is an answer, so a payload never fails to decode.
    let answer: Received<serde_json::Value> = ctx
        .receive_event(&[APPROVE_EVENT, REJECT_EVENT], None)
        .await?;
    if answer.name == REJECT_EVENT {
        let mut error = format!(
            "fleet of {count} devices rejected (event {:?})",
            answer.event_id
        );
        match rejection_reason(&answer.payload) {
            Some(reason) => error += &format!(": {}", cut(reason.into(), FLEET_ERROR_BYTES_MAX)),
            None => error += ", no reason given",
        }
        ctx.publish(PROGRESS, &error).await?;
        return Err(WorkflowError::failed(error));
    }
    ctx.publish(
        PROGRESS,
        &format!(
            "approved (event {:?}); onboarding {count} devices",
            answer.event_id
        ),
    )
    .await?;
    Ok(answer.event_id)
}

/// The reason a rejection's payload gives: `{"reason": "..."}` or a JSON string, not empty.
fn rejection_reason(payload: &serde_json::Value) -> Option<&str> {
    let reason = match payload {
        serde_json::Value::String(reason) => reason,
        serde_json::Value::Object(fields) => fields.get("reason")?.as_str()?,
        _ => return None,
    };
    Some(reason.trim()).filter(|r| !r.is_empty())
}

/// `text` cut to at most `max` bytes, at a char boundary, marked when cut.
fn cut(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max.saturating_sub(3);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push_str("...");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_engine::limits::{INPUT_BYTES_MAX, OUTPUT_BYTES_MAX};

    /// The largest fleet its checks let through (1,000 devices, names filling
    /// FLEET_NAMES_BYTES_MAX) fits the engine's input bound, and its output fits the output
    /// bound even when every device fails.
    #[test]
    fn the_largest_fleet_fits_the_engines_bounds_even_when_every_device_fails() {
        // 1,000 names of 29 bytes: 31 bytes each encoded, 31,001 bytes in all.
        let names: Vec<String> = (0..FLEET_DEVICES_MAX)
            .map(|i| format!("{i:0>29}"))
            .collect();
        let input = FleetInput {
            policy_document: crate::sample::CONNECT_ONLY.into(),
            thing_names: names.clone(),
            attributes: BTreeMap::from([("a".repeat(128), "b".repeat(800))]),
            concurrency: 64,
            approval_above: Some(FLEET_DEVICES_MAX - 1),
        };
        assert!(OnboardFleet::validate(&input).is_ok());
        assert!(serde_json::to_vec(&input).unwrap().len() <= INPUT_BYTES_MAX);
        let output = FleetOutput {
            onboarded: Vec::new(),
            failed: names.clone(),
            errors: names
                .iter()
                .take(FLEET_ERRORS_KEPT)
                .map(|n| FleetFailure {
                    thing_name: n.clone(),
                    error: cut("é".repeat(4096), FLEET_ERROR_BYTES_MAX),
                })
                .collect(),
            approval_event_id: Some("e".repeat(keel_engine::limits::EVENT_ID_LEN_MAX)),
        };
        assert!(output.errors[0].error.len() <= FLEET_ERROR_BYTES_MAX);
        assert!(output.errors[0].error.ends_with("..."));
        let bytes = serde_json::to_vec(&output).unwrap().len();
        assert!(bytes <= OUTPUT_BYTES_MAX, "{bytes}");
    }

    /// A rejection's reason is read from `{"reason": ...}` or a bare string; anything else,
    /// or a blank reason, gives none.
    #[test]
    fn a_rejection_reason_is_an_object_field_or_a_string() {
        use serde_json::json;
        assert_eq!(
            rejection_reason(&json!({"reason": " too big "})),
            Some("too big")
        );
        assert_eq!(rejection_reason(&json!("not today")), Some("not today"));
        assert_eq!(rejection_reason(&json!({"reason": 3})), None);
        assert_eq!(rejection_reason(&json!({"why": "x"})), None);
        assert_eq!(rejection_reason(&json!("  ")), None);
        assert_eq!(rejection_reason(&json!(null)), None);
    }
}
