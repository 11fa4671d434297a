//! The Greengrass (V1) steps, run by the real engine (sled on disk) through the fault proxy
//! against moto's server, with moto's own state read directly as the ground truth.

use std::time::Duration;

use aws_sdk_greengrass::types::DeploymentType;
use keel_engine::{Ctx, EngineBuilder, RunStatus, WaitPolicy, Workflow, WorkflowError};
use keel_steps::aws::greengrass::{
    AssociateRole, CreateCoreDefinition, CreateDeployment, CreateDeviceDefinition, CreateGroup,
    CreateGroupVersion, DeploymentSucceeded, Member,
};
use keel_steps::aws::iam::CreateRole;
use keel_testkit::proxy::{Applied, Fault, FaultRule, Rules};
use serde::{Deserialize, Serialize};

mod common;
use common::{first_response_lost, hostile, key, Env};

const TRUST: &str = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"Service":"greengrass.amazonaws.com"},"Action":"sts:AssumeRole"}]}"#;
const ACCOUNT_ARN: &str = "arn:aws:iot:us-east-1:123456789012";

#[derive(Clone, Debug, Serialize, Deserialize)]
struct GroupInput {
    name: String,
    devices: u32,
    fail_at_end: bool,
}

/// Every Greengrass step, in the order a core's provisioning uses them:
/// 0 role, 1 core definition, 2 device definition, 3 group, 4 associate role,
/// 5 group version, 6 deployment, 7 wait for the deployment.
struct GroupFlow;

fn register(builder: EngineBuilder) -> EngineBuilder {
    builder.workflow::<GroupFlow>()
}

fn member(name: &str) -> Member {
    Member {
        id: name.into(),
        thing_arn: format!("{ACCOUNT_ARN}:thing/{name}"),
        certificate_arn: format!("{ACCOUNT_ARN}:cert/{name:0>64}"),
        sync_shadow: true,
    }
}

impl Workflow for GroupFlow {
    const NAME: &'static str = "test.greengrass-group";
    type Input = GroupInput;
    type Output = String;

    async fn run(ctx: &mut Ctx, input: GroupInput) -> Result<String, WorkflowError> {
        let role = ctx
            .step(CreateRole {
                name: format!("{}-gg-role", input.name),
                trust_policy: TRUST.into(),
                tags: Default::default(),
                description: None,
            })
            .await?;
        let cores = ctx
            .step(CreateCoreDefinition {
                prefix: format!("{}-cores", input.name),
                cores: vec![member(&format!("{}-core", input.name))],
            })
            .await?;
        let devices = ctx
            .step(CreateDeviceDefinition {
                prefix: format!("{}-devices", input.name),
                devices: (0..input.devices)
                    .map(|i| member(&format!("{}-device-{i}", input.name)))
                    .collect(),
            })
            .await?;
        let group = ctx
            .step(CreateGroup {
                prefix: input.name.clone(),
                tags: [("site".to_string(), "plant-1".to_string())].into(),
            })
            .await?;
        ctx.step(AssociateRole {
            group_id: group.id.clone(),
            role_arn: role.arn.clone(),
        })
        .await?;
        let version = ctx
            .step(CreateGroupVersion {
                group_id: group.id.clone(),
                core_definition_version_arn: cores.version_arn.clone(),
                device_definition_version_arn: Some(devices.version_arn.clone()),
            })
            .await?;
        let deployment = ctx
            .step(CreateDeployment {
                group_id: group.id.clone(),
                group_version_id: version.version_id.clone(),
            })
            .await?;
        ctx.wait(
            DeploymentSucceeded {
                group_id: group.id.clone(),
                deployment_id: deployment.id.clone(),
            },
            WaitPolicy::every(Duration::from_millis(50), Duration::from_secs(60)),
        )
        .await?;
        if input.fail_at_end {
            return Err(WorkflowError::failed("failing on purpose after every step"));
        }
        Ok(group.id)
    }
}

fn input(name: &str) -> GroupInput {
    GroupInput {
        name: name.into(),
        devices: 3,
        fail_at_end: false,
    }
}

const CREATES: [&str; 5] = [
    "CreateCoreDefinition",
    "CreateDeviceDefinition",
    "CreateGroup",
    "CreateGroupVersion",
    "CreateDeployment",
];

