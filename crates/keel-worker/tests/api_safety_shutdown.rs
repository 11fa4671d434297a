//! Stopping the worker (docs/api.md "Safety"): SIGTERM stops the API at once and the engine drains
//! within the grace whatever clients do; a drain cut short, or a second signal, exits 3, and the
//! next start finishes what was in flight.

mod common;

use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{addr, half_sent, keel, role, roles, wait_for_attempts, worker};
use keel_testkit::demo::Worker;
use keel_testkit::moto::TestAccount;
use keel_testkit::proxy::{Dist, Fault, FaultProxy, FaultRule, Rules};

/// Waits (at most `within`) for worker `w` to exit; its exit code, `-1` for a signal, or `None`
/// if it is still running.
fn wait_exit(w: &mut Worker, within: Duration) -> Option<i32> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Some(status) = w.child.try_wait().unwrap() {
            return Some(status.code().unwrap_or(-1));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// Sends signal `name` (`TERM`, `INT`...) to worker `w`.
fn signal(w: &Worker, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &w.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// SIGTERM stops the API at once and the worker exits drained (0) despite a client holding a
/// request half-sent; a step that hangs past the grace makes the exit code 3, and a second
/// signal exits at once, also with 3.
#[test]
fn sigterm_drains_within_the_grace_whatever_clients_do_and_a_second_signal_exits_at_once() {
    let account = TestAccount::fresh().expect("moto's server (see docs/testing.md)");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");

    // An idle worker with a client holding a request half-sent: SIGTERM stops the API at
    // once and the worker exits drained (0), without waiting for the client.
    let mut w = worker(&data, &account, &account.endpoint, &["--grace-s", "30"]);
    let at = addr(&w);
    let _held = half_sent(&at);
    let _idle = TcpStream::connect(&at).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    signal(&w, "TERM");
    let mut refused_new = false;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if TcpStream::connect(&at).is_err() {
            refused_new = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(refused_new, "new connections refused after SIGTERM");
    let code = wait_exit(&mut w, Duration::from_secs(30));
    assert_eq!(
        code,
        Some(0),
        "drained, and not held by the half-sent request"
    );

    // A step that hangs (CreateRole answers after 120 s): the grace (1 s) runs out, the exit
    // code says the drain did not finish, and the next start finishes the run.
    let mut rules = Rules::seeded(7);
    rules.faults.push(
        FaultRule::new(Fault::Latency {
            delay: Dist::fixed(120_000),
        })
        .operation("CreateRole"),
    );
    let proxy = FaultProxy::start(&account.endpoint, rules).unwrap();
    let input = dir.path().join("role.json");
    std::fs::write(&input, role("slow-role").to_string()).unwrap();
    let input = input.to_str().unwrap();
    let mut w = worker(&data, &account, &proxy.endpoint(), &["--grace-s", "1"]);
    let out = keel(
        &w,
        &[
            "start",
            "iam.service-role",
            "--id",
            "slow",
            "--input",
            input,
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for_attempts(&w, "slow", "aws.iam.create-role", 1);
    let _held = half_sent(&addr(&w));
    signal(&w, "TERM");
    assert_eq!(
        wait_exit(&mut w, Duration::from_secs(30)),
        Some(3),
        "the drain did not finish: exit 3"
    );

    // The same with a long grace: a second signal exits at once, also with 3.
    let mut w = worker(&data, &account, &proxy.endpoint(), &["--grace-s", "600"]);
    wait_for_attempts(&w, "slow", "aws.iam.create-role", 2);
    signal(&w, "INT");
    std::thread::sleep(Duration::from_millis(300));
    assert!(w.child.try_wait().unwrap().is_none(), "still draining");
    signal(&w, "TERM");
    assert_eq!(wait_exit(&mut w, Duration::from_secs(30)), Some(3));

    // What was in flight runs again, with the same key, at the next start: one role.
    let w = worker(&data, &account, &account.endpoint, &[]);
    let out = keel(
        &w,
        &[
            "--json",
            "start",
            "iam.service-role",
            "--id",
            "slow",
            "--input",
            input,
            "--wait",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(roles(&account), ["slow-role"]);
}
