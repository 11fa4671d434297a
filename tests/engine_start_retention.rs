//! Finished runs are kept for the retention and then collected, many at a time; a collected
//! run's id is free again, and a retention too long to count in milliseconds keeps every run.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use common::start::{fixture, sum_of, PlainFlow};
use keel::testing::TestClock;
use keel::{Engine, EngineError, Event, RunStatus};
use keel_testkit::flows::EffectStep;

/// The retention of the collection tests: a day, on a test clock that the tests move.
const RETENTION: Duration = Duration::from_secs(24 * 3600);

/// An engine for the collection tests, on `clock`: the background pass the engine makes at
/// open sees nothing expired (the clock has not moved), and the background interval is long,
/// so it makes no other pass during a test.
async fn open_collecting(data: &Path, clock: &TestClock) -> Engine {
    keel_testkit::store::builder(data)
        .clock(clock.clone())
        .workflow::<PlainFlow>()
        .step::<EffectStep>()
        .retention(RETENTION)
        .gc_interval(Duration::from_secs(3600))
        .open()
        .await
        .unwrap()
}

/// Garbage collection reads runs a page at a time and deletes them in chunks: more runs than
/// one page holds (1,000) and one write takes (256) are all collected, each with its
/// journal, and runs still within the retention stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collection_deletes_every_expired_run_and_keeps_the_rest() {
    const EXPIRED: usize = 1_100;
    let f = fixture();
    let clock = TestClock::new();
    let engine = open_collecting(&f.data, &clock).await;
    let mut handles = Vec::new();
    for n in 0..EXPIRED {
        handles.push(
            engine
                .start::<PlainFlow>(&format!("old-{n}"), f.input(1))
                .await
                .unwrap(),
        );
    }
    for handle in handles {
        handle.result().await.unwrap();
    }
    clock.advance(RETENTION);
    let kept = engine
        .start::<PlainFlow>("recent", f.input(1))
        .await
        .unwrap();
    kept.result().await.unwrap();
    clock.advance(Duration::from_millis(1));

    assert_eq!(engine.collect_garbage().await.unwrap(), EXPIRED);
    let left = engine.list().await.unwrap();
    assert_eq!(left.len(), 1, "only the recent run is left");
    assert_eq!(left[0].id.as_str(), "recent");
    for n in [0, 255, 256, 999, 1_000, EXPIRED - 1] {
        let err = engine.history(&format!("old-{n}")).await.unwrap_err();
        assert!(matches!(err, EngineError::RunNotFound { .. }), "{err}");
    }
    assert_eq!(
        engine.history("recent").await.unwrap().run.status,
        RunStatus::Completed
    );
    engine.shutdown().await;
}

/// A retention too long to count in milliseconds keeps every run (as good as forever)
/// instead of wrapping to a few hundred milliseconds and collecting runs a second old.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retention_past_what_milliseconds_count_keeps_every_run() {
    let f = fixture();
    let clock = TestClock::new();
    let engine = keel_testkit::store::builder(&f.data)
        .clock(clock.clone())
        .workflow::<PlainFlow>()
        .step::<EffectStep>()
        .retention(Duration::from_secs(18_446_744_073_709_552))
        .gc_interval(Duration::from_secs(3600))
        .open()
        .await
        .unwrap();
    let run = engine.start::<PlainFlow>("kept", f.input(1)).await.unwrap();
    run.result().await.unwrap();
    clock.advance(Duration::from_secs(1));
    assert_eq!(
        engine.collect_garbage().await.unwrap(),
        0,
        "nothing expired"
    );
    assert_eq!(engine.list().await.unwrap().len(), 1);
    engine.shutdown().await;
}

/// Once a finished run is older than the retention, garbage collection deletes it (and says
/// so), its id is unknown, and starting the id again runs the workflow anew.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collected_id_starts_a_new_run() {
    let f = fixture();
    let clock = TestClock::new();
    let engine = open_collecting(&f.data, &clock).await;
    let output = engine
        .start::<PlainFlow>("order-4", f.input(2))
        .await
        .unwrap()
        .result()
        .await
        .unwrap();
    assert_eq!(output, sum_of(2));
    let first = engine.status("order-4").await.unwrap();
    let finished_at_ms = first.finished_at_ms.expect("a completed run has finished");
    // Collection passes over loaded runs, and a settled run is unloaded just after its
    // waiters are told: reopen, so nothing is loaded and the counts below are exact.
    engine.shutdown().await;
    drop(engine);
    let engine = open_collecting(&f.data, &clock).await;
    clock.advance(RETENTION - Duration::from_millis(1));
    assert_eq!(
        engine.collect_garbage().await.unwrap(),
        0,
        "kept for the retention"
    );
    clock.advance(Duration::from_millis(1));

    assert_eq!(
        engine.collect_garbage().await.unwrap(),
        1,
        "the run is collected"
    );
    let err = engine.status("order-4").await.unwrap_err();
    assert!(matches!(err, EngineError::RunNotFound { .. }), "{err}");
    let err = engine.history("order-4").await.unwrap_err();
    assert!(matches!(err, EngineError::RunNotFound { .. }), "{err}");
    assert!(engine.list().await.unwrap().is_empty());
    assert_eq!(
        engine.collect_garbage().await.unwrap(),
        0,
        "nothing left to collect"
    );

    let again = engine
        .start::<PlainFlow>("order-4", f.input(2))
        .await
        .unwrap();
    assert_eq!(again.result().await.unwrap(), output);
    let second = engine.history("order-4").await.unwrap();
    assert_eq!(second.run.status, RunStatus::Completed);
    assert_eq!(
        second.run.created_at_ms,
        finished_at_ms + RETENTION.as_millis() as u64,
        "a new run, created when the old one was collected"
    );
    assert_eq!(
        second
            .entries
            .iter()
            .filter(|e| matches!(e.event, Event::RunCompleted { .. }))
            .count(),
        1,
        "the new journal starts afresh"
    );
    assert_eq!(
        f.runs_per_step("order-4"),
        BTreeMap::from([(0, 2), (1, 2)]),
        "every step ran again, once"
    );
    engine.shutdown().await;
}
