//! The provisioning workflows under SIGKILL: a worker child process provisions a Greengrass
//! core with client devices, a fleet, and a core whose deployment fails late, through the
//! fault proxy (lost responses, throttling, latency, create lag, IAM propagation); it is
//! killed at seeded random moments and restarted until every run has ended. The ground
//! truth is moto's own state, read directly: every completed run's resources exist exactly
//! once and carry its idempotency key, the compensated run left nothing, and nothing exists
//! that no run owns.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use keel_engine::Engine;
use keel_engine::{IdempotencyKey, OperationIndex, RunId, RunRecord, RunStatus};
use keel_steps::aws::x509::KeyStore;
use keel_steps::aws::{AwsClients, KEY_ATTRIBUTE, KEY_TAG};
use keel_testkit::check::read_store;
use keel_testkit::crash::{is_child, path_env, ChildSpec, Ending};
use keel_testkit::inventory::Inventory;
use keel_testkit::moto::TestAccount;
use keel_testkit::proxy::{Dist, Fault, FaultProxy, FaultRule, LagRule, Rules};
use keel_workflows::fleet::OnboardFleet;
use keel_workflows::greengrass::{CoreOutput, ProvisionCore};
use keel_workflows::iam::ServiceRoleOutput;
use keel_workflows::iot::DeviceOutput;
use keel_workflows::sample::{core, fleet};
use keel_workflows::KeelWorkflows;
use rand::{Rng, SeedableRng};

const CHILD_TIMEOUT: Duration = Duration::from_secs(300);
/// Kills across the test; scenarios are added until it is reached.
const KILLS: u32 = 50;
/// Kills in one scenario before it is left to finish.
const KILLS_PER_SCENARIO: u32 = 30;
const PLANT: &str = "plant";
const CLIENTS: usize = 3;
const FLEET: &str = "fleet";
const FLEET_DEVICES: usize = 8;
/// Its deployment fails (by group name, in the proxy), late: after the role, the core, the
/// client devices, the definitions, the group and its version exist.
const DOOMED: &str = "doomed";

/// The worker: starts the three runs (idempotently: a restarted child starts the same ids,
/// which returns the existing runs) and waits until each has ended.
fn child_main() {
    let var = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name}"));
    let runtime = keel_testkit::crash::runtime();
    runtime.block_on(async {
        let sdk = TestAccount::child_sdk_config().await;
        let engine = Engine::builder(var("KEEL_DATA_DIR"))
            .provisioning_workflows()
            // The test's kills, not the run's code, end these loads: none may poison a run
            // (tests/crash_poison.rs tests poisoning).
            .poison_after_loads(u32::MAX)
            .resource(AwsClients::new(&sdk))
            .resource(KeyStore::new(var("KEEL_TEST_KEYS")))
            .open()
            .await
            .unwrap();
        let plant = engine
            .start::<ProvisionCore>(PLANT, core(PLANT, CLIENTS))
            .await
            .unwrap();
        let fleet = engine
            .start::<OnboardFleet>(FLEET, fleet(FLEET, FLEET_DEVICES, 4))
            .await
            .unwrap();
        let doomed = engine
            .start::<ProvisionCore>(DOOMED, core(DOOMED, 2))
            .await
            .unwrap();
        // Outcomes are checked by the parent against moto.
        let _ = plant.result().await;
        let _ = fleet.result().await;
        let _ = doomed.result().await;
        engine.shutdown().await;
    });
}

fn rules(seed: u64) -> Rules {
    let mut rules = Rules::seeded(seed)
        .fault(FaultRule::new(Fault::LostResponse).probability(0.1))
        .fault(FaultRule::new(Fault::Throttle).probability(0.1))
        .fault(
            FaultRule::new(Fault::Latency {
                delay: Dist::LogNormal {
                    median_ms: 5,
                    sigma: 1.0,
                },
            })
            .probability(0.5),
        )
        .lag(LagRule::after_create("iot", 100));
    rules.assume_role.propagation = Dist::Uniform {
        min_ms: 200,
        max_ms: 1_500,
    };
    rules.deployments.fail_groups_named = vec![DOOMED.into()];
    rules
}

