//! Rate limits per named service ("iam", "iot", ...), shared by every workflow of an engine:
//! additive increase, multiplicative decrease (AIMD), as TCP does with its window, with two
//! changes that make it hold against real services.
//!
//! **Decrease by the throttled share.** Services throttle some calls at any rate (AWS
//! answers a few percent of calls with throttling however slow the caller is). A limiter that
//! halves on every throttled answer settles where those random throttles come as often as its
//! increase can repair, whatever the service's capacity: near 6 calls/s under 5% random
//! throttling against a service that takes 25. This one counts outcomes over windows of about
//! a second and, when a window closes, multiplies the rate by
//! `1 - (1 - decrease_factor) * share`, where `share` is the window's throttled fraction. A
//! steady few percent costs a few percent per second, which additive increase outweighs until
//! the rate passes the capacity; past it the share grows with the excess and pulls the rate
//! back to it. A window where every call was throttled applies `decrease_factor` in full.
//! Outcomes of calls admitted before the last decrease (sent at the old rate) are not
//! counted, so one overload decreases the rate once, not once per throttled answer.
//!
//! **Priorities.** Calls of one service queue by [`Priority`]: compensations, then probes,
//! then other calls. A mass compensation gets the service's budget before new creates, and
//! waits keep observing resources while creates queue; but probes take at most
//! [`PROBES_IN_A_ROW_MAX`] slots in a row while other calls wait, so a hundred waits polling
//! densely cannot starve the creates and attaches that end them. Within a priority, calls go
//! first come, first served. Each call takes a [`Permit`]; calls are spaced `1/rate` apart.
//!
//! **Slow start.** A new limiter (at every engine start) doubles its rate per second of
//! successful calls, as TCP does, until a window is throttled at [`SLOW_START_EXIT_SHARE`] or
//! more (overload, not the random few percent); from then on each success adds
//! `increase_per_s / rate`: about `increase_per_s` more per second of calls. A restarted
//! worker is back at its service's capacity within seconds, not minutes. The rate grows only
//! while calls queue for the limiter: a rate nobody uses is not known to be safe.

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio::time::Instant;

/// Outcomes are judged over windows at least this long.
const WINDOW: Duration = Duration::from_secs(1);

pub use crate::limits::PROBES_IN_A_ROW_MAX;

/// A window throttled at this share or more ends slow start: the service is past its
/// capacity, not merely throttling at random.
pub const SLOW_START_EXIT_SHARE: f64 = 0.2;

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
    /// The rate is multiplied by this after a window where every call was throttled, and by
    /// `1 - (1 - factor) * share` after one where a `share` of them were (0 < factor < 1).
    pub decrease_factor: f64,
}

impl Default for RateLimit {
    /// 10 calls/s at first, between 0.5 and 100, +1/s per second of success, halved by a
    /// window of nothing but throttling.
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
    /// A limit that starts at `initial_per_s` and never exceeds `max_per_s`, with the
    /// default increase and decrease.
    pub fn between(initial_per_s: f64, max_per_s: f64) -> Self {
        Self {
            initial_per_s,
            max_per_s,
            increase_per_s: (initial_per_s / 5.0).max(1.0),
            ..Self::default()
        }
    }

    /// A preset for an AWS control-plane API, by the limiter names the `keel-steps` AWS steps
    /// use: `iam`, `sts`, `iot`, `greengrass`, `ec2`. Each starts at about half the rate AWS
    /// documents (or that accounts get by default) for the service's mutating calls, and may
    /// grow to about twice it: the limiter finds the account's real capacity between the two.
    /// `None` for other names. See docs/waits.md.
    pub fn aws(service: &str) -> Option<Self> {
        let (initial, max) = match service {
            // IAM's control plane is global and slow: a few mutating calls per second.
            "iam" => (5.0, 20.0),
            "sts" => (20.0, 100.0),
            // IoT Core's registry and policy APIs: 10-15 transactions per second by default.
            "iot" => (8.0, 30.0),
            // Greengrass V1's group and deployment APIs: a few per second.
            "greengrass" => (3.0, 10.0),
            // EC2's mutating actions are token buckets refilled at a few per second.
            "ec2" => (5.0, 20.0),
            _ => return None,
        };
        Some(Self::between(initial, max))
    }

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

/// Which calls of one service go first when they queue for its limiter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Priority {
    /// Undoing what a run did: first, so a failing fleet stops holding resources.
    Compensation,
    /// Polls of waits: next, so a resource's readiness is observed while creates queue.
    Probe,
    /// Every other call (creates, attaches, ...).
    Call,
}

