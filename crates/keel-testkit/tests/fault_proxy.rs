//! The fault proxy and moto harness, observed through the real AWS SDK for Rust.
//!
//! Each test gets its own moto account on the shared server, its own proxy, and an SDK client
//! with no retries (so every fault reaches the test), except where a test checks the SDK's own
//! retry behaviour.

use std::time::{Duration, Instant};

use aws_config::SdkConfig;
use aws_runtime::retries::classifiers::THROTTLING_ERRORS;
use aws_sdk_iam::config::http::HttpResponse;
use aws_sdk_iam::error::{ProvideErrorMetadata, SdkError};
use keel_testkit::aws::SdkOptions;
use keel_testkit::inventory::Inventory;
use keel_testkit::moto::{MotoError, MotoOptions, MotoServer, TestAccount};
use keel_testkit::proxy::{Applied, Dist, Fault, FaultProxy, FaultRule, LagRule, Rules};

struct Env {
    proxy: FaultProxy,
    /// Through the proxy.
    via: SdkConfig,
    /// Straight to moto: the ground truth.
    direct: SdkConfig,
}

impl Env {
    async fn new(rules: Rules) -> Env {
        Self::with_options(rules, SdkOptions::no_retries()).await
    }

    async fn with_options(rules: Rules, options: SdkOptions) -> Env {
        keel_testkit::init_tracing();
        let account = TestAccount::fresh().expect("moto's server (see docs/testing.md)");
        let proxy = FaultProxy::start(&account.endpoint, rules).expect("proxy starts");
        let via = account.sdk_config_via(&proxy.endpoint(), options).await;
        let direct = account.sdk_config().await;
        Env { proxy, via, direct }
    }

    fn iam(&self) -> aws_sdk_iam::Client {
        aws_sdk_iam::Client::new(&self.via)
    }

    fn iot(&self) -> aws_sdk_iot::Client {
        aws_sdk_iot::Client::new(&self.via)
    }

    fn greengrass(&self) -> aws_sdk_greengrass::Client {
        aws_sdk_greengrass::Client::new(&self.via)
    }

    fn sts(&self) -> aws_sdk_sts::Client {
        aws_sdk_sts::Client::new(&self.via)
    }

    async fn truth(&self) -> Inventory {
        Inventory::read(&self.direct).await.expect("inventory")
    }
}

const TRUST: &str = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"Service":"greengrass.amazonaws.com"},"Action":"sts:AssumeRole"}]}"#;

async fn create_role(iam: &aws_sdk_iam::Client, name: &str) -> Result<String, String> {
    iam.create_role()
        .role_name(name)
        .assume_role_policy_document(TRUST)
        .send()
        .await
        .map(|r| r.role().map(|r| r.arn().to_string()).unwrap_or_default())
        .map_err(|e| format!("{}", aws_sdk_iam::error::DisplayErrorContext(e)))
}

/// The error code and HTTP status of a service error; panics on any other kind of error.
fn service_error<E: ProvideErrorMetadata + std::fmt::Debug>(
    error: &SdkError<E, HttpResponse>,
) -> (String, u16) {
    match error {
        SdkError::ServiceError(e) => (
            e.err().code().unwrap_or_default().to_string(),
            e.raw().status().as_u16(),
        ),
        other => panic!("expected a service error, got {other:?}"),
    }
}

/// Whether the SDK saw the connection fail (no answer at all), as opposed to an error answer.
fn is_connection_failure<E, R>(error: &SdkError<E, R>) -> bool {
    matches!(
        error,
        SdkError::DispatchFailure(_) | SdkError::ResponseError(_) | SdkError::TimeoutError(_)
    )
}

