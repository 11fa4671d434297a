//! Waits that park between polls: a run whose wait's next poll is at least `park_after` away
//! journals its polls so far (`WaitParked`) and is unloaded until the poll is due. Checked
//! here: that it parks between every such pair of polls, that a wait loaded from its own
//! park goes on from its polls so far (confirmations in a row, poll count, deadline, the
//! time to readiness), that the probe runs once per poll (counted by the probe itself), that
//! an event sent to the run lets the wait go on, and that after a restart, or a pause and a
//! resume, a wait starts over as before: a resource is never granted with fewer than its
//! confirmations in a row.

mod common;

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use common::Scratch;
use keel::{
    Ctx, Engine, Event, Probe, Resident, RunHistory, RunStatus, StepContext, StepError,
    WaitOutcome, WaitPolicy, WaitPolls, Workflow, WorkflowError,
};
use keel_testkit::poll::{resident, until, CONDITION_TIMEOUT};
use serde::{Deserialize, Serialize};

/// Answers by how many times it was called for its run, the ground truth of the polls sent
/// (it holds through parks and restarts alike): ready or not as `pattern` says for that call,
/// its last answer repeating. Its output is the call's number.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct CallCounted {
    pattern: Vec<bool>,
}

static CALLS: Mutex<BTreeMap<String, u32>> = Mutex::new(BTreeMap::new());

/// How many times [`CallCounted`] was called for run `id`.
fn calls(id: &str) -> u32 {
    CALLS.lock().unwrap().get(id).copied().unwrap_or(0)
}

impl Probe for CallCounted {
    const KIND: &'static str = "test.call-counted";
    type Output = u32;

