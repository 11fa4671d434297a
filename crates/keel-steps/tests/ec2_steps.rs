//! The EC2 steps, run by the real engine through the fault proxy (which plays EC2's client
//! tokens, pending and flapping instances and volume lag where moto does not) against moto's
//! server, with moto's own state read directly as the ground truth.

use std::time::Duration;

use keel_engine::{Ctx, EngineBuilder, RunStatus, WaitPolicy, Workflow, WorkflowError};
use keel_steps::aws::ec2::{
    AttachVolume, CreateVolume, InstanceRunning, RunInstance, VolumeAttached, VolumeAvailable,
    TO_BE_DELETED_TAG,
};
use keel_steps::aws::{AwsSteps, KEY_TAG};
use keel_testkit::proxy::{Applied, Dist, Ec2Rule, Fault, FaultRule, LagRule, Rules};
use serde::{Deserialize, Serialize};

mod common;
use common::{hostile, key, Env};

const IMAGE: &str = "ami-760aaa0f";

#[derive(Clone, Debug, Serialize, Deserialize)]
struct LaunchInput {
    instance_type: String,
}

/// One instance, nothing else: step 0.
struct Launch;

impl Workflow for Launch {
    const NAME: &'static str = "test.ec2-launch";
    type Input = LaunchInput;
    type Output = String;

    async fn run(ctx: &mut Ctx, input: LaunchInput) -> Result<String, WorkflowError> {
        let instance = ctx
            .step(RunInstance {
                image_id: IMAGE.into(),
                instance_type: input.instance_type,
                availability_zone: None,
                tags: Default::default(),
            })
            .await?;
        Ok(instance.instance_id)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct DiskInput {
    /// Fail after everything was made and attached (the run compensates it all).
    fail_at_end: bool,
}

/// A machine with a disk, by the steps: 0 instance, 1 wait running, 2 volume, 3 wait
/// available, 4 attach, 5 wait attached.
struct Disk;

impl Workflow for Disk {
    const NAME: &'static str = "test.ec2-disk";
    type Input = DiskInput;
    type Output = (String, String);

    async fn run(ctx: &mut Ctx, input: DiskInput) -> Result<(String, String), WorkflowError> {
        let policy = WaitPolicy::every(Duration::from_millis(100), Duration::from_secs(60))
            .growth(1.0)
            .confirmations(2);
        let instance = ctx
            .step(RunInstance {
                image_id: IMAGE.into(),
                instance_type: "t3.micro".into(),
                availability_zone: None,
                tags: Default::default(),
            })
            .await?;
        ctx.wait(
            InstanceRunning {
                instance_id: instance.instance_id.clone(),
            },
            policy.clone(),
        )
        .await?;
        let volume = ctx
            .step(CreateVolume {
                availability_zone: instance.availability_zone.clone(),
                size_gib: 4,
                volume_type: Some("gp3".into()),
                tags: Default::default(),
            })
            .await?;
        ctx.wait(
            VolumeAvailable {
                volume_id: volume.volume_id.clone(),
            },
            policy.clone(),
        )
        .await?;
        ctx.step(AttachVolume {
            volume_id: volume.volume_id.clone(),
            instance_id: instance.instance_id.clone(),
            device: "/dev/sdf".into(),
        })
        .await?;
        ctx.wait(
            VolumeAttached {
                volume_id: volume.volume_id.clone(),
                instance_id: instance.instance_id.clone(),
            },
            policy,
        )
        .await?;
        if input.fail_at_end {
            return Err(WorkflowError::failed(
                "failed on purpose after the disk was attached",
            ));
        }
        Ok((instance.instance_id, volume.volume_id))
    }
}

fn register(builder: EngineBuilder) -> EngineBuilder {
    builder.workflow::<Launch>().workflow::<Disk>()
}

/// EC2's `ClientToken` contract through the steps: two installations that reuse a run id
/// (so the step key and the token) get one instance when they ask for the same thing, and a
/// third is refused, naming both, when it asks for another type; a fourth that meets the
/// conflict on a retry (by tag) is refused too, and its compensation in doubt leaves the
/// instance alone; moto holds one instance, never tagged to be deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_key_adopts_the_same_instance_and_other_parameters_are_refused_naming_both() {
    let env = Env::new(Rules::seeded(1), register).await;
    let micro = LaunchInput {
        instance_type: "t3.micro".into(),
    };
    let (first, status) = env.run::<Launch>("shared", micro.clone()).await;
    assert_eq!(status, RunStatus::Completed);
    let first = first.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let again = env.another_engine(dir.path(), register).await;
    let second = again
        .start::<Launch>("shared", micro)
        .await
        .unwrap()
        .result()
        .await
        .unwrap();
    assert_eq!(second, first, "the same token returns the same instance");
    again.shutdown().await;

    let dir = tempfile::tempdir().unwrap();
    let other = env.another_engine(dir.path(), register).await;
    let refused = other
        .start::<Launch>(
            "shared",
            LaunchInput {
                instance_type: "t3.small".into(),
            },
        )
        .await
        .unwrap()
        .result()
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains("conflict"), "{refused}");
    assert!(refused.contains(&first), "names the instance: {refused}");
    assert!(
        refused.contains("t3.micro") && refused.contains("t3.small"),
        "{refused}"
    );
    other.shutdown().await;