/// Admission to make one call; give it back with [`RateLimiter::succeeded`],
/// [`RateLimiter::throttled`] or [`RateLimiter::released`].
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
    /// Woken whenever the head of the queue changes.
    turn: Notify,
}

#[derive(Debug)]
struct State {
    rate: f64,
    next_slot: Instant,
    /// Calls waiting for a slot, in the order they get one.
    queue: BTreeSet<(Priority, u64)>,
    arrivals: u64,
    /// Bumped at each decrease: outcomes of permits from an older epoch are not counted.
    epoch: u64,
    window: Window,
    throttles: u64,
    granted: u64,
    /// Slots given to probes in a row while other calls waited.
    probes_in_a_row: u32,
    slow_start: bool,
}

impl State {
    /// The call whose turn it is: the first by priority and arrival, except that a call
    /// ([`Priority::Call`]) goes before probes that have had their slots in a row.
    fn head(&self) -> Option<(Priority, u64)> {
        let first = *self.queue.first()?;
        if first.0 == Priority::Probe && self.probes_in_a_row >= PROBES_IN_A_ROW_MAX {
            if let Some(call) = self.queue.range((Priority::Call, 0)..).next() {
                return Some(*call);
            }
        }
        Some(first)
    }

    /// `key` got a slot.
    fn granted(&mut self, key: (Priority, u64)) {
        self.queue.remove(&key);
        self.granted += 1;
        let calls_wait = self.queue.range((Priority::Call, 0)..).next().is_some();
        match key.0 {
            Priority::Probe if calls_wait => self.probes_in_a_row += 1,
            Priority::Probe | Priority::Call => self.probes_in_a_row = 0,
            Priority::Compensation => {}
        }
    }
}

#[derive(Debug)]
struct Window {
    started: Instant,
    outcomes: u32,
    throttled: u32,
}

impl Window {
    fn new(now: Instant) -> Self {
        Self {
            started: now,
            outcomes: 0,
            throttled: 0,
        }
    }
}

/// Takes a queued call out of the queue if its `acquire` is dropped before its slot.
struct Ticket<'a> {
    limiter: &'a RateLimiter,
    key: Option<(Priority, u64)>,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            let head = {
                let mut state = self.limiter.state.lock().expect("limiter lock");
                let head = state.head() == Some(key);
                state.queue.remove(&key);
                head
            };
            if head {
                self.limiter.turn.notify_waiters();
            }
        }
    }
}

impl RateLimiter {
    /// A limiter named `name` (for logs).
    pub fn new(name: &str, limit: RateLimit) -> Self {
        let limit = limit.sanitised();
        let now = Instant::now();
        Self {
            name: name.to_string(),
            state: Mutex::new(State {
                rate: limit.initial_per_s,
                next_slot: now,
                queue: BTreeSet::new(),
                arrivals: 0,
                epoch: 0,
                window: Window::new(now),
                throttles: 0,
                granted: 0,
                probes_in_a_row: 0,
                slow_start: true,
            }),
            limit,
            turn: Notify::new(),
        }
    }

    /// Waits for a slot as an ordinary call ([`Priority::Call`]) and takes it.
    pub async fn acquire(&self) -> Permit {
        self.acquire_as(Priority::Call).await
    }

