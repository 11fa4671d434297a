//! Waits judged by what the resource did, not by what the engine did (docs/waits.md): polls
//! queued at a shared rate limiter do not use up a wait's budget, a throttled poll is no
//! answer, a deadline that passed while the worker was down still gives the resource its
//! `confirmations` polls, and the statistics learn the resource's time, not the engine's
//! congestion or downtime. Each test failed on the engine before these rules.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keel::testing::TestClock;
use keel::{
    Ctx, Engine, Event, Probe, RateLimit, RunStatus, Step, StepContext, StepError, WaitOutcome,
    WaitPolicy, Workflow, WorkflowError,
};
use serde::{Deserialize, Serialize};

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Makes a resource that is ready `ready_after_ms` after it is made (wall clock).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct MakeResource {
    ready_after_ms: u64,
}

impl Step for MakeResource {
    const KIND: &'static str = "test.make-resource";
    type Output = u64;

    async fn execute(&self, _: &StepContext) -> Result<u64, StepError> {
        Ok(wall_ms() + self.ready_after_ms)
    }
}

/// Ready once the wall clock reads `ready_at_ms`; polls go through the "svc" limiter.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ReadyAt {
    ready_at_ms: u64,
}

impl Probe for ReadyAt {
    const KIND: &'static str = "test.ready-at";
    type Output = u64;

    async fn probe(&self, _: &StepContext) -> Result<Option<u64>, StepError> {
        let now = wall_ms();
        Ok((now >= self.ready_at_ms).then_some(now))
    }

    fn rate_limit(&self) -> Option<&str> {
        Some("svc")
    }
}

/// Creates a resource and waits for it: 2 confirmations, a poll every 200 ms, 2 s.
struct CreateAndWait;

impl Workflow for CreateAndWait {
    const NAME: &'static str = "test.create-and-wait";
    type Input = u64;
    type Output = u64;

    async fn run(ctx: &mut Ctx, ready_after_ms: u64) -> Result<u64, WorkflowError> {
        let ready_at_ms = ctx.step(MakeResource { ready_after_ms }).await?;
        let policy = WaitPolicy::every(Duration::from_millis(200), Duration::from_secs(2))
            .growth(1.0)
            .jitter(0.0)
            .confirmations(2);
        ctx.wait(ReadyAt { ready_at_ms }, policy).await
    }
}

/// 30 runs share a limiter of 10 calls/s, so each wait gets a poll every few seconds, far
/// less often than its schedule asks; every resource is ready 1.5 s after it is made, within
/// the 2 s budget. Every wait must end ready, and the time to readiness learned must be the
/// resource's, not the queue's. (Before: a wait whose first poll came just before readiness
/// and whose next was due past the deadline timed out without looking again, and the samples
/// counted the time polls queued.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polls_queued_at_a_shared_limiter_do_not_use_up_the_wait() {
    keel_testkit::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let fixed = RateLimit {
        initial_per_s: 10.0,
        min_per_s: 10.0,
        max_per_s: 10.0,
        increase_per_s: 0.0,
        decrease_factor: 0.5,
    };
    let engine = Engine::builder(dir.path())
        .workflow::<CreateAndWait>()
        .rate_limit("svc", fixed)
        .open()
        .await
        .unwrap();
    let ids: Vec<String> = (0..30).map(|i| format!("run-{i}")).collect();
    for id in &ids {
        engine.start::<CreateAndWait>(id, 1_500).await.unwrap();
    }
    let mut timed_out = Vec::new();
    for id in &ids {
        let record = engine.wait(id).await.unwrap();
        if record.status != RunStatus::Completed {
            timed_out.push((id.clone(), record.error));
        }
    }
    assert!(
        timed_out.is_empty(),
        "{} of 30 healthy resources judged hopeless: {timed_out:?}",
        timed_out.len()
    );
    if let Some(s) = engine.operation_stats("wait:test.ready-at") {
        assert!(
            s.max <= Duration::from_millis(1_900),
            "learned {:?} for a resource ready after 1.5 s (p50 {:?}, {} samples)",
            s.max,
            s.p50,
            s.count
        );
    }
    engine.shutdown().await;
}

