//! The limiters through a real worker (docs/api.md "Limiters"): `GET /v1/limiters` answers
//! each service's limiter, its rate the one `/metrics` reports for it, with a history of
//! samples taken since the worker started (oldest first), and needs the token like every
//! other `/v1` route; `/metrics` shows each operation's latency as a histogram whose
//! cumulative buckets end in `+Inf` at the count.

mod common;

use std::time::{Duration, Instant};

use common::{error, head, http, worker};
use keel_testkit::demo::Worker;
use keel_testkit::moto::TestAccount;
use serde_json::Value;

/// `GET path` with the token: the status and the JSON body.
fn get(w: &Worker, path: &str) -> (u16, Value) {
    http(&common::addr(w), &head(w, "GET", path, &[]), "")
}

/// The `/metrics` page, with the token.
fn metrics(w: &Worker) -> String {
    ureq::get(&format!("{}/metrics", w.api))
        .set("Authorization", &format!("Bearer {}", w.token()))
        .call()
        .unwrap()
        .into_string()
        .unwrap()
}

/// The value of the sample line `name` (with its labels) on a metrics page.
fn sample(page: &str, name: &str) -> f64 {
    page.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {name} in\n{page}"))
        .parse()
        .unwrap()
}

/// Every service has its limiter's rate and throttles and a history of samples (oldest
/// first, each with a time, a rate and throttles), and the route needs the token.
#[test]
fn limiters_answer_each_services_rate_and_its_history() {
    let account = TestAccount::fresh().expect("moto's server (see docs/testing.md)");
    let dir = tempfile::tempdir().unwrap();
    let w = worker(&dir.path().join("data"), &account, &account.endpoint, &[]);

    // The first sample is taken as the worker starts; wait for it, within a bound.
    let deadline = Instant::now() + Duration::from_secs(20);
    let limiters = loop {
        let (status, body) = get(&w, "/v1/limiters");
        assert_eq!(status, 200, "{body}");
        if body[0]["history"].as_array().is_some_and(|h| !h.is_empty()) {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "no limiter sample within 20 s: {body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let limiters = limiters.as_array().expect("an array");
    let services: Vec<&str> = limiters
        .iter()
        .map(|l| l["service"].as_str().unwrap())
        .collect();
    assert_eq!(services, ["iam", "sts", "iot", "greengrass"]);
    let page = metrics(&w);
    for limiter in limiters {
        let service = limiter["service"].as_str().unwrap();
        let rate = limiter["rate"].as_f64().expect("a rate");
        // Nothing calls AWS here, so the limiter's rate holds still between the two reads.
        let reported = sample(
            &page,
            &format!("keel_rate_limit_per_second{{service=\"{service}\"}}"),
        );
        assert_eq!(rate, reported, "{service}");
        assert!(rate > 0.0, "{service}");
        assert_eq!(limiter["throttles"], 0, "{limiter}");
        let history = limiter["history"].as_array().unwrap();
        assert!(!history.is_empty() && history.len() <= 720, "{limiter}");
        for s in history {
            assert!(s["at_ms"].as_u64().unwrap() > 1_700_000_000_000, "{s}");
            assert_eq!(s["rate"].as_f64(), Some(rate), "{s}");
            assert_eq!(s["throttles"], 0, "{s}");
        }
        let times: Vec<u64> = history
            .iter()
            .map(|s| s["at_ms"].as_u64().unwrap())
            .collect();
        assert!(
            times.windows(2).all(|t| t[0] <= t[1]),
            "oldest first: {times:?}"
        );
    }

    let without_token = format!("GET /v1/limiters HTTP/1.1\r\nHost: {}", common::addr(&w));
    error(
        http(&common::addr(&w), &without_token, ""),
        401,
        "unauthorised",
    );
}

/// An operation's latency on `/metrics` is a histogram: buckets by `le` with cumulative
/// counts that never fall, `+Inf` last at the count, and `_sum` and `_count` beside them.
#[test]
fn metrics_show_operation_latency_as_a_histogram() {
    let account = TestAccount::fresh().expect("moto's server (see docs/testing.md)");
    let dir = tempfile::tempdir().unwrap();
    let w = worker(&dir.path().join("data"), &account, &account.endpoint, &[]);
    // A run that creates an IAM role in moto: each of its steps is an operation with a
    // duration.
    let start = serde_json::json!({
        "workflow": "iam.service-role",
        "id": "m1",
        "input": common::role("metrics-role"),
    });
    let (status, body) = http(
        &common::addr(&w),
        &head(&w, "POST", "/v1/runs", &[]),
        &start.to_string(),
    );
    assert!(status == 200 || status == 201, "{status} {body}");
    let deadline = Instant::now() + Duration::from_secs(60);
    let (operation, page) = loop {
        let page = metrics(&w);
        let found = page.lines().find_map(|line| {
            let rest = line.strip_prefix("keel_operation_seconds_count{operation=\"")?;
            Some(rest.split('"').next()?.to_string())
        });
        if let Some(operation) = found {
            break (operation, page);
        }
        assert!(
            Instant::now() < deadline,
            "no operation on /metrics within 60 s:\n{page}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        page.contains("# TYPE keel_operation_seconds histogram"),
        "{page}"
    );
    let label = format!("operation=\"{operation}\"");
    let count = sample(&page, &format!("keel_operation_seconds_count{{{label}}}"));
    let sum = sample(&page, &format!("keel_operation_seconds_sum{{{label}}}"));
    assert!(count >= 1.0 && sum >= 0.0, "{page}");
    let buckets: Vec<(String, f64)> = page
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("keel_operation_seconds_bucket{le=\"")?;
            let (le, rest) = rest.split_once("\",")?;
            let value = rest.strip_prefix(&format!("{label}}} "))?;
            Some((le.to_string(), value.parse().ok()?))
        })
        .collect();
    assert_eq!(buckets.len(), 19, "{page}");
    assert_eq!(buckets[0].0, "0.001");
    assert_eq!(buckets.last().unwrap(), &("+Inf".to_string(), count));
    assert!(
        buckets.windows(2).all(|b| b[0].1 <= b[1].1),
        "cumulative: {buckets:?}"
    );
    // The other metrics keep their names.
    for name in [
        "keel_runs{status=\"completed\"}",
        "keel_throttles_total{service=\"iot\"}",
        "keel_retries_total",
        "keel_step_compensations_total",
        "keel_waits_total",
    ] {
        sample(&page, name);
    }
}
