//! Trace export through a real worker (`keel worker --otlp-endpoint`, docs/observability.md):
//! a run, its operations and their attempts arrive at an OTLP receiver as one trace with the
//! right parents and Keel's attributes; a bad endpoint is refused at start, naming the flag;
//! a collector that is not there neither holds a run nor the worker's stop. The receiver is
//! a real HTTP server on loopback decoding the real OTLP protobuf the worker sends. The runs
//! are `iam.service-role` against moto.

mod common;

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{keel, refused, refused_start, role, worker, KEEL};
use keel_testkit::demo::Worker;
use keel_testkit::moto::TestAccount;
use keel_testkit::proxy::{Fault, FaultProxy, FaultRule, Rules};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;

/// The test's OTLP/HTTP receiver: every span of every request to `POST /v1/traces`,
/// decoded from protobuf, with the `service.name` of its resource.
#[derive(Default)]
struct Receiver {
    spans: Mutex<Vec<(String, Span)>>,
}

impl Receiver {
    /// Starts a receiver on a free loopback port, on a thread and runtime of its own;
    /// returns it and its base URL.
    fn start() -> (Arc<Receiver>, String) {
        let receiver = Arc::new(Receiver::default());
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::clone(&receiver);
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let app = axum::Router::new()
                    .route("/v1/traces", axum::routing::post(take))
                    .with_state(state);
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                axum::serve(listener, app).await.unwrap();
            });
        });
        (receiver, url)
    }

    fn spans(&self) -> Vec<(String, Span)> {
        self.spans.lock().unwrap().clone()
    }
}

/// `POST /v1/traces`: a protobuf `ExportTraceServiceRequest`, answered with an empty
/// `ExportTraceServiceResponse` (all accepted); anything else is a 400.
async fn take(
    axum::extract::State(receiver): axum::extract::State<Arc<Receiver>>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> (axum::http::StatusCode, Vec<u8>) {
    let protobuf = headers
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|t| t == "application/x-protobuf");
    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
        return (axum::http::StatusCode::BAD_REQUEST, Vec::new());
    };
    if !protobuf {
        return (axum::http::StatusCode::BAD_REQUEST, Vec::new());
    }
    let mut spans = receiver.spans.lock().unwrap();
    for resource in request.resource_spans {
        let service = resource
            .resource
            .iter()
            .flat_map(|r| &r.attributes)
            .find(|a| a.key == "service.name")
            .and_then(|a| text(a.value.as_ref()?.value.as_ref()?))
            .unwrap_or_default();
        for scope in resource.scope_spans {
            for span in scope.spans {
                spans.push((service.clone(), span));
            }
        }
    }
    let answer = ExportTraceServiceResponse::default().encode_to_vec();
    (axum::http::StatusCode::OK, answer)
}

