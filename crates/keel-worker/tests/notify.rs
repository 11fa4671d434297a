//! Notifications through a real worker (docs/notifications.md): `keel worker --notify-url`
//! POSTs a signed JSON event when a run pauses; a receiver that refuses gets it again with
//! backoff until it takes it; a worker SIGKILLed after the transition and before the delivery
//! delivers it after its restart; every expected event id arrives, and a notice delivered
//! before a clean stop is not sent again after it. The receiver is a real HTTP server on
//! loopback, checking every signature with the shared secret. The runs are `sample.inbox`,
//! which waits for events and calls no AWS API.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode};
use common::{addr, head, http, KEEL};
use hmac::{Hmac, KeyInit, Mac};
use keel_testkit::demo::Worker;
use serde_json::{json, Value};
use sha2::Sha256;

const SECRET: &str = "a-shared-secret-of-the-test-0123456789";

/// One request the receiver got.
#[derive(Clone, Debug)]
struct Received {
    event_id: String,
    /// Whether `Keel-Signature` is the HMAC of `"<Keel-Timestamp>.<body>"` under the secret.
    signed: bool,
    body: Value,
    /// What the receiver answered.
    answered: u16,
}

/// The test's HTTP receiver: records every request; answers 503 while `refusing` is above
/// zero (counting it down) or `down` is set, else 204.
#[derive(Default)]
struct Receiver {
    got: Mutex<Vec<Received>>,
    refusing: AtomicUsize,
    down: AtomicUsize,
}

