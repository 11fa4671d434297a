//! The fault proxy's configuration: rules and upstreams are checked at start, and the
//! standalone binary (`keel-fault-proxy`) applies a rules file, names a bad field, and writes
//! its request record.

use keel_testkit::aws::SdkOptions;
use keel_testkit::moto::TestAccount;
use keel_testkit::proxy::{Fault, FaultProxy, FaultRule, Rules};

/// Impossible rules (a server error with status 200) and an upstream that is not HTTP are
/// refused at start, naming the rule or the upstream.
#[test]
fn bad_rules_and_upstreams_are_refused_at_start() {
    let bad = Rules::seeded(1).fault(FaultRule::new(Fault::ServerError { status: 200 }));
    let error = FaultProxy::start("http://127.0.0.1:1", bad).unwrap_err();
    assert!(error.to_string().contains("faults[0]"), "{error}");
    let error = FaultProxy::start("ftp://example", Rules::default()).unwrap_err();
    assert!(error.to_string().contains("ftp://example"), "{error}");
}

/// The standalone proxy applies its rules file, serves until SIGTERM, exits cleanly, and
/// writes the record of each request with its fault.
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

/// The standalone proxy refuses a rules file with a bad field and names that field.
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
