//! Durable waits and latency statistics: a flapping probe needs k confirmations in a row; only
//! a wait's start and end are journaled; a wait killed with SIGKILL resumes with its original
//! deadline; statistics survive a restart and match a known sample set exactly; a learned
//! policy takes its schedule from them. In-process runs use a test clock (time skipping), so
//! every journaled time is exact; the SIGKILL test runs on the wall clock across processes.

use std::path::Path;
use std::time::Duration;

use keel::testing::TestClock;
use keel::{Ctx, Engine, Event, RunHistory, Workflow, WorkflowError};
use keel::{RunStatus, WaitOutcome, WaitPolicy};
use keel_testkit::check::read_store_blocking;
use keel_testkit::crash::{is_child, path_env, ChildSpec, Ending};
use keel_testkit::flows::FlappingProbe;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct WaitInput {
    pattern: Vec<bool>,
    confirmations: u32,
    interval_ms: u64,
    timeout_ms: u64,
    learned: bool,
}

/// Waits on a flapping probe; outputs the poll that confirmed, or `None` when the wait timed
/// out (the body catches the timeout).
struct WaitFlow;

impl Workflow for WaitFlow {
    const NAME: &'static str = "test.wait";
    type Input = WaitInput;
    type Output = Option<u32>;

    async fn run(ctx: &mut Ctx, input: WaitInput) -> Result<Option<u32>, WorkflowError> {
        let mut policy = WaitPolicy::every(
            Duration::from_millis(input.interval_ms),
            Duration::from_millis(input.timeout_ms),
        )
        .growth(1.0)
        .jitter(0.0)
        .confirmations(input.confirmations);
        if input.learned {
            policy = policy.learned();
        }
        match ctx
            .wait(
                FlappingProbe {
                    pattern: input.pattern,
                },
                policy,
            )
            .await
        {
            Ok(poll) => Ok(Some(poll)),
            Err(WorkflowError::WaitTimedOut { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

fn input(pattern: &[bool], confirmations: u32, timeout_ms: u64) -> WaitInput {
    WaitInput {
        pattern: pattern.to_vec(),
        confirmations,
        interval_ms: 2,
        timeout_ms,
        learned: false,
    }
}

/// An engine on the wall clock (for the SIGKILL test, whose child and parent are processes).
async fn open(dir: &Path) -> Engine {
    keel_testkit::store::builder(dir)
        .workflow::<WaitFlow>()
        .open()
        .await
        .unwrap()
}

/// An engine on `clock`.
async fn open_on(dir: &Path, clock: &TestClock) -> Engine {
    keel_testkit::store::builder(dir)
        .clock(clock.clone())
        .workflow::<WaitFlow>()
        .open()
        .await
        .unwrap()
}

/// Starts run `id` and waits for it, skipping `clock` to every wake time (time skipping).
async fn run_to_end(
    engine: &Engine,
    clock: &TestClock,
    id: &str,
    input: WaitInput,
) -> (Option<u32>, RunHistory) {
    engine.start::<WaitFlow>(id, input).await.unwrap();
    let record = clock.skip_until_settled(engine, id).await.unwrap();
    assert_eq!(record.status, RunStatus::Completed, "{:?}", record.error);
    // A `None` output is stored as null, which reads back as no output.
    let output = serde_json::from_value(record.output.unwrap_or_default()).unwrap();
    (output, engine.history(id).await.unwrap())
}

fn wait_events(history: &RunHistory) -> Vec<(u64, Event)> {
    history
        .entries
        .iter()
        .filter(|e| matches!(e.event, Event::WaitStarted { .. } | Event::WaitEnded { .. }))
        .map(|e| (e.at_ms, e.event.clone()))
        .collect()
}

/// A wait on a flapping probe ends ready only after k "ready" answers in a row, journals only
/// its start and its end whatever the number of polls, and times out at the first "not ready"
/// answer from the deadline on.
#[tokio::test]
async fn a_flapping_probe_needs_k_confirmations_in_a_row() {
    keel_testkit::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::new();
    let engine = open_on(dir.path(), &clock).await;
    let flapping = [true, false, true, true, false];
    // k = 1: the first "yes" will do.
    assert_eq!(
        run_to_end(&engine, &clock, "k1", input(&flapping, 1, 10_000))
            .await
            .0,
        Some(1)
    );
    // k = 2: polls 3 and 4 are the first two "yes" in a row.
    let (output, history) = run_to_end(&engine, &clock, "k2", input(&flapping, 2, 10_000)).await;
    assert_eq!(output, Some(4));
    // Only the start and the end are journaled, whatever the number of polls.
    let events = wait_events(&history);
    assert_eq!(events.len(), 2, "{events:?}");
    match &events[1].1 {
        Event::WaitEnded {
            outcome: WaitOutcome::Ready { polls, output },
            ..
        } => assert_eq!((*polls, output.clone()), (4, serde_json::json!(4))),
        other => panic!("{other:?}"),
    }
    // k = 3 never happens with this pattern: the wait times out and the body goes on.
    let (output, history) = run_to_end(&engine, &clock, "k3", input(&flapping, 3, 300)).await;
    assert_eq!(output, None);
    let events = wait_events(&history);
    assert!(
        matches!(events[1].1, Event::WaitEnded { outcome: WaitOutcome::TimedOut { polls }, .. } if polls > 10)
    );
    // Poll 151, sent at the deadline (300 ms), was ready and began a run of confirmations;
    // poll 152 (302 ms) said "not ready": a poll sent at or after the deadline judged it.
    assert_eq!(
        events[1].0,
        events[0].0 + 302,
        "timed out at the first \"not ready\" from the deadline on: {events:?}"
    );
    engine.shutdown().await;
}

/// Starting a finished run with a wait again answers from its record without polling: the
/// same output, and nothing added to the journal.
#[tokio::test]
async fn a_replayed_wait_answers_from_the_journal_without_polling() {
    keel_testkit::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::new();
    let engine = open_on(dir.path(), &clock).await;
    let (first, _) = run_to_end(
        &engine,
        &clock,
        "once",
        input(&[false, true, true], 2, 10_000),
    )
    .await;
    // Starting the same run again answers from the record; the journal is unchanged.
    let entries = engine.history("once").await.unwrap().entries.len();
    let (again, history) = run_to_end(
        &engine,
        &clock,
        "once",
        input(&[false, true, true], 2, 10_000),
    )
    .await;
    assert_eq!((first, again), (Some(3), Some(3)));
    assert_eq!(history.entries.len(), entries);
    assert_eq!(history.run.status, RunStatus::Completed);
    engine.shutdown().await;
}

const KILLED_WAIT_TIMEOUT_MS: u64 = 4_000;

fn killed_wait_child() {
    let dir = std::env::var("KEEL_DATA_DIR").unwrap();
    let runtime = keel_testkit::crash::runtime();
    runtime.block_on(async {
        let engine = open(Path::new(&dir)).await;
        // Never ready: only the deadline ends it.
        let run = engine
            .start::<WaitFlow>("never", input(&[false], 1, KILLED_WAIT_TIMEOUT_MS))
            .await
            .unwrap();
        assert_eq!(run.result().await.unwrap(), None);
        engine.shutdown().await;
    });
}

/// The child is SIGKILLed halfway through a 4 s wait and restarted: the wait ends at its
/// original deadline (start + 4 s), not 4 s after the restart.
#[test]
fn a_wait_killed_halfway_keeps_its_deadline() {
    const NAME: &str = "a_wait_killed_halfway_keeps_its_deadline";
    if is_child() {
        return killed_wait_child();
    }
    keel_testkit::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let spec = ChildSpec {
        test_name: NAME,
        env: vec![("KEEL_DATA_DIR".into(), path_env(dir.path(), "data"))],
    };
    let bound = Duration::from_secs(60);
    assert_eq!(
        spec.run_and_kill_after(Duration::from_millis(2_000), bound),
        Ending::Killed
    );
    assert_eq!(spec.run(&[], bound), Ending::Finished);

    read_store_blocking(&dir.path().join("data"), async |engine| {
        let history = engine.history("never").await.unwrap();
        let events = wait_events(&history);
        assert_eq!(events.len(), 2, "started once, ended once: {events:?}");
        let (started_at, Event::WaitStarted { schedule, .. }) = &events[0] else {
            panic!("{events:?}")
        };
        // The deadline is the wait's start plus its timeout, computed just before the entry
        // is stamped (the bound leaves room for a descheduled thread). That the restart kept
        // it is checked by the one WaitStarted above and by the end's time below.
        assert!((started_at + KILLED_WAIT_TIMEOUT_MS).abs_diff(schedule.deadline_ms) <= 500);
        let ended_at = events[1].0;
        assert!(ended_at >= schedule.deadline_ms, "not before the deadline");
        // A deadline restarted by the restart would end 2 s later than this at the earliest.
        assert!(
            ended_at < schedule.deadline_ms + 1_500,
            "ended {} ms after the journaled deadline",
            ended_at - schedule.deadline_ms
        );
    });
}

/// Latency statistics survive a restart and match a known sample set exactly (count, min,
/// max, mean, percentiles, standard deviation, outliers); a run's real wait is recorded under
/// its kind.
#[tokio::test]
async fn statistics_survive_a_restart_and_match_a_known_sample_set() {
    keel_testkit::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::new();
    let engine = open_on(dir.path(), &clock).await;
    for ms in 1..=100 {
        engine.record_duration("wait:test.known", Duration::from_millis(ms));
    }
    run_to_end(&engine, &clock, "measured", input(&[true], 1, 10_000)).await;
    engine.shutdown().await;
    drop(engine);

    let engine = open_on(dir.path(), &clock).await;
    let s = engine
        .operation_stats("wait:test.known")
        .expect("survived the restart");
    let ms = Duration::from_millis;
    assert_eq!(
        (s.count, s.min, s.max, s.mean),
        (100, ms(1), ms(100), Duration::from_micros(50_500))
    );
    // Percentiles come from the HDR histogram: at or above the sample at that rank (the
    // highest duration of its bucket) and within 0.1% of it.
    for (got, want) in [(s.p50, 50), (s.p90, 90), (s.p99, 99), (s.p999, 100)] {
        assert!(
            got >= ms(want) && got <= ms(want) + ms(want) / 1000,
            "{got:?} for {want} ms"
        );
    }
    // Population sigma of 1..=100 ms: sqrt((100^2 - 1) / 12) ms.
    assert_eq!(s.std_dev, Duration::from_micros(28_866));
    assert_eq!(
        s.outliers.iter().map(|o| o.duration).collect::<Vec<_>>(),
        (91..=100).rev().map(ms).collect::<Vec<_>>()
    );
    assert!(s.distribution.iter().map(|b| b.count).sum::<u64>() == 100);
    // The real wait of the run was recorded under its kind.
    let flapping = engine
        .operation_stats("wait:test.flapping")
        .expect("the run's wait");
    assert_eq!(flapping.count, 1);
    assert_eq!(flapping.outliers[0].run_id, "measured");
    let all: Vec<_> = engine.stats().into_iter().map(|s| s.operation).collect();
    assert_eq!(all, ["wait:test.flapping", "wait:test.known"]);
    engine.shutdown().await;
}

/// A learned wait policy keeps the explicit schedule while samples are too few, and with
/// enough samples takes its initial delay, dense interval, dense span and deadline from the
/// statistics.
#[tokio::test]
async fn a_learned_policy_takes_its_schedule_from_the_statistics() {
    keel_testkit::init_tracing();
    let mut learned = input(&[true], 1, 10_000);
    learned.learned = true;
    // Too few samples: the explicit policy.
    let fresh = tempfile::tempdir().unwrap();
    let clock = TestClock::new();
    let engine = open_on(fresh.path(), &clock).await;
    let (_, history) = run_to_end(&engine, &clock, "before", learned.clone()).await;
    let Event::WaitStarted { schedule, .. } = &wait_events(&history)[0].1 else {
        unreachable!()
    };
    assert!(!schedule.learned);
    assert_eq!(schedule.dense_interval_ms, 2);
    engine.shutdown().await;

    let dir = tempfile::tempdir().unwrap();
    let engine = open_on(dir.path(), &clock).await;
    // Enough samples (20..=119 ms): no probe before 95% of the fastest, dense probing every
    // mean/8 until p99, a deadline at twice p99.9.
    for ms in 20..120 {
        engine.record_duration("wait:test.flapping", Duration::from_millis(ms));
    }
    let (_, history) = run_to_end(&engine, &clock, "after", learned).await;
    let (started_at, Event::WaitStarted { schedule, .. }) = &wait_events(&history)[0] else {
        unreachable!()
    };
    assert!(schedule.learned);
    assert_eq!(schedule.initial_delay_ms, 19);
    assert_eq!(schedule.dense_interval_ms, 69 / 8);
    assert_eq!(schedule.dense_until_ms, 118);
    assert_eq!(schedule.deadline_ms, started_at + 2 * 119);
    let ended = &wait_events(&history)[1];
    assert_eq!(
        ended.0,
        started_at + 19,
        "the first poll, at the initial delay and not before, is ready"
    );
    engine.shutdown().await;
}
