//! Inputs that cannot hurt: every workflow refuses a field it does not know (a typo such as
//! `managed_policy_arn` would otherwise be dropped and the role made without its policy), and
//! a timeout past its documented maximum (seven days), each as `InvalidInput` naming the
//! field's path, before anything is stored or created. No AWS is involved: the engine refuses
//! these starts before any step runs.

use keel_engine::{Engine, EngineError, Workflow};
use keel_workflows::fleet::OnboardFleet;
use keel_workflows::greengrass::ProvisionCore;
use keel_workflows::iam::ServiceRole;
use keel_workflows::iot::OnboardDevice;
use keel_workflows::{sample, KeelWorkflows};
use serde_json::{json, Value};

/// The documented maximum of every timeout field: seven days, in seconds.
const TIMEOUT_S_MAX: u64 = 7 * 24 * 3600;

/// Seconds whose milliseconds are 2^64 + 384: what once became a 384 ms deadline.
const WRAPPING_S: u64 = 18_446_744_073_709_552;

async fn engine(dir: &std::path::Path) -> Engine {
    Engine::builder(dir)
        .provisioning_workflows()
        .open()
        .await
        .expect("opening the engine")
}

/// `value` with the field at `path` (object keys) set to `to`.
fn with(mut value: Value, path: &[&str], to: Value) -> Value {
    let (last, parents) = path.split_last().expect("a path");
    let mut object = &mut value;
    for key in parents {
        object = &mut object[*key];
    }
    object[*last] = to;
    value
}

/// The field and reason of the `InvalidInput` that `result` must be.
fn invalid<T: std::fmt::Debug>(result: keel_engine::Result<T>) -> (String, String) {
    match result {
        Err(EngineError::InvalidInput { field, reason, .. }) => (field, reason),
        other => panic!("expected InvalidInput, got {other:?}"),
    }
}

/// A field no input type knows, at the top of an input or inside a nested one (the role and
/// the core device of a Greengrass core), is refused naming its path and the fields that were
/// expected there; nothing is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_fields_are_refused_naming_their_path() {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(dir.path()).await;
    let role = serde_json::to_value(sample::core("c", 1).role).unwrap();
    let core = serde_json::to_value(sample::core("c", 1)).unwrap();
    let device = serde_json::to_value(sample::device("d")).unwrap();
    let fleet = serde_json::to_value(sample::fleet("f", 2, 1)).unwrap();
    let arns = json!([sample::GREENGRASS_RESOURCE_ACCESS]);
    let cases = [
        (
            ServiceRole::NAME,
            with(role, &["managed_policy_arn"], arns.clone()),
            "managed_policy_arn",
        ),
        (
            ProvisionCore::NAME,
            with(core.clone(), &["role", "managed_policy_arn"], arns),
            "role.managed_policy_arn",
        ),
        (
            ProvisionCore::NAME,
            with(core.clone(), &["core", "atributes"], json!({})),
            "core.atributes",
        ),
        (
            ProvisionCore::NAME,
            with(core, &["deployment_timeout"], json!(60)),
            "deployment_timeout",
        ),
        (
            OnboardDevice::NAME,
            with(device, &["attribute"], json!({})),
            "attribute",
        ),
        (
            OnboardFleet::NAME,
            with(fleet, &["thing_name"], json!("x")),
            "thing_name",
        ),
    ];
    for (workflow, input, path) in cases {
        let (field, reason) = invalid(engine.start_json(workflow, "typo", input).await);
        assert_eq!(field, path, "{workflow}");
        assert!(
            reason.starts_with("unknown field (expected "),
            "{workflow} {path}: {reason}"
        );
    }
    let err = engine
        .start_json(
            ServiceRole::NAME,
            "typo",
            with(
                serde_json::to_value(sample::core("c", 1).role).unwrap(),
                &["managed_policy_arn"],
                json!([]),
            ),
        )
        .await
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "invalid input for workflow \"iam.service-role\": field managed_policy_arn: unknown field \
         (expected one of `name`, `trust_policy`, `managed_policy_arns`, `inline_policies`, \
         `assume_timeout_s`)"
    );
    assert!(engine.list().await.unwrap().is_empty(), "nothing stored");
    engine.shutdown().await;
}

/// `assume_timeout_s` (a role's, alone or inside a core) and `deployment_timeout_s` are
/// refused past seven days, and so is a value whose milliseconds do not fit in 64 bits, naming
/// the field; seven days exactly is accepted. Typed and JSON starts alike; nothing is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_past_their_maximum_are_refused_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(dir.path()).await;
    for seconds in [TIMEOUT_S_MAX + 1, WRAPPING_S, u64::MAX] {
        let mut role = sample::core("c", 1).role;
        role.assume_timeout_s = Some(seconds);
        let (field, reason) = invalid(
            engine
                .start::<ServiceRole>("role", role.clone())
                .await
                .map(|h| h.id().clone()),
        );
        assert_eq!(field, "assume_timeout_s");
        assert_eq!(reason, format!("{seconds} is more than 604800 (7 days)"));

        let mut core = sample::core("c", 1);
        core.role = role;
        let json = serde_json::to_value(&core).unwrap();
        let (field, _) = invalid(engine.start_json(ProvisionCore::NAME, "core", json).await);
        assert_eq!(field, "role.assume_timeout_s");

        let mut core = sample::core("c", 1);
        core.deployment_timeout_s = Some(seconds);
        let (field, reason) = invalid(
            engine
                .start::<ProvisionCore>("core", core)
                .await
                .map(|h| h.id().clone()),
        );
        assert_eq!(field, "deployment_timeout_s");
        assert_eq!(reason, format!("{seconds} is more than 604800 (7 days)"));
    }
    assert!(engine.list().await.unwrap().is_empty(), "nothing stored");

    assert_eq!(keel_workflows::iam::ASSUME_TIMEOUT_S_MAX, TIMEOUT_S_MAX);
    assert_eq!(
        keel_workflows::greengrass::DEPLOYMENT_TIMEOUT_S_MAX,
        TIMEOUT_S_MAX
    );
    let mut core = sample::core("c", 1);
    core.role.assume_timeout_s = Some(TIMEOUT_S_MAX);
    core.deployment_timeout_s = Some(TIMEOUT_S_MAX);
    assert_eq!(ProvisionCore::validate(&core), Ok(()));
    assert_eq!(ServiceRole::validate(&core.role), Ok(()));
    engine.shutdown().await;
}
