//! The AWS behaviour the fault proxy adds to moto, observed through the real AWS SDK for
//! Rust: eventual consistency after creates and deletes (lag, flapping reads), IAM role
//! propagation before STS AssumeRole, and the Greengrass deployment lifecycle.

mod common;

use std::time::{Duration, Instant};

use common::{create_role, ec2_call, instance_ids, service_error, Env};
use keel_testkit::moto::TestAccount;
use keel_testkit::poll::CONDITION_TIMEOUT;
use keel_testkit::proxy::{Applied, Dist, Ec2Rule, Fault, FaultProxy, FaultRule, LagRule, Rules};

/// Polls `read` until it succeeds (at most [`CONDITION_TIMEOUT`]), returning how many failures
/// came first.
async fn failures_until_found<F, Fut, T, E>(mut read: F) -> usize
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
    E: std::fmt::Debug,
{
    let deadline = Instant::now() + CONDITION_TIMEOUT;
    let mut failures = 0;
    loop {
        match read().await {
            Ok(_) => return failures,
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(?e, "not yet");
                failures += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("still failing after {CONDITION_TIMEOUT:?}: {e:?}"),
        }
    }
}

/// During the create lag, a new role, thing and group read as not found in their service's
/// shape, also where another operation names them, and read as found once the lag is over.
#[tokio::test]
async fn new_resources_read_as_not_found_during_the_create_lag() {
    // The lag is long enough that the reads below fall inside it on a loaded 2-core machine:
    // 300 ms was not (CI once read the role's tags after its lag had ended).
    let rules = Rules::seeded(7)
        .lag(LagRule::after_create("iam", 3_000))
        .lag(LagRule::after_create("iot", 3_000))
        .lag(LagRule::after_create("greengrass", 3_000));
    let env = Env::new(rules).await;

    let arn = create_role(&env.iam(), "lagging-role").await.unwrap();
    let e = env
        .iam()
        .get_role()
        .role_name("lagging-role")
        .send()
        .await
        .unwrap_err();
    assert!(
        e.as_service_error().unwrap().is_no_such_entity_exception(),
        "{e:?}"
    );
    assert_eq!(service_error(&e).1, 404);
    // Uses by name in another operation lag too.
    let e = env
        .iam()
        .list_role_tags()
        .role_name("lagging-role")
        .send()
        .await
        .unwrap_err();
    assert!(e.as_service_error().unwrap().is_no_such_entity_exception());

    env.iot()
        .create_thing()
        .thing_name("lagging-thing")
        .send()
        .await
        .unwrap();
    let e = env
        .iot()
        .describe_thing()
        .thing_name("lagging-thing")
        .send()
        .await
        .unwrap_err();
    assert!(
        e.as_service_error()
            .unwrap()
            .is_resource_not_found_exception(),
        "{e:?}"
    );

    let group = env
        .greengrass()
        .create_group()
        .name("g")
        .send()
        .await
        .unwrap();
    let id = group.id().unwrap().to_string();
    let e = env
        .greengrass()
        .get_group()
        .group_id(&id)
        .send()
        .await
        .unwrap_err();
    assert_eq!(service_error(&e), ("IdNotFoundException".into(), 404));

    // Everything appears once the lag is over.
    failures_until_found(|| env.iam().get_role().role_name("lagging-role").send()).await;
    failures_until_found(|| {
        env.iot()
            .describe_thing()
            .thing_name("lagging-thing")
            .send()
    })
    .await;
    failures_until_found(|| env.greengrass().get_group().group_id(&id).send()).await;
    assert!(arn.ends_with(":role/lagging-role"));
    let lagged = env
        .proxy
        .faults()
        .iter()
        .filter(|(_, f)| *f == Applied::LagNotFound)
        .count();
    assert!(lagged >= 4, "{lagged} lagged reads");
}

