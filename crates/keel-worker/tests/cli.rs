//! The `keel` binary end to end: a real worker process on a real data directory, talking to
//! moto's server through the fault proxy, driven by the real CLI; moto's own state is read
//! directly as ground truth.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use keel_testkit::demo::{self, Worker};
use keel_testkit::inventory::Inventory;
use keel_testkit::moto::TestAccount;
use keel_testkit::proxy::{Dist, FaultProxy, Rules};
use serde_json::Value;

const KEEL: &str = env!("CARGO_BIN_EXE_keel");

fn worker_command(dir: &Path, account: &TestAccount, endpoint: &str, listen: &str) -> Command {
    let mut command = demo::worker_command(Path::new(KEEL), dir, account, endpoint, listen);
    command.args(["--grace-s", "10"]).stderr(Stdio::piped());
    command
}

/// Starts a worker (with `extra` environment) and waits for its "listening" line.
fn worker(dir: &Path, account: &TestAccount, endpoint: &str, extra: &[(&str, &str)]) -> Worker {
    let mut command = worker_command(dir, account, endpoint, "127.0.0.1:0");
    command.envs(extra.iter().copied());
    Worker::start(command, dir).expect("keel worker starts")
}

fn keel_command(w: &Worker) -> Command {
    w.keel(Path::new(KEEL))
}