#[tokio::test]
async fn throttling_is_classified_as_throttling_by_the_sdk_in_every_service() {
    let rules = Rules::seeded(1)
        .fault(
            FaultRule::new(Fault::Throttle)
                .operation("CreateRole")
                .limit(1),
        )
        .fault(
            FaultRule::new(Fault::Throttle)
                .operation("GetCallerIdentity")
                .limit(1),
        )
        .fault(
            FaultRule::new(Fault::Throttle)
                .operation("CreateThing")
                .limit(1),
        )
        .fault(
            FaultRule::new(Fault::Throttle)
                .operation("CreateGroup")
                .limit(1),
        );
    let env = Env::new(rules).await;

    let e = env
        .iam()
        .create_role()
        .role_name("r")
        .assume_role_policy_document(TRUST)
        .send()
        .await
        .unwrap_err();
    let (code, status) = service_error(&e);
    assert_eq!((code.as_str(), status), ("Throttling", 400));
    assert!(THROTTLING_ERRORS.contains(&code.as_str()));

    let e = env.sts().get_caller_identity().send().await.unwrap_err();
    let (code, status) = service_error(&e);
    assert_eq!((code.as_str(), status), ("Throttling", 400));

    let e = env
        .iot()
        .create_thing()
        .thing_name("t")
        .send()
        .await
        .unwrap_err();
    let (code, status) = service_error(&e);
    assert_eq!((code.as_str(), status), ("ThrottlingException", 429));
    assert!(
        e.as_service_error().unwrap().is_throttling_exception(),
        "the modeled error"
    );
    assert!(THROTTLING_ERRORS.contains(&code.as_str()));

    let e = env
        .greengrass()
        .create_group()
        .name("g")
        .send()
        .await
        .unwrap_err();
    let (code, status) = service_error(&e);
    assert_eq!((code.as_str(), status), ("TooManyRequestsException", 429));
    assert!(THROTTLING_ERRORS.contains(&code.as_str()));

    // Each rule fired once: the second calls go through, and moto holds one of each.
    create_role(&env.iam(), "r").await.unwrap();
    env.iot()
        .create_thing()
        .thing_name("t")
        .send()
        .await
        .unwrap();
    let truth = env.truth().await;
    assert_eq!((truth.roles.len(), truth.things.len()), (1, 1));
    let throttled: Vec<_> = env.proxy.faults().into_iter().map(|(op, _)| op).collect();
    assert_eq!(
        throttled,
        [
            "CreateRole",
            "GetCallerIdentity",
            "CreateThing",
            "CreateGroup"
        ]
    );
}

#[tokio::test]
async fn the_sdk_retries_through_throttling_and_server_errors() {
    let rules = Rules::seeded(2)
        .fault(
            FaultRule::new(Fault::Throttle)
                .operation("CreateThing")
                .limit(1),
        )
        .fault(
            FaultRule::new(Fault::ServerError { status: 503 })
                .operation("CreateThing")
                .limit(1),
        );
    let mut options = SdkOptions::default();
    options.retry = options.retry.with_initial_backoff(Duration::from_millis(5));
    let env = Env::with_options(rules, options).await;
    env.iot()
        .create_thing()
        .thing_name("t")
        .send()
        .await
        .expect("third attempt succeeds");
    let seen: Vec<_> = env
        .proxy
        .requests_for("CreateThing")
        .into_iter()
        .map(|r| r.fault)
        .collect();
    assert_eq!(
        seen,
        [
            Some(Applied::Throttled),
            Some(Applied::ServerError { status: 503 }),
            None
        ]
    );
}

#[tokio::test]
async fn server_errors_answer_in_each_service_shape() {
    let rules = Rules::seeded(3)
        .fault(
            FaultRule::new(Fault::ServerError { status: 500 })
                .service("iam")
                .limit(1),
        )
        .fault(
            FaultRule::new(Fault::ServerError { status: 503 })
                .service("iam")
                .limit(1),
        )
        .fault(
            FaultRule::new(Fault::ServerError { status: 500 })
                .service("iot")
                .limit(1),
        )
        .fault(
            FaultRule::new(Fault::ServerError { status: 500 })
                .service("greengrass")
                .limit(1),
        );
    let env = Env::new(rules).await;
    let e = env
        .iam()
        .get_role()
        .role_name("x")
        .send()
        .await
        .unwrap_err();
    assert_eq!(service_error(&e), ("InternalFailure".into(), 500));
    let e = env
        .iam()
        .get_role()
        .role_name("x")
        .send()
        .await
        .unwrap_err();
    assert_eq!(service_error(&e), ("ServiceUnavailable".into(), 503));
    let e = env
        .iot()
        .describe_thing()
        .thing_name("x")
        .send()
        .await
        .unwrap_err();
    assert_eq!(service_error(&e), ("InternalFailureException".into(), 500));
    assert!(e
        .as_service_error()
        .unwrap()
        .is_internal_failure_exception());
    let e = env
        .greengrass()
        .get_group()
        .group_id("x")
        .send()
        .await
        .unwrap_err();
    assert_eq!(
        service_error(&e),
        ("InternalServerErrorException".into(), 500)
    );
    // Past the limits, moto answers for itself: the role does not exist.
    let e = env
        .iam()
        .get_role()
        .role_name("x")
        .send()
        .await
        .unwrap_err();
    assert!(e.as_service_error().unwrap().is_no_such_entity_exception());
}