    // A fourth, whose first attempt is throttled past the SDK's tries: its second attempt
    // finds the key's instance by tag with the other type, refuses it, and its compensation
    // (in doubt: no output) leaves that instance alone, since it is not what it would make.
    env.proxy
        .set_rules(
            Rules::seeded(1).fault(
                FaultRule::new(Fault::Throttle)
                    .operation("RunInstances")
                    .limit(3),
            ),
        )
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let fourth = env.another_engine(dir.path(), register).await;
    let refused = fourth
        .start::<Launch>(
            "shared",
            LaunchInput {
                instance_type: "t3.small".into(),
            },
        )
        .await
        .unwrap()
        .result()
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains("conflict"), "{refused}");
    let history = fourth.history("shared").await.unwrap();
    assert_eq!(history.run.status, RunStatus::Compensated, "{refused}");
    fourth.shutdown().await;

    let truth = env.truth().await;
    assert_eq!(truth.instances.len(), 1, "{}", truth.summary());
    assert_eq!(truth.instances[0].id, first);
    assert!(
        !truth.instances[0].tags.contains_key(TO_BE_DELETED_TAG),
        "{:?}",
        truth.instances[0].tags
    );
    assert_eq!(
        truth.instances[0].tags.get(KEY_TAG),
        Some(&key("shared", 0))
    );
    let faults: Vec<_> = env.proxy.faults().into_iter().map(|(_, f)| f).collect();
    assert!(faults.contains(&Applied::ClientTokenReplayed), "{faults:?}");
    assert!(faults.contains(&Applied::ClientTokenMismatch), "{faults:?}");
}

/// A flapping instance (running, missing, running) never counts as ready by accident: the
/// wait ends only after two `running` reads in a row, as the proxy's records show.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_instance_is_ready_only_after_two_running_reads_in_a_row() {
    let rules = Rules::seeded(5).ec2(Ec2Rule {
        flap_missing_probability: 0.8,
        flap_for: Dist::fixed(60_000),
        ..Ec2Rule::default()
    });
    let env = Env::new(rules, register).await;
    let (made, status) = env
        .run::<Disk>("flap", DiskInput { fail_at_end: false })
        .await;
    assert_eq!(status, RunStatus::Completed, "{made:?}");
    let reads: Vec<_> = env
        .proxy
        .requests_for("DescribeInstances")
        .into_iter()
        .filter(|r| r.status.is_some())
        .collect();
    let missing = reads
        .iter()
        .filter(|r| r.fault == Some(Applied::InstanceMissing))
        .count();
    assert!(missing > 0, "the instance never flapped: {reads:?}");
    // The wait's last two polls are the two confirmations: both answered for real.
    let last_two = &reads[reads.len() - 2..];
    assert!(
        last_two
            .iter()
            .all(|r| r.fault.is_none() && r.status == Some(200)),
        "{last_two:?}"
    );
}

