//! Inputs that cannot hurt: every workflow refuses a field it does not know (a typo such as
//! `managed_policy_arn` would otherwise be dropped and the role made without its policy), and
//! a timeout past its documented maximum (seven days), or a check-in wait or approval bound
//! out of range, each as `InvalidInput` naming the field's path, before anything is stored
//! or created. No AWS is involved: the engine refuses these starts before any step runs.

use keel_engine::{Engine, EngineError, Workflow};
use keel_workflows::ec2::{MachineWithDisk, Sweep};
use keel_workflows::files::S3ToSftp;
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
        .delivery_workflows()
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

/// The check-in wait of a core and the approval bound of a fleet are checked naming the
/// field: `wait_for_check_in.within_s` is 1 to seven days, and `approval_above` below the
/// largest fleet (a bound a fleet can never pass is a mistake); an unknown field inside the
/// check-in wait or a negative bound is refused with its path. Inputs without either field
/// (as stored by earlier versions) still decode, and are written back without them. Nothing
/// is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_check_in_wait_and_the_approval_bound_are_checked_naming_the_field() {
    use keel_workflows::greengrass::{CheckInWait, CHECK_IN_WITHIN_S_MAX};

    let dir = tempfile::tempdir().unwrap();
    let engine = engine(dir.path()).await;
    assert_eq!(CHECK_IN_WITHIN_S_MAX, TIMEOUT_S_MAX);
    let cases = [
        (0, "must be at least 1".to_string()),
        (
            TIMEOUT_S_MAX + 1,
            format!("{} is more than 604800 (7 days)", TIMEOUT_S_MAX + 1),
        ),
        (
            WRAPPING_S,
            format!("{WRAPPING_S} is more than 604800 (7 days)"),
        ),
    ];
    for (within_s, expected) in cases {
        let mut core = sample::core("c", 1);
        core.wait_for_check_in = Some(CheckInWait { within_s });
        let (field, reason) = invalid(
            engine
                .start::<ProvisionCore>("core", core)
                .await
                .map(|h| h.id().clone()),
        );
        assert_eq!(field, "wait_for_check_in.within_s");
        assert_eq!(reason, expected);
    }
    let mut core = sample::core("c", 1);
    core.wait_for_check_in = Some(CheckInWait {
        within_s: TIMEOUT_S_MAX,
    });
    assert_eq!(ProvisionCore::validate(&core), Ok(()));
    let json = serde_json::to_value(&core).unwrap();
    let (field, reason) = invalid(
        engine
            .start_json(
                ProvisionCore::NAME,
                "core",
                with(json, &["wait_for_check_in"], json!({"within": 60})),
            )
            .await,
    );
    assert_eq!(field, "wait_for_check_in.within");
    assert!(reason.starts_with("unknown field (expected "), "{reason}");

    let mut fleet = sample::fleet("f", 2, 1);
    fleet.approval_above = Some(1000);
    let (field, reason) = invalid(
        engine
            .start::<OnboardFleet>("fleet", fleet.clone())
            .await
            .map(|h| h.id().clone()),
    );
    assert_eq!(field, "approval_above");
    assert_eq!(reason, "1000 is outside 0..=999");
    for above in [0, 999] {
        fleet.approval_above = Some(above);
        assert_eq!(OnboardFleet::validate(&fleet), Ok(()), "{above}");
    }
    let json = serde_json::to_value(&fleet).unwrap();
    match engine
        .start_json(
            OnboardFleet::NAME,
            "fleet",
            with(json, &["approval_above"], json!(-1)),
        )
        .await
    {
        Err(EngineError::MalformedInput { field, .. }) => assert_eq!(field, "approval_above"),
        other => panic!("expected MalformedInput, got {other:?}"),
    }
    assert!(engine.list().await.unwrap().is_empty(), "nothing stored");

    // Absent, the fields are left out when written, so an input stored before they existed
    // is the same input after.
    let core = serde_json::to_value(sample::core("c", 1)).unwrap();
    let fleet = serde_json::to_value(sample::fleet("f", 2, 1)).unwrap();
    assert!(core.get("wait_for_check_in").is_none(), "{core}");
    assert!(fleet.get("approval_above").is_none(), "{fleet}");
    engine.shutdown().await;
}