impl Receiver {
    /// Starts a receiver on a free loopback port, on a thread and runtime of its own, so
    /// that it outlives the workers; returns it and its URL.
    fn start() -> (Arc<Receiver>, String) {
        let receiver = Arc::new(Receiver::default());
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let url = format!("http://{}/hooks/keel", listener.local_addr().unwrap());
        let state = Arc::clone(&receiver);
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let app = axum::Router::new()
                    .route("/hooks/keel", axum::routing::post(take))
                    .with_state(state);
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                axum::serve(listener, app).await.unwrap();
            });
        });
        (receiver, url)
    }

    fn got(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }

    /// Waits (at most 20 s) until a request for `event_id` was answered 2xx; returns them all.
    fn wait_taken(&self, event_id: &str) -> Vec<Received> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let got = self.got();
            if got
                .iter()
                .any(|r| r.event_id == event_id && r.answered < 300)
            {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "event {event_id} was not delivered within 20 s; the receiver got {got:#?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (at most 20 s) until `n` requests for `event_id` arrived.
    fn wait_requests(&self, event_id: &str, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.requests(event_id) < n {
            assert!(
                Instant::now() < deadline,
                "fewer than {n} requests for {event_id} within 20 s: {:#?}",
                self.got()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn requests(&self, event_id: &str) -> usize {
        self.got().iter().filter(|r| r.event_id == event_id).count()
    }
}

/// The receiver's handler: checks the signature as docs/notifications.md tells receivers to.
async fn take(
    axum::extract::State(receiver): axum::extract::State<Arc<Receiver>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> StatusCode {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let timestamp = header("keel-timestamp");
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(&body);
    let expected: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let fresh = timestamp
        .parse::<u64>()
        .is_ok_and(|t| t.abs_diff(unix_now()) < 300);
    let signed = fresh
        && header("keel-signature") == format!("sha256={expected}")
        && header("content-type") == "application/json";
    let refused = receiver.down.load(Ordering::SeqCst) > 0
        || receiver
            .refusing
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
    let answered = if refused {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::NO_CONTENT
    };
    receiver.got.lock().unwrap().push(Received {
        event_id: header("keel-event-id"),
        signed,
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        answered: answered.as_u16(),
    });
    answered
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A worker on `data` notifying `url`, signed with the secret in `secret`; its log goes to
/// `log`. It calls no AWS API (the runs are `sample.inbox`), so none is running.
fn notifying_worker(data: &Path, url: &str, secret: &Path, log: &Path) -> Worker {
    let mut command = Command::new(KEEL);
    command
        .args(["worker", "--listen", "127.0.0.1:0"])
        .args(["--aws-endpoint", "http://127.0.0.1:9"])
        .arg("--data-dir")
        .arg(data)
        .args(["--notify-url", url])
        .arg("--notify-secret-file")
        .arg(secret)
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env_remove("AWS_SESSION_TOKEN")
        .env_remove("KEEL_API_TOKEN")
        .env_remove("KEEL_API_TOKEN_FILE")
        .env_remove("KEEL_NO_AUTH")
        .env_remove("KEEL_NOTIFY_URL")
        .env_remove("KEEL_NOTIFY_ON")
        .env("RUST_LOG", "warn,keel=info")
        .stderr(Stdio::from(
            File::options().create(true).append(true).open(log).unwrap(),
        ));
    Worker::start(command, data).expect("keel worker")
}

fn post(w: &Worker, path: &str, body: &Value) -> (u16, Value) {
    http(&addr(w), &head(w, "POST", path, &[]), &body.to_string())
}

/// Starts `sample.inbox` run `id` and pauses it; returns the event id its pause makes:
/// `<id>:<journal index of its run_paused entry>`.
fn start_and_pause(w: &Worker, id: &str) -> String {
    let input = json!({"workflow": "sample.inbox", "id": id, "input": {"events": ["go"]}});
    let (status, body) = post(w, "/v1/runs", &input);
    assert_eq!(status, 200, "{body}");
    let (status, body) = post(w, &format!("/v1/runs/{id}/pause"), &json!({}));
    assert_eq!(status, 200, "{body}");
    // The pause is journaled once the run parks: wait for its entry.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, history) = http(
            &addr(w),
            &head(w, "GET", &format!("/v1/runs/{id}/history"), &[]),
            "",
        );
        assert_eq!(status, 200, "{history}");
        let entries = history["entries"].as_array().unwrap();
        if let Some(index) = entries.iter().position(|e| e["type"] == "run_paused") {
            return format!("{id}:{index}");
        }
        assert!(Instant::now() < deadline, "run {id} did not pause");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SIGKILLs worker `w` and reaps it.
fn kill(mut w: Worker) {
    w.child.kill().unwrap();
    w.child.wait().unwrap();
}

/// SIGTERMs worker `w` and waits (at most 30 s) for its drained exit.
fn stop(mut w: Worker) {
    let pid = w.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = w.child.try_wait().unwrap() {
            assert_eq!(status.code(), Some(0), "not drained");
            return;
        }
        assert!(Instant::now() < deadline, "the worker did not stop");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn secret_file(dir: &Path) -> PathBuf {
    let path = dir.join("notify-secret");
    std::fs::write(&path, format!("{SECRET}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// Each pause is delivered signed with its fields; refusals are retried until taken; a
/// notice whose worker was SIGKILLed before delivering it (while the receiver refused, or
/// right after the transition) arrives after the restart; the event ids taken are exactly
/// the expected ones; and notices delivered before a clean stop are not sent again after it.
#[test]
fn notices_arrive_signed_once_per_event_id_across_kills_and_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log = dir.path().join("worker.log");
    let secret = secret_file(dir.path());
    let (receiver, url) = Receiver::start();
    let mut expected = BTreeSet::new();

    // A pause is notified, signed, with the transition's fields.
    let w = notifying_worker(&data, &url, &secret, &log);
    let a = start_and_pause(&w, "run-a");
    let got = receiver.wait_taken(&a);
    let first = got.iter().find(|r| r.event_id == a).unwrap();
    assert_eq!(first.body["event_id"], a.as_str());
    assert_eq!(first.body["run_id"], "run-a");
    assert_eq!(first.body["workflow"], "sample.inbox");
    assert_eq!(first.body["status"], "paused");
    assert_eq!(first.body["previous_status"], "running");
    assert!(
        first.body["at"].as_str().unwrap().ends_with('Z'),
        "{:?}",
        first.body
    );
    assert!(first.body.get("delivered_to").is_none(), "{:?}", first.body);
    expected.insert(a.clone());

    // A receiver that refuses twice gets it a third time, after backoff.
    receiver.refusing.store(2, Ordering::SeqCst);
    let b = start_and_pause(&w, "run-b");
    receiver.wait_taken(&b);
    let answers: Vec<u16> = receiver
        .got()
        .iter()
        .filter(|r| r.event_id == b)
        .map(|r| r.answered)
        .collect();
    assert_eq!(answers, [503, 503, 204], "retried until taken");
    expected.insert(b.clone());

    // SIGKILLs after the transitions, before any delivery: one notice refused once, one
    // never tried (the kill comes as soon as the pause is durable).
    receiver.down.store(1, Ordering::SeqCst);
    let c = start_and_pause(&w, "run-c");
    receiver.wait_requests(&c, 1);
    let d = start_and_pause(&w, "run-d");
    kill(w);
    expected.insert(c.clone());
    expected.insert(d.clone());
    receiver.down.store(0, Ordering::SeqCst);

    let w = notifying_worker(&data, &url, &secret, &log);
    receiver.wait_taken(&c);
    receiver.wait_taken(&d);
    let taken: BTreeSet<String> = receiver
        .got()
        .iter()
        .filter(|r| r.answered < 300)
        .map(|r| r.event_id.clone())
        .collect();
    assert_eq!(taken, expected, "every expected event id, and no other");

    // A clean stop, then a restart: nothing delivered before is sent again. A new pause
    // shows the new worker's sender went over every pending notice (oldest first).
    stop(w);
    let before = receiver.got().len();
    let w = notifying_worker(&data, &url, &secret, &log);
    let e = start_and_pause(&w, "run-e");
    receiver.wait_taken(&e);
    let after: Vec<Received> = receiver.got()[before..].to_vec();
    assert!(
        after.iter().all(|r| r.event_id == e),
        "a delivered notice was sent again after a clean restart: {after:#?}"
    );
    expected.insert(e);
    stop(w);

    let all = receiver.got();
    assert!(
        all.iter().all(|r| r.signed),
        "an unsigned request: {all:#?}"
    );
    let mut per_id: BTreeMap<&str, usize> = BTreeMap::new();
    for r in all.iter().filter(|r| r.answered < 300) {
        *per_id.entry(&r.event_id).or_default() += 1;
    }
    assert_eq!(
        per_id
            .keys()
            .map(|k| k.to_string())
            .collect::<BTreeSet<_>>(),
        expected
    );
}

/// Bad settings are refused before anything runs, naming what is wrong: a URL of another
/// scheme, an unknown status word, and a secret file others may read.
#[test]
fn bad_notify_settings_are_refused_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let secret = secret_file(dir.path());
    let run = |extra: &[&str]| {
        let mut command = Command::new(KEEL);
        command
            .args(["worker", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&data)
            .args(extra)
            .env_remove("KEEL_NOTIFY_URL")
            .env_remove("KEEL_NOTIFY_ON")
            .env_remove("KEEL_NOTIFY_SECRET_FILE");
        common::refused_start(&mut command)
    };
    let output = run(&["--notify-url", "ftp://example.com/hook"]);
    common::refused(&output, 2, "ftp://example.com/hook");
    let output = run(&[
        "--notify-url",
        "http://127.0.0.1:9/hook",
        "--notify-on",
        "paused,stalled",
    ]);
    common::refused(&output, 2, "\"stalled\"");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let output = run(&[
        "--notify-url",
        "http://127.0.0.1:9/hook",
        "--notify-secret-file",
        secret.to_str().unwrap(),
    ]);
    common::refused(&output, 2, "lets other users read it");
}