/// During the delete lag, a deleted thing that was read before its delete still reads as
/// present though moto has deleted it; after the lag it is gone.
#[tokio::test]
async fn deleted_resources_read_as_present_during_the_delete_lag() {
    let mut lag = LagRule::after_create("iot", 0);
    lag.after_create = None;
    lag.after_delete = Some(Dist::fixed(3_000));
    let env = Env::new(Rules::seeded(8).lag(lag)).await;
    env.iot()
        .create_thing()
        .thing_name("going")
        .send()
        .await
        .unwrap();
    env.iot()
        .describe_thing()
        .thing_name("going")
        .send()
        .await
        .unwrap();
    env.iot()
        .delete_thing()
        .thing_name("going")
        .send()
        .await
        .unwrap();

    let still = env
        .iot()
        .describe_thing()
        .thing_name("going")
        .send()
        .await
        .unwrap();
    assert_eq!(still.thing_name(), Some("going"));
    assert!(env.truth().await.things.is_empty(), "moto deleted it");
    assert_eq!(
        env.proxy.faults().last().unwrap().1,
        Applied::DeletedStillPresent
    );
    // After the lag, it is gone for everyone.
    let deadline = Instant::now() + CONDITION_TIMEOUT;
    loop {
        match env.iot().describe_thing().thing_name("going").send().await {
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_resource_not_found_exception()) =>
            {
                break
            }
            other => assert!(
                Instant::now() < deadline,
                "still present after the delete lag, {CONDITION_TIMEOUT:?} on: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// found (true) / not found (false) for 40 reads of a thing during a long, flapping lag.
async fn flapping_reads(seed: u64) -> Vec<bool> {
    let mut lag = LagRule::after_create("iot", 60_000);
    lag.flap_found_probability = 0.5;
    let env = Env::new(Rules::seeded(seed).lag(lag)).await;
    env.iot()
        .create_thing()
        .thing_name("flapper")
        .send()
        .await
        .unwrap();
    let mut seen = Vec::new();
    for _ in 0..40 {
        seen.push(
            env.iot()
                .describe_thing()
                .thing_name("flapper")
                .send()
                .await
                .is_ok(),
        );
    }
    seen
}

/// During a flapping create lag, reads of a new thing alternate between found and not found,
/// in the same sequence for the same seed and in another for another seed.
#[tokio::test]
async fn flapping_reads_alternate_and_repeat_with_the_seed() {
    let first = flapping_reads(9).await;
    assert!(first.contains(&true) && first.contains(&false), "{first:?}");
    let turns = first.windows(2).filter(|w| w[0] != w[1]).count();
    assert!(turns >= 5, "found and not found alternate: {first:?}");
    assert_eq!(flapping_reads(9).await, first, "same seed, same reads");
    assert_ne!(flapping_reads(10).await, first, "another seed, other reads");
}

/// STS AssumeRole is denied (AccessDenied, 403) for a role that does not exist, and for a
/// role created through the proxy until its propagation has passed; a role created around the
/// proxy is assumable at once, and a deleted one is denied again.
#[tokio::test]
async fn assume_role_is_denied_until_the_role_exists_and_has_propagated() {
    let mut rules = Rules::seeded(11);
    // Long enough that the AssumeRole right after the create falls inside it even on a
    // slow machine; `failures_until_found` then polls until it has passed.
    rules.assume_role.propagation = Dist::fixed(3_000);
    let env = Env::new(rules).await;
    let sts = env.sts();
    let assume = |arn: String| {
        let sts = sts.clone();
        async move {
            sts.assume_role()
                .role_arn(arn)
                .role_session_name("s")
                .send()
                .await
        }
    };
    let caller = env.sts().get_caller_identity().send().await.unwrap();
    let account_id = caller.account().unwrap().to_string();

    let e = assume(format!("arn:aws:iam::{account_id}:role/nobody"))
        .await
        .unwrap_err();
    assert_eq!(service_error(&e), ("AccessDenied".into(), 403));

    let arn = create_role(&env.iam(), "fresh").await.unwrap();
    let e = assume(arn.clone()).await.unwrap_err();
    assert_eq!(service_error(&e).0, "AccessDenied", "not propagated yet");
    let denials = failures_until_found(|| assume(arn.clone())).await;
    tracing::info!(denials, "assumable after propagation");

    // A role that exists in moto but was created around the proxy is assumable at once.
    create_role(&aws_sdk_iam::Client::new(&env.direct), "direct")
        .await
        .unwrap();
    assume(format!("arn:aws:iam::{account_id}:role/direct"))
        .await
        .unwrap();
    // A deleted role is denied again.
    env.iam()
        .delete_role()
        .role_name("fresh")
        .send()
        .await
        .unwrap();
    let e = assume(arn).await.unwrap_err();
    assert_eq!(service_error(&e).0, "AccessDenied");
}

/// A group with a core and a version; returns (group id, version id).
async fn deployable(gg: &aws_sdk_greengrass::Client, name: &str) -> (String, String) {
    use aws_sdk_greengrass::types::{Core, CoreDefinitionVersion};
    let core = Core::builder()
        .id("core-1")
        .thing_arn("arn:aws:iot:us-east-1:123456789012:thing/core-1")
        .certificate_arn("arn:aws:iot:us-east-1:123456789012:cert/abc")
        .sync_shadow(false)
        .build();
    let definition = gg
        .create_core_definition()
        .name("cores")
        .initial_version(CoreDefinitionVersion::builder().cores(core).build())
        .send()
        .await
        .unwrap();
    let group = gg.create_group().name(name).send().await.unwrap();
    let group_id = group.id().unwrap().to_string();
    let version = gg
        .create_group_version()
        .group_id(&group_id)
        .core_definition_version_arn(definition.latest_version_arn().unwrap())
        .send()
        .await
        .unwrap();
    (group_id, version.version().unwrap().to_string())
}

/// A group with a core, a version, and a deployment; returns (group id, deployment id).
async fn deploy(gg: &aws_sdk_greengrass::Client, name: &str) -> (String, String) {
    use aws_sdk_greengrass::types::DeploymentType;
    let (group_id, version) = deployable(gg, name).await;
    let deployment = gg
        .create_deployment()
        .group_id(&group_id)
        .group_version_id(version)
        .deployment_type(DeploymentType::NewDeployment)
        .send()
        .await
        .unwrap();
    (group_id, deployment.deployment_id().unwrap().to_string())
}

/// The statuses deployment `deployment` of `group` reads as, each once, until it ends
/// (bounded by [`CONDITION_TIMEOUT`]), and its error message.
async fn statuses_until_done(
    gg: &aws_sdk_greengrass::Client,
    group: &str,
    deployment: &str,
) -> (Vec<String>, Option<String>) {
    let deadline = Instant::now() + CONDITION_TIMEOUT;
    let mut seen: Vec<String> = Vec::new();
    loop {
        let status = gg
            .get_deployment_status()
            .group_id(group)
            .deployment_id(deployment)
            .send()
            .await
            .unwrap();
        let s = status.deployment_status().unwrap().to_string();
        if seen.last() != Some(&s) {
            seen.push(s.clone());
        }
        if s == "Success" || s == "Failure" {
            return (seen, status.error_message().map(str::to_string));
        }
        assert!(
            Instant::now() < deadline,
            "deployment {deployment} never finished within {CONDITION_TIMEOUT:?}: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A Greengrass deployment created through the proxy reads `Building`, `InProgress`, then
/// `Success`, or `Failure` with an error message under a failure probability or for a group
/// named to fail; ResetDeployments reaches moto through the launcher's route fix.
#[tokio::test]
async fn deployments_go_through_building_and_in_progress_to_an_outcome() {
    // Each status lasts a second for the deployment whose every status is checked (a read
    // every 20 ms, with no disk in between, sees each even on a slow machine), then 150 ms
    // for those whose outcome alone is.
    let mut rules = Rules::seeded(12);
    rules.deployments.building = Dist::fixed(1_000);
    rules.deployments.in_progress = Dist::fixed(1_000);
    let env = Env::new(rules.clone()).await;
    let gg = env.greengrass();
    let (group, deployment) = deploy(&gg, "group").await;
    let (seen, error) = statuses_until_done(&gg, &group, &deployment).await;
    assert_eq!(seen, ["Building", "InProgress", "Success"]);
    assert_eq!(error, None);

    rules.deployments.building = Dist::fixed(150);
    rules.deployments.in_progress = Dist::fixed(150);
    rules.deployments.failure_probability = 1.0;
    env.proxy.set_rules(rules.clone()).unwrap();
    let (group, deployment) = deploy(&gg, "group").await;
    let (seen, error) = statuses_until_done(&gg, &group, &deployment).await;
    assert_eq!(seen.last().map(String::as_str), Some("Failure"));
    assert!(error.unwrap().contains("deployment failed"));

    // Failure by group name: the named group's deployment fails, another's succeeds.
    rules.deployments.failure_probability = 0.0;
    rules.deployments.fail_groups_named = vec!["doomed".into()];
    env.proxy.set_rules(rules).unwrap();
    let (doomed, deployment) = deploy(&gg, "doomed-1").await;
    let (seen, _) = statuses_until_done(&gg, &doomed, &deployment).await;
    assert_eq!(seen.last().map(String::as_str), Some("Failure"));
    let (fine, deployment) = deploy(&gg, "fine-1").await;
    let (seen, _) = statuses_until_done(&gg, &fine, &deployment).await;
    assert_eq!(seen.last().map(String::as_str), Some("Success"));

    // moto's ResetDeployments route works through the launcher's fix (`$reset`).
    gg.reset_deployments()
        .group_id(&group)
        .force(true)
        .send()
        .await
        .expect("ResetDeployments is routed");
    assert_eq!(env.truth().await.groups.len(), 4);
}

/// A request whose caller hangs up before the answer (a worker killed mid-call) is still
/// carried out, as a service carries out what it received: moto holds the deployment, and
/// the proxy plays its lifecycle. Before, the hang-up dropped the proxy's forwarding, or its
/// record of what moto made: a deployment created behind the proxy's back read `InProgress`
/// for ever, and a crash test's run timed out waiting for it.
#[tokio::test]
async fn a_call_whose_caller_hangs_up_is_carried_out_and_played() {
    use aws_sdk_greengrass::types::DeploymentType;
    // The call reaches moto well after the caller has gone, who waits long enough to
    // have sent it whole on a busy machine.
    let rules = Rules::seeded(13).fault(
        FaultRule::new(Fault::Latency {
            delay: Dist::fixed(3_000),
        })
        .operation("CreateDeployment"),
    );
    let env = Env::new(rules).await;
    let gg = env.greengrass();
    let (group, version) = deployable(&gg, "hung-up").await;
    let call = gg
        .create_deployment()
        .group_id(&group)
        .group_version_id(version)
        .deployment_type(DeploymentType::NewDeployment)
        .send();
    let hung_up = tokio::time::timeout(Duration::from_secs(1), call).await;
    assert!(hung_up.is_err(), "answered before the hang-up: {hung_up:?}");

    let deadline = Instant::now() + CONDITION_TIMEOUT;
    let deployment = loop {
        let truth = env.truth().await;
        let held = truth.groups.iter().find(|g| g.id == group);
        if let Some(id) = held.and_then(|g| g.deployments.first()) {
            break id.clone();
        }
        assert!(
            Instant::now() < deadline,
            "moto holds no deployment {CONDITION_TIMEOUT:?} after the hang-up: {}",
            truth.summary()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let (seen, error) = statuses_until_done(&gg, &group, &deployment).await;
    assert_eq!(
        seen.last().map(String::as_str),
        Some("Success"),
        "{error:?}"
    );
    let record = env
        .proxy
        .requests()
        .into_iter()
        .find(|r| r.operation == "CreateDeployment")
        .expect("the hung-up call is recorded");
    assert_eq!(
        (record.forwarded, record.upstream_status),
        (true, Some(200))
    );
}

/// The state of each instance in an EC2 `DescribeInstances` answer, by id.
fn instance_states(body: &str) -> Vec<(String, String)> {
    body.split("<instanceId>")
        .skip(1)
        .filter_map(|rest| {
            let id = rest.split("</instanceId>").next()?;
            let state = rest.split("<instanceState>").nth(1)?;
            let name = state.split("<name>").nth(1)?.split("</name>").next()?;
            Some((id.to_string(), name.to_string()))
        })
        .collect()
}

/// EC2 instances as EC2 shows them and moto does not: a new instance reads `pending` for a
/// while, one launched with a stuck tag reads `pending` for ever (moto says both run), and
/// one that has read `running` flaps (running, missing, running) when read by id; a volume
/// read or attached right after its creation is `InvalidVolume.NotFound` during the create
/// lag. Errors come in EC2's shape.
#[test]
fn ec2_instances_start_late_get_stuck_and_flap_and_new_volumes_lag() {
    const PENDING: Duration = Duration::from_millis(5_000);
    const VOLUME_LAG: Duration = Duration::from_millis(4_000);
    let account = TestAccount::fresh().expect("moto's server");
    let key = account.credentials.access_key_id.clone();
    // moto sets an account's EC2 up at its first call (seconds): not inside the window.
    let (status, body) = ec2_call(&account.endpoint, &key, "DescribeInstances", &[]).unwrap();
    assert_eq!(status, 200, "{body}");
    let rules = Rules::seeded(9)
        .ec2(Ec2Rule {
            pending: Dist::fixed(PENDING.as_millis() as u64),
            stuck_tagged: vec!["stuck/".into()],
            flap_missing_probability: 0.5,
            flap_for: Dist::fixed(600_000),
        })
        .lag(LagRule::after_create("ec2", VOLUME_LAG.as_millis() as u64));
    let proxy = FaultProxy::start(&account.endpoint, rules).unwrap();
    let via = |action: &str, params: &[(&str, &str)]| {
        ec2_call(&proxy.endpoint(), &key, action, params).expect("an answer")
    };
    let launch = |tag: &str| {
        let (status, body) = via(
            "RunInstances",
            &[
                ("ImageId", "ami-760aaa0f"),
                ("InstanceType", "t3.micro"),
                ("MinCount", "1"),
                ("MaxCount", "1"),
                ("TagSpecification.1.ResourceType", "instance"),
                ("TagSpecification.1.Tag.1.Key", "keel:key"),
                ("TagSpecification.1.Tag.1.Value", tag),
            ],
        );
        assert_eq!(status, 200, "{body}");
        instance_ids(&body).remove(0)
    };
    let started = Instant::now();
    let usual = launch("run/1");
    // The proxy starts an instance's pending window when it passes the launch on, which is
    // before `launch` returns: waiting out the window is counted from here, not from
    // `started` (under load the launch itself can take much of the window).
    let usual_launched = Instant::now();
    let stuck = launch("stuck/1");
    let read = |id: &str| via("DescribeInstances", &[("InstanceId.1", id)]);

    // Both read pending at first; moto says both run.
    let (_, everything) = via("DescribeInstances", &[]);
    let states = instance_states(&everything);
    assert!(
        started.elapsed() < PENDING,
        "too slow to see the pending window"
    );
    assert_eq!(
        states,
        [
            (usual.clone(), "pending".into()),
            (stuck.clone(), "pending".into())
        ]
    );
    let (_, direct) = ec2_call(&account.endpoint, &key, "DescribeInstances", &[]).unwrap();
    assert!(
        instance_states(&direct).iter().all(|(_, s)| s == "running"),
        "{direct}"
    );

    // A volume right after its creation: not found, in EC2's shape, until the lag is over.
    let (status, body) = via(
        "CreateVolume",
        &[("AvailabilityZone", "us-east-1a"), ("Size", "8")],
    );
    assert_eq!(status, 200, "{body}");
    let volume_made = Instant::now();
    let volume = body
        .split("<volumeId>")
        .nth(1)
        .and_then(|rest| rest.split("</volumeId>").next())
        .unwrap()
        .to_string();
    let attach = [
        ("VolumeId", volume.as_str()),
        ("InstanceId", usual.as_str()),
        ("Device", "/dev/sdf"),
    ];
    let (status, body) = via("AttachVolume", &attach);
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("<Response><Errors><Error><Code>InvalidVolume.NotFound</Code>"),
        "{body}"
    );

    // After the pending window: the usual instance runs, the stuck one never does.
    let margin = Duration::from_millis(100);
    std::thread::sleep((PENDING + margin).saturating_sub(usual_launched.elapsed()));
    std::thread::sleep((VOLUME_LAG + margin).saturating_sub(volume_made.elapsed()));
    assert_eq!(
        instance_states(&read(&stuck).1),
        [(stuck.clone(), "pending".into())]
    );
    let (status, body) = via("AttachVolume", &attach);
    assert_eq!(status, 200, "the volume's lag is over: {body}");

    // Read by id from its first running read on, the usual instance flaps: some reads miss
    // it (InvalidInstanceID.NotFound), the others find it running.
    let (mut found, mut missing) = (0, 0);
    for _ in 0..40 {
        let (status, body) = read(&usual);
        match status {
            200 => {
                assert_eq!(instance_states(&body), [(usual.clone(), "running".into())]);
                found += 1;
            }
            400 => {
                assert!(
                    body.contains("<Code>InvalidInstanceID.NotFound</Code>"),
                    "{body}"
                );
                missing += 1;
            }
            other => panic!("{other}: {body}"),
        }
    }
    assert!(found > 5 && missing > 5, "found {found}, missing {missing}");
    let records = proxy.requests();
    let count = |applied: Applied| {
        records
            .iter()
            .filter(|r| r.fault == Some(applied.clone()))
            .count()
    };
    assert_eq!(count(Applied::InstanceMissing), missing);
    assert!(count(Applied::InstancePending) >= 2);
    assert_eq!(count(Applied::LagNotFound), 1);
}
