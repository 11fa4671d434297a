//! `ec2.machine-with-disk` and `ec2.sweep` against moto through the fault proxy (which plays
//! EC2's client tokens, late and stuck instances, flapping reads and volume lag), with moto's
//! own state read directly as the ground truth.

use keel_engine::RunStatus;
use keel_steps::aws::ec2::TO_BE_DELETED_TAG;
use keel_steps::aws::KEY_TAG;
use keel_testkit::proxy::{Applied, Dist, Ec2Rule, Fault, FaultRule, LagRule, Rules};
use keel_workflows::ec2::{Machine, MachineWithDisk, Sweep, SweepInput, MACHINE_TAG};
use keel_workflows::sample;

mod common;
use common::env;

/// Under 30% lost responses and 20% throttling on every EC2 call, with instances that start
/// late and flap and volumes that read "not found" after their create, each machine has one
/// instance and one disk, attached at its device; nothing else lives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_machine_and_disk_exists_once_under_lost_responses_and_throttling() {
    // The pending and lag windows span several polls each (instances poll at once, then
    // after about 1 s, 2.5 s and 4.75 s; volumes at once, then after 250, 625 and 1,190 ms),
    // so that even on a slow machine, where a step's sync can outlast a window of a few
    // hundred ms, three or more reads of each resource fall inside them and one of all those
    // escapes the 44% of calls that are faulted (all faulted: under one in a thousand).
    let rules = Rules::seeded(27)
        .fault(
            FaultRule::new(Fault::LostResponse)
                .service("ec2")
                .probability(0.3),
        )
        .fault(
            FaultRule::new(Fault::Throttle)
                .service("ec2")
                .probability(0.2),
        )
        .ec2(Ec2Rule {
            pending: Dist::Uniform {
                min_ms: 3_500,
                max_ms: 4_500,
            },
            flap_missing_probability: 0.3,
            flap_for: Dist::fixed(2_000),
            ..Ec2Rule::default()
        })
        .lag(LagRule::after_create("ec2", 1_500));
    let env = env(rules).await;
    let names = ["web-0", "web-1", "web-2"];
    let mut runs = Vec::new();
    for name in names {
        runs.push(
            env.engine
                .start::<MachineWithDisk>(name, sample::machine(name))
                .await
                .unwrap(),
        );
    }
    let mut machines: Vec<Machine> = Vec::new();
    for run in runs {
        machines.push(run.result().await.unwrap());
    }
    let truth = keel_testkit::inventory::Inventory::read(&env.direct)
        .await
        .unwrap();
    assert_eq!(truth.instances.len(), names.len(), "{}", truth.summary());
    for (name, machine) in names.iter().zip(&machines) {
        let instances = truth.instances_tagged("Name", name);
        assert_eq!(instances.len(), 1, "{name}: {}", truth.summary());
        assert_eq!(instances[0].id, machine.instance_id);
        assert!(instances[0].tags.contains_key(KEY_TAG), "{name}");
        assert_eq!(machine.instance_generation, 0, "{name}");
        let disks = truth.volumes_tagged("Name", name);
        assert_eq!(disks.len(), 1, "{name}: {:?}", truth.volumes);
        assert_eq!(disks[0].id, machine.volume_id);
        assert_eq!(disks[0].size_gib, 8);
        assert_eq!(
            disks[0].attached_to,
            vec![(machine.instance_id.clone(), "/dev/sdf".to_string())]
        );
        assert_eq!(machine.device, "/dev/sdf");
    }
    let faults: Vec<_> = env.proxy.faults().into_iter().map(|(_, f)| f).collect();
    for expected in [
        Applied::LostResponse,
        Applied::Throttled,
        Applied::InstancePending,
        Applied::LagNotFound,
    ] {
        assert!(faults.contains(&expected), "{expected:?} in {faults:?}");
    }
}

