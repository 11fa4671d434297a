//! Schedules through a real worker (docs/api.md "Schedules"): `POST /v1/schedules` creates
//! one (201, then 200 for the same definition, 409 `schedule_exists` for another), refuses
//! bad definitions naming the field and storing nothing, and needs the token and a JSON
//! body like every state change; the schedule fires runs under derived ids; it can be read,
//! paused, resumed and deleted (its runs kept); and `keel schedule` does all of it from the
//! command line, as tables and as JSON. The runs are `sample.inbox`, which waits a second
//! for an event and ends.

mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use common::{error, head, http, keel, ok_json, refused, worker};
use keel_testkit::demo::Worker;
use keel_testkit::moto::TestAccount;
use serde_json::{json, Value};

fn send(w: &Worker, method: &str, path: &str, body: &str) -> (u16, Value) {
    http(&common::addr(w), &head(w, method, path, &[]), body)
}

fn get(w: &Worker, path: &str) -> (u16, Value) {
    send(w, "GET", path, "")
}

/// A schedule of `sample.inbox` every second.
fn every_second(name: &str) -> Value {
    json!({
        "name": name,
        "workflow": "sample.inbox",
        "input": {"events": ["go"], "within_s": 1},
        "every": {"interval": {"seconds": 1}},
        "catch_up": "latest",
        "overlap": "allow"
    })
}

/// The ids of the runs the worker holds that schedule `name` started.
fn runs_of(w: &Worker, name: &str) -> Vec<String> {
    let (status, page) = get(w, "/v1/runs?limit=1000");
    assert_eq!(status, 200, "{page}");
    page["runs"]
        .as_array()
        .expect("runs")
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .filter(|id| id.starts_with(&format!("{name}@")))
        .collect()
}

