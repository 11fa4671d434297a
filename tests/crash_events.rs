//! Crash tests of events: a child process starts runs that each take a series of events, one
//! step after each and a published progress value, while the same process sends the events.
//! It is killed with SIGKILL at every event crash point (after a delivery is durable and
//! before the send returns, after a receive took an event and before the next step, after a
//! publish) and at seeded random moments, restarted until it finishes, and then: every event
//! whose send returned was taken once, no event was taken twice, none was lost, each run took
//! its events in the order they were sent, and each event's step took effect.
//!
//! The child logs each event id once its send returned (fsynced) and never sends those again
//! after a restart; the others it sends again (a send cut off by a kill may or may not have
//! been delivered, and its retry is the same event by its id).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use keel::{Ctx, Event, RunStatus, Workflow, WorkflowError};
use keel_testkit::crash::{is_child, path_env, ChildSpec, Ending};
use keel_testkit::effects::Action;
use keel_testkit::flows::{EffectStep, Fault};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

const RUNS: u32 = 3;
const EVENTS: u32 = 8;
const CHILD_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Clone, Debug, Serialize, Deserialize)]
struct CourierInput {
    events: u32,
    log: String,
}

/// Takes `events` events named `item`, each followed by an effect step and a progress value;
/// outputs the ids of the events it took, in order.
struct Courier;

impl Workflow for Courier {
    const NAME: &'static str = "test.courier";
    type Input = CourierInput;
    type Output = Vec<String>;

    async fn run(ctx: &mut Ctx, input: CourierInput) -> Result<Vec<String>, WorkflowError> {
        let mut taken = Vec::new();
        for n in 0..input.events {
            // A lost event ends the run (as timed out) instead of hanging the test.
            let event = ctx
                .receive_event::<u32>(&["item"], Some(Duration::from_secs(60)))
                .await?;
            if event.payload != n {
                return Err(WorkflowError::failed(format!(
                    "event {} carries {}, expected {n}",
                    event.event_id, event.payload
                )));
            }
            ctx.step(EffectStep {
                n,
                fault: Fault::None,
                log: input.log.clone(),
                jitter_ms: 0,
            })
            .await?;
            ctx.publish("progress", &(n + 1)).await?;
            taken.push(event.event_id);
        }
        Ok(taken)
    }
}

fn run_id(i: u32) -> String {
    format!("courier-{i}")
}

fn event_id(run: u32, n: u32) -> String {
    format!("r{run}-e{n}")
}

/// Event ids whose send returned, from the sent log.
fn acknowledged(path: &Path) -> BTreeSet<String> {
    match std::fs::read_to_string(path) {
        Ok(text) => text.lines().map(str::to_owned).collect(),
        Err(_) => BTreeSet::new(),
    }
}

/// The child: start every run, send every event not acknowledged yet (round robin over the
/// runs, in order per run), logging each acknowledgement durably, and wait for the runs.
fn child_main() {
    let dir = std::env::var("KEEL_DATA_DIR").expect("KEEL_DATA_DIR");
    let log = std::env::var("KEEL_EFFECT_LOG").expect("KEEL_EFFECT_LOG");
    let sent_log = std::path::PathBuf::from(std::env::var("KEEL_SENT_LOG").expect("KEEL_SENT_LOG"));
    let runtime = keel_testkit::crash::runtime();
    runtime.block_on(async {
        let engine = keel_testkit::store::builder(&dir)
            .workflow::<Courier>()
            .poison_after_loads(u32::MAX)
            .step::<EffectStep>()
            .open()
            .await
            .unwrap();
        let mut runs = Vec::new();
        for i in 0..RUNS {
            let input = CourierInput {
                events: EVENTS,
                log: log.clone(),
            };
            runs.push(engine.start::<Courier>(&run_id(i), input).await.unwrap());
        }
        let done = acknowledged(&sent_log);
        let mut sent = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&sent_log)
            .unwrap();
        for n in 0..EVENTS {
            for i in 0..RUNS {
                let id = event_id(i, n);
                if done.contains(&id) {
                    continue;
                }
                engine.send(&run_id(i), "item", &n, &id).await.unwrap();
                writeln!(sent, "{id}").unwrap();
                sent.sync_data().unwrap();
            }
        }
        for run in runs {
            run.result().await.unwrap();
        }
        engine.shutdown().await;
    });
}

fn spec<'a>(test_name: &'a str, dir: &Path) -> ChildSpec<'a> {
    ChildSpec {
        test_name,
        env: vec![
            ("KEEL_DATA_DIR".into(), path_env(dir, "data")),
            ("KEEL_EFFECT_LOG".into(), path_env(dir, "effects.jsonl")),
            ("KEEL_SENT_LOG".into(), path_env(dir, "sent.log")),
        ],
    }
}

