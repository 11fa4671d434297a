//! The worker against slow and idle clients (docs/api.md "Safety"): more connections than it has
//! file descriptors do not keep out a request, and slow clients are cut off after the read timeout.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{addr, half_sent, http, keel, KEEL};
use keel_testkit::demo::{self, Worker};
use keel_testkit::moto::TestAccount;

/// More idle, trickling and half-sent connections than the worker has file descriptors do not
/// keep out health checks or the CLI, and slow clients are cut off after the read timeout
/// (408 for one stopped mid-body).
#[test]
fn idle_and_slow_connections_do_not_keep_a_request_out() {
    let account = TestAccount::fresh().expect("moto's server (see docs/testing.md)");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // The worker as a machine usually runs it: 1,024 file descriptors at most.
    let wrapper = dir.path().join("keel-1024");
    std::fs::write(
        &wrapper,
        format!("#!/bin/sh\nexec prlimit --nofile=1024 -- {KEEL} \"$@\"\n"),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut command =
        demo::worker_command(&wrapper, &data, &account, &account.endpoint, "127.0.0.1:0");
    command
        .args(["--read-timeout-s", "2"])
        .stderr(Stdio::piped());
    let w = Worker::start(command, &data).expect("keel worker");
    let at = addr(&w);
    // More connections than the worker has descriptors: 1,100 that send nothing, 20 that
    // trickle a head, 20 that stop mid-body. (This process may need more than its default.)
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    let hard = limit.maximum.unwrap_or(u64::MAX);
    if limit.current.unwrap_or(u64::MAX) < 2048 {
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(hard.min(4096)),
                maximum: limit.maximum,
            },
        )
        .expect("raising this process's open-file limit");
    }
    let silent = (hard.min(4096).saturating_sub(200) as usize).min(1100);
    assert!(silent >= 300, "this process may open only {hard} files");
    let mut held: Vec<TcpStream> = (0..silent)
        .map(|_| TcpStream::connect(&at).unwrap())
        .collect();
    for _ in 0..20 {
        let mut stream = TcpStream::connect(&at).unwrap();
        stream
            .write_all(format!("GET /v1/runs HTTP/1.1\r\nHost: {at}\r\n").as_bytes())
            .unwrap();
        held.push(stream);
    }
    held.extend((0..20).map(|_| half_sent(&at)));
    // Health and the CLI still answer.
    let (status, health) = http(&at, &format!("GET /v1/health HTTP/1.1\r\nHost: {at}"), "");
    assert_eq!((status, health["status"].as_str()), (200, Some("ok")));
    let out = keel(&w, &["--json", "list"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A client that sends half a head is cut off after the read timeout (2 s).
    let mut slow = TcpStream::connect(&at).unwrap();
    slow.write_all(format!("GET /v1/runs HTTP/1.1\r\nHost: {at}\r\n").as_bytes())
        .unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut rest = Vec::new();
    let cut_off = Instant::now();
    let read = slow.read_to_end(&mut rest);
    assert!(
        read.is_ok() && cut_off.elapsed() < Duration::from_secs(25),
        "the server closed the slow connection ({read:?} after {:?})",
        cut_off.elapsed()
    );
    // And one that stops mid-body gets 408 once the same time has passed.
    let mut body = half_sent(&at);
    body.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut answer = String::new();
    let _ = body.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    assert!(answer.contains("\"kind\":\"timeout\""), "{answer:?}");
    drop(held);
}