/// The API creates idempotently, refuses what it cannot fire (storing nothing), fires, and
/// pauses, resumes and deletes.
#[test]
fn schedules_are_created_fired_paused_resumed_and_deleted_over_the_api() {
    let account = TestAccount::fresh().expect("moto's server (see docs/testing.md)");
    let dir = tempfile::tempdir().unwrap();
    let w = worker(&dir.path().join("data"), &account, &account.endpoint, &[]);
    let spec = every_second("tick");

    let (status, created) = send(&w, "POST", "/v1/schedules", &spec.to_string());
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["spec"], spec);
    assert_eq!(created["paused"], false);
    let (status, again) = send(&w, "POST", "/v1/schedules", &spec.to_string());
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["created_at_ms"], created["created_at_ms"]);
    let mut other = spec.clone();
    other["input"]["within_s"] = json!(2);
    let line = error(
        send(&w, "POST", "/v1/schedules", &other.to_string()),
        409,
        "schedule_exists",
    );
    assert!(line.contains("delete it first"), "{line}");

    // Refusals name the field, and store nothing.
    let refusals = [
        (
            json!({"every": {"cron": "0 3 * *"}}),
            400,
            "invalid_request",
            "every.cron",
        ),
        (
            json!({"every": {"interval": {"seconds": 0}}}),
            400,
            "invalid_request",
            "every.interval.seconds",
        ),
        (
            json!({"catch_up": {"all": {"max": 0}}}),
            400,
            "invalid_request",
            "catch_up",
        ),
        (json!({"name": "bad/name"}), 400, "invalid_request", "name"),
        (
            json!({"workflow": "no.such"}),
            400,
            "unknown_workflow",
            "no.such",
        ),
        (
            json!({"input": {"events": []}}),
            400,
            "invalid_input",
            "events",
        ),
        (json!({"when": "now"}), 400, "invalid_input", "when"),
    ];
    for (change, status, kind, words) in refusals {
        let mut bad = every_second("refused");
        for (key, value) in change.as_object().unwrap() {
            bad[key] = value.clone();
        }
        let line = error(
            send(&w, "POST", "/v1/schedules", &bad.to_string()),
            status,
            kind,
        );
        assert!(line.contains(words), "{bad}: {line}");
    }
    // No token, or no JSON: refused before the handler.
    let addr = common::addr(&w);
    let no_token =
        format!("POST /v1/schedules HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json");
    error(
        http(&addr, &no_token, &spec.to_string()),
        401,
        "unauthorised",
    );
    let text = format!(
        "POST /v1/schedules HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\nContent-Type: text/plain",
        w.token()
    );
    error(
        http(&addr, &text, &spec.to_string()),
        415,
        "unsupported_media_type",
    );
    let (status, list) = get(&w, "/v1/schedules");
    assert_eq!(status, 200);
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["spec"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["tick"], "only the created schedule is stored");
    error(get(&w, "/v1/schedules/refused"), 404, "schedule_not_found");

    // It fires every second, under ids derived from its name and the fire time.
    let deadline = Instant::now() + Duration::from_secs(30);
    let fired = loop {
        let (_, schedule) = get(&w, "/v1/schedules/tick");
        if schedule["fires"].as_u64().unwrap_or(0) >= 2 {
            break schedule;
        }
        assert!(Instant::now() < deadline, "no second fire: {schedule}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let last_run = fired["last_run"].as_str().unwrap().to_string();
    assert!(
        last_run.starts_with("tick@") && last_run.ends_with('Z'),
        "{last_run}"
    );
    assert!(runs_of(&w, "tick").contains(&last_run));

    let (status, paused) = send(&w, "POST", "/v1/schedules/tick/pause", "{}");
    assert_eq!(status, 200, "{paused}");
    assert_eq!(paused["paused"], true);
    assert_eq!(paused["next_fire_ms"], Value::Null);
    let (status, resumed) = send(&w, "POST", "/v1/schedules/tick/resume", "{}");
    assert_eq!(status, 200, "{resumed}");
    assert_eq!(resumed["paused"], false);
    assert!(resumed["not_before_ms"].as_u64().is_some(), "{resumed}");
    error(
        send(&w, "POST", "/v1/schedules/tick/stop", "{}"),
        404,
        "no_route",
    );
    error(
        send(&w, "POST", "/v1/schedules/nosuch/pause", "{}"),
        404,
        "schedule_not_found",
    );

    let runs = runs_of(&w, "tick").len();
    let (status, deleted) = send(&w, "DELETE", "/v1/schedules/tick", "{}");
    assert_eq!(status, 200, "{deleted}");
    assert_eq!(deleted["spec"]["name"], "tick");
    error(get(&w, "/v1/schedules/tick"), 404, "schedule_not_found");
    error(
        send(&w, "DELETE", "/v1/schedules/tick", "{}"),
        404,
        "schedule_not_found",
    );
    assert!(
        runs_of(&w, "tick").len() >= runs,
        "the runs it started are kept"
    );
    let (_, list) = get(&w, "/v1/schedules");
    assert_eq!(list, json!([]));
}

/// `keel schedule create|list|show|pause|resume|delete` round trip, with tables and `--json`
/// and the documented exit codes.
#[test]
fn the_cli_creates_lists_shows_pauses_resumes_and_deletes_schedules() {
    let account = TestAccount::fresh().expect("moto's server (see docs/testing.md)");
    let dir = tempfile::tempdir().unwrap();
    let w = worker(&dir.path().join("data"), &account, &account.endpoint, &[]);
    let input = dir.path().join("input.json");
    let mut file = std::fs::File::create(&input).unwrap();
    write!(file, r#"{{"events": ["go"], "within_s": 1}}"#).unwrap();
    let input = input.to_str().unwrap();

    let create = [
        "schedule",
        "create",
        "nightly-sweep",
        "--cron",
        "0 3 * * *",
        "--workflow",
        "sample.inbox",
        "--input",
        input,
        "--catch-up",
        "all:3",
        "--overlap",
        "skip",
    ];
    let out = keel(&w, &create);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8(out.stdout).unwrap();
    for words in [
        "name",
        "next fire (UTC)",
        "nightly-sweep",
        "cron 0 3 * * *",
        "all:3",
        "active",
    ] {
        assert!(table.contains(words), "{words:?} not in\n{table}");
    }
    assert!(
        table.contains(" 03:00:00"),
        "the next fire is at 03:00 UTC:\n{table}"
    );
    // The same again is the same schedule; another definition is refused (exit 2).
    assert!(keel(&w, &create).status.success());
    let mut other = create;
    other[4] = "0 4 * * *";
    refused(&keel(&w, &other), 2, "delete it first");
    refused(
        &keel(
            &w,
            &[
                "schedule",
                "create",
                "x",
                "--every",
                "0s",
                "--workflow",
                "sample.inbox",
            ],
        ),
        2,
        "at least 1",
    );
    refused(
        &keel(
            &w,
            &[
                "schedule",
                "create",
                "x",
                "--every",
                "1h",
                "--workflow",
                "sample.inbox",
                "--input",
                input,
                "--catch-up",
                "all:x",
            ],
        ),
        2,
        "skip, latest or all:N",
    );
    refused(
        &keel(
            &w,
            &[
                "schedule",
                "create",
                "x",
                "--cron",
                "0 3 * *",
                "--workflow",
                "sample.inbox",
                "--input",
                input,
            ],
        ),
        2,
        "every.cron",
    );
    let hourly = [
        "schedule",
        "create",
        "hourly",
        "--every",
        "1h",
        "--workflow",
        "sample.inbox",
        "--input",
        input,
    ];
    assert!(keel(&w, &hourly).status.success());

    let list = ok_json(keel(&w, &["--json", "schedule", "list"]));
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["spec"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["hourly", "nightly-sweep"]);
    assert_eq!(
        list[0]["spec"]["every"],
        json!({"interval": {"seconds": 3600}})
    );
    assert_eq!(list[1]["spec"]["catch_up"], json!({"all": {"max": 3}}));
    assert_eq!(list[1]["spec"]["overlap"], "skip");
    let table = String::from_utf8(keel(&w, &["schedule", "list"]).stdout).unwrap();
    assert_eq!(table.lines().count(), 3, "{table}");
    assert!(table.contains("3600s"), "{table}");

    let shown = ok_json(keel(&w, &["--json", "schedule", "show", "nightly-sweep"]));
    assert_eq!(shown["spec"]["every"], json!({"cron": "0 3 * * *"}));
    let paused =
        String::from_utf8(keel(&w, &["schedule", "pause", "nightly-sweep"]).stdout).unwrap();
    assert!(paused.contains("paused"), "{paused}");
    let shown = ok_json(keel(&w, &["--json", "schedule", "show", "nightly-sweep"]));
    assert_eq!(shown["paused"], true);
    assert_eq!(shown["next_fire_ms"], Value::Null);
    let resumed = ok_json(keel(&w, &["--json", "schedule", "resume", "nightly-sweep"]));
    assert_eq!(resumed["paused"], false);
    assert!(resumed["next_fire_ms"].as_u64().is_some());
    let deleted = keel(&w, &["schedule", "delete", "nightly-sweep"]);
    assert!(
        deleted.status.success(),
        "{}",
        String::from_utf8_lossy(&deleted.stderr)
    );
    refused(
        &keel(&w, &["schedule", "show", "nightly-sweep"]),
        2,
        "no schedule named",
    );
    let list = ok_json(keel(&w, &["--json", "schedule", "list"]));
    assert_eq!(list.as_array().unwrap().len(), 1);
}
