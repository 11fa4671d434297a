//! The worker against a hostile web page, a hostile neighbour and a slow client
//! (docs/api.md "Safety"): a real `keel worker` process on a real data directory, reached by
//! raw HTTP (so every header is the test's choice) and by the real CLI; moto's own state is
//! read as ground truth of what the refused requests did not do.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use keel_testkit::demo::{self, Worker};
use keel_testkit::inventory::Inventory;
use keel_testkit::moto::TestAccount;
use keel_testkit::proxy::{Dist, Fault, FaultProxy, FaultRule, Rules};
use serde_json::{json, Value};

const KEEL: &str = env!("CARGO_BIN_EXE_keel");

fn worker_command(data: &Path, account: &TestAccount, endpoint: &str, extra: &[&str]) -> Command {
    let mut command = demo::worker_command(Path::new(KEEL), data, account, endpoint, "127.0.0.1:0");
    command.args(extra).stderr(Stdio::piped());
    command
}

fn worker(data: &Path, account: &TestAccount, endpoint: &str, extra: &[&str]) -> Worker {
    Worker::start(worker_command(data, account, endpoint, extra), data).expect("keel worker")
}

fn keel(w: &Worker, args: &[&str]) -> Output {
    w.keel(Path::new(KEEL)).args(args).output().unwrap()
}

/// Runs a worker that must refuse to start and returns its output; fails the test if it is
/// still running after a minute (it started instead).
fn refused_start(command: &mut Command) -> Output {
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

fn refused(output: &Output, code: i32, needle: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(code), "{stderr}");
    assert!(stderr.contains(needle), "{needle:?} not in {stderr:?}");
}

/// The worker's `host:port`.
fn addr(w: &Worker) -> String {
    w.api.trim_start_matches("http://").to_string()
}

