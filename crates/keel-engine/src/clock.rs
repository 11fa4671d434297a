//! The engine's clock: the one source of every journaled instant (entry times, record times,
//! timer wake times, wait deadlines and polls, retry and undo times, the garbage-collection
//! horizon) and of the sleeps that wait for them.
//!
//! In production it is the system's wall clock. Tests, the engine's own and its users'
//! (`keel::testing`), use a [`TestClock`], which stands still until the test moves it: a
//! three-day timer is tested in milliseconds, and no assertion depends on how fast a busy
//! machine runs. Latency statistics measure real elapsed time whichever clock is used, and
//! rate limiters space calls in real time: both are about the services called, not about the
//! workflow's time.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

/// `duration` in whole milliseconds, saturating at `u64::MAX` (some 584 million years: the
/// end of time for a clock counting milliseconds since the epoch). `as_millis() as u64` would
/// keep the low 64 bits, so that 2^64 + 384 ms (18446744073709552 s) became 384 ms: a timeout
/// or sleep that long must never become a short one. Every duration the engine turns into
/// journaled milliseconds goes through this.
pub(crate) fn millis_saturating(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Where the engine reads the time (ms since the Unix epoch) and sleeps until an instant.
/// [`Clock::system`] by default; [`crate::EngineBuilder::clock`] sets a [`TestClock`].
#[derive(Clone, Debug)]
pub struct Clock(Source);

#[derive(Clone, Debug)]
enum Source {
    System,
    Test(TestClock),
}

impl Clock {
    /// The system's wall clock.
    pub fn system() -> Clock {
        Clock(Source::System)
    }

    /// Milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> u64 {
        match &self.0 {
            Source::System => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            Source::Test(clock) => clock.now_ms(),
        }
    }

    /// Resolves once the clock reads `at_ms` or later.
    pub async fn sleep_until(&self, at_ms: u64) {
        match &self.0 {
            Source::System => loop {
                // Re-read after every sleep: the wall clock may have been set back meanwhile.
                let now = self.now_ms();
                if now >= at_ms {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(at_ms - now)).await;
            },
            // Boxed: the test clock's sleep is bigger than the system's, and every sleeping
            // run holds this future.
            Source::Test(clock) => Box::pin(clock.sleep_until(at_ms)).await,
        }
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::system()
    }
}

impl From<TestClock> for Clock {
    fn from(clock: TestClock) -> Clock {
        Clock(Source::Test(clock))
    }
}

/// A clock that moves only when a test moves it ([`TestClock::advance`],
/// [`TestClock::skip_to_next_wake`], [`TestClock::skip_until_settled`]). Clones share one
/// time; an engine reopened with a clone of the same clock sees the time go on.
#[derive(Clone, Debug)]
pub struct TestClock {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    now_ms: watch::Sender<u64>,
    /// Pending sleeps: id -> wake time.
    sleepers: Mutex<BTreeMap<u64, u64>>,
    /// Bumped whenever a sleep begins, so a test can wait for the engine to fall asleep.
    slept: watch::Sender<u64>,
    next_id: AtomicU64,
}

/// Removes a sleep from the clock's pending set when it ends or is abandoned.
struct Sleeper<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for Sleeper<'_> {
    fn drop(&mut self) {
        self.shared
            .sleepers
            .lock()
            .expect("test clock lock")
            .remove(&self.id);
    }
}

impl Default for TestClock {
    fn default() -> Self {
        TestClock::new()
    }
}

impl TestClock {
    /// Where a new test clock starts: 2026-01-01T00:00:00Z, so journals of tests read alike.
    pub const START_MS: u64 = 1_767_225_600_000;

    /// A clock standing at [`TestClock::START_MS`].
    pub fn new() -> TestClock {
        TestClock::starting_at(TestClock::START_MS)
    }

    /// A clock standing at `now_ms` (ms since the Unix epoch).
    pub fn starting_at(now_ms: u64) -> TestClock {
        TestClock {
            shared: Arc::new(Shared {
                now_ms: watch::channel(now_ms).0,
                sleepers: Mutex::new(BTreeMap::new()),
                slept: watch::channel(0).0,
                next_id: AtomicU64::new(0),
            }),
        }
    }

    /// The time, in ms since the Unix epoch.
    pub fn now_ms(&self) -> u64 {
        *self.shared.now_ms.borrow()
    }

    /// Moves the time forward by `by`, waking every sleep that is due.
    pub fn advance(&self, by: Duration) {
        let by_ms = millis_saturating(by);
        self.shared
            .now_ms
            .send_modify(|now| *now = now.saturating_add(by_ms));
    }

