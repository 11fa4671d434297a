//! Events in and values out through a real worker (docs/api.md "Events and published values"):
//! `POST /v1/runs/{id}/events/{name}` delivers an event once per id and refuses mismatches,
//! unknown runs, bad names and ids, and payloads over the limit, storing nothing for them;
//! `GET /v1/runs/{id}/published/{name}` answers at once or long-polls within its cap; a start
//! can carry an event; and `keel send`, `keel get` and `keel history` drive and show all of it.
//! The runs are `sample.inbox`, which takes one event per name of its input and publishes its
//! progress after each.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use common::{error, finished, head, http, keel, ok_json, refused, worker, KEEL};
use keel_testkit::demo::Worker;
use keel_testkit::moto::TestAccount;
use serde_json::{json, Value};

/// `POST` of `body` to `path` on `w`, with the `extra` header lines.
fn post(w: &Worker, path: &str, extra: &[&str], body: &str) -> (u16, Value) {
    http(&common::addr(w), &head(w, "POST", path, extra), body)
}

/// `GET` of `path` on `w`.
fn get(w: &Worker, path: &str) -> (u16, Value) {
    http(&common::addr(w), &head(w, "GET", path, &[]), "")
}

/// Asserts a `200` answer and returns its body.
fn ok((status, body): (u16, Value)) -> Value {
    assert_eq!(status, 200, "{body}");
    body
}

/// The journal of run `id`, as the API gives it.
fn entries(w: &Worker, id: &str) -> Vec<Value> {
    let history = ok(get(w, &format!("/v1/runs/{id}/history")));
    history["entries"].as_array().expect("entries").clone()
}

/// How many events the journal of run `id` holds as delivered.
fn deliveries(w: &Worker, id: &str) -> usize {
    entries(w, id)
        .iter()
        .filter(|e| e["type"] == "event_delivered")
        .count()
}

/// Whether `id` reads as a version 4 UUID.
fn is_uuid_v4(id: &str) -> bool {
    let groups: Vec<&str> = id.split('-').collect();
    let lengths: Vec<usize> = groups.iter().map(|g| g.len()).collect();
    lengths == [8, 4, 4, 4, 12]
        && id.chars().all(|c| c == '-' || c.is_ascii_hexdigit())
        && groups[2].starts_with('4')
}