#[tokio::test]
async fn a_lost_response_is_a_connection_failure_while_moto_holds_the_resource() {
    let rules = Rules::seeded(4)
        .fault(FaultRule::new(Fault::LostResponse).operation("CreateThing"))
        .fault(FaultRule::new(Fault::LostResponse).operation("CreateRole"));
    let env = Env::new(rules).await;
    let e = env
        .iot()
        .create_thing()
        .thing_name("lost-thing")
        .send()
        .await
        .unwrap_err();
    assert!(is_connection_failure(&e), "{e:?}");
    let e = env
        .iam()
        .create_role()
        .role_name("lost-role")
        .assume_role_policy_document(TRUST)
        .send()
        .await
        .unwrap_err();
    assert!(is_connection_failure(&e), "{e:?}");

    let truth = env.truth().await;
    assert!(
        truth.thing("lost-thing").is_some(),
        "the effect happened: {}",
        truth.summary()
    );
    assert!(
        truth.role("lost-role").is_some(),
        "the effect happened: {}",
        truth.summary()
    );
    for record in env.proxy.requests() {
        assert_eq!(record.fault, Some(Applied::LostResponse));
        assert!(record.forwarded);
        assert_eq!(record.upstream_status, Some(200));
        assert_eq!(record.status, None, "the client got no answer");
    }
}

#[tokio::test]
async fn a_reset_before_forwarding_changes_nothing() {
    let rules = Rules::seeded(5).fault(FaultRule::new(Fault::ResetBeforeForward).service("iot"));
    let env = Env::new(rules).await;
    let e = env
        .iot()
        .create_thing()
        .thing_name("never")
        .send()
        .await
        .unwrap_err();
    assert!(is_connection_failure(&e), "{e:?}");
    assert!(env.truth().await.is_empty());
    let record = &env.proxy.requests()[0];
    assert_eq!((record.forwarded, record.status), (false, None));
}

#[tokio::test]
async fn added_latency_delays_the_answer_and_is_recorded() {
    let rules = Rules::seeded(6).fault(
        FaultRule::new(Fault::Latency {
            delay: Dist::fixed(150),
        })
        .operation("ListRoles"),
    );
    let env = Env::new(rules).await;
    let started = Instant::now();
    env.iam().list_roles().send().await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(150));
    let record = &env.proxy.requests()[0];
    assert_eq!(
        (record.latency_ms, record.fault.clone(), record.status),
        (150, None, Some(200))
    );
}

/// Polls `read` until it succeeds (at most 20 s), returning how many failures came first.
async fn failures_until_found<F, Fut, T, E>(mut read: F) -> usize
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
    E: std::fmt::Debug,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut failures = 0;
    loop {
        match read().await {
            Ok(_) => return failures,
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(?e, "not yet");
                failures += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("still failing after 20 s: {e:?}"),
        }
    }
}

