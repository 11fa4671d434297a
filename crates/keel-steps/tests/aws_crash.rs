//! Crash tests of the AWS steps: a child process provisions a device and a Greengrass group
//! through the fault proxy against moto, and is killed with SIGKILL at every named crash
//! point; after restarts until it finishes, moto's own state (read directly) must hold each
//! resource of the completed run exactly once and nothing of the compensated run.

use std::path::Path;
use std::time::Duration;

use aws_sdk_greengrass::types::DeploymentType;
use keel_engine::{Ctx, Engine, RunStatus, WaitPolicy, Workflow, WorkflowError};
use keel_steps::aws::greengrass::{
    AssociateRole, CreateCoreDefinition, CreateDeployment, CreateGroup, CreateGroupVersion,
    DeploymentSucceeded, Member,
};
use keel_steps::aws::iam::CreateRole;
use keel_steps::aws::iot::{
    AttachThingPrincipal, CreateKeyMaterial, CreateThing, RegisterCertificate,
};
use keel_steps::aws::x509::KeyStore;
use keel_steps::aws::{AwsClients, AwsSteps, KEY_ATTRIBUTE, KEY_TAG};
use keel_testkit::check::read_store;
use keel_testkit::crash::{is_child, path_env, ChildSpec, Ending};
use keel_testkit::inventory::Inventory;
use keel_testkit::moto::TestAccount;
use keel_testkit::proxy::{Fault, FaultProxy, FaultRule, Rules};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

mod common;
use common::{first_response_lost, key};

const CHILD_TIMEOUT: Duration = Duration::from_secs(180);
const TRUST: &str = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"Service":"greengrass.amazonaws.com"},"Action":"sts:AssumeRole"}]}"#;
const KEPT: &str = "kept";
const UNDONE: &str = "undone";

#[derive(Clone, Debug, Serialize, Deserialize)]
struct CoreInput {
    name: String,
    fail_at_end: bool,
}

/// A Greengrass core's provisioning, one step of each kind that makes something:
/// 0 role, 1 thing, 2 key material, 3 certificate, 4 certificate on thing, 5 core definition,
/// 6 group, 7 role on group, 8 group version, 9 deployment, 10 wait for the deployment.
struct CoreFlow;

impl Workflow for CoreFlow {
    const NAME: &'static str = "test.greengrass-core";
    type Input = CoreInput;
    type Output = String;

