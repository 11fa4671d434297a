//! Under load, Keel's waits, limiter and saga measure the resource, not the engine's own
//! queueing or downtime: concurrent BOSH-like runs (create an instance, wait until it runs,
//! create a volume, wait until it is available, attach) against a simulated cloud with
//! heavy-tailed readiness, lying reads, 5% random throttling and a capacity of 25 calls/s,
//! with the engine's process SIGKILLed and restarted under them, destroy no healthy resource,
//! compensate no healthy run, and use at least 80% of the cloud's capacity while busy.
//!
//! The cloud runs in the test's process and keeps the ground truth; the engine runs in a child
//! (this binary again). Knobs, for a bigger run: `KEEL_LOAD_RUNS` (default 30),
//! `KEEL_LOAD_TIME_SCALE` (default 0.15: readiness median 0.3 s, polls every 150 ms, wait
//! deadlines 2.25 s), `KEEL_LOAD_KILLS` (default 2), `KEEL_LOAD_DOWNTIME_MS` (default 5 s
//! times the scale), `KEEL_LOAD_SEED` (default 1), `KEEL_LOAD_KEEP` (keep the directory with
//! the store, the children's logs, `truth.json` and `report.json`, and say where it is); for
//! diagnosis `KEEL_LOAD_FIXED_RATE` (calls/s: the engine's limiter fixed at that rate instead
//! of its defaults, to tell the waits' defects from the limiter's). The report is in the
//! failure message; `RUST_LOG=load_simcloud=info` with `--nocapture` prints it on success too.

use std::str::FromStr;
use std::time::Duration;

use keel_testkit::crash::is_child;
use keel_testkit::simcloud::load::{self, ChildProgram, LoadParams};

const NAME: &str = "concurrent_runs_under_kills_destroy_nothing_healthy_and_use_the_capacity";

fn knob<T: FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(text) => text
            .parse()
            .unwrap_or_else(|_| panic!("{name}={text:?} does not parse")),
        Err(_) => default,
    }
}

fn params() -> LoadParams {
    let runs = knob("KEEL_LOAD_RUNS", 30);
    let time_scale = knob("KEEL_LOAD_TIME_SCALE", 0.15);
    let scenario = LoadParams::scenario(runs, time_scale);
    LoadParams {
        kills: knob("KEEL_LOAD_KILLS", 2),
        downtime_ms: knob("KEEL_LOAD_DOWNTIME_MS", scenario.downtime_ms),
        seed: knob("KEEL_LOAD_SEED", 1),
        settle_timeout_ms: Duration::from_secs(300).as_millis() as u64,
        engine_rate_limit: std::env::var("KEEL_LOAD_FIXED_RATE")
            .ok()
            .map(|rate| load::fixed_rate_limit(rate.parse().expect("KEEL_LOAD_FIXED_RATE"))),
        ..scenario
    }
}

/// The goals of the issue, on the reduced scenario (30 runs, time scaled by 0.15, 2 kills).
#[test]
fn concurrent_runs_under_kills_destroy_nothing_healthy_and_use_the_capacity() {
    if is_child() {
        return load::child_main();
    }
    keel_testkit::init_tracing();
    let params = params();
    let dir = tempfile::tempdir().unwrap();
    let program = ChildProgram::TestBinary {
        test_name: NAME.into(),
    };
    let report = keel_testkit::crash::runtime()
        .block_on(load::run(&params, &program, dir.path()))
        .unwrap();
    let kept = std::env::var_os("KEEL_LOAD_KEEP").map(|_| dir.keep());
    tracing::info!(kept = ?kept, "\n{}", report.table());
    assert!(report.kills > 0, "no kill landed:\n{}", report.table());
    let missed = report.missed_goals();
    assert!(
        missed.is_empty(),
        "{}\n\n{}{}",
        missed.join("\n"),
        report.table(),
        kept.map(|d| format!("store and logs kept in {}", d.display()))
            .unwrap_or_default()
    );
}