/// A string attribute value.
fn text(value: &Any) -> Option<String> {
    match value {
        Any::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

/// Span `span`'s attribute `key`, as text (integers written out).
fn attribute(span: &Span, key: &str) -> Option<String> {
    let value = span.attributes.iter().find(|a| a.key == key)?;
    match value.value.as_ref()?.value.as_ref()? {
        Any::StringValue(s) => Some(s.clone()),
        Any::IntValue(n) => Some(n.to_string()),
        other => Some(format!("{other:?}")),
    }
}

/// Writes `iam.service-role`'s input for role `name` to a file in `dir`; its path.
fn role_input(dir: &Path, name: &str) -> String {
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, role(name).to_string()).unwrap();
    path.to_str().unwrap().to_string()
}

/// Starts run `id` of `iam.service-role` and waits until it completes.
fn run_to_completion(w: &Worker, dir: &Path, id: &str) {
    let input = role_input(dir, &format!("{id}-role"));
    let out = keel(
        w,
        &[
            "--json",
            "start",
            "iam.service-role",
            "--id",
            id,
            "--input",
            &input,
            "--wait",
        ],
    );
    assert!(
        out.status.success(),
        "run {id}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Sends SIGTERM to worker `w` and waits (at most `within`) for it to exit: its exit code
/// and how long the stop took.
fn stop(w: &mut Worker, within: Duration) -> (i32, Duration) {
    let signalled = Instant::now();
    let status = Command::new("kill")
        .args(["-TERM", &w.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    while signalled.elapsed() < within {
        if let Some(status) = w.child.try_wait().unwrap() {
            return (status.code().unwrap_or(-1), signalled.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("the worker did not stop within {within:?} of SIGTERM");
}

/// A worker with `--otlp-endpoint` exports a completed run as one trace: a `run` span with
/// `keel.run_id`, operation spans (`step`, `wait`) that are its children with
/// `keel.idempotency_key` and `keel.operation`, and `attempt` spans that are children of
/// their step with the same key and `keel.attempt` (a failed attempt with an error status,
/// the last one ok); flushed at the graceful stop, which exits 0.
#[test]
fn a_run_its_operations_and_their_attempts_arrive_as_one_trace() {
    let account = TestAccount::fresh().expect("moto's server (see docs/testing.md)");
    let (receiver, url) = Receiver::start();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // The role's creation fails with a 503 three times (the SDK's own retries included), so
    // the step has a failed attempt before the one that succeeds.
    let mut rules = Rules::seeded(26);
    rules.faults.push(
        FaultRule::new(Fault::ServerError { status: 503 })
            .operation("CreateRole")
            .limit(3),
    );
    let proxy = FaultProxy::start(&account.endpoint, rules).unwrap();
    let mut w = worker(
        &data,
        &account,
        &proxy.endpoint(),
        &["--otlp-endpoint", &url],
    );
    run_to_completion(&w, dir.path(), "traced");
    let (code, _) = stop(&mut w, Duration::from_secs(60));
    assert_eq!(code, 0, "the worker did not drain");

    let spans = receiver.spans();
    assert!(
        spans.iter().all(|(service, _)| service == "keel-worker"),
        "service.name"
    );
    let spans: Vec<Span> = spans.into_iter().map(|(_, span)| span).collect();
    let names: Vec<&str> = spans.iter().map(|s| s.name.as_str()).collect();
    let runs: Vec<&Span> = spans
        .iter()
        .filter(|s| s.name == "run" && attribute(s, "keel.run_id").as_deref() == Some("traced"))
        .collect();
    assert_eq!(runs.len(), 1, "one run span for the run, in {names:?}");
    let run = runs[0];
    assert!(run.parent_span_id.is_empty(), "the run span is the root");
    assert_eq!(
        attribute(run, "keel.workflow").as_deref(),
        Some("iam.service-role")
    );
    let trace = &run.trace_id;
    assert_eq!(trace.len(), 16);

    // Operations: children of the run span, each with the run's id and its own key.
    let operations: Vec<&Span> = spans
        .iter()
        .filter(|s| s.parent_span_id == run.span_id)
        .filter(|s| s.name == "step" || s.name == "wait")
        .collect();
    let steps: Vec<&Span> = operations
        .iter()
        .copied()
        .filter(|s| s.name == "step")
        .collect();
    assert!(
        !steps.is_empty(),
        "the role's steps under the run span, in {names:?}"
    );
    assert!(
        operations.iter().any(|s| s.name == "wait"),
        "the wait for the role under the run span, in {names:?}"
    );
    let mut keys = HashMap::new();
    for op in &operations {
        assert_eq!(&op.trace_id, trace, "{} in the run's trace", op.name);
        assert_eq!(attribute(op, "keel.run_id").as_deref(), Some("traced"));
        let key = attribute(op, "keel.idempotency_key").expect("keel.idempotency_key");
        assert_eq!(key.len(), 36, "a UUID: {key}");
        let kind = attribute(op, "keel.kind").expect("keel.kind");
        assert_eq!(
            attribute(op, "keel.operation"),
            Some(format!("{}:{kind}", op.name))
        );
        let ok = StatusCode::Ok as i32;
        assert_eq!(op.status.as_ref().map(|s| s.code), Some(ok), "{kind}");
        assert!(keys.insert(op.span_id.clone(), key).is_none());
    }
    assert!(
        steps
            .iter()
            .any(|s| attribute(s, "keel.operation").as_deref() == Some("step:aws.iam.create-role")),
        "the role's creation"
    );

    // Attempts: children of their step, with its key, numbered from 1; every attempt but
    // the last failed retryably (an error status), the last is ok.
    let attempts: Vec<&Span> = spans.iter().filter(|s| s.name == "attempt").collect();
    for step in &steps {
        let mut mine: Vec<&Span> = attempts
            .iter()
            .copied()
            .filter(|a| a.parent_span_id == step.span_id)
            .collect();
        mine.sort_by_key(|a| a.start_time_unix_nano);
        let kind = attribute(step, "keel.kind").unwrap();
        assert!(!mine.is_empty(), "no attempt of {kind}");
        if kind == "aws.iam.create-role" {
            assert!(
                mine.len() >= 2,
                "a failed attempt of {kind}, then one that worked"
            );
        }
        for (i, attempt) in mine.iter().enumerate() {
            assert_eq!(&attempt.trace_id, trace);
            assert_eq!(attribute(attempt, "keel.run_id").as_deref(), Some("traced"));
            assert_eq!(
                attribute(attempt, "keel.attempt"),
                Some((i + 1).to_string())
            );
            assert_eq!(
                attribute(attempt, "keel.idempotency_key").as_ref(),
                keys.get(&step.span_id)
            );
            let (outcome, status) = if i + 1 == mine.len() {
                ("ok", StatusCode::Ok)
            } else {
                ("retryable", StatusCode::Error)
            };
            assert_eq!(attribute(attempt, "keel.outcome").as_deref(), Some(outcome));
            assert_eq!(attempt.status.as_ref().map(|s| s.code), Some(status as i32));
            assert!(attempt.start_time_unix_nano >= step.start_time_unix_nano);
            assert!(attempt.end_time_unix_nano <= step.end_time_unix_nano);
        }
    }
    assert!(
        attempts
            .iter()
            .all(|a| steps.iter().any(|s| s.span_id == a.parent_span_id)),
        "every attempt's parent is a step of the run"
    );
}

/// A bad `--otlp-endpoint` (not http or https, or not a URL), on the command line or in
/// `KEEL_OTLP_ENDPOINT`, is refused at start (exit 2) with a message naming the flag.
#[test]
fn a_bad_endpoint_is_refused_at_start_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let base = |command: &mut Command| {
        command
            .args(["worker", "--listen", "127.0.0.1:0", "--no-auth"])
            .arg("--data-dir")
            .arg(&data)
            .env_remove("KEEL_API_TOKEN")
            .env_remove("KEEL_API_TOKEN_FILE")
            .env_remove("KEEL_OTLP_ENDPOINT");
    };
    for bad in ["ftp://127.0.0.1:4318", "127.0.0.1:4318", "http://"] {
        let mut command = Command::new(KEEL);
        base(&mut command);
        command.args(["--otlp-endpoint", bad]);
        refused(&refused_start(&mut command), 2, "--otlp-endpoint");
    }
    let mut command = Command::new(KEEL);
    base(&mut command);
    command.env("KEEL_OTLP_ENDPOINT", "grpc://127.0.0.1:4317");
    let out = refused_start(&mut command);
    refused(&out, 2, "--otlp-endpoint");
    refused(&out, 2, "http(s)");
    assert!(!data.exists(), "nothing was made before the refusal");
}

/// A collector that is not there (a closed loopback port) does not hold a run, nor the
/// worker's stop: the runs complete, SIGTERM exits drained within a few seconds (the flush
/// is bounded), and the failed export is logged at warn once, not once per span or export.
#[test]
fn an_unreachable_collector_neither_holds_a_run_nor_the_stop() {
    let account = TestAccount::fresh().expect("moto's server (see docs/testing.md)");
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let url = format!("http://{closed}");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut w = worker(
        &data,
        &account,
        &account.endpoint,
        &["--otlp-endpoint", &url],
    );
    let started = Instant::now();
    for id in ["unheard-1", "unheard-2"] {
        run_to_completion(&w, dir.path(), id);
    }
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "the runs took {:?}",
        started.elapsed()
    );
    let (code, took) = stop(&mut w, Duration::from_secs(30));
    assert_eq!(code, 0, "the worker did not drain");
    assert!(took < Duration::from_secs(8), "the stop took {took:?}");
    let mut stderr = String::new();
    w.child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    // At most one warning of failed exports within the minute, whatever the number of
    // spans and exports; and the loss is told, by that warning or (should the last export
    // still be trying when the flush's bound ends) by the flush's own.
    let failed = stderr.matches("OTLP trace export failed").count();
    let unflushed = stderr.matches("the last spans were not flushed").count();
    assert!(failed <= 1, "one warning of the failed exports: {stderr}");
    assert!(failed + unflushed >= 1, "the lost spans are told: {stderr}");
}