/// One raw HTTP/1.1 exchange: the status and the body as JSON (`Null` if it is not JSON).
fn http(addr: &str, head: &str, body: &str) -> (u16, Value) {
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
fn error(answer: (u16, Value), status: u16, kind: &str) -> String {
    let (got, body) = answer;
    assert_eq!(got, status, "{body}");
    assert_eq!(body["kind"], kind, "{body}");
    body["error"].as_str().expect("an error line").to_string()
}

fn role(name: &str) -> Value {
    let mut core = keel_workflows::sample::core(name, 0);
    core.role.name = name.into();
    serde_json::to_value(core.role).unwrap()
}

fn roles(account: &TestAccount) -> Vec<String> {
    let truth = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(async { Inventory::read(&account.sdk_config().await).await.unwrap() });
    truth.roles.iter().map(|r| r.name.clone()).collect()
}

/// What a web page can send (no JSON type, no token or a wrong one, a foreign or null origin,
/// a rebound host name) cannot start, cancel or read a run, even on loopback, and creates
/// nothing; the worker's own page with the token can.
#[test]
fn a_web_page_cannot_start_cancel_or_read_runs_and_even_loopback_needs_the_token() {
    let account = TestAccount::fresh().expect("moto's server (see docs/testing.md)");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let w = worker(&data, &account, &account.endpoint, &[]);
    let at = addr(&w);
    let host = format!("Host: {at}");
    // The worker made its token, owner-only, at its first start.
    let token_file = data.join("api-token");
    let mode = std::fs::metadata(&token_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{mode:o}");
    let token = w.token();
    assert_eq!(token.len(), 64, "32 random bytes in hex");
    let bearer = format!("Authorization: Bearer {token}");
    let start = json!({"workflow": "iam.service-role", "id": "evil", "input": role("evil-admin")})
        .to_string();

    // What a page's form or fetch can send without a CORS preflight: text/plain, no type.
    let post = "POST /v1/runs HTTP/1.1";
    for content_type in [
        "Content-Type: text/plain",
        "Content-Type: application/x-www-form-urlencoded",
    ] {
        let head = format!("{post}\r\n{host}\r\n{bearer}\r\n{content_type}");
        error(http(&at, &head, &start), 415, "unsupported_media_type");
    }
    error(
        http(&at, &format!("{post}\r\n{host}\r\n{bearer}"), &start),
        415,
        "unsupported_media_type",
    );
    // No token, even on loopback.
    let json_type = "Content-Type: application/json";
    let line = error(
        http(&at, &format!("{post}\r\n{host}\r\n{json_type}"), &start),
        401,
        "unauthorised",
    );
    assert!(line.contains("api-token"), "{line}");
    error(
        http(
            &at,
            &format!("{post}\r\n{host}\r\nAuthorization: Bearer nope\r\n{json_type}"),
            &start,
        ),
        401,
        "unauthorised",
    );
    // A page's origin, or a name rebound to 127.0.0.1.
    let evil_origin = "Origin: http://evil.example";
    error(
        http(
            &at,
            &format!("{post}\r\n{host}\r\n{bearer}\r\n{json_type}\r\n{evil_origin}"),
            &start,
        ),
        403,
        "cross_origin",
    );
    error(
        http(
            &at,
            &format!("{post}\r\n{host}\r\n{bearer}\r\n{json_type}\r\nOrigin: null"),
            &start,
        ),
        403,
        "cross_origin",
    );
    let port = at.rsplit(':').next().unwrap();
    let rebound = format!("Host: evil.example:{port}");
    error(
        http(
            &at,
            &format!("GET /v1/runs HTTP/1.1\r\n{rebound}\r\n{bearer}"),
            "",
        ),
        421,
        "wrong_host",
    );
    error(
        http(
            &at,
            &format!("{post}\r\n{rebound}\r\n{bearer}\r\n{json_type}"),
            &start,
        ),
        421,
        "wrong_host",
    );
    error(http(&at, "GET /v1/runs HTTP/1.1", ""), 421, "wrong_host");
    // A cancel needs a JSON body too.
    let cancel = "POST /v1/runs/evil/cancel HTTP/1.1";
    error(
        http(&at, &format!("{cancel}\r\n{host}\r\n{bearer}"), ""),
        415,
        "unsupported_media_type",
    );
    error(
        http(
            &at,
            &format!("{cancel}\r\n{host}\r\n{bearer}\r\n{json_type}"),
            "",
        ),
        400,
        "malformed_request",
    );
    // None of that stored or created anything.
    let (status, page) = http(
        &at,
        &format!("GET /v1/runs HTTP/1.1\r\n{host}\r\n{bearer}"),
        "",
    );
    assert_eq!(
        (status, page["runs"].as_array().map(Vec::len)),
        (200, Some(0)),
        "{page}"
    );
    assert!(roles(&account).is_empty());

    // The worker's own page (same origin), `localhost`, and a lowercase scheme are fine.
    let same_origin = format!("Origin: http://{at}");
    let head = format!(
        "{post}\r\n{host}\r\nAuthorization: bearer {token}\r\n{json_type}\r\n{same_origin}"
    );
    let (status, record) = http(&at, &head, &start);
    assert_eq!(status, 200, "{record}");
    let (status, _) = http(
        &at,
        &format!("GET /v1/runs/evil HTTP/1.1\r\nHost: localhost:{port}\r\n{bearer}"),
        "",
    );
    assert_eq!(status, 200);
    let head = format!("{cancel}\r\n{host}\r\n{bearer}\r\n{json_type}");
    let (status, cancelled) = http(&at, &head, "{}");
    assert_eq!(status, 200, "{cancelled}");
    // Health answers without the token (it says nothing).
    let (status, health) = http(&at, &format!("GET /v1/health HTTP/1.1\r\n{host}"), "");
    assert_eq!((status, health["status"].as_str()), (200, Some("ok")));

    // The CLI reads the token from the data directory; without it, one clear line.
    let out = keel(&w, &["--json", "status", "evil"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(KEEL)
        .args(["--api", &w.api, "--data-dir"])
        .arg(dir.path().join("elsewhere"))
        .args(["status", "evil"])
        .env_remove("KEEL_API_TOKEN")
        .output()
        .unwrap();
    refused(&out, 2, "missing or wrong API token");
    // Another user who took the worker's port does not get the token.
    decoy_listener_gets_no_token(&w, &token);
    // A token file others can read is refused, by the CLI and by the worker.
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = keel(&w, &["status", "evil"]);
    refused(&out, 2, "mode 0644");
    drop(w);
    let out = refused_start(&mut worker_command(&data, &account, &account.endpoint, &[]));
    refused(&out, 2, "mode 0644");
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();

    // `--no-auth` is for loopback only, and still checks Host, Origin and the body's type.
    let out = refused_start(
        demo::worker_command(
            Path::new(KEEL),
            &data,
            &account,
            &account.endpoint,
            "0.0.0.0:0",
        )
        .arg("--no-auth"),
    );
    refused(&out, 2, "--no-auth is for loopback");
    let w = worker(&data, &account, &account.endpoint, &["--no-auth"]);
    let at = addr(&w);
    let host = format!("Host: {at}");
    let (status, _) = http(&at, &format!("GET /v1/runs/evil HTTP/1.1\r\n{host}"), "");
    assert_eq!(status, 200);
    error(
        http(
            &at,
            &format!("{post}\r\n{host}\r\nContent-Type: text/plain"),
            &start,
        ),
        415,
        "unsupported_media_type",
    );
    error(
        http(
            &at,
            &format!(
                "GET /v1/runs HTTP/1.1\r\nHost: evil.example:{}",
                at.rsplit(':').next().unwrap()
            ),
            "",
        ),
        421,
        "wrong_host",
    );
    // A token given to the worker is used instead of the data directory's.
    drop(w);
    let mut given = worker_command(&data, &account, &account.endpoint, &[]);
    given.env("KEEL_API_TOKEN", "given-token-0123456789");
    let w = Worker::start(given, &data).unwrap();
    let at = addr(&w);
    let (status, _) = http(
        &at,
        &format!("GET /v1/runs HTTP/1.1\r\nHost: {at}\r\nAuthorization: Bearer {token}"),
        "",
    );
    assert_eq!(
        status, 401,
        "the data directory's token is not the one in use"
    );
    let (status, _) = http(
        &at,
        &format!(
            "GET /v1/runs HTTP/1.1\r\nHost: {at}\r\nAuthorization: Bearer given-token-0123456789"
        ),
        "",
    );
    assert_eq!(status, 200);
    // A configured name is let through.
    drop(w);
    let w = worker(
        &data,
        &account,
        &account.endpoint,
        &["--allowed-host", "Keel.Internal"],
    );
    let at = addr(&w);
    let bearer = format!("Authorization: Bearer {}", w.token());
    let (status, _) = http(
        &at,
        &format!("GET /v1/runs HTTP/1.1\r\nHost: keel.internal\r\n{bearer}"),
        "",
    );
    assert_eq!(status, 200);
}

/// With the worker stopped, another user (uid 65534) listens on its port; the CLI refuses to
/// send the token there, and the decoy receives nothing. Needs root to run the decoy as
/// another user; skipped otherwise.
fn decoy_listener_gets_no_token(w: &Worker, token: &str) {
    if rustix::process::geteuid().as_raw() != 0 {
        tracing::warn!("not root: the decoy-listener check is skipped");
        return;
    }
    let (host, port) = addr(w)
        .rsplit_once(':')
        .map(|(h, p)| (h.to_string(), p.to_string()))
        .unwrap();
    let stopped = Worker {
        child: std::process::Command::new("true").spawn().unwrap(),
        api: w.api.clone(),
        data: w.data.clone(),
    };
    // The real worker stops (killed: its port is free at once).
    let pid = w.child.id();
    Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // perl is part of every Debian system (perl-base) and runs as any user.
    let script = r#"
        use IO::Socket::INET;
        my $s = IO::Socket::INET->new(LocalAddr => $ARGV[0], LocalPort => $ARGV[1],
            Listen => 8, ReuseAddr => 1) or die "bind: $!";
        $| = 1; print "ready\n";
        my $got = "";
        eval {
            local $SIG{ALRM} = sub { die "timeout\n" };
            alarm 5; my $c = $s->accept(); alarm 2; $c->recv($got, 65536); alarm 0;
        };
        $got =~ s/\n/ /g; print length($got), " ", $got, "\n";
    "#;
    let mut decoy = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "perl",
            "-e",
            script,
        ])
        .args([&host, &port])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(decoy.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    let cli = keel(&stopped, &["status", "evil"]);
    refused(&cli, 1, "held by another user");
    let mut heard = String::new();
    std::io::Read::read_to_string(&mut out, &mut heard).unwrap();
    decoy.wait().unwrap();
    assert!(!heard.contains(token), "the decoy got the token: {heard}");
    assert!(heard.starts_with('0'), "the decoy got a request: {heard}");
}

/// A connection that holds a request half-sent.
fn half_sent(at: &str) -> TcpStream {
    let mut stream = TcpStream::connect(at).unwrap();
    let head = format!(
        "POST /v1/runs HTTP/1.1\r\nHost: {at}\r\nContent-Type: application/json\r\n\
         Content-Length: 100\r\n\r\n{{\"workflow\""
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream
}

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

/// Waits until run `id`'s journal holds `n` starts of a `kind` attempt, then a little longer
/// for the attempt's call to reach the proxy (which logs a call only once it is answered).
fn wait_for_attempts(w: &Worker, id: &str, kind: &str, n: usize) {
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

/// A data directory others can write to, a keys directory others can read, and a token
/// planted as a link are refused before any store is opened, naming what is wrong; fixed, the
/// worker starts.
#[test]
fn a_data_directory_others_can_write_to_is_refused_before_anything_runs() {
    let account = TestAccount::fresh().expect("moto's server (see docs/testing.md)");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = refused_start(&mut worker_command(&data, &account, &account.endpoint, &[]));
    refused(&out, 2, "mode 0777");
    refused(&out, 2, &data.display().to_string());
    assert_eq!(
        std::fs::read_dir(&data).unwrap().count(),
        0,
        "nothing made in it"
    );
    // Keys readable by others: refused too.
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    let keys = data.join("keys");
    std::fs::create_dir(&keys).unwrap();
    std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = refused_start(&mut worker_command(&data, &account, &account.endpoint, &[]));
    refused(&out, 2, "keys directory");
    refused(&out, 2, "mode 0755");
    assert!(!data.join("journal").exists(), "no store opened");
    std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o700)).unwrap();
    // A token planted as a link to another file is not followed.
    let elsewhere = dir.path().join("planted");
    std::fs::write(&elsewhere, "attacker-token\n").unwrap();
    std::os::unix::fs::symlink(&elsewhere, data.join("api-token")).unwrap();
    let out = refused_start(&mut worker_command(&data, &account, &account.endpoint, &[]));
    refused(&out, 2, "api-token");
    std::fs::remove_file(data.join("api-token")).unwrap();
    // Fixed, the worker starts.
    let w = worker(&data, &account, &account.endpoint, &[]);
    let out = keel(&w, &["--json", "list"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Run ids that clash with child ids or look like paths or flags, misspelt or unknown fields,
/// and a timeout that overflows a duration are refused naming what is wrong, and nothing is
/// stored or created; a fleet's children keep their ids, and listings come in pages.
#[test]
fn ids_that_clash_with_children_or_look_like_paths_or_flags_and_unknown_fields_are_refused() {
    let account = TestAccount::fresh().expect("moto's server (see docs/testing.md)");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let w = worker(&data, &account, &account.endpoint, &[]);
    let write = |name: &str, value: &Value| {
        let path = dir.path().join(name);
        std::fs::write(&path, value.to_string()).unwrap();
        path.to_string_lossy().into_owned()
    };
    let input = write("role.json", &role("a-role"));
    for id in ["sqfleet/1", "../../etc/passwd", ".hidden", "a..b", "-rf"] {
        let out = keel(
            &w,
            &[
                "start",
                "iam.service-role",
                &format!("--id={id}"),
                "--input",
                &input,
            ],
        );
        refused(&out, 2, "id");
    }
    // A typo in a field name names the field.
    let mut typo = role("typo-role");
    let arns = typo
        .as_object_mut()
        .unwrap()
        .remove("managed_policy_arns")
        .unwrap();
    typo["managed_policy_arn"] = arns;
    let typo = write("typo.json", &typo);
    let out = keel(
        &w,
        &[
            "start",
            "iam.service-role",
            "--id",
            "typo",
            "--input",
            &typo,
        ],
    );
    refused(&out, 2, "managed_policy_arn");
    // A timeout that overflows a duration.
    let mut core = serde_json::to_value(keel_workflows::sample::core("huge", 0)).unwrap();
    core["deployment_timeout_s"] = json!(18_446_744_073_709_552u64);
    let huge = write("huge.json", &core);
    let out = keel(
        &w,
        &[
            "start",
            "greengrass.provision-core",
            "--id",
            "huge",
            "--input",
            &huge,
        ],
    );
    refused(&out, 2, "deployment_timeout_s");
    // Unknown fields of the request itself, through the API: invalid_input, named.
    let at = addr(&w);
    let head = format!(
        "POST /v1/runs HTTP/1.1\r\nHost: {at}\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json",
        w.token()
    );
    let body = json!({"workflow": "iam.service-role", "id": "x", "input": role("x"), "wait": true});
    let line = error(http(&at, &head, &body.to_string()), 400, "invalid_input");
    assert!(line.contains("wait"), "{line}");
    let body = json!({"workflow": "iam.service-role", "id": "x", "input": typo_value()});
    let line = error(http(&at, &head, &body.to_string()), 400, "invalid_input");
    assert!(line.contains("managed_policy_arn"), "{line}");
    // Nothing was stored or created.
    let page = ok_json(keel(&w, &["--json", "list"]));
    assert_eq!(page["runs"], json!([]), "{page}");
    assert!(roles(&account).is_empty());

    // A fleet's children keep their ids: `sqfleet` onboards its two devices.
    let fleet = serde_json::to_value(keel_workflows::sample::fleet("sq", 2, 2)).unwrap();
    let fleet = write("fleet.json", &fleet);
    let out = keel(
        &w,
        &[
            "--json",
            "start",
            "iot.onboard-fleet",
            "--id",
            "sqfleet",
            "--input",
            &fleet,
            "--wait",
        ],
    );
    let record = ok_json(out);
    assert_eq!(record["status"], "completed", "{record}");
    // Listings come in pages.
    let first = ok_json(keel(&w, &["--json", "list", "--limit", "2"]));
    assert_eq!(first["runs"].as_array().unwrap().len(), 2, "{first}");
    let next = first["next"].as_str().expect("a next page").to_string();
    let second = ok_json(keel(
        &w,
        &["--json", "list", "--limit", "2", "--after", &next],
    ));
    assert_eq!(second["runs"].as_array().unwrap().len(), 1, "{second}");
    assert_eq!(second["next"], Value::Null);
    let out = keel(&w, &["list", "--limit", "5000"]);
    refused(&out, 2, "limit 5000");
}

fn typo_value() -> Value {
    let mut typo = role("typo-role");
    let arns = typo
        .as_object_mut()
        .unwrap()
        .remove("managed_policy_arns")
        .unwrap();
    typo["managed_policy_arn"] = arns;
    typo
}

fn ok_json(output: Output) -> Value {
    assert!(
        output.status.success(),
        "exit {:?}: {}",
        output.status.code(),
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("JSON on stdout")
}

/// Inputs over the limit (large or endless) are refused naming the limit, every error is
/// `{error, kind}` JSON, and a worker that cannot take its port exits before resuming any run:
/// no AWS call.
#[test]
fn inputs_are_bounded_every_error_is_json_and_a_worker_that_cannot_listen_calls_no_one() {
    let account = TestAccount::fresh().expect("moto's server (see docs/testing.md)");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let proxy = FaultProxy::start(&account.endpoint, Rules::seeded(3)).unwrap();
    let w = worker(&data, &account, &proxy.endpoint(), &[]);
    // A 4 MiB input is refused by the CLI with the limit named, not as "cannot reach".
    let big = dir.path().join("big.json");
    std::fs::write(&big, format!("\"{}\"", "x".repeat(4 << 20))).unwrap();
    let out = keel(
        &w,
        &[
            "start",
            "iam.service-role",
            "--id",
            "big",
            "--input",
            big.to_str().unwrap(),
        ],
    );
    refused(&out, 2, "limit");
    // An endless input too, without reading it all.
    let out = keel(
        &w,
        &[
            "start",
            "iam.service-role",
            "--id",
            "zero",
            "--input",
            "/dev/zero",
        ],
    );
    refused(&out, 2, "limit");
    // Errors outside the handlers are {error, kind} too.
    let at = addr(&w);
    let auth = format!("Host: {at}\r\nAuthorization: Bearer {}", w.token());
    error(
        http(
            &at,
            &format!("DELETE /v1/runs HTTP/1.1\r\n{auth}\r\nContent-Type: application/json"),
            "{}",
        ),
        405,
        "method_not_allowed",
    );
    error(
        http(
            &at,
            &format!("GET /v1/runs/x/cancel HTTP/1.1\r\n{auth}"),
            "",
        ),
        405,
        "method_not_allowed",
    );
    error(
        http(
            &at,
            &format!("GET /v1/runs?limit=many HTTP/1.1\r\n{auth}"),
            "",
        ),
        400,
        "invalid_request",
    );
    error(
        http(
            &at,
            &format!("GET /v1/runs?colour=red HTTP/1.1\r\n{auth}"),
            "",
        ),
        400,
        "invalid_request",
    );
    error(
        http(&at, &format!("GET /v1/runs/%FF HTTP/1.1\r\n{auth}"), ""),
        400,
        "bad_request",
    );
    // Metrics need the token.
    let (status, _) = http(&at, &format!("GET /metrics HTTP/1.1\r\nHost: {at}"), "");
    assert_eq!(status, 401);
    // A body over the limit is refused with the limit named.
    let big_body = "x".repeat(keel_engine::limits::INPUT_BYTES_MAX + 20 * 1024);
    let head = format!("POST /v1/runs HTTP/1.1\r\n{auth}\r\nContent-Type: application/json");
    let line = error(http(&at, &head, &big_body), 413, "too_large");
    assert!(line.contains("limit"), "{line}");

    // A run in flight, then the worker dies; a new worker that cannot take its port exits
    // before it resumes the run: no AWS call.
    let input = dir.path().join("role.json");
    std::fs::write(&input, role("listen-role").to_string()).unwrap();
    let mut rules = Rules::seeded(3);
    rules.faults.push(
        FaultRule::new(Fault::Latency {
            delay: Dist::fixed(120_000),
        })
        .operation("CreateRole"),
    );
    proxy.set_rules(rules).unwrap();
    let out = keel(
        &w,
        &[
            "start",
            "iam.service-role",
            "--id",
            "r",
            "--input",
            input.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for_attempts(&w, "r", "aws.iam.create-role", 1);
    let mut w = w;
    w.child.kill().unwrap();
    w.child.wait().unwrap();
    // Calls answer at once again, so any call the next worker made would be logged.
    proxy.set_rules(Rules::seeded(3)).unwrap();
    let calls = proxy.requests().len();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().to_string();
    let out = refused_start(&mut demo::worker_command(
        Path::new(KEEL),
        &data,
        &account,
        &proxy.endpoint(),
        &port,
    ));
    refused(&out, 1, "cannot listen");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        proxy.requests().len(),
        calls,
        "no AWS call from a worker that cannot serve"
    );
    // An AWS endpoint that is not a URL is refused up front.
    let out = refused_start(&mut demo::worker_command(
        Path::new(KEEL),
        &data,
        &account,
        "localhost:4566",
        "127.0.0.1:0",
    ));
    refused(&out, 2, "not an http(s) URL");
}