/// What a scripted probe answers at one poll.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
enum Answer {
    Ready,
    NotReady,
    Throttled,
}

/// Scripts by name; a test changes a script between two processes' lives of a run.
static SCRIPTS: Mutex<Option<HashMap<String, Vec<Answer>>>> = Mutex::new(None);

fn script(name: &str, answers: &[Answer]) {
    SCRIPTS
        .lock()
        .unwrap()
        .get_or_insert_with(HashMap::new)
        .insert(name.into(), answers.to_vec());
}

/// Answers its script's n-th entry at the n-th poll since the wait (re)started, repeating the
/// script.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Scripted {
    name: String,
}

impl Probe for Scripted {
    const KIND: &'static str = "test.scripted";
    type Output = u32;

    async fn probe(&self, ctx: &StepContext) -> Result<Option<u32>, StepError> {
        let answers = SCRIPTS.lock().unwrap().as_ref().unwrap()[&self.name].clone();
        let n = ctx.attempt().0;
        match answers[(n as usize - 1) % answers.len()] {
            Answer::Ready => Ok(Some(n)),
            Answer::NotReady => Ok(None),
            Answer::Throttled => Err(StepError::throttled("Rate exceeded")),
        }
    }
}

/// Waits on its script's probe: 2 confirmations, a poll every 100 ms, 1 s; a timeout is an
/// output (`None`), other failures fail the run.
struct ScriptedWait;

impl Workflow for ScriptedWait {
    const NAME: &'static str = "test.scripted-wait";
    type Input = String;
    type Output = Option<u32>;