#[tokio::test]
async fn new_resources_read_as_not_found_during_the_create_lag() {
    let rules = Rules::seeded(7)
        .lag(LagRule::after_create("iam", 300))
        .lag(LagRule::after_create("iot", 300))
        .lag(LagRule::after_create("greengrass", 300));
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

    // Uses by ARN lag too, and everything appears once the lag is over.
    let e = env
        .iam()
        .list_role_tags()
        .role_name("lagging-role")
        .send()
        .await
        .unwrap_err();
    assert!(e.as_service_error().unwrap().is_no_such_entity_exception());
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

#[tokio::test]
async fn deleted_resources_read_as_present_during_the_delete_lag() {
    let mut lag = LagRule::after_create("iot", 0);
    lag.after_create = None;
    lag.after_delete = Some(Dist::fixed(400));
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
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match env.iot().describe_thing().thing_name("going").send().await {
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_resource_not_found_exception()) =>
            {
                break
            }
            other => assert!(Instant::now() < deadline, "still present: {other:?}"),
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

#[tokio::test]
async fn flapping_reads_alternate_and_repeat_with_the_seed() {
    let first = flapping_reads(9).await;
    assert!(first.contains(&true) && first.contains(&false), "{first:?}");
    let turns = first.windows(2).filter(|w| w[0] != w[1]).count();
    assert!(turns >= 5, "found and not found alternate: {first:?}");
    assert_eq!(flapping_reads(9).await, first, "same seed, same reads");
    assert_ne!(flapping_reads(10).await, first, "another seed, other reads");
}

/// The faults of a fixed sequence of 60 calls under probabilistic rules.
async fn fault_sequence(seed: u64) -> Vec<(String, Applied)> {
    let rules = Rules::seeded(seed)
        .fault(
            FaultRule::new(Fault::Throttle)
                .operation("GetRole")
                .probability(0.3),
        )
        .fault(
            FaultRule::new(Fault::ServerError { status: 503 })
                .service("iam")
                .probability(0.2),
        )
        .fault(
            FaultRule::new(Fault::LostResponse)
                .operation("DescribeThing")
                .probability(0.25),
        );
    let env = Env::new(rules).await;
    for i in 0..30 {
        let _ = env.iam().get_role().role_name(format!("r{i}")).send().await;
        let _ = env
            .iot()
            .describe_thing()
            .thing_name(format!("t{i}"))
            .send()
            .await;
    }
    env.proxy.faults()
}

#[tokio::test]
async fn the_same_seed_gives_the_same_faults() {
    let first = fault_sequence(42).await;
    assert!(first.len() >= 10, "{first:?}");
    let kinds: std::collections::BTreeSet<_> =
        first.iter().map(|(_, f)| format!("{f:?}")).collect();
    assert_eq!(kinds.len(), 3, "all three rules fired: {kinds:?}");
    assert_eq!(fault_sequence(42).await, first);
    assert_ne!(fault_sequence(43).await, first);
}

#[tokio::test]
async fn assume_role_is_denied_until_the_role_exists_and_has_propagated() {
    let mut rules = Rules::seeded(11);
    rules.assume_role.propagation = Dist::fixed(400);
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

/// A group with a core, a version, and a deployment; returns (group id, deployment id).
async fn deploy(gg: &aws_sdk_greengrass::Client, name: &str) -> (String, String) {
    use aws_sdk_greengrass::types::{Core, CoreDefinitionVersion, DeploymentType};
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
    let deployment = gg
        .create_deployment()
        .group_id(&group_id)
        .group_version_id(version.version().unwrap())
        .deployment_type(DeploymentType::NewDeployment)
        .send()
        .await
        .unwrap();
    (group_id, deployment.deployment_id().unwrap().to_string())
}

async fn statuses_until_done(
    gg: &aws_sdk_greengrass::Client,
    group: &str,
    deployment: &str,
) -> (Vec<String>, Option<String>) {
    let deadline = Instant::now() + Duration::from_secs(20);
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
            "deployment never finished: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn deployments_go_through_building_and_in_progress_to_an_outcome() {
    let mut rules = Rules::seeded(12);
    rules.deployments.building = Dist::fixed(150);
    rules.deployments.in_progress = Dist::fixed(150);
    let env = Env::new(rules.clone()).await;
    let gg = env.greengrass();
    let (group, deployment) = deploy(&gg, "group").await;
    let (seen, error) = statuses_until_done(&gg, &group, &deployment).await;
    assert_eq!(seen, ["Building", "InProgress", "Success"]);
    assert_eq!(error, None);

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

#[tokio::test]
async fn every_request_is_classified_by_service_and_operation() {
    let env = Env::new(Rules::seeded(13)).await;
    create_role(&env.iam(), "classified").await.unwrap();
    env.sts().get_caller_identity().send().await.unwrap();
    env.iot()
        .create_thing()
        .thing_name("c")
        .send()
        .await
        .unwrap();
    env.iot()
        .list_thing_principals()
        .thing_name("c")
        .send()
        .await
        .unwrap();
    env.greengrass().list_groups().send().await.unwrap();
    let seen: Vec<_> = env
        .proxy
        .requests()
        .into_iter()
        .map(|r| format!("{}:{}", r.service, r.operation))
        .collect();
    assert_eq!(
        seen,
        [
            "iam:CreateRole",
            "sts:GetCallerIdentity",
            "iot:CreateThing",
            "iot:ListThingPrincipals",
            "greengrass:ListGroups"
        ]
    );
}

#[tokio::test]
async fn accounts_on_the_shared_server_do_not_see_each_other() {
    let a = Env::new(Rules::seeded(14)).await;
    let b = Env::new(Rules::seeded(14)).await;
    create_role(&a.iam(), "mine").await.unwrap();
    a.iot()
        .create_thing()
        .thing_name("mine")
        .send()
        .await
        .unwrap();
    assert!(b.truth().await.is_empty());
    let truth = a.truth().await;
    assert_eq!((truth.roles.len(), truth.things.len()), (1, 1));
}

#[test]
fn a_python_without_moto_gives_an_error_that_says_how_to_install_it() {
    let options = MotoOptions {
        python: "python3".into(),
        python_args: vec!["-S".into()],
    };
    let error = MotoServer::start(options).unwrap_err();
    assert!(matches!(error, MotoError::NotInstalled { .. }), "{error}");
    assert!(
        error.to_string().contains("pip install 'moto[server]'"),
        "{error}"
    );
    let options = MotoOptions {
        python: "/nonexistent/python3".into(),
        python_args: vec![],
    };
    let error = MotoServer::start(options).unwrap_err();
    assert!(matches!(error, MotoError::NoPython { .. }), "{error}");
    assert!(error.to_string().contains("pip install"), "{error}");
}

#[test]
fn bad_rules_and_upstreams_are_refused_at_start() {
    let bad = Rules::seeded(1).fault(FaultRule::new(Fault::ServerError { status: 200 }));
    let error = FaultProxy::start("http://127.0.0.1:1", bad).unwrap_err();
    assert!(error.to_string().contains("faults[0]"), "{error}");
    let error = FaultProxy::start("ftp://example", Rules::default()).unwrap_err();
    assert!(error.to_string().contains("ftp://example"), "{error}");
}

#[tokio::test]
async fn the_standalone_proxy_applies_a_rules_file_and_writes_its_record() {
    use std::io::BufRead;
    let account = TestAccount::fresh().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.json");
    let record = dir.path().join("record.json");
    std::fs::write(
        &rules,
        r#"{"seed": 1, "faults": [{"operation": "CreateThing", "fault": {"kind": "throttle"}, "limit": 1}]}"#,
    )
    .unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_keel-fault-proxy"))
        .args(["--upstream", &account.endpoint, "--rules"])
        .arg(&rules)
        .arg("--record")
        .arg(&record)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut endpoint = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut endpoint)
        .unwrap();
    let config = account
        .sdk_config_via(endpoint.trim(), SdkOptions::no_retries())
        .await;
    let iot = aws_sdk_iot::Client::new(&config);
    let e = iot.create_thing().thing_name("t").send().await.unwrap_err();
    assert!(e.as_service_error().unwrap().is_throttling_exception());
    iot.create_thing().thing_name("t").send().await.unwrap();

    let pid = child.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    assert!(child.wait().unwrap().success());
    let written: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&record).unwrap()).unwrap();
    let faults: Vec<_> = written
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["fault"]["kind"].clone())
        .collect();
    assert_eq!(
        faults,
        [serde_json::json!("throttled"), serde_json::Value::Null]
    );
}

#[test]
fn the_standalone_proxy_names_the_bad_field_of_a_rules_file() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.json");
    std::fs::write(
        &rules,
        r#"{"faults": [{"fault": {"kind": "server_error", "status": "x"}}]}"#,
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keel-fault-proxy"))
        .args(["--upstream", "http://127.0.0.1:1", "--rules"])
        .arg(&rules)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("faults[0].fault"), "{stderr}");
}

#[tokio::test]
async fn a_server_of_its_own_can_be_reset_to_empty() {
    let server = MotoServer::start(MotoOptions::default()).expect("moto starts");
    let account = server.new_account().unwrap();
    let config = account.sdk_config().await;
    create_role(&aws_sdk_iam::Client::new(&config), "before-reset")
        .await
        .unwrap();
    assert_eq!(Inventory::read(&config).await.unwrap().roles.len(), 1);
    server.reset().unwrap();
    assert!(Inventory::read(&config).await.unwrap().is_empty());
    drop(server);
}
