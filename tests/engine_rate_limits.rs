//! Rate limits per service: a step that names a service waits for a slot of the engine's
//! limiter of that name, and its throttled attempts slow the limiter down (once per epoch);
//! its successes speed it up again.

use std::time::Duration;

use keel::{
    Ctx, Engine, RateLimit, RetryPolicy, Step, StepContext, StepError, Workflow, WorkflowError,
};
use serde::{Deserialize, Serialize};

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
}

struct OneCall;

impl Workflow for OneCall {
    const NAME: &'static str = "test.one-call";
    type Input = ();
    type Output = u32;

    async fn run(ctx: &mut Ctx, _: ()) -> Result<u32, WorkflowError> {
        ctx.step(ThrottledOnce).await
    }
}

#[tokio::test]
async fn throttled_attempts_slow_the_service_limiter_and_successes_recover_it() {
    keel_testkit::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let limit = RateLimit {
        initial_per_s: 50.0,
        min_per_s: 1.0,
        max_per_s: 1_000.0,
        increase_per_s: 5.0,
        decrease_factor: 0.5,
    };
    let engine = Engine::builder(dir.path())
        .workflow::<OneCall>()
        .rate_limit("svc", limit)
        .open()
        .await
        .unwrap();
    let limiter = engine.rate_limiter("svc");
    assert_eq!(limiter.rate(), 50.0);
    assert_eq!(
        engine
            .start::<OneCall>("a", ())
            .await
            .unwrap()
            .result()
            .await
            .unwrap(),
        2
    );
    // Halved by the throttle (25), then +5/25 for the success.
    assert_eq!(limiter.throttles(), 1);
    assert!((limiter.rate() - 25.2).abs() < 1e-9, "{}", limiter.rate());
    engine
        .start::<OneCall>("b", ())
        .await
        .unwrap()
        .result()
        .await
        .unwrap();
    assert_eq!(limiter.throttles(), 2);
    let expected = 25.2 * 0.5 + 5.0 / (25.2 * 0.5);
    assert!(
        (limiter.rate() - expected).abs() < 1e-9,
        "{}",
        limiter.rate()
    );
    // The same limiter is shared: another name is another limiter, with the defaults.
    assert_eq!(
        engine.rate_limiter("other").rate(),
        RateLimit::default().initial_per_s
    );
    engine.shutdown().await;
}
