//! Waiting on a condition instead of sleeping: bounded polls of what the engine reports.

use std::time::{Duration, Instant};

use keel_engine::testing::TestClock;
use keel_engine::{Engine, RunHistory};

/// How long a polled condition may take before the test fails.
pub const CONDITION_TIMEOUT: Duration = Duration::from_secs(30);

/// Polls run `id`'s history until `condition` holds; panics after [`CONDITION_TIMEOUT`].
pub async fn until(engine: &Engine, id: &str, condition: impl Fn(&RunHistory) -> bool) {
    let deadline = Instant::now() + CONDITION_TIMEOUT;
    loop {
        if let Ok(history) = engine.history(id).await {
            if condition(&history) {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "condition on run {id} did not hold within {CONDITION_TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// `future`'s output; panics, naming `what`, if it takes longer than [`CONDITION_TIMEOUT`].
pub async fn answered<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(CONDITION_TIMEOUT, future)
        .await
        .unwrap_or_else(|_| panic!("{what}: never answered"))
}

/// Returns once run `id`'s record is there (its start wrote it); panics after
/// [`CONDITION_TIMEOUT`], or on any error but the run's not being found.
pub async fn recorded(engine: &Engine, id: &str) {
    let deadline = Instant::now() + CONDITION_TIMEOUT;
    loop {
        match engine.status(id).await {
            Ok(_) => return,
            Err(keel_engine::EngineError::RunNotFound { .. }) => {}
            Err(other) => panic!("reading run {id}: {other}"),
        }
        assert!(Instant::now() < deadline, "run {id} was never recorded");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The wake time of the next sleep on `clock`, once the engine sleeps on it; panics after
/// [`CONDITION_TIMEOUT`] (real time) if nothing does.
pub async fn asleep(clock: &TestClock) -> u64 {
    tokio::time::timeout(CONDITION_TIMEOUT, clock.next_wake())
        .await
        .expect("the engine never slept on the test clock")
}

/// Waits until `engine` holds exactly `want` in memory ([`Engine::resident`]: runs loaded and
/// parked), polling in real time for at most [`CONDITION_TIMEOUT`].
pub async fn resident(engine: &Engine, want: keel_engine::Resident) {
    let deadline = Instant::now() + CONDITION_TIMEOUT;
    loop {
        let now = engine.resident();
        if now == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the engine holds {now:?}, not {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Moves `clock` on by `step` until `engine` holds `want` ([`Engine::resident`]), looking for
/// up to half a second (real time) after each move; panics after 50 moves. A run that has just
/// journaled its wait may read the clock a moment later, so a single move may come too early
/// for it: use this where extra moves change nothing else the test checks.
pub async fn advance_until(
    engine: &Engine,
    clock: &TestClock,
    step: Duration,
    want: keel_engine::Resident,
) {
    for _ in 0..50 {
        clock.advance(step);
        let deadline = Instant::now() + Duration::from_millis(500);
        while Instant::now() < deadline {
            if engine.resident() == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    panic!("the engine holds {:?}, not {want:?}", engine.resident());
}