/// An instance that never starts is given up at its deadline: compensated by the fast path
/// (tagged `keel:to-be-deleted`, terminated, not waited for) and replaced by a new
/// generation, which is the machine; moto holds the abandoned one terminated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_instance_is_replaced_and_the_abandoned_one_terminated() {
    let rules = Rules::seeded(4).ec2(Ec2Rule {
        stuck_tagged: vec!["stuck generation 0".into()],
        ..Ec2Rule::default()
    });
    let env = env(rules).await;
    let mut input = sample::machine("stuck");
    input.instance_wait_s = Some(1);
    let machine = env
        .engine
        .start::<MachineWithDisk>("stuck", input)
        .await
        .unwrap()
        .result()
        .await
        .unwrap();
    assert_eq!(machine.instance_generation, 1);
    assert_eq!(machine.volume_generation, 0);
    let truth = keel_testkit::inventory::Inventory::read(&env.direct)
        .await
        .unwrap();
    let live = truth.instances_tagged("Name", "stuck");
    assert_eq!(live.len(), 1, "{}", truth.summary());
    assert_eq!(live[0].id, machine.instance_id);
    assert_eq!(
        live[0].tags.get(MACHINE_TAG).map(String::as_str),
        Some("stuck generation 1")
    );
    assert_eq!(truth.terminated_instances.len(), 1, "{}", truth.summary());
    let abandoned = &truth.terminated_instances[0];
    assert_eq!(
        abandoned.tags.get(MACHINE_TAG).map(String::as_str),
        Some("stuck generation 0")
    );
    assert_eq!(
        abandoned.tags.get(TO_BE_DELETED_TAG),
        abandoned.tags.get(KEY_TAG),
        "tagged by its own step's compensation"
    );
    let history = env.engine.history("stuck").await.unwrap();
    assert_eq!(history.run.status, RunStatus::Completed);
}

/// The sweep terminates what carries `keel:to-be-deleted` and is not terminated (as left by
/// a fast-path compensation whose terminate did not take), waits until it reads terminated,
/// and leaves every other instance alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweep_terminates_what_the_fast_path_left_and_nothing_else() {
    let env = env(Rules::seeded(6)).await;
    let ec2 = aws_sdk_ec2::Client::new(&env.direct);
    let launch = |tags: &[(&str, &str)]| {
        let mut spec = aws_sdk_ec2::types::TagSpecification::builder()
            .resource_type(aws_sdk_ec2::types::ResourceType::Instance);
        for (k, v) in tags {
            spec = spec.tags(aws_sdk_ec2::types::Tag::builder().key(*k).value(*v).build());
        }
        ec2.run_instances()
            .image_id(sample::MACHINE_IMAGE)
            .min_count(1)
            .max_count(1)
            .tag_specifications(spec.build())
            .send()
    };
    let left = launch(&[(TO_BE_DELETED_TAG, "some-key")]).await.unwrap();
    let left = left.instances()[0].instance_id().unwrap().to_string();
    let kept = launch(&[("Name", "kept")]).await.unwrap();
    let kept = kept.instances()[0].instance_id().unwrap().to_string();

    let swept = env
        .engine
        .start::<Sweep>("sweep", SweepInput::default())
        .await
        .unwrap()
        .result()
        .await
        .unwrap();
    assert_eq!(swept.terminated, vec![left.clone()]);
    let truth = keel_testkit::inventory::Inventory::read(&env.direct)
        .await
        .unwrap();
    let live: Vec<_> = truth.instances.iter().map(|i| i.id.clone()).collect();
    assert_eq!(live, vec![kept]);
    assert!(truth.terminated_instances.iter().any(|i| i.id == left));

    // A second sweep finds nothing.
    let again = env
        .engine
        .start::<Sweep>("sweep-again", SweepInput::default())
        .await
        .unwrap()
        .result()
        .await
        .unwrap();
    assert!(again.terminated.is_empty(), "{again:?}");
}
