//! The provisioning workflows end to end against moto's server, through the fault proxy
//! (lost responses and throttling), with moto's own state read directly as ground truth:
//! a Greengrass core with client devices and a fleet complete with every resource once; a
//! deployment that fails compensates the whole chain, child runs included, to nothing; bad
//! inputs are refused naming the field, before anything exists.

mod common;

use common::env;
use keel_engine::{EngineError, RunStatus};
use keel_testkit::inventory::Inventory;
use keel_testkit::proxy::{Fault, FaultRule, Rules};
use keel_workflows::fleet::OnboardFleet;
use keel_workflows::greengrass::ProvisionCore;
use keel_workflows::sample::{core, fleet};

fn hostile(seed: u64) -> Rules {
    Rules::seeded(seed)
        .fault(FaultRule::new(Fault::LostResponse).probability(0.1))
        .fault(FaultRule::new(Fault::Throttle).probability(0.1))
}

/// Under lost responses and throttling, a Greengrass core with three clients and a fleet of
/// six complete with every resource existing once in moto, and every child run completed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_core_with_clients_and_a_fleet_complete_with_every_resource_once() {
    let env = env(hostile(3)).await;
    let core = env
        .engine
        .start::<ProvisionCore>("plant", core("plant", 3))
        .await
        .unwrap();
    let fleet = env
        .engine
        .start::<OnboardFleet>("fleet", fleet("fleet", 6, 3))
        .await
        .unwrap();
    let core = core.result().await.unwrap();
    let fleet = fleet.result().await.unwrap();
    assert_eq!(core.client_devices.len(), 3);
    assert_eq!(fleet.onboarded.len(), 6);
    assert!(fleet.failed.is_empty());
    assert!(!core.core.data_endpoint.is_empty());
    assert!(core.core.key_file.exists(), "the core's key file");

    let truth = Inventory::read(&env.direct).await.unwrap();
    // 1 core + 3 clients + 6 fleet devices, each a thing with one active certificate and
    // one policy.
    assert_eq!(truth.things.len(), 10, "{}", truth.summary());
    assert_eq!(truth.certificates.len(), 10, "{}", truth.summary());
    assert!(truth.certificates.iter().all(|c| c.status == "ACTIVE"));
    assert!(truth.things.iter().all(|t| t.principals.len() == 1));
    assert_eq!(truth.iot_policies.len(), 10, "{}", truth.summary());
    assert_eq!(truth.roles.len(), 1, "{}", truth.summary());
    assert_eq!(truth.roles[0].attached_policies.len(), 1);
    assert_eq!(truth.groups.len(), 1, "{}", truth.summary());
    assert_eq!(truth.groups[0].id, core.group_id);
    assert_eq!(
        truth.groups[0].role_arn.as_deref(),
        Some(core.role_arn.as_str())
    );
    assert_eq!(truth.core_definitions.len(), 1);
    assert_eq!(truth.device_definitions.len(), 1);
    // The children are runs of their own, each completed once.
    let runs = env.engine.list().await.unwrap();
    assert_eq!(
        runs.len(),
        2 + 1 + 1 + 3 + 6,
        "parents, role, core, clients, fleet"
    );
    assert!(runs.iter().all(|r| r.status == RunStatus::Completed));
    env.engine.shutdown().await;
}

/// A core whose deployment fails compensates the whole chain, child runs included, and moto
/// ends empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_deployment_compensates_the_whole_chain_children_included() {
    let mut rules = hostile(5);
    rules.deployments.failure_probability = 1.0;
    let env = env(rules).await;
    let error = env
        .engine
        .start::<ProvisionCore>("doomed", core("doomed", 2))
        .await
        .unwrap()
        .result()
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("compensated"), "{error}");
    let truth = Inventory::read(&env.direct).await.unwrap();
    assert!(truth.is_empty(), "{}", truth.summary());
    for run in env.engine.list().await.unwrap() {
        assert_eq!(
            run.status,
            RunStatus::Compensated,
            "{}: {:?}",
            run.id,
            run.error
        );
    }
    env.engine.shutdown().await;
}

/// Bad core and fleet inputs are refused at start naming the field, before any run is stored
/// or any resource exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_are_refused_naming_the_field_before_anything_exists() {
    let env = env(Rules::seeded(1)).await;
    let mut bad_role = core("x", 1);
    bad_role.role.name = "has space".into();
    let mut bad_policy = core("x", 2);
    bad_policy.client_policy_document = r#"{"Statement":[{"Effect":"Perhaps"}]}"#.into();
    let mut bad_client = core("x", 2);
    bad_client.client_devices[1] = "has/slash".into();
    let mut twice = core("x", 2);
    twice.client_devices[1] = "x-core".into();
    let cases = [
        (bad_role, "role.name"),
        (bad_policy, "client_policy_document.Statement[0]"),
        (bad_client, "client_devices[1]"),
        (twice, "client_devices[1]"),
    ];
    for (input, field) in cases {
        match env.engine.start::<ProvisionCore>("bad", input).await {
            Err(EngineError::InvalidInput { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{field}: {:?}", other.map(|h| h.id().clone())),
        }
    }
    let empty = fleet("f", 0, 1);
    let mut long_names = fleet("f", 1000, 1);
    for name in &mut long_names.thing_names {
        name.insert_str(0, &"n".repeat(30));
    }
    let fleets = [
        (empty, "thing_names", "1..=1000"),
        (long_names, "thing_names", "split the fleet"),
    ];
    for (input, field, reason) in fleets {
        match env.engine.start::<OnboardFleet>("bad-fleet", input).await {
            Err(EngineError::InvalidInput {
                field: f,
                reason: r,
                ..
            }) => {
                assert_eq!(f, field);
                assert!(r.contains(reason), "{r}");
            }
            other => panic!("{field}: {:?}", other.map(|h| h.id().clone())),
        }
    }
    assert!(env.engine.list().await.unwrap().is_empty());
    let truth = Inventory::read(&env.direct).await.unwrap();
    assert!(truth.is_empty(), "{}", truth.summary());
    env.engine.shutdown().await;
}