/// A run that fails after its disk is attached is compensated: detached, the volume deleted,
/// the instance tagged `keel:to-be-deleted` and terminated without waiting for it (no read of
/// the instance after the terminate); moto holds nothing live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_run_detaches_deletes_and_terminates_without_waiting() {
    let env = Env::new(hostile(8), register).await;
    let (result, status) = env
        .run::<Disk>("undone", DiskInput { fail_at_end: true })
        .await;
    assert_eq!(status, RunStatus::Compensated, "{result:?}");
    let truth = env.truth().await;
    assert!(truth.is_empty(), "{}", truth.summary());
    assert_eq!(truth.terminated_instances.len(), 1, "{}", truth.summary());
    let terminated = &truth.terminated_instances[0];
    assert_eq!(
        terminated.tags.get(TO_BE_DELETED_TAG),
        Some(&key("undone", 0))
    );
    let requests = env.proxy.requests();
    let last_terminate = requests
        .iter()
        .rposition(|r| r.operation == "TerminateInstances")
        .expect("a terminate");
    assert!(
        requests[last_terminate..]
            .iter()
            .all(|r| r.operation != "DescribeInstances"),
        "the compensation waited for the termination"
    );
}

/// "Not found" for a volume right after its create is lag: the attach is retried until it
/// takes. A volume attached to another instance is a conflict that names it, and changes
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_retries_lag_and_refuses_a_volume_attached_elsewhere() {
    let env = Env::new(
        Rules::seeded(3).lag(LagRule::after_create("ec2", 1_500)),
        register,
    )
    .await;
    let (made, status) = env
        .run::<Disk>("first", DiskInput { fail_at_end: false })
        .await;
    assert_eq!(status, RunStatus::Completed, "{made:?}");
    let (instance, volume) = made.unwrap();
    let lagged = env
        .proxy
        .faults()
        .into_iter()
        .filter(|(op, f)| op.starts_with("Describe") && *f == Applied::LagNotFound)
        .count();
    assert!(lagged > 0, "the volume never lagged");

    let (other, status) = env
        .run::<Launch>(
            "other",
            LaunchInput {
                instance_type: "t3.micro".into(),
            },
        )
        .await;
    assert_eq!(status, RunStatus::Completed);
    let other = other.unwrap();
    // Attach the first run's volume to the other instance, as a step of a third run.
    struct Steal;
    impl Workflow for Steal {
        const NAME: &'static str = "test.ec2-steal";
        type Input = (String, String);
        type Output = ();
        async fn run(
            ctx: &mut Ctx,
            (volume, instance): (String, String),
        ) -> Result<(), WorkflowError> {
            ctx.step(AttachVolume {
                volume_id: volume,
                instance_id: instance,
                device: "/dev/sdg".into(),
            })
            .await?;
            Ok(())
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let thief = env
        .another_engine(dir.path(), |b| b.workflow::<Steal>())
        .await;
    let refused = thief
        .start::<Steal>("steal", (volume.clone(), other.clone()))
        .await
        .unwrap()
        .result()
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains("conflict"), "{refused}");
    assert!(refused.contains(&instance), "names the owner: {refused}");
    thief.shutdown().await;
    let truth = env.truth().await;
    let found = truth.volumes.iter().find(|v| v.id == volume).unwrap();
    assert_eq!(found.attached_to, vec![(instance, "/dev/sdf".to_string())]);
}

const CHILD_TIMEOUT: Duration = Duration::from_secs(180);
const KEPT: &str = "kept";
const UNDONE: &str = "undone";

/// The crash test's child: start both runs (idempotently: a restarted child starts the same
/// ids) and wait for both.
fn child_main() {
    let var = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name}"));
    let runtime = keel_testkit::crash::runtime();
    runtime.block_on(async {
        let sdk = keel_testkit::moto::TestAccount::child_sdk_config().await;
        let engine = keel_engine::Engine::builder(var("KEEL_DATA_DIR"))
            .workflow::<Disk>()
            .aws_steps()
            .resource(keel_steps::aws::AwsClients::new(&sdk))
            .open()
            .await
            .unwrap();
        let mut runs = Vec::new();
        for run in [KEPT, UNDONE] {
            let input = DiskInput {
                fail_at_end: run == UNDONE,
            };
            runs.push(engine.start::<Disk>(run, input).await.unwrap());
        }
        for run in runs {
            let _ = run.result().await;
        }
        engine.shutdown().await;
    });
}

