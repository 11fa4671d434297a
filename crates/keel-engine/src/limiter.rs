//! Rate limits per named service ("iam", "iot", ...), shared by every workflow of an engine:
//! additive increase, multiplicative decrease (AIMD), as TCP does with its window.
//!
//! Each call takes a [`Permit`] (waiting for its slot: calls are spaced `1/rate` apart). A
//! throttled call halves the rate, but only once per *epoch*: calls admitted before the last
//! decrease were sent at the old rate, and their throttling says nothing new, so a burst of
//! throttled answers from one overload halves the rate once, not twenty times. Each success
//! adds `increase_per_s / rate` to the rate: about `increase_per_s` more per second of calls.

use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// The settings of one limiter.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RateLimit {
    /// Calls per second at first.
    pub initial_per_s: f64,
    /// Never slower than this.
    pub min_per_s: f64,
    /// Never faster than this.
    pub max_per_s: f64,
    /// Added to the rate per second of successful calls.
    pub increase_per_s: f64,
    /// The rate is multiplied by this on throttling (0 < factor < 1).
    pub decrease_factor: f64,
}

impl Default for RateLimit {
    /// 10 calls/s at first, between 0.5 and 100, +1/s per second of success, halved on
    /// throttling.
    fn default() -> Self {
        Self {
            initial_per_s: 10.0,
            min_per_s: 0.5,
            max_per_s: 100.0,
            increase_per_s: 1.0,
            decrease_factor: 0.5,
        }
    }
}

impl RateLimit {
    /// The settings made sane: positive rates, min <= initial <= max, a factor in (0, 1).
    fn sanitised(self) -> Self {
        let min = self.min_per_s.max(0.001);
        let max = self.max_per_s.max(min);
        Self {
            initial_per_s: self.initial_per_s.clamp(min, max),
            min_per_s: min,
            max_per_s: max,
            increase_per_s: self.increase_per_s.max(0.0),
            decrease_factor: self.decrease_factor.clamp(0.01, 0.99),
        }
    }
}

/// Admission to make one call; give it back with [`RateLimiter::succeeded`] or
/// [`RateLimiter::throttled`].
#[derive(Debug)]
#[must_use = "report the call's outcome to the limiter"]
pub struct Permit {
    epoch: u64,
}

/// One service's limiter.
#[derive(Debug)]
pub struct RateLimiter {
    name: String,
    limit: RateLimit,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    rate: f64,
    next_slot: Instant,
    epoch: u64,
    throttles: u64,
}

impl RateLimiter {
    /// A limiter named `name` (for logs).
    pub fn new(name: &str, limit: RateLimit) -> Self {
        let limit = limit.sanitised();
        Self {
            name: name.to_string(),
            state: Mutex::new(State {
                rate: limit.initial_per_s,
                next_slot: Instant::now(),
                epoch: 0,
                throttles: 0,
            }),
            limit,
        }
    }

    /// Waits for the next free slot and takes it.
    pub async fn acquire(&self) -> Permit {
        let (slot, epoch) = {
            let mut state = self.state.lock().expect("limiter lock");
            let now = Instant::now();
            let slot = state.next_slot.max(now);
            state.next_slot = slot + Duration::from_secs_f64(1.0 / state.rate);
            (slot, state.epoch)
        };
        tokio::time::sleep_until(slot).await;
        Permit { epoch }
    }

    /// The call succeeded: the rate grows a little.
    pub fn succeeded(&self, permit: Permit) {
        let _ = permit;
        let mut state = self.state.lock().expect("limiter lock");
        state.rate =
            (state.rate + self.limit.increase_per_s / state.rate).min(self.limit.max_per_s);
    }

    /// The call was throttled: the rate drops by the decrease factor, once per epoch.
    pub fn throttled(&self, permit: Permit) {
        let mut state = self.state.lock().expect("limiter lock");
        state.throttles += 1;
        if permit.epoch != state.epoch {
            return;
        }
        let before = state.rate;
        state.rate = (state.rate * self.limit.decrease_factor).max(self.limit.min_per_s);
        state.epoch += 1;
        // Calls already spaced at the old rate keep their slots; the next ones use the new.
        tracing::info!(limiter = %self.name, from = before, to = state.rate, "throttled: slowing down");
    }

    /// The call ended otherwise (neither a success nor throttling): no change.
    pub fn released(&self, permit: Permit) {
        let _ = permit;
    }

    /// The current rate, in calls per second.
    pub fn rate(&self) -> f64 {
        self.state.lock().expect("limiter lock").rate
    }

    /// Throttled answers reported so far.
    pub fn throttles(&self) -> u64 {
        self.state.lock().expect("limiter lock").throttles
    }

    /// The limiter's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(initial: f64) -> RateLimit {
        RateLimit {
            initial_per_s: initial,
            min_per_s: 1.0,
            max_per_s: 1_000.0,
            increase_per_s: 10.0,
            decrease_factor: 0.5,
        }
    }

    #[tokio::test]
    async fn a_burst_of_throttles_from_one_epoch_halves_the_rate_once() {
        let limiter = RateLimiter::new("svc", limit(100.0));
        let mut permits = Vec::new();
        for _ in 0..5 {
            permits.push(limiter.acquire().await);
        }
        for p in permits {
            limiter.throttled(p);
        }
        assert_eq!(limiter.rate(), 50.0);
        assert_eq!(limiter.throttles(), 5);
        // A call admitted after the decrease, throttled, halves it again.
        let p = limiter.acquire().await;
        limiter.throttled(p);
        assert_eq!(limiter.rate(), 25.0);
    }

    #[tokio::test]
    async fn successes_recover_the_rate_additively_up_to_the_cap() {
        let limiter = RateLimiter::new("svc", limit(10.0));
        let p = limiter.acquire().await;
        limiter.throttled(p);
        assert_eq!(limiter.rate(), 5.0);
        // rate' = rate + 10 / rate per success: 5 -> 7 -> 8.43 -> ...
        let p = limiter.acquire().await;
        limiter.succeeded(p);
        assert_eq!(limiter.rate(), 7.0);
        for _ in 0..100 {
            let p = Permit { epoch: 0 };
            limiter.succeeded(p);
        }
        assert!(
            limiter.rate() > 40.0 && limiter.rate() < 50.0,
            "{}",
            limiter.rate()
        );
        for _ in 0..100_000 {
            limiter.succeeded(Permit { epoch: 0 });
        }
        assert_eq!(limiter.rate(), 1_000.0);
    }

    #[tokio::test]
    async fn the_rate_never_drops_below_its_floor() {
        let limiter = RateLimiter::new("svc", limit(2.0));
        for _ in 0..10 {
            let epoch = limiter.state.lock().unwrap().epoch;
            limiter.throttled(Permit { epoch });
        }
        assert_eq!(limiter.rate(), 1.0);
    }

    #[tokio::test(start_paused = true)]
    async fn calls_are_spaced_one_over_the_rate_apart() {
        let limiter = RateLimiter::new("svc", limit(20.0));
        let started = Instant::now();
        for _ in 0..11 {
            let p = limiter.acquire().await;
            limiter.released(p);
        }
        // 11 calls at 20/s: the last one 10 intervals (0.5 s) after the first.
        assert_eq!(started.elapsed(), Duration::from_millis(500));
    }
}