fn key(run: &RunId, step: u32) -> String {
    IdempotencyKey::for_step(run, OperationIndex(step)).to_string()
}

/// The completed runs of `workflow`, with their outputs.
fn completed<T: serde::de::DeserializeOwned>(
    runs: &[RunRecord],
    workflow: &str,
) -> Vec<(RunId, T)> {
    runs.iter()
        .filter(|r| r.workflow == workflow && r.status == RunStatus::Completed)
        .map(|r| {
            let output = r.output.clone().expect("a completed run's output");
            (r.id.clone(), serde_json::from_value(output).unwrap())
        })
        .collect()
}

/// The ground truth: the runs' outcomes from the journal, the resources from moto, the key
/// files on disk.
async fn verify(scenario: u64, dir: &Path, direct: &aws_config::SdkConfig) {
    let runs = read_store(&dir.join("data"), async |engine| {
        engine.list().await.unwrap()
    })
    .await;
    let listing: Vec<String> = runs
        .iter()
        .map(|r| format!("{} {} {:?} {:?}", r.id, r.workflow, r.status, r.error))
        .collect();
    let ctx = format!("scenario {scenario}: {listing:#?}");
    let status = |id: &str| runs.iter().find(|r| r.id.as_str() == id).map(|r| r.status);
    assert_eq!(status(PLANT), Some(RunStatus::Completed), "{ctx}");
    assert_eq!(status(FLEET), Some(RunStatus::Completed), "{ctx}");
    assert_eq!(status(DOOMED), Some(RunStatus::Compensated), "{ctx}");
    // Every child ended with its parent: a completed parent's children completed, the
    // compensated parent's children were compensated.
    for run in &runs {
        let root = run.id.as_str().split('/').next().unwrap();
        let expected = if root == DOOMED {
            RunStatus::Compensated
        } else {
            RunStatus::Completed
        };
        assert_eq!(run.status, expected, "{} in {ctx}", run.id);
    }

    let truth = Inventory::read(direct).await.unwrap();
    let summary = truth.summary();
    // Devices: 1 core + the clients of the plant, and the fleet; nothing of the doomed core.
    let devices: Vec<(RunId, DeviceOutput)> = completed(&runs, "iot.onboard-device");
    assert_eq!(devices.len(), 1 + CLIENTS + FLEET_DEVICES, "{ctx}");
    let owned: BTreeSet<&str> = devices.iter().map(|(_, d)| d.thing_name.as_str()).collect();
    let present: BTreeSet<&str> = truth.things.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(present, owned, "scenario {scenario}: things\n{summary}");
    assert_eq!(truth.certificates.len(), devices.len(), "{summary}");
    assert_eq!(truth.iot_policies.len(), devices.len(), "{summary}");
    for (run, device) in &devices {
        let thing = truth.thing(&device.thing_name).unwrap();
        assert_eq!(
            thing.attributes.get(KEY_ATTRIBUTE),
            Some(&key(run, 0)),
            "{run}"
        );
        assert_eq!(
            thing.principals,
            vec![device.certificate_arn.clone()],
            "{run}"
        );
        let certificate = truth
            .certificates
            .iter()
            .find(|c| c.arn == device.certificate_arn)
            .unwrap_or_else(|| panic!("{run}: certificate\n{summary}"));
        assert_eq!(certificate.status, "ACTIVE", "{run}");
        assert_eq!(certificate.policies.len(), 1, "{run}: {summary}");
        let policy = &certificate.policies[0];
        // Steps: 0 thing, 1 key material, 2 certificate, 3 policy.
        assert!(policy.ends_with(&key(run, 3)), "{run}: policy {policy}");
        assert!(device.key_file.exists(), "{run}: {:?}", device.key_file);
    }
    // Key material: a key and a certificate file per completed device, nothing else.
    let files = std::fs::read_dir(dir.join("keys")).unwrap().count();
    assert_eq!(files, 2 * devices.len(), "scenario {scenario}: key files");

    // The plant's role, group and definitions, once each; none of the doomed core's.
    let roles: Vec<(RunId, ServiceRoleOutput)> = completed(&runs, "iam.service-role");
    assert_eq!(roles.len(), 1, "{ctx}");
    let (role_run, role) = &roles[0];
    assert_eq!(truth.roles.len(), 1, "scenario {scenario}: {summary}");
    assert_eq!(truth.roles[0].arn, role.arn);
    assert_eq!(truth.roles[0].tags.get(KEY_TAG), Some(&key(role_run, 0)));
    assert_eq!(truth.roles[0].attached_policies.len(), 1);
    assert!(truth.iam_policies.is_empty(), "{summary}");
    let cores: Vec<(RunId, CoreOutput)> = completed(&runs, "greengrass.provision-core");
    assert_eq!(cores.len(), 1, "{ctx}");
    let (_, plant) = &cores[0];
    assert_eq!(truth.groups.len(), 1, "scenario {scenario}: {summary}");
    let group = &truth.groups[0];
    assert_eq!(group.id, plant.group_id);
    assert_eq!(group.role_arn.as_deref(), Some(role.arn.as_str()));
    assert_eq!(group.deployments, vec![plant.deployment_id.clone()]);
    assert_eq!(truth.core_definitions.len(), 1, "{summary}");
    assert_eq!(truth.device_definitions.len(), 1, "{summary}");
}