    async fn probe(&self, ctx: &StepContext) -> Result<Option<u32>, StepError> {
        let call = {
            let mut calls = CALLS.lock().unwrap();
            let call = calls.entry(ctx.run_id().to_string()).or_default();
            *call += 1;
            *call
        };
        let ready = self
            .pattern
            .get(call as usize - 1)
            .or(self.pattern.last())
            .copied()
            .unwrap_or(true);
        Ok(ready.then_some(call))
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct PolledInput {
    pattern: Vec<bool>,
    confirmations: u32,
    timeout_ms: u64,
}

/// Polls between parks: every [`INTERVAL_MS`], longer than the engine's `park_after`.
const INTERVAL_MS: u64 = 20_000;

/// Waits on [`CallCounted`]; outputs the call that confirmed, or `None` when it timed out.
struct Polled;

impl Workflow for Polled {
    const NAME: &'static str = "test.park-wait";
    type Input = PolledInput;
    type Output = Option<u32>;

    async fn run(ctx: &mut Ctx, input: PolledInput) -> Result<Option<u32>, WorkflowError> {
        let policy = WaitPolicy::every(
            Duration::from_millis(INTERVAL_MS),
            Duration::from_millis(input.timeout_ms),
        )
        .growth(1.0)
        .jitter(0.0)
        .confirmations(input.confirmations);
        let probe = CallCounted {
            pattern: input.pattern,
        };
        match ctx.wait(probe, policy).await {
            Ok(call) => Ok(Some(call)),
            Err(WorkflowError::WaitTimedOut { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

async fn open(scratch: &Scratch) -> Engine {
    keel_testkit::store::builder(&scratch.data)
        .clock(scratch.clock.clone())
        .park_after(Some(keel::PARK_AFTER_DEFAULT))
        .workflow::<Polled>()
        .open()
        .await
        .expect("opening the engine")
}

fn parked(parked: usize) -> Resident {
    Resident { loaded: 0, parked }
}

/// The polls each `WaitParked` entry of `history` journaled, in order.
fn parks(history: &RunHistory) -> Vec<WaitPolls> {
    history
        .entries
        .iter()
        .filter_map(|e| match &e.event {
            Event::WaitParked { polls, .. } => Some(polls.clone()),
            _ => None,
        })
        .collect()
}

/// The wait's end, and when it was journaled.
fn wait_end(history: &RunHistory) -> (u64, WaitOutcome) {
    history
        .entries
        .iter()
        .find_map(|e| match &e.event {
            Event::WaitEnded { outcome, .. } => Some((e.at_ms, outcome.clone())),
            _ => None,
        })
        .expect("the wait ended")
}

/// `future`'s output; panics if it takes longer than [`CONDITION_TIMEOUT`] (real time), as a
/// wait that never confirms would.
async fn bounded<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(CONDITION_TIMEOUT, future)
        .await
        .expect("the run did not settle in time")
}

/// Run `id` once settled, its engine's clock skipped to each wake time meanwhile.
async fn settled(engine: &Engine, scratch: &Scratch, id: &str) -> keel::RunRecord {
    bounded(scratch.clock.skip_until_settled(engine, id))
        .await
        .unwrap()
}

/// Waits until run `id` has parked `times` times in all and is parked now, with the probe
/// called `polls` times.
async fn parked_after(engine: &Engine, id: &str, times: usize, polls: u32) {
    until(engine, id, |h| parks(h).len() == times).await;
    resident(engine, parked(1)).await;
    assert_eq!(calls(id), polls, "polls sent before park {times}");
}

/// A wait whose polls are 20 s apart parks between every two of them, and each load from a
/// park goes on where the wait was: "not ready, ready, not ready, ready, ready" with two
/// confirmations ends ready at the fifth poll (a wait that started over at each load would
/// never see two in a row), after five calls of the probe, with the time to readiness (from
/// the start to the fourth poll) recorded as a measure of the resource.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_parks_between_polls_and_goes_on_from_its_polls_so_far() {
    keel_testkit::init_tracing();
    let scratch = Scratch::new();
    let engine = open(&scratch).await;
    let id = "between-polls";
    let input = PolledInput {
        pattern: vec![false, true, false, true, true],
        confirmations: 2,
        timeout_ms: 3_600_000,
    };
    let started_at_ms = scratch.clock.now_ms();
    let handle = engine.start::<Polled>(id, input).await.unwrap();
    let result = tokio::spawn(async move { handle.result().await });
    for poll in 1..=4 {
        parked_after(&engine, id, poll, poll as u32).await;
        scratch
            .clock
            .advance_to(started_at_ms + poll as u64 * INTERVAL_MS);
    }
    assert_eq!(bounded(result).await.unwrap().unwrap(), Some(5));
    resident(&engine, Resident::default()).await;
    assert_eq!(calls(id), 5, "one call of the probe per poll");

    let history = engine.history(id).await.unwrap();
    assert_eq!(history.run.status, RunStatus::Completed);
    let parks = parks(&history);
    assert_eq!(
        parks
            .iter()
            .map(|p| (p.sent, p.answers, p.streak, p.next_at_ms - started_at_ms))
            .collect::<Vec<_>>(),
        [
            (1, 1, 0, INTERVAL_MS),
            (2, 2, 1, 2 * INTERVAL_MS),
            (3, 3, 0, 3 * INTERVAL_MS),
            (4, 4, 1, 4 * INTERVAL_MS),
        ],
        "the polls so far at each park"
    );
    assert_eq!(
        wait_end(&history),
        (
            started_at_ms + 4 * INTERVAL_MS,
            WaitOutcome::Ready {
                output: serde_json::json!(5),
                polls: 5
            }
        )
    );
    let measured = engine
        .operation_stats("wait:test.call-counted")
        .expect("the time to readiness was recorded");
    assert_eq!(measured.count, 1);
    assert_eq!(
        (
            measured.outliers[0].run_id.as_str(),
            measured.outliers[0].duration
        ),
        (id, Duration::from_millis(3 * INTERVAL_MS)),
        "from the start to the poll that began the confirmations"
    );
    engine.shutdown().await;
}

/// A resource never ready is judged by a poll sent at the deadline, whichever park the wait
/// comes back from: polls at 0, 20, 40 and 60 s, then at the deadline (70 s), parked before
/// each but the first, and the wait times out there after five polls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_wait_keeps_its_deadline() {
    keel_testkit::init_tracing();
    let scratch = Scratch::new();
    let engine = open(&scratch).await;
    let id = "deadline";
    let input = PolledInput {
        pattern: vec![false],
        confirmations: 1,
        timeout_ms: 70_000,
    };
    let started_at_ms = scratch.clock.now_ms();
    engine.start::<Polled>(id, input).await.unwrap();
    let record = settled(&engine, &scratch, id).await;
    assert_eq!(record.status, RunStatus::Completed, "{:?}", record.error);
    assert_eq!(record.output, None, "timed out");
    assert_eq!(calls(id), 5);
    let history = engine.history(id).await.unwrap();
    assert_eq!(
        parks(&history)
            .iter()
            .map(|p| (p.sent, p.next_at_ms - started_at_ms))
            .collect::<Vec<_>>(),
        [
            (1, INTERVAL_MS),
            (2, 2 * INTERVAL_MS),
            (3, 3 * INTERVAL_MS),
            (4, 4 * INTERVAL_MS),
        ],
    );
    assert_eq!(
        wait_end(&history),
        (started_at_ms + 70_000, WaitOutcome::TimedOut { polls: 5 })
    );
    engine.shutdown().await;
}

/// Starts run `id` waiting for "not ready, ready, ready" with two confirmations, and lets it
/// poll twice: it is parked after "not ready, ready", one confirmation of two. Returns when
/// it started.
async fn parked_with_one_confirmation(engine: &Engine, scratch: &Scratch, id: &str) -> u64 {
    let input = PolledInput {
        pattern: vec![false, true, true],
        confirmations: 2,
        timeout_ms: 3_600_000,
    };
    let started_at_ms = scratch.clock.now_ms();
    engine.start::<Polled>(id, input).await.unwrap();
    parked_after(engine, id, 1, 1).await;
    scratch.clock.advance_to(started_at_ms + INTERVAL_MS);
    parked_after(engine, id, 2, 2).await;
    started_at_ms
}

/// Lets run `id` of [`parked_with_one_confirmation`], whose wait started over, settle: its
/// third call's "ready" is the first of a new run of confirmations, so it ends ready at the
/// fourth call, after two polls since it started over.
async fn ended_after_starting_over(engine: &Engine, scratch: &Scratch, id: &str) {
    let record = settled(engine, scratch, id).await;
    assert_eq!(record.status, RunStatus::Completed, "{:?}", record.error);
    assert_eq!(record.output, Some(serde_json::json!(4)));
    assert_eq!(calls(id), 4);
    let (_, outcome) = wait_end(&engine.history(id).await.unwrap());
    assert_eq!(
        outcome,
        WaitOutcome::Ready {
            output: serde_json::json!(4),
            polls: 2
        },
        "two polls since the wait started over"
    );
}

/// An event sent to a run parked in a wait loads it from that park: the wait goes on from
/// its polls (parking again until its next poll, with the same polls), so the third call's
/// "ready" is the second in a row and ends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_sent_to_a_parked_wait_lets_it_go_on() {
    keel_testkit::init_tracing();
    let scratch = Scratch::new();
    let engine = open(&scratch).await;
    let id = "sent-to";
    let started_at_ms = parked_with_one_confirmation(&engine, &scratch, id).await;
    engine
        .send(id, "ping", &serde_json::json!(1), "ping-1")
        .await
        .unwrap();
    parked_after(&engine, id, 3, 2).await;
    let history = engine.history(id).await.unwrap();
    let parks = parks(&history);
    assert_eq!(parks[2], parks[1], "parked again with the same polls");
    scratch.clock.advance_to(started_at_ms + 2 * INTERVAL_MS);
    let record = bounded(engine.wait(id)).await.unwrap();
    assert_eq!(record.status, RunStatus::Completed, "{:?}", record.error);
    assert_eq!(record.output, Some(serde_json::json!(3)));
    assert_eq!(calls(id), 3);
    engine.shutdown().await;
}

/// A run parked in a wait and paused is loaded again by its resume, not from its park: the
/// wait starts over, as after a restart (the pause is not a sleep of the wait), and ends at
/// the fourth call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_wait_paused_and_resumed_starts_over() {
    keel_testkit::init_tracing();
    let scratch = Scratch::new();
    let engine = open(&scratch).await;
    let id = "paused";
    parked_with_one_confirmation(&engine, &scratch, id).await;
    engine.pause(id).await.unwrap();
    assert_eq!(engine.wait(id).await.unwrap().status, RunStatus::Paused);
    engine.resume(id).await.unwrap();
    ended_after_starting_over(&engine, &scratch, id).await;
    engine.shutdown().await;
}

/// A wait parked after "not ready, ready" (one confirmation of two) whose engine restarts
/// starts over, as a wait does after any restart: its journaled polls are not trusted, since
/// nothing says what happened between them and the reopen. So the third call's "ready" is
/// the first of a new run, and the wait ends ready at the fourth call, not the third. No
/// time to readiness is recorded: the restart is in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_wait_starts_over_after_a_restart() {
    keel_testkit::init_tracing();
    let scratch = Scratch::new();
    let engine = open(&scratch).await;
    let id = "restarted";
    parked_with_one_confirmation(&engine, &scratch, id).await;
    engine.shutdown().await;
    drop(engine);

    let engine = open(&scratch).await;
    ended_after_starting_over(&engine, &scratch, id).await;
    assert!(
        engine
            .operation_stats("wait:test.call-counted")
            .is_none_or(|s| s.count == 0),
        "no time to readiness across a restart"
    );
    engine.shutdown().await;
}