    /// Waits for a slot behind every queued call of a higher priority (and earlier calls of
    /// the same one), and takes it.
    pub async fn acquire_as(&self, priority: Priority) -> Permit {
        let key = {
            let mut state = self.state.lock().expect("limiter lock");
            state.arrivals += 1;
            let key = (priority, state.arrivals);
            state.queue.insert(key);
            key
        };
        let mut ticket = Ticket {
            limiter: self,
            key: Some(key),
        };
        loop {
            let turn = self.turn.notified();
            tokio::pin!(turn);
            turn.as_mut().enable();
            let slot = {
                let mut state = self.state.lock().expect("limiter lock");
                if state.head() != Some(key) {
                    None
                } else {
                    let now = Instant::now();
                    if state.next_slot > now {
                        Some(state.next_slot)
                    } else {
                        // A slot missed by at most one interval is still taken (timers wake
                        // late), so the rate holds; an idle limiter gives no larger burst.
                        let interval = Duration::from_secs_f64(1.0 / state.rate);
                        let slot = state
                            .next_slot
                            .max(now.checked_sub(interval).unwrap_or(now));
                        state.next_slot = slot + interval;
                        state.granted(key);
                        let epoch = state.epoch;
                        drop(state);
                        ticket.key = None;
                        self.turn.notify_waiters();
                        return Permit { epoch };
                    }
                }
            };
            match slot {
                // Not first in line: wait for the head to change.
                None => turn.await,
                // First in line: wait for the slot, or for a call of a higher priority to
                // take the head.
                Some(at) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(at) => {}
                        _ = turn => {}
                    }
                }
            }
        }
    }

    /// The call succeeded: the rate grows a little.
    pub fn succeeded(&self, permit: Permit) {
        self.outcome(permit, false);
    }

    /// The call was throttled: counted in its window's throttled share.
    pub fn throttled(&self, permit: Permit) {
        self.outcome(permit, true);
    }

    /// The call ended otherwise (neither a success nor throttling): no change.
    pub fn released(&self, permit: Permit) {
        let _ = permit;
    }

    fn outcome(&self, permit: Permit, throttled: bool) {
        let mut state = self.state.lock().expect("limiter lock");
        if throttled {
            state.throttles += 1;
        } else if !state.queue.is_empty() {
            // Grows only while calls queue for it: a rate the callers do not use says nothing
            // about the service, and would be a burst when they come.
            let increase = if state.slow_start {
                1.0
            } else {
                self.limit.increase_per_s / state.rate
            };
            state.rate = (state.rate + increase).min(self.limit.max_per_s);
        }
        if permit.epoch != state.epoch {
            // Sent at a rate already decreased from: says nothing about the current one.
            return;
        }
        state.window.outcomes += 1;
        state.window.throttled += u32::from(throttled);
        let now = Instant::now();
        if now.duration_since(state.window.started) < WINDOW {
            return;
        }
        let Window {
            outcomes,
            throttled,
            ..
        } = std::mem::replace(&mut state.window, Window::new(now));
        if throttled == 0 {
            return;
        }
        let share = f64::from(throttled) / f64::from(outcomes);
        if share >= SLOW_START_EXIT_SHARE {
            state.slow_start = false;
        }
        let before = state.rate;
        let factor = 1.0 - (1.0 - self.limit.decrease_factor) * share;
        state.rate = (state.rate * factor).max(self.limit.min_per_s);
        state.epoch += 1;
        // Calls already spaced at the old rate keep their slots; the next ones use the new.
        tracing::debug!(limiter = %self.name, from = before, to = state.rate, throttled, outcomes, "throttled: slowing down");
    }

    /// The current rate, in calls per second.
    pub fn rate(&self) -> f64 {
        self.state.lock().expect("limiter lock").rate
    }

    /// Throttled answers reported so far.
    pub fn throttles(&self) -> u64 {
        self.state.lock().expect("limiter lock").throttles
    }

    /// Slots given so far.
    pub fn granted(&self) -> u64 {
        self.state.lock().expect("limiter lock").granted
    }

    /// Calls waiting for a slot now.
    pub fn queued(&self) -> usize {
        self.state.lock().expect("limiter lock").queue.len()
    }

    /// The limiter's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// A slot of a service's limiter, held for one call, or no slot when the call names no
/// service: what step attempts, polls and undo attempts take before their call and give back
/// with the call's outcome.
pub(crate) struct Slot<'a>(Option<(&'a RateLimiter, Permit)>);

