//! The fault proxy's faults, observed through the real AWS SDK for Rust: throttling and
//! server errors in each service's shape, lost responses, resets, latency, the request
//! record, and faults that repeat with the seed.
//!
//! Each test gets its own moto account on the shared server, its own proxy, and an SDK client
//! with no retries (so every fault reaches the test), except where a test checks the SDK's own
//! retry behaviour.

mod common;

use std::time::{Duration, Instant};

use aws_runtime::retries::classifiers::THROTTLING_ERRORS;
use aws_sdk_iam::error::SdkError;
use common::{create_role, ec2_call, instance_ids, service_error, Env, TRUST};
use keel_testkit::aws::SdkOptions;
use keel_testkit::proxy::{Applied, Dist, Fault, FaultRule, Rules};

/// Whether the SDK saw the connection fail (no answer at all), as opposed to an error answer.
fn is_connection_failure<E, R>(error: &SdkError<E, R>) -> bool {
    matches!(
        error,
        SdkError::DispatchFailure(_) | SdkError::ResponseError(_) | SdkError::TimeoutError(_)
    )
}

/// Rules seeded with `seed` under which each of `rules` fires once (on the first request it
/// selects) and then lets requests through.
fn once_each(seed: u64, rules: impl IntoIterator<Item = FaultRule>) -> Rules {
    rules
        .into_iter()
        .fold(Rules::seeded(seed), |all, rule| all.fault(rule.limit(1)))
}

/// Each request the proxy received, in order: its operation and the fault applied.
fn applied(proxy: &keel_testkit::proxy::FaultProxy) -> Vec<(String, Option<Applied>)> {
    proxy
        .requests()
        .into_iter()
        .map(|r| (r.operation, r.fault))
        .collect()
}

