//! The AWS steps, run by the real engine (sled on disk) through the fault proxy against
//! moto's server, with moto's own state read directly as the ground truth.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::time::Duration;

use keel_engine::{Ctx, EngineBuilder, Event, RunStatus, WaitPolicy, Workflow, WorkflowError};
use keel_steps::aws::iam::{AttachRolePolicy, CreateRole, PutRolePolicy, RoleAssumable};
use keel_steps::aws::iot::{
    ActivateCertificate, AttachPolicy, AttachThingPrincipal, CreateKeyMaterial, CreatePolicy,
    CreateThing, RegisterCertificate,
};
use keel_steps::aws::{KEY_ATTRIBUTE, KEY_TAG};
use keel_testkit::inventory::Inventory;
use keel_testkit::proxy::{Applied, Dist, Fault, FaultRule, LagRule, Rules};
use serde::{Deserialize, Serialize};

mod common;
use common::{first_response_lost, hostile, key, Env};

const TRUST: &str = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"AWS":"*"},"Action":"sts:AssumeRole"}]}"#;
const INLINE: &str =
    r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"iot:*","Resource":"*"}]}"#;
const IOT_POLICY: &str = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"iot:Connect","Resource":"*"}]}"#;
const MANAGED: &str = "arn:aws:iam::aws:policy/AWSIoTDataAccess";

#[derive(Clone, Debug, Serialize, Deserialize)]
struct DeviceInput {
    name: String,
    /// Fail after every step completed (the run compensates everything).
    fail_at_end: bool,
    /// Wait for the role to be assumable (STS).
    wait_assumable: bool,
}

/// Every AWS step of the library, in the order a device flow uses them:
/// 0 role, 1 attach managed policy, 2 inline policy, [3 wait], thing, policy, key material,
/// certificate, attach policy to certificate, attach certificate to thing, activate.
struct DeviceFlow;

fn register(builder: EngineBuilder) -> EngineBuilder {
    builder.workflow::<DeviceFlow>()
}

impl Workflow for DeviceFlow {
    const NAME: &'static str = "test.aws-device";
    type Input = DeviceInput;
    type Output = String;

    async fn run(ctx: &mut Ctx, input: DeviceInput) -> Result<String, WorkflowError> {
        let role = ctx
            .step(CreateRole {
                name: format!("{}-role", input.name),
                trust_policy: TRUST.into(),
                tags: [("team".to_string(), "keel".to_string())].into(),
                description: None,
            })
            .await?;
        ctx.step(AttachRolePolicy {
            role: role.name.clone(),
            policy_arn: MANAGED.into(),
        })
        .await?;
        ctx.step(PutRolePolicy {
            role: role.name.clone(),
            policy_name: "inline".into(),
            document: INLINE.into(),
        })
        .await?;
        if input.wait_assumable {
            ctx.wait(
                RoleAssumable {
                    role_arn: role.arn.clone(),
                    session_name: "keel-probe".into(),
                },
                WaitPolicy::every(Duration::from_millis(50), Duration::from_secs(60)),
            )
            .await?;
        }
        let thing = ctx
            .step(CreateThing {
                name: input.name.clone(),
                attributes: [("model".to_string(), "t1".to_string())].into(),
            })
            .await?;
        let policy = ctx
            .step(CreatePolicy {
                prefix: format!("{}-policy", input.name),
                document: IOT_POLICY.into(),
            })
            .await?;
        let material = ctx
            .step(CreateKeyMaterial {
                subject: input.name.clone(),
            })
            .await?;
        let cert = ctx
            .step(RegisterCertificate {
                certificate_pem: material.certificate_pem,
            })
            .await?;
        ctx.step(AttachPolicy {
            policy_name: policy.name.clone(),
            target: cert.arn.clone(),
        })
        .await?;
        ctx.step(AttachThingPrincipal {
            thing: thing.name.clone(),
            principal: cert.arn.clone(),
        })
        .await?;
        ctx.step(ActivateCertificate {
            certificate_id: cert.id.clone(),
        })
        .await?;
        if input.fail_at_end {
            return Err(WorkflowError::failed("failing on purpose after every step"));
        }
        Ok(cert.id)
    }
}