/// Kills the child with SIGKILL at every named crash point the flow reaches (its first hit,
/// then a seeded later one), under 10% lost responses and 10% throttling; after it finishes,
/// the completed run has one instance and one disk attached to it, and the compensated run
/// left nothing live (its instance terminated, tagged by its own step).
#[test]
fn killed_at_every_crash_point_each_instance_and_disk_exists_once_or_not_at_all() {
    use keel_testkit::crash::{is_child, path_env, ChildSpec};
    use rand::{Rng, SeedableRng};
    const NAME: &str =
        "killed_at_every_crash_point_each_instance_and_disk_exists_once_or_not_at_all";
    if is_child() {
        return child_main();
    }
    keel_testkit::init_tracing();
    let runtime = keel_testkit::crash::runtime();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x0065_6332);
    let mut kills = 0;
    // No sleeps, no child runs and no events in the flow.
    let points: Vec<_> = keel_testkit::store::crash_points()
        .into_iter()
        .filter(|p| {
            !["timer.", "child.", "event."]
                .iter()
                .any(|kind| p.starts_with(kind))
        })
        .collect();
    for (i, point) in points.iter().enumerate() {
        let account =
            keel_testkit::moto::TestAccount::fresh().expect("moto's server (see docs/testing.md)");
        // The first six attaches are throttled: the two runs' first attach attempts share
        // them, and at least one gets all three of the SDK's tries refused, so every child
        // meets a step failure whatever the random draws; the first launch and the first volume lose
        // their answers, so the client token answers a retry.
        let rules = Rules::seeded(i as u64)
            .fault(
                FaultRule::new(Fault::Throttle)
                    .operation("AttachVolume")
                    .limit(6),
            )
            .fault(FaultRule::new(Fault::LostResponse).probability(0.1))
            .fault(FaultRule::new(Fault::Throttle).probability(0.1));
        let rules = common::first_response_lost(rules, &["RunInstances", "CreateVolume"]);
        let proxy =
            keel_testkit::proxy::FaultProxy::start(&account.endpoint, rules).expect("proxy starts");
        let dir = tempfile::tempdir().unwrap();
        let mut env = vec![("KEEL_DATA_DIR".into(), path_env(dir.path(), "data"))];
        env.extend(account.child_env(&proxy.endpoint()));
        let spec = ChildSpec {
            test_name: NAME,
            env,
        };
        kills +=
            spec.kill_at_first_and_later_hit(point, rng.gen_range(1..6u32), CHILD_TIMEOUT, || {});
        spec.run_until_finished(CHILD_TIMEOUT);
        runtime.block_on(async {
            let (kept, undone) =
                keel_testkit::check::read_store(&dir.path().join("data"), async |engine| {
                    let kept = engine.history(KEPT).await.unwrap();
                    (kept, engine.history(UNDONE).await.unwrap())
                })
                .await;
            assert_eq!(kept.run.status, RunStatus::Completed, "{point}");
            assert_eq!(undone.run.status, RunStatus::Compensated, "{point}");
            let direct = account.sdk_config().await;
            let truth = keel_testkit::inventory::Inventory::read(&direct)
                .await
                .unwrap();
            assert_eq!(truth.instances.len(), 1, "{point}: {}", truth.summary());
            let instance = &truth.instances[0];
            assert_eq!(instance.tags.get(KEY_TAG), Some(&key(KEPT, 0)), "{point}");
            let data: Vec<_> = truth
                .volumes
                .iter()
                .filter(|v| v.tags.contains_key(KEY_TAG))
                .collect();
            assert_eq!(data.len(), 1, "{point}: {:?}", truth.volumes);
            assert_eq!(data[0].tags.get(KEY_TAG), Some(&key(KEPT, 2)), "{point}");
            assert_eq!(
                data[0].attached_to,
                vec![(instance.id.clone(), "/dev/sdf".to_string())],
                "{point}"
            );
            for gone in &truth.terminated_instances {
                assert_eq!(gone.tags.get(KEY_TAG), Some(&key(UNDONE, 0)), "{point}");
                assert_eq!(
                    gone.tags.get(TO_BE_DELETED_TAG),
                    Some(&key(UNDONE, 0)),
                    "{point}"
                );
            }
            assert_eq!(
                truth.terminated_instances.len(),
                1,
                "{point}: {}",
                truth.summary()
            );
        });
    }
    // Every point killed at its first hit (asserted above), and most at a later one too.
    assert!(kills > points.len(), "{kills} kills");
}