/// A throttle rule answers in each service's own shape (IAM and STS `Throttling` 400, IoT
/// `ThrottlingException` 429, Greengrass `TooManyRequestsException` 429), whose code the SDK
/// counts as throttling; a rule with a limit fires that often and no more.
#[tokio::test]
async fn throttling_is_classified_as_throttling_by_the_sdk_in_every_service() {
    let operations = [
        "CreateRole",
        "GetCallerIdentity",
        "CreateThing",
        "CreateGroup",
    ];
    let rules = once_each(
        1,
        operations.map(|operation| FaultRule::new(Fault::Throttle).operation(operation)),
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
    assert_eq!(throttled, operations);
}

/// With its standard retry strategy, the SDK retries through a throttle and a 503 and succeeds
/// at the third attempt; the proxy records each attempt's fault.
#[tokio::test]
async fn the_sdk_retries_through_throttling_and_server_errors() {
    let rules = once_each(
        2,
        [Fault::Throttle, Fault::ServerError { status: 503 }]
            .map(|fault| FaultRule::new(fault).operation("CreateThing")),
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

/// A server-error rule answers in each service's shape (IAM `InternalFailure` 500 and
/// `ServiceUnavailable` 503, IoT `InternalFailureException` 500, Greengrass
/// `InternalServerErrorException` 500); past the rules' limits, moto answers for itself.
#[tokio::test]
async fn server_errors_answer_in_each_service_shape() {
    let rules = once_each(
        3,
        [
            (500, "iam"),
            (503, "iam"),
            (500, "iot"),
            (500, "greengrass"),
        ]
        .map(|(status, service)| FaultRule::new(Fault::ServerError { status }).service(service)),
    );
    let env = Env::new(rules).await;
    let get_role = || env.iam().get_role().role_name("x").send();
    let e = get_role().await.unwrap_err();
    assert_eq!(service_error(&e), ("InternalFailure".into(), 500));
    let e = get_role().await.unwrap_err();
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
    let e = get_role().await.unwrap_err();
    assert!(e.as_service_error().unwrap().is_no_such_entity_exception());
}

/// A lost response reaches moto, so the resource exists, while the SDK sees a connection
/// failure and no answer.
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

/// A connection reset before forwarding is a connection failure that never reaches moto:
/// nothing is created.
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

/// A latency rule delays the answer by the drawn duration and records it.
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

/// Under probabilistic rules, the same seed and the same requests give the same faults, and
/// another seed gives others.
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

/// Each request is named by its service and operation, in the query protocol (IAM, STS) and
/// in the REST services (IoT, Greengrass).
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

/// EC2 as the proxy plays it where moto does not: a client token makes a repeated
/// RunInstances return the first instance (moto 5.2 would launch another), also when the
/// first answer was lost after moto launched it; the same token with other parameters is
/// `IdempotentParameterMismatch`; a throttle is `RequestLimitExceeded` 503, which the SDK
/// classes as throttling; every error is in EC2's own XML shape.
#[test]
fn ec2_client_tokens_and_throttling_are_played_as_ec2_does() {
    let account = keel_testkit::moto::TestAccount::fresh().expect("moto's server");
    let rules = Rules::seeded(3)
        .fault(
            FaultRule::new(Fault::LostResponse)
                .service("ec2")
                .operation("RunInstances")
                .limit(1),
        )
        .fault(
            FaultRule::new(Fault::Throttle)
                .service("ec2")
                .operation("DescribeInstances")
                .limit(1),
        );
    let proxy = keel_testkit::proxy::FaultProxy::start(&account.endpoint, rules).unwrap();
    let key = account.credentials.access_key_id.clone();
    let via =
        |action: &str, params: &[(&str, &str)]| ec2_call(&proxy.endpoint(), &key, action, params);
    let tagged = |value: &'static str| {
        [
            ("TagSpecification.1.ResourceType", "instance"),
            ("TagSpecification.1.Tag.1.Key", "keel:key"),
            ("TagSpecification.1.Tag.1.Value", value),
        ]
    };
    let run = |token: &'static str, instance_type: &'static str| {
        let mut params = vec![
            ("ImageId", "ami-760aaa0f"),
            ("InstanceType", instance_type),
            ("MinCount", "1"),
            ("MaxCount", "1"),
            ("ClientToken", token),
        ];
        params.extend(tagged("run/1"));
        via("RunInstances", &params)
    };
    // What moto holds, asked around the proxy.
    let in_moto = || {
        let filter = [
            ("Filter.1.Name", "tag:keel:key"),
            ("Filter.1.Value.1", "run/1"),
        ];
        let (status, body) =
            ec2_call(&account.endpoint, &key, "DescribeInstances", &filter).unwrap();
        assert_eq!(status, 200, "{body}");
        instance_ids(&body)
    };

    // The first launch's answer is lost after moto launched it.
    assert_eq!(run("token-a", "t3.micro"), None);
    let launched = in_moto();
    assert_eq!(launched.len(), 1, "{launched:?}");
    // Sent again with its token: the same instance, and nothing new in moto.
    let (status, body) = run("token-a", "t3.micro").unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(instance_ids(&body), launched);
    assert_eq!(in_moto(), launched);
    // The same token with another instance type: refused, in EC2's shape.
    let (status, body) = run("token-a", "t3.small").unwrap();
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("<Response><Errors><Error><Code>IdempotentParameterMismatch</Code>"),
        "{body}"
    );
    assert_eq!(in_moto(), launched);
    // Another token is another launch.
    let (status, body) = run("token-b", "t3.small").unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(in_moto().len(), 2);

    // A throttle: 503 RequestLimitExceeded in EC2's shape, a code the SDK counts as
    // throttling; the next call goes through.
    let (status, body) = via("DescribeInstances", &[]).unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("<Code>RequestLimitExceeded</Code>"), "{body}");
    assert!(THROTTLING_ERRORS.contains(&"RequestLimitExceeded"));
    let (status, body) = via("DescribeInstances", &[]).unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(instance_ids(&body).len(), 2);

    assert_eq!(
        applied(&proxy),
        [
            ("RunInstances".to_string(), Some(Applied::LostResponse)),
            (
                "RunInstances".to_string(),
                Some(Applied::ClientTokenReplayed)
            ),
            (
                "RunInstances".to_string(),
                Some(Applied::ClientTokenMismatch)
            ),
            ("RunInstances".to_string(), None),
            ("DescribeInstances".to_string(), Some(Applied::Throttled)),
            ("DescribeInstances".to_string(), None),
        ]
    );
}