impl<'a> Slot<'a> {
    /// Waits for a slot of `limiter` (if any) as `priority`.
    pub(crate) async fn take(limiter: Option<&'a RateLimiter>, priority: Priority) -> Slot<'a> {
        match limiter {
            Some(limiter) => Slot(Some((limiter, limiter.acquire_as(priority).await))),
            None => Slot(None),
        }
    }

    /// Reports the call's outcome: success, throttling, or neither.
    pub(crate) fn report<T>(self, result: &Result<T, crate::step::StepError>) {
        let Some((limiter, permit)) = self.0 else {
            return;
        };
        match result {
            Ok(_) => limiter.succeeded(permit),
            Err(e) if e.is_throttled() => limiter.throttled(permit),
            Err(_) => limiter.released(permit),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A limiter past slow start: each success adds `increase_per_s / rate`.
    fn additive(limit: RateLimit) -> RateLimiter {
        let limiter = busy(limit);
        limiter.state.lock().unwrap().slow_start = false;
        limiter
    }

    /// A limiter with a call queued for it (the rate grows only then).
    fn busy(limit: RateLimit) -> RateLimiter {
        let limiter = RateLimiter::new("svc", limit);
        limiter
            .state
            .lock()
            .unwrap()
            .queue
            .insert((Priority::Call, u64::MAX));
        limiter
    }

    fn limit(initial: f64) -> RateLimit {
        RateLimit {
            initial_per_s: initial,
            min_per_s: 1.0,
            max_per_s: 1_000.0,
            increase_per_s: 10.0,
            decrease_factor: 0.5,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_window_of_nothing_but_throttles_halves_the_rate_once() {
        let limiter = RateLimiter::new("svc", limit(100.0));
        let mut permits = Vec::new();
        for _ in 0..5 {
            permits.push(limiter.acquire().await);
        }
        tokio::time::advance(WINDOW).await;
        for p in permits {
            limiter.throttled(p);
        }
        assert_eq!(limiter.rate(), 50.0);
        assert_eq!(limiter.throttles(), 5);
        // A call admitted after the decrease, throttled in the next window, halves it again.
        let p = limiter.acquire().await;
        tokio::time::advance(WINDOW).await;
        limiter.throttled(p);
        assert_eq!(limiter.rate(), 25.0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_small_throttled_share_costs_a_small_decrease() {
        let limiter = additive(RateLimit {
            increase_per_s: 0.0,
            ..limit(20.0)
        });
        // 1 throttled of 20 within the window: nothing changes until the window is over.
        limiter.throttled(Permit { epoch: 0 });
        for _ in 0..19 {
            limiter.succeeded(Permit { epoch: 0 });
        }
        assert_eq!(limiter.rate(), 20.0);
        // The first outcome past a second closes it: 1 of 21 throttled, about 2.4% slower.
        tokio::time::advance(WINDOW).await;
        limiter.succeeded(Permit { epoch: 0 });
        let expected = 20.0 * (1.0 - 0.5 / 21.0);
        assert!(
            (limiter.rate() - expected).abs() < 1e-9,
            "{}",
            limiter.rate()
        );
    }

    #[tokio::test]
    async fn successes_recover_the_rate_additively_up_to_the_cap() {
        let limiter = additive(limit(10.0));
        // rate' = rate + 10 / rate per success: 10 -> 11 -> 11.9 -> ...
        limiter.succeeded(Permit { epoch: 0 });
        assert_eq!(limiter.rate(), 11.0);
        for _ in 0..100 {
            limiter.succeeded(Permit { epoch: 0 });
        }
        assert!(
            limiter.rate() > 45.0 && limiter.rate() < 50.0,
            "{}",
            limiter.rate()
        );
        for _ in 0..100_000 {
            limiter.succeeded(Permit { epoch: 0 });
        }
        assert_eq!(limiter.rate(), 1_000.0);
    }

    #[tokio::test]
    async fn in_slow_start_each_success_adds_one_call_per_second_until_an_overloaded_window() {
        let limiter = busy(limit(10.0));
        for _ in 0..10 {
            limiter.succeeded(Permit { epoch: 0 });
        }
        assert_eq!(
            limiter.rate(),
            20.0,
            "doubled by a second's worth of successes"
        );
        // A window throttled at 10%: a small decrease, still in slow start.
        {
            let mut state = limiter.state.lock().unwrap();
            state.window.started -= WINDOW;
            state.window.outcomes = 9;
        }
        limiter.throttled(Permit { epoch: 0 });
        assert!((limiter.rate() - 19.0).abs() < 1e-9, "{}", limiter.rate());
        assert!(limiter.state.lock().unwrap().slow_start);
        // A window throttled at 50%: overload, slow start is over.
        {
            let mut state = limiter.state.lock().unwrap();
            state.window.started -= WINDOW;
            state.window.outcomes = 1;
            state.window.throttled = 0;
        }
        limiter.throttled(Permit { epoch: 1 });
        assert!((limiter.rate() - 14.25).abs() < 1e-9, "{}", limiter.rate());
        limiter.succeeded(Permit { epoch: 2 });
        assert!((limiter.rate() - (14.25 + 10.0 / 14.25)).abs() < 1e-9);
    }

    #[tokio::test]
    async fn the_rate_grows_only_while_calls_queue() {
        let limiter = RateLimiter::new("svc", limit(10.0));
        for _ in 0..100 {
            limiter.succeeded(Permit { epoch: 0 });
        }
        assert_eq!(limiter.rate(), 10.0);
    }

    #[tokio::test(start_paused = true)]
    async fn probes_take_at_most_two_slots_in_a_row_while_calls_wait() {
        let limiter = std::sync::Arc::new(RateLimiter::new("svc", limit(10.0)));
        limiter.released(limiter.acquire().await);
        let order = std::sync::Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        let arrivals = [
            ("probe-1", Priority::Probe),
            ("probe-2", Priority::Probe),
            ("probe-3", Priority::Probe),
            ("create-1", Priority::Call),
            ("probe-4", Priority::Probe),
            ("probe-5", Priority::Probe),
            ("create-2", Priority::Call),
            ("probe-6", Priority::Probe),
        ];
        for (name, priority) in arrivals {
            let (limiter, order) = (limiter.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let p = limiter.acquire_as(priority).await;
                order.lock().unwrap().push(name);
                limiter.released(p);
            }));
            tokio::task::yield_now().await;
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(
            *order.lock().unwrap(),
            [
                "probe-1", "probe-2", "create-1", "probe-3", "probe-4", "create-2", "probe-5",
                "probe-6"
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_rate_never_drops_below_its_floor() {
        let limiter = RateLimiter::new("svc", limit(2.0));
        for _ in 0..10 {
            let p = limiter.acquire().await;
            tokio::time::advance(WINDOW).await;
            limiter.throttled(p);
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

    #[tokio::test(start_paused = true)]
    async fn queued_calls_go_by_priority_then_by_arrival() {
        let limiter = std::sync::Arc::new(RateLimiter::new("svc", limit(10.0)));
        // Takes the free slot, so everyone after queues.
        limiter.released(limiter.acquire().await);
        let order = std::sync::Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for (name, priority) in [
            ("create-1", Priority::Call),
            ("probe-1", Priority::Probe),
            ("create-2", Priority::Call),
            ("undo-1", Priority::Compensation),
            ("probe-2", Priority::Probe),
        ] {
            let (limiter, order) = (limiter.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let p = limiter.acquire_as(priority).await;
                order.lock().unwrap().push(name);
                limiter.released(p);
            }));
            // Every call is queued before the next slot comes.
            tokio::task::yield_now().await;
        }
        assert_eq!(limiter.queued(), 5);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(
            *order.lock().unwrap(),
            ["undo-1", "probe-1", "probe-2", "create-1", "create-2"]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_given_up_while_queued_leaves_the_queue() {
        let limiter = RateLimiter::new("svc", limit(1.0));
        limiter.released(limiter.acquire().await);
        let gave_up = tokio::time::timeout(
            Duration::from_millis(100),
            limiter.acquire_as(Priority::Call),
        )
        .await;
        assert!(gave_up.is_err());
        assert_eq!(limiter.queued(), 0);
        // The next call gets the slot the abandoned one would have had.
        let started = Instant::now();
        limiter.released(limiter.acquire().await);
        assert_eq!(started.elapsed(), Duration::from_millis(900));
    }
}