    /// Moves the time forward to `at_ms` (never backward), waking every sleep that is due.
    pub fn advance_to(&self, at_ms: u64) {
        self.shared.now_ms.send_if_modified(|now| {
            let later = at_ms > *now;
            *now = (*now).max(at_ms);
            later
        });
    }

    /// How many sleeps are pending (the engine's timers, retry backoffs, wait polls).
    pub fn sleepers(&self) -> usize {
        let now = self.now_ms();
        let sleepers = self.shared.sleepers.lock().expect("test clock lock");
        sleepers.values().filter(|at| **at > now).count()
    }

    /// The earliest pending wake time, if anything sleeps.
    pub fn next_wake_ms(&self) -> Option<u64> {
        let now = self.now_ms();
        let sleepers = self.shared.sleepers.lock().expect("test clock lock");
        sleepers.values().copied().filter(|at| *at > now).min()
    }

    /// Waits (in real time, without bound: wrap it in a timeout) until something sleeps on
    /// the clock, and returns the earliest wake time.
    pub async fn next_wake(&self) -> u64 {
        let mut slept = self.shared.slept.subscribe();
        loop {
            if let Some(at_ms) = self.next_wake_ms() {
                return at_ms;
            }
            if slept.changed().await.is_err() {
                unreachable!("the clock holds its own sender");
            }
        }
    }

    /// Waits until something sleeps on the clock and moves the time to its wake time;
    /// returns the new time.
    pub async fn skip_to_next_wake(&self) -> u64 {
        let at_ms = self.next_wake().await;
        self.advance_to(at_ms);
        self.now_ms()
    }

    /// Waits for run `id` of `engine` to settle, moving the clock to each wake time as soon as
    /// anything sleeps on it (time skipping): timers fire, backoffs end and wait deadlines
    /// pass at once, in order. Answers as [`crate::Engine::wait`] does.
    pub async fn skip_until_settled(
        &self,
        engine: &crate::Engine,
        id: &str,
    ) -> crate::Result<crate::RunRecord> {
        let settled = engine.wait(id);
        tokio::pin!(settled);
        loop {
            tokio::select! {
                record = &mut settled => return record,
                _ = self.skip_to_next_wake() => {}
            }
        }
    }

    async fn sleep_until(&self, at_ms: u64) {
        let mut now = self.shared.now_ms.subscribe();
        if *now.borrow_and_update() >= at_ms {
            return;
        }
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        self.shared
            .sleepers
            .lock()
            .expect("test clock lock")
            .insert(id, at_ms);
        let _sleeper = Sleeper {
            shared: &self.shared,
            id,
        };
        self.shared.slept.send_modify(|n| *n += 1);
        let _ = now.wait_for(|now| *now >= at_ms).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A test clock stands still, wakes a sleeper only once advanced past its wake time, and
    /// forgets a sleep that was abandoned.
    #[tokio::test]
    async fn a_test_clock_moves_only_when_told() {
        let clock = TestClock::starting_at(1_000);
        let engine_clock = Clock::from(clock.clone());
        assert_eq!(engine_clock.now_ms(), 1_000);
        let sleeping = tokio::spawn({
            let engine_clock = engine_clock.clone();
            async move { engine_clock.sleep_until(5_000).await }
        });
        assert_eq!(clock.next_wake().await, 5_000);
        clock.advance(Duration::from_millis(3_999));
        assert_eq!(clock.sleepers(), 1, "not due yet");
        assert!(!sleeping.is_finished());
        clock.advance(Duration::from_millis(1));
        sleeping.await.unwrap();
        assert_eq!(clock.sleepers(), 0);
        assert_eq!(clock.next_wake_ms(), None);

        let abandoned = tokio::spawn({
            let engine_clock = engine_clock.clone();
            async move { engine_clock.sleep_until(9_000).await }
        });
        assert_eq!(clock.next_wake().await, 9_000);
        abandoned.abort();
        let _ = abandoned.await;
        assert_eq!(clock.sleepers(), 0, "an abandoned sleep is forgotten");
        clock.advance_to(2_000);
        assert_eq!(clock.now_ms(), 5_000, "never backward");
        // A sleep already due does not wait.
        engine_clock.sleep_until(5_000).await;
    }

    /// Advancing a test clock by more than milliseconds can count (18446744073709552 s is
    /// 2^64 + 384 ms) takes it to the end of time, not 384 ms further.
    #[test]
    fn a_test_clock_advanced_past_what_milliseconds_count_saturates() {
        let clock = TestClock::starting_at(1_000);
        clock.advance(Duration::from_secs(18_446_744_073_709_552));
        assert_eq!(clock.now_ms(), u64::MAX);
    }
}