/// The group's deployments (type and group version ARN), oldest first, read directly.
async fn deployments(env: &Env, group_id: &str) -> Vec<(DeploymentType, String)> {
    let gg = aws_sdk_greengrass::Client::new(&env.direct);
    gg.list_deployments()
        .group_id(group_id)
        .send()
        .await
        .unwrap()
        .deployments()
        .iter()
        .map(|d| {
            (
                d.deployment_type().cloned().unwrap(),
                d.group_arn().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// The group versions naming a core definition version (moto adds an empty first one).
async fn versions_with_core(env: &Env, group_id: &str) -> Vec<String> {
    let gg = aws_sdk_greengrass::Client::new(&env.direct);
    let mut found = Vec::new();
    let versions = gg
        .list_group_versions()
        .group_id(group_id)
        .send()
        .await
        .unwrap();
    for v in versions.versions() {
        let detail = gg
            .get_group_version()
            .group_id(group_id)
            .group_version_id(v.version().unwrap())
            .send()
            .await
            .unwrap();
        if let Some(core) = detail
            .definition()
            .and_then(|d| d.core_definition_version_arn())
        {
            found.push(core.to_string());
        }
    }
    found
}

/// Under random lost responses and throttling, and the first response of every create lost,
/// a Greengrass group's run completes with each resource existing exactly once (every create
/// adopted, not repeated), one deployment, and the wait ended on the deployment's `Success`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_create_leaves_exactly_one_resource_under_lost_responses_and_throttling() {
    for seed in [1, 2] {
        let env = Env::new(first_response_lost(hostile(seed), &CREATES), register).await;
        let run = format!("core-{seed}");
        let (result, status) = env.run::<GroupFlow>(&run, input("plant")).await;
        let group_id = result.unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        assert_eq!(status, RunStatus::Completed);
        let truth = env.truth().await;
        assert_eq!(truth.groups.len(), 1, "seed {seed}: {}", truth.summary());
        let group = &truth.groups[0];
        assert_eq!(group.id, group_id);
        assert_eq!(group.name, format!("plant-{}", key(&run, 3)));
        assert_eq!(group.role_arn.as_deref(), Some(truth.roles[0].arn.as_str()));
        assert_eq!(truth.core_definitions.len(), 1, "{}", truth.summary());
        assert_eq!(truth.device_definitions.len(), 1, "{}", truth.summary());
        let cores = versions_with_core(&env, &group_id).await;
        assert_eq!(cores.len(), 1, "seed {seed}: group versions {cores:?}");
        assert!(cores[0].contains(&truth.core_definitions[0]));
        let deployed = deployments(&env, &group_id).await;
        assert_eq!(deployed.len(), 1, "seed {seed}: {deployed:?}");
        assert_eq!(deployed[0].0, DeploymentType::NewDeployment);
        // Every create lost its first response and was adopted, not repeated.
        let lost: Vec<String> = env
            .proxy
            .faults()
            .into_iter()
            .filter(|(op, applied)| {
                CREATES.contains(&op.as_str()) && matches!(applied, Applied::LostResponse)
            })
            .map(|(op, _)| op)
            .collect();
        for op in CREATES {
            assert!(lost.iter().any(|l| l == op), "seed {seed}: {op} never lost");
        }
        // The wait ended on the deployment's Success, as the proxy's lifecycle reported it
        // (its last answer; any earlier ones were Building or InProgress).
        let statuses: Vec<String> = env
            .proxy
            .faults()
            .into_iter()
            .filter_map(|(_, applied)| match applied {
                Applied::Deployment { status } => Some(status),
                _ => None,
            })
            .collect();
        assert_eq!(
            statuses.last().map(String::as_str),
            Some("Success"),
            "{statuses:?}"
        );
        assert!(
            statuses
                .iter()
                .rev()
                .skip(1)
                .all(|s| s == "Building" || s == "InProgress"),
            "{statuses:?}"
        );
        env.engine.shutdown().await;
    }
}

/// A core definition of the name the step derives but with other members fails the run as a
/// conflict, is left unchanged, and the run's own resources are compensated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_definition_of_the_step_name_with_other_members_is_a_conflict_and_is_left_unchanged() {
    let env = Env::new(hostile(11), register).await;
    let gg = aws_sdk_greengrass::Client::new(&env.direct);
    let run = "definition-conflict";
    let other = member("somebody-elses-core");
    let taken = gg
        .create_core_definition()
        .name(format!("taken-cores-{}", key(run, 1)))
        .initial_version(
            aws_sdk_greengrass::types::CoreDefinitionVersion::builder()
                .cores(
                    aws_sdk_greengrass::types::Core::builder()
                        .id(&other.id)
                        .thing_arn(&other.thing_arn)
                        .certificate_arn(&other.certificate_arn)
                        .sync_shadow(true)
                        .build(),
                )
                .build(),
        )
        .send()
        .await
        .unwrap();
    let (result, status) = env.run::<GroupFlow>(run, input("taken")).await;
    let error = result.unwrap_err().to_string();
    assert!(
        error.contains("conflict: Greengrass core definition") && error.contains("other members"),
        "{error}"
    );
    assert_eq!(status, RunStatus::Compensated);
    let truth = env.truth().await;
    assert_eq!(
        truth.core_definitions,
        vec![taken.id().unwrap().to_string()]
    );
    assert!(truth.roles.is_empty(), "the run's role was compensated");
    assert!(truth.groups.is_empty() && truth.device_definitions.is_empty());
    let kept = gg
        .get_core_definition_version()
        .core_definition_id(taken.id().unwrap())
        .core_definition_version_id(taken.latest_version().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(
        kept.definition().unwrap().cores()[0].id(),
        Some(other.id.as_str())
    );
    env.engine.shutdown().await;
}

/// A Greengrass run that fails after its deployment compensates to nothing under lost
/// responses, resetting the deployment before the group is deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compensation_resets_the_deployment_and_removes_everything_under_lost_responses() {
    for seed in [21, 22] {
        let env = Env::new(hostile(seed), register).await;
        let run = format!("undo-{seed}");
        let (result, status) = env
            .run::<GroupFlow>(
                &run,
                GroupInput {
                    fail_at_end: true,
                    ..input("gone")
                },
            )
            .await;
        assert!(result.is_err());
        assert_eq!(status, RunStatus::Compensated);
        let truth = env.truth().await;
        assert!(truth.is_empty(), "seed {seed}: {}", truth.summary());
        assert!(
            !env.proxy.requests_for("ResetDeployments").is_empty(),
            "seed {seed}: the deployment was not reset before the group was deleted"
        );
        env.engine.shutdown().await;
    }
}

/// A deployment that ends in `Failure` fails the wait with an error saying so, and the run
/// compensates to nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_deployment_fails_the_wait_and_the_run_compensates() {
    let mut rules = Rules::seeded(51);
    rules.deployments.failure_probability = 1.0;
    let env = Env::new(rules, register).await;
    let (result, status) = env.run::<GroupFlow>("failing", input("broken")).await;
    let error = result.unwrap_err().to_string();
    assert!(
        error.contains("deployment") && error.contains("failed"),
        "{error}"
    );
    assert_eq!(status, RunStatus::Compensated);
    let truth = env.truth().await;
    assert!(truth.is_empty(), "{}", truth.summary());
    env.engine.shutdown().await;
}

/// A group whose create and finding listings lose their responses stays in doubt while moto
/// holds it; once the run is cancelled, the group is found by its name and compensated,
/// leaving nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_in_doubt_is_found_by_name_and_compensated() {
    // CreateGroup's answer is lost, and so are the listings of every retry that would find
    // the group: the step stays in doubt, retrying.
    let rules = Rules::seeded(61)
        .fault(FaultRule::new(Fault::LostResponse).operation("CreateGroup"))
        .fault(
            FaultRule::new(Fault::LostResponse)
                .operation("ListGroups")
                .skip(1),
        );
    let env = Env::new(rules, register).await;
    let run = "in-doubt";
    let handle = env
        .engine
        .start::<GroupFlow>(run, input("doubt"))
        .await
        .unwrap();
    env.await_requests("ListGroups", 3).await;
    assert_eq!(env.proxy.requests_for("CreateGroup").len(), 1);
    assert_eq!(
        env.truth().await.groups.len(),
        1,
        "the lost create took effect"
    );
    env.proxy.set_rules(Rules::seeded(62)).unwrap();
    env.engine.cancel(run).await.unwrap();
    let _ = handle.result().await;
    let status = env.engine.history(run).await.unwrap().run.status;
    assert_eq!(status, RunStatus::Compensated);
    let truth = env.truth().await;
    assert!(truth.is_empty(), "{}", truth.summary());
    env.engine.shutdown().await;
}