/// `keel ARGS` against `w`, with the token from its data directory.
fn keel(w: &Worker, args: &[&str]) -> Output {
    w.keel(Path::new(KEEL))
        .args(args)
        .output()
        .expect("running keel")
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

fn refused(output: &Output, code: i32, needle: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(code), "{stderr}");
    assert!(stderr.contains(needle), "{needle:?} not in {stderr:?}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
}

fn write(dir: &Path, name: &str, value: &Value) -> String {
    let path = dir.join(name);
    std::fs::write(&path, serde_json::to_vec(value).unwrap()).unwrap();
    path.to_string_lossy().into_owned()
}

fn device(name: &str) -> Value {
    serde_json::to_value(keel_workflows::sample::device(name)).unwrap()
}

/// The CLI starts a run idempotently (same id and input, same run; another input refused),
/// refuses bad requests with one clear line and stores nothing for them, and shows history,
/// stats and metrics; a second worker on the same data directory and an unreachable worker are
/// reported plainly.
#[test]
fn the_cli_starts_idempotently_refuses_bad_requests_and_shows_history_and_stats() {
    keel_testkit::init_tracing();
    let account = TestAccount::fresh().expect("moto's server (see docs/testing.md)");
    let proxy = FaultProxy::start(&account.endpoint, Rules::seeded(1)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let w = worker(&data, &account, &proxy.endpoint(), &[]);
    let api = &w.api.clone();
    // The data directory is owner-only.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&data).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700, "{mode:o}");

    let input = write(dir.path(), "d1.json", &device("cli-1"));
    let first = ok_json(keel(
        &w,
        &[
            "--json",
            "start",
            "iot.onboard-device",
            "--id",
            "d1",
            "--input",
            &input,
            "--wait",
        ],
    ));
    assert_eq!(first["status"], "completed", "{first}");
    // The same id and input: the same run, nothing new.
    let again = ok_json(keel(
        &w,
        &[
            "--json",
            "start",
            "iot.onboard-device",
            "--id",
            "d1",
            "--input",
            &input,
        ],
    ));
    assert_eq!(again["output"], first["output"]);
    assert_eq!(again["created_at_ms"], first["created_at_ms"]);
    // The same id, another input: refused, exit 2, one clear line.
    let other = write(dir.path(), "d2.json", &device("cli-2"));
    let out = keel(
        &w,
        &[
            "start",
            "iot.onboard-device",
            "--id",
            "d1",
            "--input",
            &other,
        ],
    );
    refused(&out, 2, "already exists");
    // Malformed input file, unknown workflow, a bad field, an unknown run.
    let broken = dir.path().join("broken.json");
    std::fs::write(&broken, "{ not json").unwrap();
    let out = keel(
        &w,
        &[
            "start",
            "iot.onboard-device",
            "--id",
            "x",
            "--input",
            broken.to_str().unwrap(),
        ],
    );
    refused(&out, 2, "is not JSON");
    let out = keel(
        &w,
        &["start", "no.such-flow", "--id", "x", "--input", &input],
    );
    refused(&out, 2, "unknown workflow \"no.such-flow\"");
    let mut bad = device("cli-3");
    bad["thing_name"] = "has space".into();
    let bad = write(dir.path(), "bad.json", &bad);
    let out = keel(
        &w,
        &["start", "iot.onboard-device", "--id", "x", "--input", &bad],
    );
    refused(&out, 2, "field thing_name");
    let out = keel(&w, &["status", "nobody"]);
    refused(&out, 2, "no run with id nobody");
    let out = keel(&w, &["list", "--status", "sideways"]);
    refused(&out, 2, "unknown status \"sideways\"");
    // None of that stored anything.
    let runs = ok_json(keel(&w, &["--json", "list"]));
    assert_eq!(runs["runs"].as_array().unwrap().len(), 1, "{runs}");

    // History: one row per step, each completed once.
    let out = keel(&w, &["history", "d1"]);
    assert!(out.status.success());
    let table = String::from_utf8_lossy(&out.stdout);
    for kind in [
        "aws.iot.create-thing",
        "aws.iot.create-key-material",
        "aws.iot.register-certificate-pem",
        "aws.iot.activate-certificate",
    ] {
        assert!(table.contains(kind), "{kind} in\n{table}");
    }
    let history = ok_json(keel(&w, &["--json", "history", "d1"]));
    let operations = history["operations"].as_array().unwrap();
    assert_eq!(operations.len(), 8, "{history}");
    assert!(operations.iter().all(|o| o["outcome"] == "completed"));
    // Stats: every step kind with its count.
    let stats = ok_json(keel(&w, &["--json", "stats"]));
    let create = stats
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["operation"] == "step:aws.iot.create-thing")
        .expect("CreateThing's stats");
    assert_eq!(create["count"], 1);
    let out = keel(&w, &["stats"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("p99 ms"));
    // Metrics in Prometheus text.
    let metrics = ureq::get(&format!("{api}/metrics"))
        .set("Authorization", &format!("Bearer {}", w.token()))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    assert!(
        metrics.contains("keel_runs{status=\"completed\"} 1"),
        "{metrics}"
    );
    // The run completed: the worker holds nothing of it.
    for state in ["loaded", "parked"] {
        assert!(
            metrics.contains(&format!("keel_runs_in_memory{{state=\"{state}\"}} 0")),
            "{metrics}"
        );
    }
    // Latency as a histogram: one execution, so every bucket from its duration up, and
    // `+Inf` last, count it once.
    let create = "operation=\"step:aws.iot.create-thing\"";
    assert!(
        metrics.contains(&format!("keel_operation_seconds_count{{{create}}} 1")),
        "{metrics}"
    );
    assert!(metrics.contains(&format!("keel_operation_seconds_sum{{{create}}} ")));
    let buckets: Vec<&str> = metrics
        .lines()
        .filter(|l| {
            l.starts_with("keel_operation_seconds_bucket{le=")
                && l.contains(&format!(",{create}}}"))
        })
        .collect();
    assert_eq!(buckets.len(), 19, "{metrics}");
    assert!(buckets[18].starts_with("keel_operation_seconds_bucket{le=\"+Inf\","));
    assert!(buckets[18].ends_with(" 1"), "{metrics}");
    let counts: Vec<&str> = buckets
        .iter()
        .map(|l| l.rsplit(' ').next().unwrap())
        .collect();
    let first_one = counts
        .iter()
        .position(|&c| c == "1")
        .expect("a bucket holds it");
    assert!(counts[..first_one].iter().all(|&c| c == "0"), "{buckets:?}");
    assert!(counts[first_one..].iter().all(|&c| c == "1"), "{buckets:?}");

    // A second worker on the same data directory: one clear line, exit 1.
    let out = worker_command(&data, &account, &proxy.endpoint(), "127.0.0.1:0")
        .output()
        .unwrap();
    refused(&out, 1, "locked by another process");

    // An unreachable worker says so.
    let mut unreachable = keel_command(&w);
    drop(w);
    let out = unreachable.args(["status", "d1"]).output().unwrap();
    refused(&out, 1, "cannot reach the worker");
}

/// A run waiting on STS is cancelled and compensated; another, interrupted by SIGTERM while
/// it waits, is drained (exit 0) and resumed to completion by the restarted worker, leaving
/// only its role in moto.
#[test]
fn a_waiting_run_is_cancelled_and_compensated_and_sigterm_drains_then_the_run_resumes() {
    keel_testkit::init_tracing();
    let account = TestAccount::fresh().expect("moto's server (see docs/testing.md)");
    // IAM roles become assumable only after 3 s: the role run waits on STS meanwhile.
    let mut rules = Rules::seeded(2);
    rules.assume_role.propagation = Dist::fixed(3_000);
    let proxy = FaultProxy::start(&account.endpoint, rules).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let role = |name: &str| {
        let mut core = keel_workflows::sample::core(name, 0);
        core.role.name = name.into();
        serde_json::to_value(core.role).unwrap()
    };
    let w = worker(&data, &account, &proxy.endpoint(), &[]);
    let doomed = write(dir.path(), "doomed.json", &role("doomed-role"));
    ok_json(keel(
        &w,
        &[
            "--json",
            "start",
            "iam.service-role",
            "--id",
            "doomed",
            "--input",
            &doomed,
        ],
    ));
    // The cancellation is durable when the verb returns; the run compensates after.
    let cancelled = ok_json(keel(&w, &["--json", "cancel", "doomed"]));
    assert_eq!(cancelled["id"], "doomed");
    // Another role run, interrupted by SIGTERM while it waits: the worker drains and exits 0.
    let kept = write(dir.path(), "kept.json", &role("kept-role"));
    ok_json(keel(
        &w,
        &[
            "--json",
            "start",
            "iam.service-role",
            "--id",
            "kept",
            "--input",
            &kept,
        ],
    ));
    let mut w = w;
    unsafe_free_sigterm(w.child.id());
    let status = w.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    // Restarted, it resumes the run, which completes; the cancelled one left nothing.
    let w = worker(&data, &account, &proxy.endpoint(), &[]);
    let out = keel(
        &w,
        &[
            "--json",
            "start",
            "iam.service-role",
            "--id",
            "kept",
            "--input",
            &kept,
            "--wait",
        ],
    );
    let kept = ok_json(out);
    assert_eq!(kept["status"], "completed", "{kept}");
    let doomed = ok_json(keel(&w, &["--json", "status", "doomed"]));
    assert_eq!(doomed["status"], "compensated", "{doomed}");
    let truth = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(async { Inventory::read(&account.sdk_config().await).await.unwrap() });
    let names: Vec<&str> = truth.roles.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["kept-role"], "{}", truth.summary());
}

/// SIGTERM through the `kill` program (the workspace forbids unsafe code).
fn unsafe_free_sigterm(pid: u32) {
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}