fn input(name: &str) -> DeviceInput {
    DeviceInput {
        name: name.into(),
        fail_at_end: false,
        wait_assumable: false,
    }
}

const CREATES: [&str; 4] = [
    "CreateRole",
    "CreateThing",
    "CreatePolicy",
    "RegisterCertificateWithoutCA",
];

/// Checks that exactly one of each resource exists and carries the run's keys.
/// `offset`: 1 when the run waited for the role (the wait takes an operation number).
fn assert_one_device(truth: &Inventory, run: &str, name: &str, offset: u32) {
    let role_name = format!("{name}-role");
    assert_eq!(truth.roles.len(), 1, "{}", truth.summary());
    let role = truth.role(&role_name).expect("the role");
    assert_eq!(role.tags.get(KEY_TAG), Some(&key(run, 0)));
    assert_eq!(role.attached_policies, vec![MANAGED.to_string()]);
    assert_eq!(role.inline_policies, vec!["inline".to_string()]);
    assert_eq!(truth.things.len(), 1, "{}", truth.summary());
    let thing = truth.thing(name).expect("the thing");
    assert_eq!(
        thing.attributes.get(KEY_ATTRIBUTE),
        Some(&key(run, 3 + offset))
    );
    assert_eq!(truth.iot_policies.len(), 1, "{}", truth.summary());
    assert_eq!(
        truth.iot_policies[0].name,
        format!("{name}-policy-{}", key(run, 4 + offset))
    );
    assert_eq!(truth.certificates.len(), 1, "{}", truth.summary());
    let cert = &truth.certificates[0];
    assert_eq!(cert.status, "ACTIVE");
    assert_eq!(cert.policies, vec![truth.iot_policies[0].name.clone()]);
    assert_eq!(thing.principals, vec![cert.arn.clone()]);
}

/// Under random lost responses and throttling, and the first response of every create lost,
/// a device's run completes with each of its resources existing exactly once (every create
/// adopted, not repeated), its private key in a 0600 file and not in the journal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_create_leaves_exactly_one_resource_under_lost_responses_and_throttling() {
    let mut lost_creates = std::collections::BTreeSet::new();
    for seed in [1, 2, 3] {
        // On top of the random faults, the first call of every create loses its response, so
        // every create step goes through adoption at least once.
        let env = Env::new(first_response_lost(hostile(seed), &CREATES), register).await;
        let run = format!("device-{seed}");
        let (result, status) = env.run::<DeviceFlow>(&run, input("sensor")).await;
        let cert_id = result.unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        assert_eq!(status, RunStatus::Completed);
        let truth = env.truth().await;
        assert_one_device(&truth, &run, "sensor", 0);
        assert_eq!(truth.certificates[0].id, cert_id);
        // The faults did land on the creates.
        let lost: Vec<String> = env
            .proxy
            .faults()
            .into_iter()
            .filter(|(_, applied)| matches!(applied, Applied::LostResponse))
            .map(|(op, _)| op)
            .collect();
        assert!(lost.len() >= 2, "seed {seed}: only {lost:?} lost");
        lost_creates.extend(
            lost.into_iter()
                .filter(|op| op.starts_with("Create") || op.starts_with("Register")),
        );
        // The private key is in a file of mode 0600, and not in the journal.
        let material = journaled_output(&env, &run, 5).await;
        let key_path = material["key_path"].as_str().unwrap();
        let pem = std::fs::read_to_string(key_path).unwrap();
        let mode = std::fs::metadata(key_path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let journal = serde_json::to_string(&env.engine.history(&run).await.unwrap()).unwrap();
        let secret = pem.lines().nth(1).unwrap();
        assert!(
            !journal.contains(secret),
            "the private key reached the journal"
        );
        env.engine.shutdown().await;
    }
    // Over the seeds, every kind of create lost a response at least once.
    let all: std::collections::BTreeSet<String> = CREATES.map(String::from).into();
    assert_eq!(lost_creates, all);
}