    async fn run(ctx: &mut Ctx, input: CoreInput) -> Result<String, WorkflowError> {
        let role = ctx
            .step(CreateRole {
                name: format!("{}-role", input.name),
                trust_policy: TRUST.into(),
                tags: Default::default(),
                description: None,
            })
            .await?;
        let thing = ctx
            .step(CreateThing {
                name: format!("{}-core", input.name),
                attributes: Default::default(),
            })
            .await?;
        let material = ctx
            .step(CreateKeyMaterial {
                subject: thing.name.clone(),
            })
            .await?;
        let cert = ctx
            .step(RegisterCertificate {
                certificate_pem: material.certificate_pem,
            })
            .await?;
        ctx.step(AttachThingPrincipal {
            thing: thing.name.clone(),
            principal: cert.arn.clone(),
        })
        .await?;
        let cores = ctx
            .step(CreateCoreDefinition {
                prefix: format!("{}-cores", input.name),
                cores: vec![Member {
                    id: thing.name.clone(),
                    thing_arn: thing.arn.clone(),
                    certificate_arn: cert.arn.clone(),
                    sync_shadow: false,
                }],
            })
            .await?;
        let group = ctx
            .step(CreateGroup {
                prefix: input.name.clone(),
                tags: Default::default(),
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
                device_definition_version_arn: None,
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
        Ok(cert.id)
    }
}

fn input(run: &str) -> CoreInput {
    CoreInput {
        name: run.into(),
        fail_at_end: run == UNDONE,
    }
}

/// The child: start both runs (idempotently: a restarted child starts the same ids) and wait
/// for both.
fn child_main() {
    let var = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name}"));
    let dir = var("KEEL_DATA_DIR");
    let runtime = keel_testkit::crash::runtime();
    runtime.block_on(async {
        let sdk = TestAccount::child_sdk_config().await;
        let engine = Engine::builder(&dir)
            .workflow::<CoreFlow>()
            .aws_steps()
            .resource(AwsClients::new(&sdk))
            .resource(KeyStore::new(var("KEEL_TEST_KEYS")))
            .open()
            .await
            .unwrap();
        let mut runs = Vec::new();
        for run in [KEPT, UNDONE] {
            runs.push(engine.start::<CoreFlow>(run, input(run)).await.unwrap());
        }
        for run in runs {
            // The compensated run ends in an error; both outcomes are checked by the parent.
            let _ = run.result().await;
        }
        engine.shutdown().await;
    });
}

/// The ground truth: the journal's outcomes, moto's resources, the key files.
async fn verify(point: &str, dir: &Path, direct: &aws_config::SdkConfig) {
    let (kept, undone) = read_store(&dir.join("data"), async |engine| {
        let kept = engine.history(KEPT).await.unwrap();
        (kept, engine.history(UNDONE).await.unwrap())
    })
    .await;
    let journal = |h: &keel_engine::RunHistory| serde_json::to_string_pretty(&h.entries).unwrap();
    assert_eq!(
        kept.run.status,
        RunStatus::Completed,
        "{point}: {}",
        journal(&kept)
    );
    assert_eq!(
        undone.run.status,
        RunStatus::Compensated,
        "{point}: {}",
        journal(&undone)
    );

    let truth = Inventory::read(direct).await.unwrap();
    let summary = truth.summary();
    assert_eq!(truth.roles.len(), 1, "{point}: {summary}");
    assert_eq!(truth.roles[0].tags.get(KEY_TAG), Some(&key(KEPT, 0)));
    assert_eq!(truth.things.len(), 1, "{point}: {summary}");
    let thing = &truth.things[0];
    assert_eq!(thing.attributes.get(KEY_ATTRIBUTE), Some(&key(KEPT, 1)));
    assert_eq!(truth.certificates.len(), 1, "{point}: {summary}");
    assert_eq!(thing.principals, vec![truth.certificates[0].arn.clone()]);
    assert_eq!(truth.core_definitions.len(), 1, "{point}: {summary}");
    assert_eq!(truth.device_definitions.len(), 0, "{point}: {summary}");
    assert_eq!(truth.groups.len(), 1, "{point}: {summary}");
    let group = &truth.groups[0];
    assert_eq!(group.name, format!("{KEPT}-{}", key(KEPT, 6)));
    assert_eq!(group.role_arn.as_deref(), Some(truth.roles[0].arn.as_str()));
    let gg = aws_sdk_greengrass::Client::new(direct);
    let deployments = gg
        .list_deployments()
        .group_id(&group.id)
        .send()
        .await
        .unwrap();
    let types: Vec<_> = deployments
        .deployments()
        .iter()
        .filter_map(|d| d.deployment_type().cloned())
        .collect();
    assert_eq!(types, vec![DeploymentType::NewDeployment], "{point}");
    // Only the kept run's key material is left: its key and certificate files.
    let keys: Vec<String> = std::fs::read_dir(dir.join("keys"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let cert_key = key(KEPT, 2);
    assert_eq!(keys.len(), 2, "{point}: {keys:?}");
    assert!(
        keys.iter().all(|k| k.starts_with(&cert_key)),
        "{point}: {keys:?}"
    );
}

/// Kills the child at every named crash point the scenario reaches (at its first hit, then
/// at a seeded later one), under 10% lost responses and 10% throttling; after it finishes, the kept run's
/// resources exist exactly once and the compensated run left nothing.
#[test]
fn killed_at_every_crash_point_each_resource_exists_once_or_not_at_all() {
    const NAME: &str = "killed_at_every_crash_point_each_resource_exists_once_or_not_at_all";
    if is_child() {
        return child_main();
    }
    keel_testkit::init_tracing();
    let runtime = keel_testkit::crash::runtime();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x0061_7773);
    let mut kills = 0;
    // No sleeps, no child runs and no events in the flow: the timer, child and event points
    // are not reached.
    let points: Vec<_> = keel_testkit::store::crash_points()
        .into_iter()
        .filter(|p| {
            !["timer.", "child.", "event."]
                .iter()
                .any(|kind| p.starts_with(kind))
        })
        .collect();
    for (i, point) in points.iter().enumerate() {
        let account = TestAccount::fresh().expect("moto's server (see docs/testing.md)");
        // The first group create always loses its answer (Greengrass creates run without
        // SDK retries), so every child meets a step failure whatever the random draws.
        let rules = Rules::seeded(i as u64)
            .fault(FaultRule::new(Fault::LostResponse).probability(0.1))
            .fault(FaultRule::new(Fault::Throttle).probability(0.1));
        let rules = first_response_lost(rules, &["CreateGroup"]);
        let proxy = FaultProxy::start(&account.endpoint, rules).expect("proxy starts");
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
        // The first kill at the point's first hit (some points are met once per child: the one
        // compensation's start), the second at a seeded later hit, if the restarted child
        // meets the point that often.
        kills +=
            spec.kill_at_first_and_later_hit(point, rng.gen_range(1..6u32), CHILD_TIMEOUT, || {});
        spec.run_until_finished(CHILD_TIMEOUT);
        runtime.block_on(async {
            verify(point, dir.path(), &account.sdk_config().await).await;
        });
    }
    // Every point killed at its first hit (asserted above), and most at a later one too.
    assert!(kills > points.len(), "{kills} kills");
}

/// The run of [`KeyFlow`].
const KEY_RUN: &str = "device-key";

/// A device's certificate alone: 0 key material, 1 certificate.
struct KeyFlow;

impl Workflow for KeyFlow {
    const NAME: &'static str = "test.device-key";
    type Input = String;
    type Output = String;

    async fn run(ctx: &mut Ctx, subject: String) -> Result<String, WorkflowError> {
        let material = ctx.step(CreateKeyMaterial { subject }).await?;
        let cert = ctx
            .step(RegisterCertificate {
                certificate_pem: material.certificate_pem,
            })
            .await?;
        Ok(cert.id)
    }
}

/// The child of [`a_key_left_by_a_killed_attempt_is_replaced_not_adopted`]: runs [`KEY_RUN`]
/// to its end.
fn key_child_main() {
    let var = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name}"));
    let runtime = keel_testkit::crash::runtime();
    runtime.block_on(async {
        let sdk = TestAccount::child_sdk_config().await;
        let engine = Engine::builder(var("KEEL_DATA_DIR"))
            .workflow::<KeyFlow>()
            .aws_steps()
            .resource(AwsClients::new(&sdk))
            .resource(KeyStore::new(var("KEEL_TEST_KEYS")))
            .open()
            .await
            .unwrap();
        let run = engine
            .start::<KeyFlow>(KEY_RUN, "sensor".into())
            .await
            .unwrap();
        let _ = run.result().await;
        engine.shutdown().await;
    });
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The SubjectPublicKeyInfo (DER) of the private key in `path`.
fn public_key_of(path: &Path) -> Vec<u8> {
    let pem = std::fs::read_to_string(path).unwrap();
    rcgen::KeyPair::from_pem(&pem).unwrap().public_key_der()
}

/// Key files written by an attempt that was killed before its outcome was journaled are never
/// adopted: the next attempt makes a new key and removes them, and moto ends holding one
/// certificate, of the new key.
#[test]
fn a_key_left_by_a_killed_attempt_is_replaced_not_adopted() {
    const NAME: &str = "a_key_left_by_a_killed_attempt_is_replaced_not_adopted";
    if is_child() {
        return key_child_main();
    }
    keel_testkit::init_tracing();
    let runtime = keel_testkit::crash::runtime();
    let account = TestAccount::fresh().expect("moto's server (see docs/testing.md)");
    let dir = tempfile::tempdir().unwrap();
    let mut env = vec![
        ("KEEL_DATA_DIR".into(), path_env(dir.path(), "data")),
        ("KEEL_TEST_KEYS".into(), path_env(dir.path(), "keys")),
    ];
    env.extend(account.child_env(&account.endpoint));
    let spec = ChildSpec {
        test_name: NAME,
        env,
    };
    // Killed right after the first step's effect: the key files are written and synced, the
    // step's outcome is not journaled.
    let ending = spec.run(
        &[("KEEL_CRASH_AT", "step.after_effect".to_string())],
        CHILD_TIMEOUT,
    );
    assert_eq!(ending, Ending::Killed);
    let keys = dir.path().join("keys");
    let leftovers: Vec<String> = std::fs::read_dir(&keys)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(leftovers.len(), 2, "{leftovers:?}");
    let leftover_key = leftovers.iter().find(|n| n.ends_with(".key.pem")).unwrap();
    let leftover_spki = public_key_of(&keys.join(leftover_key));

    spec.run_until_finished(CHILD_TIMEOUT);
    runtime.block_on(async {
        let history = read_store(&dir.path().join("data"), async |engine| {
            engine.history(KEY_RUN).await.unwrap()
        })
        .await;
        assert_eq!(history.run.status, RunStatus::Completed);
        let material = history
            .entries
            .iter()
            .find_map(|entry| match &entry.event {
                keel_engine::Event::StepCompleted { step, output, .. } if step.0 == 0 => {
                    Some(output.clone())
                }
                _ => None,
            })
            .expect("the key material's output");
        let key_path = Path::new(material["key_path"].as_str().unwrap());
        let spki = public_key_of(key_path);
        assert_ne!(spki, leftover_spki, "the killed attempt's key was adopted");
        assert_eq!(material["key_fingerprint"], sha256_hex(&spki));
        for name in &leftovers {
            assert!(!keys.join(name).exists(), "{name} was left behind");
        }
        let truth = Inventory::read(&account.sdk_config().await).await.unwrap();
        assert_eq!(truth.certificates.len(), 1, "{}", truth.summary());
        let iot = aws_sdk_iot::Client::new(&account.sdk_config().await);
        let described = iot
            .describe_certificate()
            .certificate_id(&truth.certificates[0].id)
            .send()
            .await
            .unwrap();
        let pem = described
            .certificate_description()
            .and_then(|d| d.certificate_pem())
            .unwrap();
        let der = pem::parse(pem).unwrap().into_contents();
        assert!(
            der.windows(spki.len()).any(|w| w == spki),
            "moto's certificate is not of the journaled key"
        );
    });
}
