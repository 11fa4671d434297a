//! Rate limits per service: a step that names a service waits for a slot of the engine's
//! limiter of that name, and reports throttling and success to it; so does its compensation,
//! ahead of the service's other calls. The limiter finds a service's capacity under random
//! throttling (docs/waits.md).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel::{
    Compensation, Ctx, Engine, RateLimit, RateLimiter, RetryPolicy, RunStatus, Step, StepContext,
    StepError, Workflow, WorkflowError,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// Throttled on its first attempt, fine on the next.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ThrottledOnce;

impl Step for ThrottledOnce {
    const KIND: &'static str = "test.throttled-once";
    type Output = u32;

    async fn execute(&self, ctx: &StepContext) -> Result<u32, StepError> {
        if ctx.attempt().0 == 1 {
            return Err(StepError::throttled("Rate exceeded"));
        }
        Ok(ctx.attempt().0)
    }

    fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy::default().with_backoff(Duration::from_millis(1), Duration::from_millis(5))
    }

    fn rate_limit(&self) -> Option<&str> {
        Some("svc")
    }

    /// Throttled on its first undo attempt, done on the next.
    async fn compensate(
        &self,
        ctx: &StepContext,
        _: Option<u32>,
    ) -> Result<Compensation, StepError> {
        UNDO_ATTEMPTS.fetch_add(1, Ordering::SeqCst);
        if ctx.attempt().0 == 1 {
            return Err(StepError::throttled("Rate exceeded"));
        }
        Ok(Compensation::Done)
    }

    fn compensation_retry_policy(&self) -> RetryPolicy {
        RetryPolicy::default().with_backoff(Duration::from_millis(1), Duration::from_millis(5))
    }
}

static UNDO_ATTEMPTS: AtomicU32 = AtomicU32::new(0);

struct OneCall;

impl Workflow for OneCall {
    const NAME: &'static str = "test.one-call";
    type Input = bool;
    type Output = u32;

    /// The step, then (with `fail`) a failure that compensates it.
    async fn run(ctx: &mut Ctx, fail: bool) -> Result<u32, WorkflowError> {
        let attempts = ctx.step(ThrottledOnce).await?;
        if fail {
            return Err(WorkflowError::failed("fails after the step"));
        }
        Ok(attempts)
    }
}

async fn open(dir: &std::path::Path) -> Engine {
    Engine::builder(dir)
        .workflow::<OneCall>()
        .rate_limit("svc", RateLimit::between(50.0, 1_000.0))
        .open()
        .await
        .unwrap()
}

/// Each attempt of a step takes a slot of its service's limiter and a throttled attempt is
/// reported to it; another service name gets a limiter of its own, with the defaults.
#[tokio::test]
async fn throttled_attempts_are_reported_to_the_service_limiter() {
    keel_testkit::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path()).await;
    let limiter = engine.rate_limiter("svc");
    let handle = engine.start::<OneCall>("a", false).await.unwrap();
    assert_eq!(handle.result().await.unwrap(), 2);
    assert_eq!(limiter.throttles(), 1);
    assert_eq!(limiter.granted(), 2, "each attempt took a slot");
    // Another name is another limiter, with the defaults.
    assert_eq!(
        engine.rate_limiter("other").rate(),
        RateLimit::default().initial_per_s
    );
    engine.shutdown().await;
}

/// Compensations used to call the service without a slot of its limiter: a mass compensation
/// hit the API unthrottled, and its throttling slowed nothing down.
#[tokio::test]
async fn compensations_take_slots_of_the_service_limiter_and_report_throttling() {
    keel_testkit::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path()).await;
    let limiter = engine.rate_limiter("svc");
    let handle = engine.start::<OneCall>("b", true).await.unwrap();
    assert!(handle.result().await.is_err());
    let record = engine.status("b").await.unwrap();
    assert_eq!(record.status, RunStatus::Compensated);
    assert_eq!(UNDO_ATTEMPTS.load(Ordering::SeqCst), 2);
    // Two attempts of the step, two of its undo: four slots, two throttles.
    assert_eq!(
        limiter.throttles(),
        2,
        "the undo's throttling reached the limiter"
    );
    assert_eq!(limiter.granted(), 4);
    engine.shutdown().await;
}

/// A service that takes `capacity` calls per second (a token bucket holding one second's
/// worth) and throttles a random `noise` share of calls whatever the rate.
struct Service {
    capacity: f64,
    noise: f64,
    tokens: f64,
    refilled: Instant,
    rng: StdRng,
    accepted: Vec<Instant>,
}

impl Service {
    fn call(&mut self) -> bool {
        let now = Instant::now();
        let elapsed = now.duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.capacity).min(self.capacity);
        self.refilled = now;
        if self.rng.gen::<f64>() < self.noise || self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        self.accepted.push(now);
        true
    }
}

/// The limiter with its defaults, 40 callers, a service of 25 calls/s that throttles 5% of
/// calls at random: it must use at least 80% of the capacity. (Halving on every throttled
/// answer settled near 6 calls/s, whatever the capacity.) In virtual time.
#[tokio::test(start_paused = true)]
async fn under_random_throttling_the_limiter_finds_the_service_capacity() {
    let capacity = 25.0;
    let service = Arc::new(Mutex::new(Service {
        capacity,
        noise: 0.05,
        tokens: 0.0,
        refilled: Instant::now(),
        rng: StdRng::seed_from_u64(7),
        accepted: Vec::new(),
    }));
    let limiter = Arc::new(RateLimiter::new("svc", RateLimit::default()));
    let started = Instant::now();
    let run_for = Duration::from_secs(300);
    let mut callers = Vec::new();
    for _ in 0..40 {
        let (service, limiter) = (service.clone(), limiter.clone());
        callers.push(tokio::spawn(async move {
            while started.elapsed() < run_for {
                let permit = limiter.acquire().await;
                // A call takes 20 ms.
                tokio::time::sleep(Duration::from_millis(20)).await;
                if service.lock().unwrap().call() {
                    limiter.succeeded(permit);
                } else {
                    limiter.throttled(permit);
                }
            }
        }));
    }
    for caller in callers {
        caller.await.unwrap();
    }
    // The last 200 s: past the ramp from the initial rate.
    let service = service.lock().unwrap();
    let from = started + Duration::from_secs(100);
    let accepted = service.accepted.iter().filter(|t| **t >= from).count();
    let per_s = accepted as f64 / 200.0;
    tracing::info!(
        "accepted {per_s:.1} calls/s of {capacity} ({:.0}%), limiter at {:.1}/s",
        100.0 * per_s / capacity,
        limiter.rate()
    );
    assert!(
        per_s >= 0.8 * capacity,
        "the limiter used {per_s:.1} calls/s of a capacity of {capacity} (limiter at {:.1}/s)",
        limiter.rate()
    );
}