/// A create whose answer was lost starts its create lag when a replay of its client token is
/// answered, not when moto made it: a caller whose retries outlast the window still sees the
/// new volume missing right after it learns of it. A second answered replay does not start
/// the window again.
#[test]
fn a_lost_creates_lag_starts_when_its_replay_is_answered() {
    // Long enough that the replay and the first read, both answered by the proxy itself,
    // fit in it on a loaded machine.
    const LAG: Duration = Duration::from_millis(3_000);
    let account = keel_testkit::moto::TestAccount::fresh().expect("moto's server");
    let key = account.credentials.access_key_id.clone();
    // moto sets an account's EC2 up at its first call (seconds): not inside the window.
    let (status, body) = ec2_call(&account.endpoint, &key, "DescribeVolumes", &[]).unwrap();
    assert_eq!(status, 200, "{body}");
    let rules = Rules::seeded(5)
        .fault(
            FaultRule::new(Fault::LostResponse)
                .service("ec2")
                .operation("CreateVolume")
                .limit(1),
        )
        .lag(keel_testkit::proxy::LagRule::after_create(
            "ec2",
            LAG.as_millis() as u64,
        ));
    let proxy = keel_testkit::proxy::FaultProxy::start(&account.endpoint, rules).unwrap();
    let via =
        |action: &str, params: &[(&str, &str)]| ec2_call(&proxy.endpoint(), &key, action, params);
    let create = || {
        via(
            "CreateVolume",
            &[
                ("AvailabilityZone", "us-east-1a"),
                ("Size", "8"),
                ("ClientToken", "volume-token"),
            ],
        )
    };
    let volume_id = |body: &str| {
        body.split("<volumeId>")
            .nth(1)
            .and_then(|rest| rest.split("</volumeId>").next())
            .map(str::to_string)
    };

    // The create's answer is lost after moto made the volume; the caller retries after the
    // window moto's create would have started.
    assert_eq!(create(), None);
    std::thread::sleep(LAG + Duration::from_millis(200));
    // The window starts in the proxy between `sent` and `answered`.
    let sent = Instant::now();
    let (status, body) = create().expect("the replay's answer");
    assert_eq!(status, 200, "{body}");
    let answered = Instant::now();
    let volume = volume_id(&body).expect("a volume id");
    let read = || via("DescribeVolumes", &[("VolumeId.1", volume.as_str())]).unwrap();

    // Right after the answer: not found, in EC2's shape.
    let (status, body) = read();
    assert!(
        sent.elapsed() < LAG,
        "too slow to see the window ({:?})",
        sent.elapsed()
    );
    assert_eq!(status, 400, "the lag runs from the replay's answer: {body}");
    assert!(
        body.contains("<Code>InvalidVolume.NotFound</Code>"),
        "{body}"
    );

    // After the window: found, and a second replay does not hide it again.
    std::thread::sleep((LAG + Duration::from_millis(100)).saturating_sub(answered.elapsed()));
    let (status, body) = read();
    assert_eq!(status, 200, "{body}");
    assert_eq!(volume_id(&body).as_deref(), Some(volume.as_str()));
    let (status, body) = create().expect("the second replay's answer");
    assert_eq!(status, 200, "{body}");
    let (status, body) = read();
    assert_eq!(status, 200, "answered once already: {body}");

    assert_eq!(
        applied(&proxy),
        [
            ("CreateVolume".to_string(), Some(Applied::LostResponse)),
            (
                "CreateVolume".to_string(),
                Some(Applied::ClientTokenReplayed)
            ),
            ("DescribeVolumes".to_string(), Some(Applied::LagNotFound)),
            ("DescribeVolumes".to_string(), None),
            (
                "CreateVolume".to_string(),
                Some(Applied::ClientTokenReplayed)
            ),
            ("DescribeVolumes".to_string(), None),
        ]
    );
}
