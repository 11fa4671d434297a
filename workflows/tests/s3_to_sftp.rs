//! `files.s3-to-sftp` end to end: an object in moto's S3 delivered to a real OpenSSH server
//! (Debian's sshd on a loopback port), complete and verified under its final name, with the
//! verified local copy staged; a delivery the server refuses (its host key is not the one
//! recorded) is compensated, leaving neither the staged copy nor anything remote.

use keel_engine::{Engine, RunStatus};
use keel_steps::files::{digest_of, sha256_hex};
use keel_steps::s3::S3Client;
use keel_testkit::moto::TestAccount;
use keel_testkit::sshd::Sshd;
use keel_workflows::files::{DeliveryInput, S3ToSftp};
use keel_workflows::{sample, KeelWorkflows};
use rand::{RngCore, SeedableRng};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_is_delivered_complete_and_a_refused_delivery_is_undone() {
    keel_testkit::init_tracing();
    let account = TestAccount::fresh().expect("moto's server (see docs/testing.md)");
    let sdk = account.sdk_config().await;
    let s3 = S3Client::new(&sdk);
    s3.0.create_bucket().bucket("drop").send().await.unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x7332_7366);
    let mut report = vec![0u8; 5 << 20];
    rng.fill_bytes(&mut report);
    s3.0.put_object()
        .bucket("drop")
        .key("reports/2026-12/report.bin")
        .body(report.clone().into())
        .send()
        .await
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let sshd = Sshd::start(dir.path()).expect("sshd (scripts/test.sh installs it)");
    let (staging, inbox) = (dir.path().join("staging"), dir.path().join("inbox"));
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::create_dir_all(&inbox).unwrap();
    let input = |known_hosts: std::path::PathBuf| -> DeliveryInput {
        let mut input =
            sample::delivery("drop", "reports/2026-12/report.bin", sshd.port, &sshd.user);
        input.staging_dir = staging.clone();
        input.remote_dir = inbox.display().to_string();
        input.server.known_hosts = known_hosts;
        input.server.credential = keel_steps::sftp::Credential::KeyFile {
            path: sshd.client_key.clone(),
        };
        input
    };
    let engine = Engine::builder(dir.path().join("data"))
        .delivery_workflows()
        .resource(s3)
        .open()
        .await
        .unwrap();

    let run = engine
        .start::<S3ToSftp>("delivered", input(sshd.known_hosts.clone()))
        .await
        .unwrap();
    let delivery = run.result().await.unwrap();
    let want = (report.len() as u64, sha256_hex(&report));
    assert_eq!(digest_of(&inbox.join("report.bin")).unwrap(), want);
    assert_eq!(digest_of(&staging.join("report.bin")).unwrap(), want);
    assert_eq!(delivery.delivered.sha256, want.1);
    assert_eq!(
        delivery.delivered.path,
        format!("{}/report.bin", inbox.display())
    );

    // Another delivery of the same object under another name, to a server whose key changed.
    std::fs::remove_file(staging.join("report.bin")).unwrap();
    let mut refused = input(sshd.wrong_known_hosts(&dir.path().join("wrong")).unwrap());
    refused.name = Some("copy.bin".into());
    let run = engine.start::<S3ToSftp>("refused", refused).await.unwrap();
    let error = run
        .result()
        .await
        .expect_err("the host key is not the recorded one");
    assert!(format!("{error:#}").contains("host key"), "{error:#}");
    assert_eq!(
        engine.status("refused").await.unwrap().status,
        RunStatus::Compensated
    );
    let names = |d: &std::path::Path| -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    assert!(names(&staging).is_empty(), "{:?}", names(&staging));
    assert_eq!(names(&inbox), ["report.bin"]);
    engine.shutdown().await;
}
