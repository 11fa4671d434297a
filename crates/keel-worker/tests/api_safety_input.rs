//! What callers send (docs/api.md "Safety"): run ids that clash with children's or look like paths
//! or flags, unknown fields and inputs over the limits are refused naming what is wrong, with
//! nothing stored or created; every error is `{error, kind}` JSON; and a worker that cannot take
//! its port calls no one.

mod common;

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use common::{
    addr, error, http, keel, refused, refused_start, role, roles, wait_for_attempts, worker, KEEL,
};
use keel_testkit::demo;
use keel_testkit::moto::TestAccount;
use keel_testkit::proxy::{Dist, Fault, FaultProxy, FaultRule, Rules};
use serde_json::{json, Value};

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
    let typo = write("typo.json", &typo_value());
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

/// The input of an `iam.service-role` run with a typo in a field name (`managed_policy_arn`).
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

/// The JSON a successful CLI call printed; fails the test on any other exit.
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
    // (The limit holds an input and an event payload at their bounds, for a start with an
    // event.)
    let big_body = "x".repeat(
        keel_engine::limits::INPUT_BYTES_MAX
            + keel_engine::limits::EVENT_PAYLOAD_BYTES_MAX
            + 20 * 1024,
    );
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