/// A `keel` run's stdout as text, failing the test on any exit but 0.
fn ok_text(output: Output) -> String {
    assert!(
        output.status.success(),
        "exit {:?}: {}",
        output.status.code(),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// An event id is one event: the same id again is a duplicate, with another payload or name
/// a `409 event_mismatch`; unknown runs, bad names and ids, payloads over the limit, bodies
/// that are not JSON and finished runs are refused with their status and kind; none of
/// these refusals stores anything, and the run took exactly the events that were delivered,
/// in order, one of them under an id the worker made up.
#[test]
fn events_are_delivered_once_per_id_and_refusals_say_why_and_store_nothing() {
    let account = TestAccount::fresh().expect("moto's server (see docs/testing.md)");
    let dir = tempfile::tempdir().unwrap();
    let w = worker(&dir.path().join("data"), &account, &account.endpoint, &[]);
    let start =
        json!({"workflow": "sample.inbox", "id": "inbox", "input": {"events": ["go", "go", "go"]}});
    ok(post(&w, "/v1/runs", &[], &start.to_string()));

    let first = ok(post(
        &w,
        "/v1/runs/inbox/events/go",
        &["Event-Id: e-1"],
        r#"{"n": 1}"#,
    ));
    assert_eq!(
        first,
        json!({"run_id": "inbox", "name": "go", "event_id": "e-1", "duplicate": false})
    );
    let again = ok(post(
        &w,
        "/v1/runs/inbox/events/go",
        &["Event-Id: e-1"],
        r#"{"n": 1}"#,
    ));
    assert_eq!(again["duplicate"], true, "{again}");

    let other_payload = post(&w, "/v1/runs/inbox/events/go", &["Event-Id: e-1"], "2");
    let line = error(other_payload, 409, "event_mismatch");
    assert!(line.contains("e-1"), "{line}");
    let other_name = post(
        &w,
        "/v1/runs/inbox/events/stop",
        &["Event-Id: e-1"],
        "{\"n\": 1}",
    );
    error(other_name, 409, "event_mismatch");
    let unknown = post(&w, "/v1/runs/nosuch/events/go", &["Event-Id: x"], "{}");
    error(unknown, 404, "not_found");
    let bad_name = post(&w, "/v1/runs/inbox/events/go!", &["Event-Id: x"], "{}");
    let line = error(bad_name, 400, "invalid_request");
    assert!(line.contains("go!"), "{line}");
    let long_name = format!("/v1/runs/inbox/events/{}", "n".repeat(65));
    error(
        post(&w, &long_name, &["Event-Id: x"], "{}"),
        400,
        "invalid_request",
    );
    let bad_id = post(&w, "/v1/runs/inbox/events/go", &["Event-Id: a b"], "{}");
    let line = error(bad_id, 400, "invalid_request");
    assert!(line.contains("event id"), "{line}");
    let long_id = format!("Event-Id: {}", "i".repeat(129));
    error(
        post(&w, "/v1/runs/inbox/events/go", &[&long_id], "{}"),
        400,
        "invalid_request",
    );
    let two_ids = post(
        &w,
        "/v1/runs/inbox/events/go",
        &["Event-Id: a", "Event-Id: b"],
        "{}",
    );
    error(two_ids, 400, "invalid_request");
    // Over the payload's 48 KiB but within the body's 112 KiB: the engine's limit; past the
    // body's, the server's. Both are 413.
    let big = json!("x".repeat(50_000)).to_string();
    let line = error(
        post(&w, "/v1/runs/inbox/events/go", &["Event-Id: big"], &big),
        413,
        "too_large",
    );
    assert!(line.contains("49152"), "{line}");
    let huge = json!("x".repeat(120_000)).to_string();
    error(
        post(&w, "/v1/runs/inbox/events/go", &["Event-Id: huge"], &huge),
        413,
        "too_large",
    );
    let not_json = post(&w, "/v1/runs/inbox/events/go", &["Event-Id: nj"], "{go");
    error(not_json, 400, "malformed_request");
    let empty = post(&w, "/v1/runs/inbox/events/go", &["Event-Id: nj"], "");
    error(empty, 400, "malformed_request");
    let text_head =
        head(&w, "POST", "/v1/runs/inbox/events/go", &[]).replace("application/json", "text/plain");
    error(
        http(&common::addr(&w), &text_head, "{}"),
        415,
        "unsupported_media_type",
    );
    assert_eq!(deliveries(&w, "inbox"), 1, "refusals store nothing");

    // Without an Event-Id the worker makes one up and says which.
    let made = ok(post(&w, "/v1/runs/inbox/events/go", &[], "{\"n\": 2}"));
    let made_id = made["event_id"].as_str().unwrap().to_string();
    assert!(is_uuid_v4(&made_id), "{made}");
    assert_eq!(made["duplicate"], false, "{made}");
    ok(post(
        &w,
        "/v1/runs/inbox/events/go",
        &["Event-Id: e-3"],
        "{\"n\": 3}",
    ));

    let record = finished(&w, "inbox");
    assert_eq!(record["status"], "completed", "{record}");
    assert_eq!(record["output"], json!(["e-1", made_id, "e-3"]));
    // A finished run: a retried send is the same event; a new one is refused.
    let retried = ok(post(
        &w,
        "/v1/runs/inbox/events/go",
        &["Event-Id: e-3"],
        "{\"n\": 3}",
    ));
    assert_eq!(retried["duplicate"], true, "{retried}");
    let late = post(&w, "/v1/runs/inbox/events/go", &["Event-Id: e-4"], "{}");
    let line = error(late, 409, "invalid_state");
    assert!(line.contains("completed"), "{line}");
    assert_eq!(deliveries(&w, "inbox"), 3);
}

/// A value that is not there is `404 not_published` (an unknown run stays `not_found`), at
/// once or at the end of a wait that is honoured; a wait past the cap or unreadable is a
/// `400` naming it; a long poll returns as soon as a newer value is published, or at its
/// end with the value the caller has; and a start that carries an event puts it in the new
/// run's mailbox (a second start with the same id and event delivers nothing more).
#[test]
fn published_values_are_read_at_once_or_long_polled_and_a_start_can_carry_an_event() {
    let account = TestAccount::fresh().expect("moto's server (see docs/testing.md)");
    let dir = tempfile::tempdir().unwrap();
    let w = worker(&dir.path().join("data"), &account, &account.endpoint, &[]);
    let start =
        json!({"workflow": "sample.inbox", "id": "poll", "input": {"events": ["go", "go"]}});
    ok(post(&w, "/v1/runs", &[], &start.to_string()));
    let path = "/v1/runs/poll/published/progress";

    let line = error(get(&w, path), 404, "not_published");
    assert!(line.contains("progress"), "{line}");
    error(
        get(&w, "/v1/runs/nosuch/published/progress"),
        404,
        "not_found",
    );
    error(
        get(&w, "/v1/runs/poll/published/pro%20gress"),
        400,
        "invalid_request",
    );
    let line = error(get(&w, &format!("{path}?wait=61s")), 400, "invalid_request");
    assert!(line.contains("60 s"), "{line}");
    let line = error(
        get(&w, &format!("{path}?wait=soon")),
        400,
        "invalid_request",
    );
    assert!(line.contains("soon"), "{line}");
    error(get(&w, &format!("{path}?when=1s")), 400, "invalid_request");
    let asked = Instant::now();
    error(get(&w, &format!("{path}?wait=700ms")), 404, "not_published");
    assert!(
        asked.elapsed() >= Duration::from_millis(700),
        "the wait was honoured"
    );

    // A long poll for a first value, answered by the publish after the first event.
    let at = common::addr(&w);
    let poll_head = head(&w, "GET", &format!("{path}?wait=30s"), &[]);
    let asked = Instant::now();
    let poller = std::thread::spawn(move || http(&at, &poll_head, ""));
    ok(post(
        &w,
        "/v1/runs/poll/events/go",
        &["Event-Id: p-1"],
        "{}",
    ));
    let first = ok(poller.join().unwrap());
    assert!(
        asked.elapsed() < Duration::from_secs(25),
        "answered by the publish"
    );
    assert_eq!(
        first["value"],
        json!({"done": 1, "of": 2, "event_ids": ["p-1"]})
    );
    let version = first["version"].as_u64().expect("a version");
    assert!(first["at_ms"].as_u64().is_some(), "{first}");
    // Nothing newer: the end of the wait brings the same version back.
    let same = ok(get(&w, &format!("{path}?wait=300ms&after={version}")));
    assert_eq!(same["version"], version, "{same}");
    // Without a wait, `after` changes nothing: the latest value, at once.
    assert_eq!(
        ok(get(&w, &format!("{path}?after={version}")))["version"],
        version
    );
    ok(post(
        &w,
        "/v1/runs/poll/events/go",
        &["Event-Id: p-2"],
        "{}",
    ));
    let second = ok(get(&w, &format!("{path}?wait=30s&after={version}")));
    assert!(second["version"].as_u64().unwrap() > version, "{second}");
    assert_eq!(second["value"]["event_ids"], json!(["p-1", "p-2"]));
    assert_eq!(finished(&w, "poll")["status"], "completed");
    // A finished run publishes nothing more: a long poll ends at once.
    let asked = Instant::now();
    let last = ok(get(
        &w,
        &format!("{path}?wait=30s&after={}", second["version"]),
    ));
    assert_eq!(last["version"], second["version"]);
    assert!(
        asked.elapsed() < Duration::from_secs(25),
        "not held to its end"
    );

    // A start with an event: the run takes it with no send.
    let greeted = json!({
        "workflow": "sample.inbox", "id": "greeted", "input": {"events": ["hello"]},
        "event": {"name": "hello", "event_id": "h-1", "payload": {"hi": 1}},
    });
    let record = ok(post(&w, "/v1/runs", &[], &greeted.to_string()));
    assert_eq!(record["id"], "greeted", "{record}");
    let record = finished(&w, "greeted");
    assert_eq!(record["status"], "completed", "{record}");
    assert_eq!(record["output"], json!(["h-1"]));
    // The same start again is the same run and the same event.
    ok(post(&w, "/v1/runs", &[], &greeted.to_string()));
    assert_eq!(deliveries(&w, "greeted"), 1);
    // The event's fields are checked like the request's, and its name like a send's.
    let mut typo = greeted.clone();
    typo["id"] = json!("typo");
    typo["event"]["id"] = json!("h-2");
    let line = error(
        post(&w, "/v1/runs", &[], &typo.to_string()),
        400,
        "invalid_input",
    );
    assert!(line.contains("event"), "{line}");
    let mut bad = greeted.clone();
    bad["id"] = json!("bad");
    bad["event"]["name"] = json!("he llo");
    error(
        post(&w, "/v1/runs", &[], &bad.to_string()),
        400,
        "invalid_request",
    );
    error(get(&w, "/v1/runs/typo"), 404, "not_found");
    error(get(&w, "/v1/runs/bad"), 404, "not_found");
}

/// `keel send` takes its payload from a file or stdin, says whether the event was delivered
/// now or before, makes up an id (and prints it) when not given one, and shows refusals as
/// one line with exit 2; `keel get` prints a value and its version, waits for one with
/// `--wait`, exits 4 when there is none (or none newer than `--after`); `keel history`
/// shows receives, publishes, a receive that timed out, and each delivered event with the
/// receive that took it.
#[test]
fn the_cli_sends_events_gets_values_and_shows_them_in_history() {
    let account = TestAccount::fresh().expect("moto's server (see docs/testing.md)");
    let dir = tempfile::tempdir().unwrap();
    let w = worker(&dir.path().join("data"), &account, &account.endpoint, &[]);
    let write = |name: &str, value: &Value| {
        let path = dir.path().join(name);
        std::fs::write(&path, value.to_string()).unwrap();
        path.to_string_lossy().into_owned()
    };
    let input = write("inbox.json", &json!({"events": ["go", "go"]}));
    ok_json(keel(
        &w,
        &[
            "--json",
            "start",
            "sample.inbox",
            "--id",
            "cli",
            "--input",
            &input,
        ],
    ));

    let out = keel(&w, &["get", "cli", "progress"]);
    refused(&out, 4, "published no value named \"progress\"");
    refused(&keel(&w, &["get", "nosuch", "progress"]), 2, "no run");
    refused(
        &keel(&w, &["get", "cli", "progress", "--wait", "2m"]),
        2,
        "60 s",
    );

    // `keel get --wait` returns once the value appears.
    let getter = w
        .keel(Path::new(KEEL))
        .args(["--json", "get", "cli", "progress", "--wait", "30s"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let asked = Instant::now();
    let payload = write("payload.json", &json!({"n": 1}));
    let sent = ok_text(keel(
        &w,
        &["send", "cli", "go", "--data", &payload, "--event-id", "f-1"],
    ));
    assert_eq!(sent, "delivered event f-1 (go) to run cli\n");
    let got = getter.wait_with_output().unwrap();
    assert!(
        asked.elapsed() < Duration::from_secs(25),
        "answered by the publish"
    );
    let got = ok_json(got);
    assert_eq!(got["value"]["event_ids"], json!(["f-1"]), "{got}");
    let version = got["version"].as_u64().unwrap().to_string();

    let again = ok_text(keel(
        &w,
        &["send", "cli", "go", "--data", &payload, "--event-id", "f-1"],
    ));
    assert_eq!(
        again,
        "event f-1 (go) was delivered to run cli before: nothing changed\n"
    );
    let other = write("other.json", &json!({"n": 9}));
    let out = keel(
        &w,
        &["send", "cli", "go", "--data", &other, "--event-id", "f-1"],
    );
    refused(&out, 2, "f-1");
    let not_json = dir.path().join("not.json");
    std::fs::write(&not_json, "{go").unwrap();
    let out = keel(
        &w,
        &["send", "cli", "go", "--data", not_json.to_str().unwrap()],
    );
    refused(&out, 2, "not JSON");
    refused(
        &keel(
            &w,
            &["send", "cli", "go!", "--data", &payload, "--event-id", "x"],
        ),
        2,
        "go!",
    );
    let out = keel(
        &w,
        &["--json", "get", "cli", "progress", "--after", &version],
    );
    refused(&out, 4, &format!("newer than version {version}"));

    // From stdin, with an id the CLI makes up and names on stderr.
    let mut sender = w
        .keel(Path::new(KEEL))
        .args(["send", "cli", "go", "--data", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    sender
        .stdin
        .take()
        .unwrap()
        .write_all(br#"{"n": 2}"#)
        .unwrap();
    let sent = sender.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&sent.stderr).into_owned();
    let made = stderr
        .split_whitespace()
        .nth(2)
        .expect("the made-up id on stderr")
        .to_string();
    assert!(is_uuid_v4(&made), "{stderr}");
    assert!(stderr.contains(&format!("--event-id {made}")), "{stderr}");
    assert_eq!(
        ok_text(sent),
        format!("delivered event {made} (go) to run cli\n")
    );

    let shown = ok_text(keel(
        &w,
        &[
            "get", "cli", "progress", "--wait", "30s", "--after", &version,
        ],
    ));
    let first_line = shown.lines().next().unwrap();
    assert!(
        first_line.starts_with("progress of run cli: version "),
        "{shown}"
    );
    assert!(first_line.ends_with(" UTC"), "{shown}");
    let value: Value = serde_json::from_str(shown.split_once('\n').unwrap().1).unwrap();
    assert_eq!(
        value,
        json!({"done": 2, "of": 2, "event_ids": ["f-1", made]})
    );
    let record = finished(&w, "cli");
    assert_eq!(record["output"], json!(["f-1", made]), "{record}");

    // A receive that times out, for history.
    let late = write("late.json", &json!({"events": ["never"], "within_s": 1}));
    ok_json(keel(
        &w,
        &[
            "--json",
            "start",
            "sample.inbox",
            "--id",
            "late",
            "--input",
            &late,
        ],
    ));
    let record = finished(&w, "late");
    assert_eq!(record["output"], json!([]), "{record}");

    let history = ok_text(keel(&w, &["history", "cli"]));
    for needle in [
        "receive  go",
        "took f-1 (go)",
        &format!("took {made} (go)"),
        "publish  progress",
        r#"{"done":1,"event_ids":["f-1"],"of":2}"#,
        "events delivered:",
    ] {
        assert!(history.contains(needle), "{needle:?} not in\n{history}");
    }
    let delivered: Vec<&str> = history
        .lines()
        .skip_while(|l| *l != "events delivered:")
        .skip(2)
        .collect();
    assert_eq!(delivered.len(), 2, "{history}");
    assert!(
        delivered[0].contains("go    f-1") && delivered[0].ends_with("#0"),
        "{history}"
    );
    assert!(
        delivered[1].contains(&made) && delivered[1].ends_with("#2"),
        "{history}"
    );
    let json = ok_json(keel(&w, &["--json", "history", "cli"]));
    assert_eq!(json["events"][0]["event_id"], "f-1", "{json}");
    assert_eq!(json["events"][0]["taken_by"], 0, "{json}");
    let late = ok_text(keel(&w, &["history", "late"]));
    assert!(
        late.contains("receive  never") && late.contains("timed out"),
        "{late}"
    );
    assert!(
        late.contains(r#"{"done":1,"event_ids":[],"of":1}"#),
        "{late}"
    );
}
