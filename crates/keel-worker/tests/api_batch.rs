//! Bulk actions, reruns and purges through a real worker (docs/api.md "Batches, reruns and
//! purges"): `POST /v1/runs:batch` dry-runs, acts in bounded calls that follow the
//! continuation, filters by status, id prefix and creation time, reports skips with their
//! reasons and refuses bad requests changing nothing; `POST /v1/runs/{id}/rerun` starts a
//! finished run again (and refuses an unfinished one); a purge deletes finished runs; and
//! `keel batch`, `keel rerun` and `keel purge` drive it all, asking before acting on several
//! runs and retrying a call while the worker restarts. The runs are `sample.inbox`: one that
//! waits for an event stays running, one started with its event completes at once.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{error, finished, head, http, keel, ok_json, refused, worker, KEEL};
use keel_testkit::demo::{self, Worker};
use keel_testkit::moto::TestAccount;
use serde_json::{json, Value};

/// `POST` of `body` to `path` on `w`.
fn post(w: &Worker, path: &str, body: &str) -> (u16, Value) {
    http(&common::addr(w), &head(w, "POST", path, &[]), body)
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

/// Starts a `sample.inbox` run `id` that waits for an event `go`: it stays running.
fn waiting(w: &Worker, id: &str) -> Value {
    let start = json!({"workflow": "sample.inbox", "id": id, "input": {"events": ["go"]}});
    ok(post(w, "/v1/runs", &start.to_string()))
}

/// Starts a `sample.inbox` run `id` with its event in its mailbox and waits until it
/// completed.
fn completed(w: &Worker, id: &str) -> Value {
    let start = json!({
        "workflow": "sample.inbox", "id": id, "input": {"events": ["go"]},
        "event": {"name": "go", "event_id": format!("{id}-go"), "payload": {}}
    });
    ok(post(w, "/v1/runs", &start.to_string()));
    let record = finished(w, id);
    assert_eq!(record["status"], "completed", "{record}");
    record
}

/// Every run's id and status, in id order.
fn statuses(w: &Worker) -> Vec<(String, String)> {
    let page = ok(get(w, "/v1/runs?limit=1000"));
    page["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["id"].as_str().unwrap().into(),
                r["status"].as_str().unwrap().into(),
            )
        })
        .collect()
}