/// A resource of the name a step derives that belongs to another owner (a role without the
/// run's key, a thing with another run's key, an IoT policy with another document) fails the
/// run as a conflict naming it, and is left unchanged while the run's own resources are
/// compensated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_same_named_resource_of_another_owner_is_a_conflict_and_is_left_unchanged() {
    let env = Env::new(hostile(11), register).await;
    let iam = aws_sdk_iam::Client::new(&env.direct);
    let iot = aws_sdk_iot::Client::new(&env.direct);
    // A role made by another tool (no key), and a thing carrying another run's key.
    iam.create_role()
        .role_name("taken-role")
        .assume_role_policy_document(TRUST)
        .send()
        .await
        .unwrap();
    let (result, status) = env.run::<DeviceFlow>("role-conflict", input("taken")).await;
    let error = result.unwrap_err().to_string();
    assert!(
        error.contains("conflict: IAM role \"taken-role\""),
        "{error}"
    );
    // Failed when the conflict came on the first attempt (nothing to undo), compensated when
    // a lost response made the step's outcome uncertain first.
    assert!(
        matches!(status, RunStatus::Failed | RunStatus::Compensated),
        "{status:?}"
    );
    let truth = env.truth().await;
    let role = truth.role("taken-role").unwrap();
    assert!(role.tags.is_empty() && role.attached_policies.is_empty());
    assert_eq!(truth.things.len(), 0);

    let other = key("somebody-else", 3);
    iot.create_thing()
        .thing_name("claimed")
        .attribute_payload(
            aws_sdk_iot::types::AttributePayload::builder()
                .attributes(KEY_ATTRIBUTE, &other)
                .build(),
        )
        .send()
        .await
        .unwrap();
    let (result, status) = env
        .run::<DeviceFlow>("thing-conflict", input("claimed"))
        .await;
    let error = result.unwrap_err().to_string();
    assert!(error.contains("conflict: IoT thing \"claimed\""), "{error}");
    assert!(error.contains(&other), "{error}");
    assert_eq!(status, RunStatus::Compensated);
    let truth = env.truth().await;
    assert_eq!(
        truth
            .thing("claimed")
            .unwrap()
            .attributes
            .get(KEY_ATTRIBUTE),
        Some(&other)
    );
    // The run's own role was compensated; only the other tool's role is left.
    assert_eq!(truth.roles.len(), 1, "{}", truth.summary());

    // An IoT policy of the name this run derives, with another document.
    let run = "policy-conflict";
    iot.create_policy()
        .policy_name(format!("p-policy-{}", key(run, 4)))
        .policy_document(INLINE)
        .send()
        .await
        .unwrap();
    let (result, _) = env.run::<DeviceFlow>(run, input("p")).await;
    let error = result.unwrap_err().to_string();
    assert!(error.contains("another document"), "{error}");
    let truth = env.truth().await;
    assert_eq!(truth.iot_policies.len(), 1);
    assert!(
        truth.thing("p").is_none(),
        "the run's thing was compensated"
    );
    env.engine.shutdown().await;
}

/// A device run that fails after all its steps succeeded compensates to nothing in moto and
/// no key file, even when deletes lose their responses and run again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compensation_after_success_and_under_lost_responses_leaves_nothing() {
    for seed in [21, 22] {
        let env = Env::new(hostile(seed), register).await;
        let run = format!("undo-{seed}");
        let (result, status) = env
            .run::<DeviceFlow>(
                &run,
                DeviceInput {
                    fail_at_end: true,
                    ..input("gone")
                },
            )
            .await;
        assert!(result.is_err());
        assert_eq!(status, RunStatus::Compensated);
        let truth = env.truth().await;
        assert!(truth.is_empty(), "seed {seed}: {}", truth.summary());
        // Every delete whose response was lost ran again and found nothing to do.
        let lost_deletes = env
            .proxy
            .faults()
            .into_iter()
            .filter(|(op, applied)| {
                (op.contains("Delete") || op.contains("Detach"))
                    && matches!(applied, Applied::LostResponse)
            })
            .count();
        assert!(lost_deletes > 0, "seed {seed}: no undo was repeated");
        assert_eq!(
            std::fs::read_dir(&env.keys).map(|d| d.count()).unwrap_or(0),
            0,
            "key files left"
        );
        env.engine.shutdown().await;
    }
}