/// Kills the worker at seeded random moments (at least [`KILLS`] across scenarios, each
/// scenario a fresh account and proxy seed) and restarts it until its runs have ended; then
/// checks the journal and moto against each other.
#[test]
fn killed_at_random_moments_completed_runs_own_their_resources_once_and_compensated_ones_nothing() {
    const NAME: &str =
        "killed_at_random_moments_completed_runs_own_their_resources_once_and_compensated_ones_nothing";
    if is_child() {
        return child_main();
    }
    keel_testkit::init_tracing();
    let runtime = keel_testkit::crash::runtime();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x6b65_656c);
    let mut kills = 0;
    let mut scenario = 0;
    while kills < KILLS {
        assert!(scenario < 8, "only {kills} kills in {scenario} scenarios");
        let account = TestAccount::fresh().expect("moto's server (see docs/testing.md)");
        let proxy = FaultProxy::start(&account.endpoint, rules(scenario)).expect("proxy starts");
        let dir = tempfile::tempdir().unwrap();
        let mut env = vec![
            ("KEEL_DATA_DIR".into(), path_env(dir.path(), "data")),
            ("KEEL_TEST_KEYS".into(), path_env(dir.path(), "keys")),
        ];
        env.extend(account.child_env(&proxy.endpoint()));
        let spec = ChildSpec {
            test_name: NAME,
            env,
        };
        let mut in_scenario = 0;
        let mut finished = false;
        while !finished && in_scenario < KILLS_PER_SCENARIO {
            let delay = Duration::from_millis(rng.gen_range(200..2_500));
            match spec.run_and_kill_after(delay, CHILD_TIMEOUT) {
                Ending::Killed => in_scenario += 1,
                Ending::Finished => finished = true,
                Ending::Aborted => panic!("the worker child aborted"),
            }
        }
        if !finished {
            spec.run_until_finished(CHILD_TIMEOUT);
        }
        tracing::info!(scenario, kills = in_scenario, "scenario finished");
        runtime.block_on(async {
            verify(scenario, dir.path(), &account.sdk_config().await).await;
        });
        kills += in_scenario;
        scenario += 1;
    }
}