/// Checks every run against what was sent and the effect log.
fn verify(dir: &Path) {
    let effects = keel_testkit::check::effects_at(&dir.join("effects.jsonl"));
    keel_testkit::check::read_store_blocking(&dir.join("data"), async |engine| {
        for i in 0..RUNS {
            let id = run_id(i);
            let history = engine.history(&id).await.unwrap();
            assert_eq!(
                history.run.status,
                RunStatus::Completed,
                "{id}: {:?}",
                history.run.error
            );
            let expected: Vec<String> = (0..EVENTS).map(|n| event_id(i, n)).collect();
            let taken: Vec<String> =
                serde_json::from_value(history.run.output.clone().unwrap()).unwrap();
            assert_eq!(taken, expected, "{id} took every event once, in order");
            let mut delivered = BTreeMap::new();
            let mut received = BTreeMap::new();
            for entry in &history.entries {
                match &entry.event {
                    Event::EventDelivered { event_id, .. } => {
                        *delivered.entry(event_id.clone()).or_insert(0) += 1
                    }
                    Event::EventReceived { event_id, .. } => {
                        *received.entry(event_id.clone()).or_insert(0) += 1
                    }
                    _ => {}
                }
            }
            for event in &expected {
                assert_eq!(
                    delivered.get(event),
                    Some(&1),
                    "{id}: {event} delivered once"
                );
                assert_eq!(received.get(event), Some(&1), "{id}: {event} taken once");
            }
            assert_eq!(delivered.len(), expected.len(), "{id}: no stray delivery");
            // An acknowledged send is never sent again, so a lost one would have left its
            // run waiting for it (until its receive timed out and the child failed), or
            // taking the next event in its place (its payload checked by the run).
            // Each event's step took effect (a step cut off by a kill may have run twice
            // under its one key), and no step ran that the journal does not hold.
            let keys: BTreeSet<&str> = effects
                .iter()
                .filter(|e| e.run == id && e.action == Action::Do)
                .map(|e| e.key.as_str())
                .collect();
            assert_eq!(keys.len(), EVENTS as usize, "{id}: one effect per event");
            assert!(
                effects.iter().all(|e| e.action == Action::Do),
                "nothing was undone"
            );
            let progress = engine.published(&id, "progress").await.unwrap().unwrap();
            assert_eq!(progress.value, serde_json::json!(EVENTS));
        }
    });
}

/// Killing the child at every event crash point (at seeded hit counts) leaves every event
/// taken exactly once, in order, with its step's effect.
#[test]
fn crash_at_every_event_point() {
    const NAME: &str = "crash_at_every_event_point";
    if is_child() {
        return child_main();
    }
    keel_testkit::init_tracing();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x6576_656e);
    let points: Vec<&str> = keel_testkit::store::crash_points()
        .into_iter()
        .filter(|p| p.starts_with("event."))
        .collect();
    assert_eq!(points.len(), 3, "{points:?}");
    for point in &points {
        let dir = tempfile::tempdir().unwrap();
        let spec = spec(NAME, dir.path());
        // The second child meets each point less often: what was sent and taken before is not
        // sent or taken again.
        for most in [RUNS * EVENTS / 2, 3] {
            let skip = rng.gen_range(0..most);
            let ending = spec.run(
                &[
                    ("KEEL_CRASH_AT", point.to_string()),
                    ("KEEL_CRASH_SKIP", skip.to_string()),
                ],
                CHILD_TIMEOUT,
            );
            assert_eq!(
                ending,
                Ending::Killed,
                "{point} (skip {skip}) was never reached"
            );
        }
        spec.run_until_finished(CHILD_TIMEOUT);
        verify(dir.path());
    }
}

/// SIGKILL at seeded random moments, 15 times per scenario over 4 scenarios: the same checks
/// hold after the child finishes.
#[test]
fn crash_events_at_random_moments() {
    const NAME: &str = "crash_events_at_random_moments";
    if is_child() {
        return child_main();
    }
    keel_testkit::init_tracing();
    for seed in 0..4u64 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let dir = tempfile::tempdir().unwrap();
        let spec = spec(NAME, dir.path());
        spec.kill_repeatedly(
            15,
            || Duration::from_millis(rng.gen_range(1..120)),
            CHILD_TIMEOUT,
            || {
                verify(dir.path());
                keel_testkit::store::wipe(&dir.path().join("data"));
                for file in ["effects.jsonl", "sent.log"] {
                    let _ = std::fs::remove_file(dir.path().join(file));
                }
            },
        );
        spec.run_until_finished(CHILD_TIMEOUT);
        verify(dir.path());
    }
}