/// A machine's input is checked field by field, naming the field: an unknown field, the
/// name, the image id, the instance type, the zone, the disk's size and type, the device, the
/// generations and the three waits; the sweep's wait too. Nothing is stored; the sample
/// machine and the bounds themselves are accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_input_is_checked_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(dir.path()).await;
    let machine = serde_json::to_value(sample::machine("web-1")).unwrap();
    let cases = [
        ("disk_size", json!(8), "disk_size", "unknown field"),
        ("name", json!("web 1"), "name", "holds ' '"),
        ("image_id", json!("ami-XYZ"), "image_id", "is not an AMI id"),
        (
            "instance_type",
            json!("t3"),
            "instance_type",
            "is not an instance type",
        ),
        (
            "availability_zone",
            json!("Zone A"),
            "availability_zone",
            "holds",
        ),
        (
            "disk_size_gib",
            json!(0),
            "disk_size_gib",
            "outside 1..=16384",
        ),
        (
            "disk_size_gib",
            json!(16_385),
            "disk_size_gib",
            "outside 1..=16384",
        ),
        ("disk_type", json!("gp9"), "disk_type", "is not one of"),
        (
            "device",
            json!("/dev/sda"),
            "device",
            "is not a data volume's device",
        ),
        ("generations", json!(0), "generations", "outside 1..=10"),
        ("generations", json!(11), "generations", "outside 1..=10"),
        ("instance_wait_s", json!(0), "instance_wait_s", "at least 1"),
        (
            "volume_wait_s",
            json!(TIMEOUT_S_MAX + 1),
            "volume_wait_s",
            "more than",
        ),
        (
            "attach_wait_s",
            json!(WRAPPING_S),
            "attach_wait_s",
            "more than",
        ),
    ];
    for (key, value, path, why) in cases {
        let input = with(machine.clone(), &[key], value);
        let (field, reason) = invalid(engine.start_json(MachineWithDisk::NAME, "m", input).await);
        assert_eq!(field, path, "{key}");
        assert!(reason.contains(why), "{key}: {reason}");
    }
    let (field, _) = invalid(
        engine
            .start_json(Sweep::NAME, "sweep", json!({"wait_s": 0}))
            .await,
    );
    assert_eq!(field, "wait_s");
    assert!(engine.list().await.unwrap().is_empty(), "nothing stored");

    let mut input = sample::machine("web-1");
    input.disk_size_gib = keel_workflows::ec2::DISK_GIB_MAX;
    input.generations = Some(keel_workflows::ec2::GENERATIONS_MAX);
    input.instance_wait_s = Some(TIMEOUT_S_MAX);
    input.device = Some("/dev/xvdp".into());
    assert_eq!(MachineWithDisk::validate(&input), Ok(()));
    assert_eq!(keel_workflows::ec2::WAIT_S_MAX, TIMEOUT_S_MAX);
    engine.shutdown().await;
}

/// A delivery's input is checked field by field, naming the field (nested ones by their
/// path): the bucket, the key, the digest, the staging directory, the name (or the key's last
/// segment standing for it), the server's host, port, user, known-hosts and credential paths,
/// the remote directory and the parts. Nothing is stored; the sample is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_input_is_checked_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(dir.path()).await;
    let delivery =
        serde_json::to_value(sample::delivery("drop", "in/report.csv", 22, "keel")).unwrap();
    let cases: [(&[&str], Value, &str, &str); 16] = [
        (&["bucket"], json!("Drop"), "bucket", "not a bucket name"),
        (&["bucket"], json!("d"), "bucket", "not a bucket name"),
        (&["key"], json!(""), "key", "1 to 1024 bytes"),
        (&["key"], json!("in/"), "key", "not a file name"),
        (&["key"], json!("in/.hidden"), "key", "not a file name"),
        (&["sha256"], json!("abc"), "sha256", "not 64 hex digits"),
        (
            &["staging_dir"],
            json!("staging"),
            "staging_dir",
            "absolute path",
        ),
        (&["name"], json!("a/b"), "name", "not a file name"),
        (
            &["name"],
            json!("report.csv.sha256"),
            "name",
            "not a file name",
        ),
        (
            &["server", "host"],
            json!(""),
            "server.host",
            "1 to 253 bytes",
        ),
        (
            &["server", "port"],
            json!(0),
            "server.port",
            "must not be 0",
        ),
        (
            &["server", "user"],
            json!(""),
            "server.user",
            "1 to 256 bytes",
        ),
        (
            &["server", "known_hosts"],
            json!("known_hosts"),
            "server.known_hosts",
            "absolute path",
        ),
        (
            &["server", "credential", "path"],
            json!("id"),
            "server.credential.path",
            "absolute path",
        ),
        (
            &["remote_dir"],
            json!("inbox"),
            "remote_dir",
            "absolute path",
        ),
        (&["parts"], json!(17), "parts", "outside 1..=16"),
    ];
    for (path, value, want, why) in cases {
        let input = with(delivery.clone(), path, value);
        let (field, reason) = invalid(engine.start_json(S3ToSftp::NAME, "d", input).await);
        assert_eq!(field, want, "{path:?}");
        assert!(reason.contains(why), "{path:?}: {reason}");
    }
    let (field, _) = invalid(
        engine
            .start_json(
                S3ToSftp::NAME,
                "d",
                with(delivery.clone(), &["server", "password"], json!("x")),
            )
            .await,
    );
    assert_eq!(field, "server.password");
    assert!(engine.list().await.unwrap().is_empty(), "nothing stored");
    assert_eq!(
        S3ToSftp::validate(&sample::delivery("drop", "report.csv", 2222, "keel")),
        Ok(())
    );
    engine.shutdown().await;
}