/// A create whose every response is lost stays in doubt while moto holds the resource; once
/// the run is cancelled, the resource is found by its key and compensated, leaving nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steps_in_doubt_are_found_by_key_and_compensated() {
    // Every create's response is lost: each create step stays in doubt, retrying.
    let creates = ["CreateRole"];
    let mut rules = Rules::seeded(31);
    for op in creates {
        rules = rules.fault(FaultRule {
            service: None,
            operation: Some(op.into()),
            fault: Fault::LostResponse,
            probability: 1.0,
            skip: 0,
            limit: None,
        });
    }
    let env = Env::new(rules, register).await;
    let run = "in-doubt";
    let handle = env
        .engine
        .start::<DeviceFlow>(run, input("doubt"))
        .await
        .unwrap();
    env.await_requests("CreateRole", 2).await;
    let truth = env.truth().await;
    assert_eq!(truth.roles.len(), 1, "the lost create took effect");
    env.proxy.set_rules(Rules::seeded(32)).unwrap();
    env.engine.cancel(run).await.unwrap();
    let _ = handle.result().await;
    let status = env.engine.history(run).await.unwrap().run.status;
    assert_eq!(status, RunStatus::Compensated);
    let truth = env.truth().await;
    assert!(truth.is_empty(), "{}", truth.summary());
    env.engine.shutdown().await;
}

/// Under IAM and IoT create lag and a role that STS refuses until it has propagated, a device
/// run completes with every resource once, its wait polling AssumeRole until the role is
/// assumable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn role_and_certificate_lag_is_waited_out_without_sleeping() {
    let mut rules = Rules::seeded(41)
        .lag(LagRule {
            service: "iot".into(),
            after_create: Some(Dist::Uniform {
                min_ms: 200,
                max_ms: 600,
            }),
            after_delete: None,
            flap_found_probability: 0.3,
            include_deletes: false,
        })
        .lag(LagRule {
            service: "iam".into(),
            after_create: Some(Dist::Uniform {
                min_ms: 200,
                max_ms: 600,
            }),
            after_delete: None,
            flap_found_probability: 0.3,
            include_deletes: false,
        });
    // Propagation runs from CreateRole; the wait starts only after the two role steps that
    // follow it, which the IAM lag above (and their retries) can stretch past 1.5 s on a
    // busy machine: 4 s keeps the role unassumable when the wait begins.
    rules.assume_role.propagation = Dist::Fixed { ms: 4000 };
    let env = Env::new(rules, register).await;
    let run = "lagging";
    let (result, status) = env
        .run::<DeviceFlow>(
            run,
            DeviceInput {
                wait_assumable: true,
                ..input("slow")
            },
        )
        .await;
    result.unwrap();
    assert_eq!(status, RunStatus::Completed);
    assert_one_device(&env.truth().await, run, "slow", 1);
    // STS refused the role at first, and the wait polled until it did not.
    let assume = env.proxy.requests_for("AssumeRole");
    assert!(assume.len() >= 2, "{} AssumeRole calls", assume.len());
    env.engine.shutdown().await;
}

