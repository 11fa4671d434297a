//! What the API safety suites share: a real `keel worker` process on a real data directory,
//! reached by raw HTTP (so every header is the test's choice) and by the real CLI, and moto's
//! own state, read as ground truth of what refused requests did not do.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use keel_testkit::demo::{self, Worker};
use keel_testkit::inventory::Inventory;
use keel_testkit::moto::TestAccount;
use serde_json::Value;

/// The `keel` binary under test.
pub(crate) const KEEL: &str = env!("CARGO_BIN_EXE_keel");

/// The command that runs a worker on `data` (API on a free loopback port) against AWS at
/// `endpoint`, with `extra` arguments and its stderr captured.
pub(crate) fn worker_command(
    data: &Path,
    account: &TestAccount,
    endpoint: &str,
    extra: &[&str],
) -> Command {
    let mut command = demo::worker_command(Path::new(KEEL), data, account, endpoint, "127.0.0.1:0");
    command.args(extra).stderr(Stdio::piped());
    command
}

/// A running worker, as [`worker_command`] starts it.
pub(crate) fn worker(data: &Path, account: &TestAccount, endpoint: &str, extra: &[&str]) -> Worker {
    Worker::start(worker_command(data, account, endpoint, extra), data).expect("keel worker")
}

/// Runs the CLI against worker `w` with `args`.
pub(crate) fn keel(w: &Worker, args: &[&str]) -> Output {
    w.keel(Path::new(KEEL)).args(args).output().unwrap()
}

/// Runs a worker that must refuse to start and returns its output; fails the test if it is
/// still running after a minute (it started instead).
pub(crate) fn refused_start(command: &mut Command) -> Output {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "the worker started instead of refusing: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

/// Asserts that `output` is a refusal: exit `code`, and `needle` on stderr.
pub(crate) fn refused(output: &Output, code: i32, needle: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(code), "{stderr}");
    assert!(stderr.contains(needle), "{needle:?} not in {stderr:?}");
}

/// The worker's `host:port`.
pub(crate) fn addr(w: &Worker) -> String {
    w.api.trim_start_matches("http://").to_string()
}

/// One raw HTTP/1.1 exchange: the status and the body as JSON (`Null` if it is not JSON).
pub(crate) fn http(addr: &str, head: &str, body: &str) -> (u16, Value) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let request = format!(
        "{head}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    // The worker may answer and close before a refused body is all written: the answer counts.
    let _ = stream.write_all(request.as_bytes());
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {text:?}"));
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

/// Asserts an error answer: `status`, `{error, kind}` with `kind`.
pub(crate) fn error(answer: (u16, Value), status: u16, kind: &str) -> String {
    let (got, body) = answer;
    assert_eq!(got, status, "{body}");
    assert_eq!(body["kind"], kind, "{body}");
    body["error"].as_str().expect("an error line").to_string()
}

/// The input of an `iam.service-role` run that creates role `name`.
pub(crate) fn role(name: &str) -> Value {
    let mut core = keel_workflows::sample::core(name, 0);
    core.role.name = name.into();
    serde_json::to_value(core.role).unwrap()
}

/// The names of the roles moto holds for `account`: the ground truth.
pub(crate) fn roles(account: &TestAccount) -> Vec<String> {
    let truth = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(async { Inventory::read(&account.sdk_config().await).await.unwrap() });
    truth.roles.iter().map(|r| r.name.clone()).collect()
}

/// A connection that holds a request half-sent.
pub(crate) fn half_sent(at: &str) -> TcpStream {
    let mut stream = TcpStream::connect(at).unwrap();
    let head = format!(
        "POST /v1/runs HTTP/1.1\r\nHost: {at}\r\nContent-Type: application/json\r\n\
         Content-Length: 100\r\n\r\n{{\"workflow\""
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream
}

/// Waits until run `id`'s journal holds `n` starts of a `kind` attempt, then a little longer
/// for the attempt's call to reach the proxy (which logs a call only once it is answered).
pub(crate) fn wait_for_attempts(w: &Worker, id: &str, kind: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = keel(w, &["--json", "history", id]);
        let history: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        let attempts = history["operations"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|o| o["kind"] == kind)
            .map(|o| o["attempts"].as_u64().unwrap_or(0))
            .sum::<u64>();
        if attempts >= n as u64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no {kind} attempt {n} in {history}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
}

/// The JSON a successful CLI call printed; fails the test on any other exit.
pub(crate) fn ok_json(output: Output) -> Value {
    assert!(
        output.status.success(),
        "exit {:?}: {}",
        output.status.code(),
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("JSON on stdout")
}

/// The head of an API request to worker `w` (`method` and `path`), with its `Host`, its token,
/// `Content-Type: application/json` and the `extra` header lines.
pub(crate) fn head(w: &Worker, method: &str, path: &str, extra: &[&str]) -> String {
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json",
        addr(w),
        w.token()
    );
    for line in extra {
        head += "\r\n";
        head += line;
    }
    head
}

/// Waits until run `id` is finished (a terminal status) and returns its record, as
/// `keel status` shows it; fails the test after a minute, naming the status it saw.
pub(crate) fn finished(w: &Worker, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let record = ok_json(keel(w, &["--json", "status", id]));
        let status = record["status"].as_str().unwrap_or_default().to_string();
        let running = ["running", "suspended", "paused", "compensating"];
        if !running.contains(&status.as_str()) {
            return record;
        }
        assert!(
            Instant::now() < deadline,
            "run {id} did not finish within a minute: {record}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