/// Waits until run `id` has `status`; fails the test after 30 s naming what it saw.
fn until_status(w: &Worker, id: &str, status: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let record = ok(get(w, &format!("/v1/runs/{}", id.replace('/', "%2F"))));
        if record["status"] == status {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "run {id} did not become {status} within 30 s: {record}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The ids of a report's runs.
fn ids(report: &Value) -> Vec<String> {
    report["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect()
}

/// `ms` since the Unix epoch as RFC 3339.
fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// Now, in ms since the Unix epoch.
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A batch dry-runs without changing anything, then acts in calls of `limit` runs that
/// follow the continuation to the last match; filters by status, id prefix and creation
/// time select exactly their runs; runs whose state does not admit the action are skipped
/// with the reason; bad requests are refused with 400 and change nothing; a rerun starts a
/// finished run again under its default or given id (the same id again is the same run, a
/// running run is refused with 409); a purge needs a time and finished statuses, and deletes
/// exactly the finished runs it matches.
#[test]
fn batches_act_in_bounded_calls_skip_with_reasons_and_refuse_bad_requests() {
    let account = TestAccount::fresh().expect("moto's server (see docs/testing.md)");
    let dir = tempfile::tempdir().unwrap();
    let w = worker(&dir.path().join("data"), &account, &account.endpoint, &[]);
    for n in 1..=5 {
        waiting(&w, &format!("fleet-{n}"));
    }
    completed(&w, "done-1");
    let last_old = completed(&w, "done-2");
    // The later runs are created after this time, the earlier ones before.
    let boundary = last_old["updated_at_ms"].as_u64().unwrap() + 1;
    while now_ms() <= boundary {
        std::thread::yield_now();
    }
    waiting(&w, "late-1");
    completed(&w, "late-2");
    let before = statuses(&w);

    // Refusals: each would cancel every run it names if it were taken.
    let refusals = [
        (
            json!({"action": "cancel", "filter": {"id_prefix": "fleet-", "bogus": 1}}),
            "invalid_input",
            "bogus",
        ),
        (
            json!({"action": "cancel", "filter": {"id_prefix": "fleet-"}, "dry": true}),
            "invalid_input",
            "dry",
        ),
        (
            json!({"action": "cancel", "filter": {"statuses": ["runing"]}}),
            "invalid_status",
            "runing",
        ),
        (
            json!({"action": "cancel", "filter": {}}),
            "invalid_request",
            "needs a filter",
        ),
        (
            json!({"action": "cancel", "filter": {"id_prefix": "fleet-"}, "limit": 0}),
            "invalid_request",
            "limit 0",
        ),
        (
            json!({"action": "cancel", "filter": {"created_after": "last tuesday"}}),
            "invalid_request",
            "filter.created_after",
        ),
        (
            json!({"action": "explode", "filter": {"id_prefix": "fleet-"}}),
            "invalid_request",
            "explode",
        ),
        (
            json!({"action": "cancel", "filter": {"id_prefix": "fleet-"}, "note": "x"}),
            "invalid_request",
            "resolve action only",
        ),
        (
            json!({"action": "purge", "filter": {"id_prefix": "done-"}}),
            "invalid_request",
            "finished_before",
        ),
        (
            json!({"action": "purge", "filter": {"statuses": ["running"],
                   "finished_before": "2100-01-01T00:00:00Z"}}),
            "invalid_request",
            "running is not finished",
        ),
    ];
    for (body, kind, needle) in refusals {
        let line = error(post(&w, "/v1/runs:batch", &body.to_string()), 400, kind);
        assert!(line.contains(needle), "{needle:?} not in {line:?} ({body})");
    }
    assert_eq!(statuses(&w), before, "refusals change nothing");

    // The list's filters beyond status and prefix (the console's), and the counts.
    let late = ok(get(
        &w,
        &format!(
            "/v1/runs?workflow=sample.inbox&created_after={}",
            rfc3339(boundary)
        ),
    ));
    let late: Vec<&str> = late["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(late, ["late-1", "late-2"]);
    let line = error(
        get(&w, "/v1/runs?created_before=yesterday"),
        400,
        "invalid_request",
    );
    assert!(line.contains("created_before"), "{line}");
    let counts = ok(get(&w, "/v1/runs:counts"));
    assert_eq!(counts["total"], before.len());
    for (status, n) in counts["counts"].as_object().unwrap() {
        let held = before.iter().filter(|(_, s)| s == status).count();
        assert_eq!(n, held, "{status}");
    }
    assert_eq!(counts["counts"]["running"], 6, "{counts}");

    // A dry run counts every match, lists the first `limit`, and changes nothing.
    let pause =
        json!({"action": "pause", "filter": {"statuses": ["running"], "id_prefix": "fleet-"}});
    let mut dry = pause.clone();
    dry["dry_run"] = true.into();
    dry["limit"] = 2.into();
    let plan = ok(post(&w, "/v1/runs:batch", &dry.to_string()));
    assert_eq!(
        (plan["matched"].as_u64(), plan["done"].as_u64()),
        (Some(5), Some(5)),
        "{plan}"
    );
    assert_eq!(ids(&plan), ["fleet-1", "fleet-2"], "{plan}");
    assert!(plan["runs"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["outcome"] == "would_act"));
    assert_eq!(plan["next"], Value::Null, "{plan}");
    assert_eq!(statuses(&w), before, "a dry run changes nothing");

    // The real thing, two runs a call: three calls, each going on where the last stopped.
    let mut request = pause.clone();
    request["limit"] = 2.into();
    let mut calls = Vec::new();
    loop {
        let report = ok(post(&w, "/v1/runs:batch", &request.to_string()));
        assert_eq!(report["dry_run"], false, "{report}");
        calls.push(ids(&report));
        assert!(report["runs"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["outcome"] == "done"));
        match report["next"].as_str() {
            Some(next) => request["after"] = next.into(),
            None => break,
        }
        assert!(calls.len() < 10, "the continuation never ends: {calls:?}");
    }
    assert_eq!(
        calls,
        [
            vec!["fleet-1", "fleet-2"],
            vec!["fleet-3", "fleet-4"],
            vec!["fleet-5"]
        ]
    );
    for n in 1..=5 {
        until_status(&w, &format!("fleet-{n}"), "paused");
    }
    // The prefix kept late-1 out, the status the finished runs.
    let now = statuses(&w);
    assert!(
        now.contains(&("late-1".into(), "running".into())),
        "{now:?}"
    );
    assert!(
        now.contains(&("done-1".into(), "completed".into())),
        "{now:?}"
    );

    // Created after the boundary: late-1 is cancelled, late-2 skipped for its state.
    let cancel = json!({"action": "cancel", "filter": {"created_after": rfc3339(boundary)}});
    let report = ok(post(&w, "/v1/runs:batch", &cancel.to_string()));
    assert_eq!(ids(&report), ["late-1", "late-2"], "{report}");
    let runs = report["runs"].as_array().unwrap();
    assert_eq!(runs[0]["outcome"], "done", "{report}");
    assert_eq!(runs[1]["outcome"], "skipped", "{report}");
    let reason = runs[1]["reason"].as_str().unwrap();
    assert!(
        reason.contains("is completed") && reason.contains("cancel needs"),
        "{reason}"
    );
    assert_eq!(
        (report["done"].as_u64(), report["skipped"].as_u64()),
        (Some(1), Some(1))
    );
    finished(&w, "late-1");
    // The same call again acts on nothing twice.
    let again = ok(post(&w, "/v1/runs:batch", &cancel.to_string()));
    assert_eq!(again["done"], 0, "{again}");

    // `?prefix=` on the list.
    let page = ok(get(&w, "/v1/runs?prefix=fleet-"));
    let listed: Vec<&str> = page["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        listed,
        ["fleet-1", "fleet-2", "fleet-3", "fleet-4", "fleet-5"]
    );

    // Reruns: the default id, a given one (the same again is the same run), and refusals.
    let (status, rerun) = post(&w, "/v1/runs/done-1/rerun", "{}");
    assert_eq!(status, 201, "{rerun}");
    assert_eq!(
        (rerun["id"].as_str(), rerun["rerun_of"].as_str()),
        (Some("done-1.rerun-1"), Some("done-1"))
    );
    assert_eq!(rerun["input"]["events"], json!(["go"]), "{rerun}");
    let body = json!({"as": "redo-2", "input": {"events": ["go", "go"]}}).to_string();
    let (status, first) = post(&w, "/v1/runs/done-2/rerun", &body);
    assert_eq!(status, 201, "{first}");
    let (status, second) = post(&w, "/v1/runs/done-2/rerun", &body);
    assert_eq!(status, 200, "the same rerun again: {second}");
    assert_eq!(second["created_at_ms"], first["created_at_ms"]);
    let line = error(post(&w, "/v1/runs/late-1.x/rerun", "{}"), 404, "not_found");
    assert!(line.contains("late-1.x"), "{line}");
    let line = error(
        post(&w, "/v1/runs/redo-2/rerun", "{}"),
        409,
        "invalid_state",
    );
    assert!(line.contains("running"), "{line}");
    error(
        post(&w, "/v1/runs/done-1/rerun", r#"{"id": "x"}"#),
        400,
        "invalid_input",
    );
    let history = ok(get(&w, "/v1/runs/done-2/history"));
    let noted: Vec<&Value> = history["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "rerun_started")
        .collect();
    assert_eq!(noted.len(), 1, "one note for the repeated rerun: {history}");
    assert_eq!(noted[0]["run"], "redo-2");

    // A purge of finished `done-` and `late-` runs; the running reruns are not finished.
    let purge = json!({"action": "purge", "filter": {
        "statuses": ["completed", "compensated"], "finished_before": "2100-01-01T00:00:00Z"}});
    let report = ok(post(&w, "/v1/runs:batch", &purge.to_string()));
    assert_eq!(
        ids(&report),
        ["done-1", "done-2", "late-1", "late-2"],
        "{report}"
    );
    assert_eq!(report["done"], 4, "{report}");
    for id in ["done-1", "done-2", "late-1", "late-2"] {
        error(get(&w, &format!("/v1/runs/{id}")), 404, "not_found");
    }
    let left: Vec<String> = statuses(&w).into_iter().map(|(id, _)| id).collect();
    assert_eq!(
        left,
        [
            "done-1.rerun-1",
            "fleet-1",
            "fleet-2",
            "fleet-3",
            "fleet-4",
            "fleet-5",
            "redo-2"
        ]
    );
}

/// `keel batch` refuses to act on several runs when it cannot ask (stdin is no terminal)
/// unless `--yes`, and then acts on exactly the runs its filter matches, call after call;
/// a call made while the worker is down is made again once it is back on its port;
/// `keel rerun` starts a finished run again and `keel status` and `keel history` show the
/// link both ways; `keel purge --dry-run` lists what it would delete and deletes nothing.
#[test]
fn the_cli_asks_before_acting_follows_the_continuation_and_outlasts_a_restart() {
    let account = TestAccount::fresh().expect("moto's server (see docs/testing.md)");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // A fixed port, so that the worker comes back where the CLI keeps calling.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let start = |data: &Path| {
        let command =
            demo::worker_command(Path::new(KEEL), data, &account, &account.endpoint, &listen);
        Worker::start(command, data).expect("keel worker")
    };
    let mut w = start(&data);
    for n in 1..=3 {
        waiting(&w, &format!("cli-{n}"));
    }
    waiting(&w, "keep-1");
    completed(&w, "fin-1");
    let before = statuses(&w);

    let out = keel(
        &w,
        &["batch", "pause", "--status", "running", "--prefix", "cli-"],
    );
    refused(&out, 2, "add --yes");
    assert!(String::from_utf8_lossy(&out.stderr).contains("3 runs"));
    assert_eq!(statuses(&w), before, "nothing done without --yes");
    let out = keel(&w, &["batch", "pause", "--status", "running"]);
    refused(&out, 2, "add --yes");

    let args = [
        "--json", "batch", "pause", "--status", "running", "--prefix", "cli-",
    ];
    let report = ok_json(keel(&w, &[&args[..], &["--yes", "--limit", "2"]].concat()));
    assert_eq!(
        (report["done"].as_u64(), report["calls"].as_u64()),
        (Some(3), Some(2)),
        "{report}"
    );
    assert_eq!(ids(&report), ["cli-1", "cli-2", "cli-3"], "{report}");
    for n in 1..=3 {
        until_status(&w, &format!("cli-{n}"), "paused");
    }
    assert!(statuses(&w).contains(&("keep-1".into(), "running".into())));
    // The table: one row per run, the progress on stderr.
    let out = keel(&w, &["batch", "pause", "--prefix", "cli-", "--yes"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.starts_with("id "), "{table}");
    assert_eq!(table.matches("skipped").count(), 3, "{table}");
    assert!(table.contains("is paused: pause needs running"), "{table}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("pause call 1"));

    // The worker dies; the CLI keeps making its call until the worker is back.
    w.child.kill().unwrap();
    w.child.wait().unwrap();
    let mut cli = w
        .keel(Path::new(KEEL))
        .args(["batch", "resume", "--prefix", "cli-", "--yes"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(cli.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    assert!(line.contains("trying the same call again"), "{line}");
    w = start(&data);
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
    let status = cli.wait().unwrap();
    assert!(status.success(), "{line}{rest}");
    assert!(rest.contains("resume: 3 runs done"), "{rest}");
    for n in 1..=3 {
        until_status(&w, &format!("cli-{n}"), "running");
    }

    // keel rerun, and the link in status and history.
    let rerun = ok_json(keel(
        &w,
        &["--json", "rerun", "fin-1", "--as", "fin-1-again"],
    ));
    assert_eq!(rerun["rerun_of"], "fin-1", "{rerun}");
    let out = keel(&w, &["status", "fin-1-again"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("rerun of fin-1"));
    let out = keel(&w, &["history", "fin-1"]);
    let history = String::from_utf8_lossy(&out.stdout);
    assert!(
        history.contains("rerun as:") && history.contains("fin-1-again"),
        "{history}"
    );
    let out = keel(&w, &["rerun", "keep-1"]);
    refused(&out, 2, "only a finished run is rerun");

    // keel purge: a dry run lists, deletes nothing; unfinished statuses are refused.
    let out = keel(&w, &["purge", "--before", "2100-01-01", "--dry-run"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(
        listed.contains("fin-1") && listed.contains("would act"),
        "{listed}"
    );
    assert!(!listed.contains("cli-1"), "{listed}");
    assert_eq!(
        ok_json(keel(&w, &["--json", "status", "fin-1"]))["status"],
        "completed"
    );
    let out = keel(
        &w,
        &["purge", "--before", "2100-01-01", "--status", "running"],
    );
    refused(&out, 2, "running is not finished");
    let out = keel(&w, &["purge", "--before", "someday"]);
    assert_eq!(out.status.code(), Some(2));
    let out = keel(&w, &["--json", "purge", "--before", "2100-01-01", "--yes"]);
    assert_eq!(ok_json(out)["done"], 1);
    error(get(&w, "/v1/runs/fin-1"), 404, "not_found");
}

/// `keel worker --retention-for` refuses a workflow the worker does not register, naming
/// the ones it does, before it opens its store.
#[test]
fn retention_for_an_unknown_workflow_is_refused_naming_the_registered_ones() {
    let account = TestAccount::fresh().expect("moto's server (see docs/testing.md)");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut command = common::worker_command(
        &data,
        &account,
        &account.endpoint,
        &["--retention", "30d", "--retention-for", "sample.inbx=12h"],
    );
    let out = common::refused_start(&mut command);
    refused(&out, 2, "--retention-for sample.inbx: no such workflow");
    assert!(String::from_utf8_lossy(&out.stderr).contains("sample.inbox"));
    assert!(!data.join("journal").exists(), "the store was not opened");
    let out = common::refused_start(&mut common::worker_command(
        &data,
        &account,
        &account.endpoint,
        &["--retention-for", "sample.inbox"],
    ));
    refused(&out, 2, "WORKFLOW=DURATION");
}