/// The output the journal of `run` holds for step `step`.
async fn journaled_output(env: &Env, run: &str, step: u32) -> serde_json::Value {
    let history = env.engine.history(run).await.unwrap();
    history
        .entries
        .iter()
        .find_map(|entry| match &entry.event {
            Event::StepCompleted {
                step: s, output, ..
            } if s.0 == step => Some(output.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no output of step {step} in {run}'s journal"))
}

/// A key pair and a certificate of it, as PEM: (key, certificate, certificate id).
fn key_and_certificate(subject: &str) -> (rcgen::KeyPair, String, String) {
    let pair = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, subject);
    let cert = params.self_signed(&pair).unwrap();
    let id = sha256_hex(cert.der());
    (pair, cert.pem(), id)
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Key and certificate files planted under the names a device's key material takes (the
/// predictable name, and a name of the form an attempt that was killed before its outcome was
/// journaled leaves) are never adopted: moto holds a certificate of a key the run made, and the
/// key file the journal names holds that key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_files_planted_in_the_keys_directory_are_never_adopted() {
    let env = Env::new(Rules::seeded(51), register).await;
    let run = "planted";
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&env.keys)
        .unwrap();
    let (planted, planted_pem, planted_id) = key_and_certificate("planted");
    let prefix = key(run, 5);
    for stem in [prefix.clone(), format!("{prefix}.00112233aabbccdd")] {
        std::fs::write(
            env.keys.join(format!("{stem}.key.pem")),
            planted.serialize_pem(),
        )
        .unwrap();
        std::fs::write(env.keys.join(format!("{stem}.cert.pem")), &planted_pem).unwrap();
    }
    let (result, status) = env.run::<DeviceFlow>(run, input("planted")).await;
    let cert_id = result.unwrap();
    assert_eq!(status, RunStatus::Completed);
    assert_ne!(
        cert_id, planted_id,
        "the planted certificate was registered"
    );
    let truth = env.truth().await;
    assert_eq!(truth.certificates.len(), 1, "{}", truth.summary());
    assert_eq!(truth.certificates[0].id, cert_id);

    // The key file the journal names holds the journaled key, which is not the planted one,
    // and moto's certificate is of that key (its DER holds the key's SubjectPublicKeyInfo).
    let material = journaled_output(&env, run, 5).await;
    let key_path = material["key_path"].as_str().unwrap();
    let pair = rcgen::KeyPair::from_pem(&std::fs::read_to_string(key_path).unwrap()).unwrap();
    let spki = pair.public_key_der();
    assert_eq!(material["key_fingerprint"], sha256_hex(&spki));
    assert_ne!(
        spki,
        planted.public_key_der(),
        "the planted key was adopted"
    );
    let iot = aws_sdk_iot::Client::new(&env.direct);
    let described = iot
        .describe_certificate()
        .certificate_id(&cert_id)
        .send()
        .await
        .unwrap();
    let registered = described
        .certificate_description()
        .and_then(|d| d.certificate_pem())
        .unwrap();
    let der = pem::parse(registered).unwrap().into_contents();
    assert!(
        der.windows(spki.len()).any(|w| w == spki),
        "moto's certificate is not of the key in {key_path}"
    );
    env.engine.shutdown().await;
}

/// A keys directory with mode 0755 is refused before any key is written or any certificate
/// registered: the run fails with an error naming the directory and its mode, compensates what
/// it made, and moto ends empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keys_directory_open_to_others_fails_the_run_naming_path_and_mode() {
    let env = Env::new(Rules::seeded(52), register).await;
    std::fs::DirBuilder::new()
        .mode(0o755)
        .create(&env.keys)
        .unwrap();
    std::fs::set_permissions(&env.keys, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (result, status) = env.run::<DeviceFlow>("open-keys", input("open")).await;
    let error = result.unwrap_err().to_string();
    let path = env.keys.display().to_string();
    assert!(
        error.contains(&format!("keys directory {path} has mode 0755")),
        "{error}"
    );
    assert_eq!(status, RunStatus::Compensated);
    let truth = env.truth().await;
    assert!(truth.is_empty(), "{}", truth.summary());
    assert_eq!(std::fs::read_dir(&env.keys).unwrap().count(), 0);
    env.engine.shutdown().await;
}