    async fn run(ctx: &mut Ctx, name: String) -> Result<Option<u32>, WorkflowError> {
        let policy = WaitPolicy::every(Duration::from_millis(100), Duration::from_secs(1))
            .growth(1.0)
            .jitter(0.0)
            .confirmations(2);
        match ctx.wait(Scripted { name }, policy).await {
            Ok(poll) => Ok(Some(poll)),
            Err(WorkflowError::WaitTimedOut { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

async fn open_on(dir: &Path, clock: &TestClock) -> Engine {
    Engine::builder(dir)
        .clock(clock.clone())
        .workflow::<ScriptedWait>()
        .open()
        .await
        .unwrap()
}

fn wait_ended(engine_history: &keel::RunHistory) -> (u64, WaitOutcome) {
    engine_history
        .entries
        .iter()
        .find_map(|e| match &e.event {
            Event::WaitEnded { outcome, .. } => Some((e.at_ms, outcome.clone())),
            _ => None,
        })
        .expect("the wait ended")
}

/// Ready, throttled, ready, throttled...: the throttled polls say nothing about the resource,
/// so polls 1 and 3 are two confirmations in a row. (Before: every throttle broke the run
/// and the wait timed out on a ready resource.)
#[tokio::test]
async fn a_throttled_poll_neither_confirms_nor_breaks_a_run_of_confirmations() {
    keel_testkit::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::new();
    let engine = open_on(dir.path(), &clock).await;
    script("flaky-api", &[Answer::Ready, Answer::Throttled]);
    engine
        .start::<ScriptedWait>("r", "flaky-api".into())
        .await
        .unwrap();
    let record = clock.skip_until_settled(&engine, "r").await.unwrap();
    assert_eq!(record.status, RunStatus::Completed, "{:?}", record.error);
    assert_eq!(record.output, Some(serde_json::json!(3)));
    engine.shutdown().await;
}

/// A probe that is always throttled cannot wait forever, nor time out (which would recreate a
/// resource nobody looked at): past the deadline, ten unanswered polls in a row, over at least
/// a minute, end the wait as failed, naming the last error. (Before: it timed out at the
/// deadline.)
#[tokio::test]
async fn a_probe_that_never_answers_fails_the_wait_past_its_deadline() {
    keel_testkit::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::new();
    let engine = open_on(dir.path(), &clock).await;
    script("throttled", &[Answer::Throttled]);
    engine
        .start::<ScriptedWait>("r", "throttled".into())
        .await
        .unwrap();
    let started = clock.now_ms();
    let record = clock.skip_until_settled(&engine, "r").await.unwrap();
    assert_ne!(record.status, RunStatus::Completed);
    let (at_ms, outcome) = wait_ended(&engine.history("r").await.unwrap());
    let WaitOutcome::Failed { error, polls } = outcome else {
        panic!("{outcome:?}")
    };
    assert!(error.message.contains("got no answer"), "{}", error.message);
    assert!(error.message.contains("Rate exceeded"), "{}", error.message);
    assert!(error.message.contains("over 60.0 s"), "{}", error.message);
    // 10 polls before the deadline (every 100 ms from 0), then one every 100 ms from the
    // deadline (1 s) until a minute after it.
    assert_eq!(polls, 611);
    assert_eq!(at_ms, started + 61_000);
    engine.shutdown().await;
}

/// Under load a service throttles in bursts, and the engine's own calls are most of them: a
/// burst of throttled polls past the deadline is not a probe that never answers. Not ready
/// until the deadline, then 15 throttled polls (1.4 s), then ready twice: the wait ends ready.
/// (Before: the tenth throttled poll failed the wait, and the run compensated a healthy
/// resource; seen in CI's `load_simcloud`.)
#[tokio::test]
async fn a_burst_of_throttling_past_the_deadline_does_not_fail_the_wait() {
    keel_testkit::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::new();
    let engine = open_on(dir.path(), &clock).await;
    let mut answers = vec![Answer::NotReady; 10];
    answers.extend([Answer::Throttled; 15]);
    answers.extend([Answer::Ready; 2]);
    script("throttle-burst", &answers);
    engine
        .start::<ScriptedWait>("r", "throttle-burst".into())
        .await
        .unwrap();
    let record = clock.skip_until_settled(&engine, "r").await.unwrap();
    assert_eq!(record.status, RunStatus::Completed, "{:?}", record.error);
    assert_eq!(record.output, Some(serde_json::json!(27)));
    engine.shutdown().await;
}

/// The worker is down past a wait's deadline. After the restart the wait gets its two
/// confirmations' worth of answers before it may be judged: a flapping first read after the
/// restart is not the end. The wait spanned the downtime, so it records no statistics
/// sample. (Before: the first "not ready" after the restart timed the wait out.)
#[tokio::test]
async fn a_deadline_passed_while_the_worker_was_down_still_gives_the_resource_its_polls() {
    keel_testkit::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::new();
    script("restarted", &[Answer::NotReady]);
    let engine = open_on(dir.path(), &clock).await;
    engine
        .start::<ScriptedWait>("r", "restarted".into())
        .await
        .unwrap();
    keel_testkit::poll::asleep(&clock).await;
    engine.shutdown().await;
    drop(engine);
    // Down for 10 s, past the 1 s deadline. After the restart: a flap, then ready twice.
    clock.advance(Duration::from_secs(10));
    script(
        "restarted",
        &[
            Answer::NotReady,
            Answer::Ready,
            Answer::Ready,
            Answer::NotReady,
        ],
    );
    let engine = open_on(dir.path(), &clock).await;
    let record = clock.skip_until_settled(&engine, "r").await.unwrap();
    assert_eq!(record.status, RunStatus::Completed, "{:?}", record.error);
    assert_eq!(record.output, Some(serde_json::json!(3)));
    assert!(
        engine.operation_stats("wait:test.scripted").is_none(),
        "a wait across a restart measures the downtime, not the resource"
    );
    engine.shutdown().await;
}
