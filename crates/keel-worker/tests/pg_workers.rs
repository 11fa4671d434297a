//! `keel worker` processes sharing one PostgreSQL database (docs/deploy.md): a run started
//! through one worker's API is read and operated through another's; a worker whose lease is
//! lost exits with an error instead of going on, so that its supervisor starts a fresh one.
//! Needs moto and the PostgreSQL server `scripts/test.sh` starts.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{keel, role, worker_command};
use keel_testkit::demo::Worker;
use keel_testkit::moto::TestAccount;
use keel_testkit::postgres::{execute, fresh_database, query_texts};
use serde_json::Value;

/// A worker on `data` keeping its runs in the database at `url`, with a 1 s lease.
fn pg_worker(data: &Path, account: &TestAccount, url: &str) -> Worker {
    let mut command: Command = worker_command(data, account, &account.endpoint, &[]);
    command.env("KEEL_STORE", url).env("KEEL_LEASE_MS", "1000");
    Worker::start(command, data).expect("keel worker on PostgreSQL")
}

/// The JSON the CLI prints for `args` against worker `w`, which must succeed.
fn json(w: &Worker, args: &[&str]) -> Value {
    let out = keel(w, args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "keel {args:?}: {stderr}");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("keel {args:?}: {e}"))
}

/// A run started through one worker is listed and read through the other, to its end; then a worker whose lease the database says ended exits with code 1,
/// naming why, and the other worker goes on serving.
#[test]
fn workers_share_runs_and_a_worker_that_lost_its_lease_exits() {
    let account = TestAccount::fresh().expect("moto's server (see docs/testing.md)");
    let dir = tempfile::tempdir().unwrap();
    let url = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(fresh_database());
    let mut a = pg_worker(&dir.path().join("a"), &account, &url);
    let b = pg_worker(&dir.path().join("b"), &account, &url);
    let input = dir.path().join("role.json");
    std::fs::write(&input, role("shared-role").to_string()).unwrap();
    let input = input.display().to_string();
    let start = [
        "--json",
        "start",
        "iam.service-role",
        "--id=shared",
        "--input",
    ];
    json(&a, &[&start[..], &[input.as_str()]].concat());
    let listed = json(&b, &["--json", "list"]);
    assert!(listed.to_string().contains("\"shared\""), "{listed}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let record = json(&b, &["--json", "status", "shared"]);
        if record["status"] == "completed" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the run never completed: {record}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        json(&a, &["--json", "status", "shared"])["status"],
        "completed"
    );

    let rt = tokio::runtime::Runtime::new().unwrap();
    let a_id = rt
        .block_on(query_texts(
            &url,
            &format!("SELECT id FROM keel_workers WHERE pid = {}", a.child.id()),
        ))
        .pop()
        .expect("worker a is registered");
    rt.block_on(execute(
        &url,
        &format!("UPDATE keel_workers SET lease_until = clock_timestamp() WHERE id = '{a_id}'"),
    ));
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = a.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the worker went on without its lease"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(a.child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("the lease was lost"), "{stderr}");
    assert!(stderr.contains("can make nothing durable"), "{stderr}");
    assert_eq!(
        json(&b, &["--json", "status", "shared"])["status"],
        "completed"
    );
}
