//! A bulk cancel of a fleet's runs under SIGKILL: a child process (the worker) holds
//! `KEEL_BATCH_RUNS` runs (1,000 by default), each past an effect and asleep, and cancels them
//! by filter in batches of 100, keeping the continuation token durably after each call as
//! an operator's client does. It is killed with SIGKILL in the middle of a batch call (at
//! each batch crash point, at seeded hit counts, twice), then restarted until it finishes:
//! it reopens the store, repeats its last call from the token it kept, goes on to the end,
//! and waits for every run to settle. Then every matched run is compensated, its
//! compensation started and finished once, and its effect undone under its own key (an undo
//! cut off by a kill runs again under that key, which a real undo dedupes on).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use keel::{Batch, BatchAction, Ctx, Event, RunFilter, RunStatus, Workflow, WorkflowError};
use keel_testkit::crash::{is_child, path_env, ChildSpec, Ending};
use keel_testkit::effects::Action;
use keel_testkit::flows::{EffectStep, Fault};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

const CHILD_TIMEOUT: Duration = Duration::from_secs(300);
const BATCH_LIMIT: usize = 100;

/// How many runs the fleet holds (`KEEL_BATCH_RUNS`, default 1,000).
fn runs() -> u32 {
    keel_testkit::failover::knob("KEEL_BATCH_RUNS", 1000)
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct HeldInput {
    log: String,
}

/// Takes one effect, then sleeps for a day.
struct Held;

impl Workflow for Held {
    const NAME: &'static str = "test.held";
    type Input = HeldInput;
    type Output = u32;

    async fn run(ctx: &mut Ctx, input: HeldInput) -> Result<u32, WorkflowError> {
        let done = ctx
            .step(EffectStep {
                n: 0,
                fault: Fault::None,
                log: input.log,
                jitter_ms: 0,
            })
            .await?;
        ctx.sleep(Duration::from_secs(24 * 3600)).await?;
        Ok(done)
    }
}

fn run_id(n: u32) -> String {
    format!("fleet-{n:04}")
}

/// The child: start the fleet (idempotent by id), then cancel it by filter from the token
/// kept in the token file, keeping each call's continuation durably; then wait for the runs.
fn child_main() {
    let dir = std::env::var("KEEL_DATA_DIR").expect("KEEL_DATA_DIR");
    let log = std::env::var("KEEL_EFFECT_LOG").expect("KEEL_EFFECT_LOG");
    let tokens = std::path::PathBuf::from(std::env::var("KEEL_TOKENS").expect("KEEL_TOKENS"));
    let runtime = keel_testkit::crash::runtime();
    runtime.block_on(async {
        let engine = keel_testkit::store::builder(&dir)
            .workflow::<Held>()
            .step::<EffectStep>()
            .poison_after_loads(u32::MAX)
            .open()
            .await
            .unwrap();
        // The fleet is started once: a restart finds it in the store.
        let fleet_started = tokens.exists();
        if !fleet_started {
            let input = HeldInput { log: log.clone() };
            for n in 0..runs() {
                engine
                    .start::<Held>(&run_id(n), input.clone())
                    .await
                    .unwrap();
            }
            // Every run past its effect before the cancel, so that each has one to undo.
            while keel_testkit::check::effects_at(Path::new(&log)).len() < runs() as usize {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            keep_token(&tokens, "start");
        }
        // The last token kept: "start", a run id to go on after, or "end".
        let kept = std::fs::read_to_string(&tokens).unwrap();
        let last = kept.lines().last().unwrap_or("start");
        let mut after = match last {
            "start" | "end" => None,
            id => Some(id.to_string()),
        };
        if last != "end" {
            loop {
                let batch = Batch {
                    action: BatchAction::Cancel,
                    filter: RunFilter {
                        statuses: vec![RunStatus::Running],
                        workflow: Some(Held::NAME.into()),
                        ..RunFilter::default()
                    },
                    dry_run: false,
                    after: after.clone(),
                    limit: BATCH_LIMIT,
                };
                let report = engine.batch(&batch).await.unwrap();
                assert_eq!(report.failed, 0, "{report:?}");
                match report.next {
                    Some(next) => {
                        keep_token(&tokens, &next);
                        after = Some(next);
                    }
                    None => {
                        keep_token(&tokens, "end");
                        break;
                    }
                }
            }
        }
        for n in 0..runs() {
            engine.wait(&run_id(n)).await.unwrap();
        }
        engine.shutdown().await;
    });
}

/// Appends `token` to the token file and syncs it: what the operator's client remembers.
fn keep_token(path: &Path, token: &str) {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    writeln!(file, "{token}").unwrap();
    file.sync_data().unwrap();
}

/// SIGKILL in the middle of a bulk cancel, twice at each of the batch's points, then to the
/// end: every run of the fleet is compensated once, and its effect undone under its own key.
#[test]
fn a_bulk_cancel_killed_midway_resumes_and_compensates_every_run_once() {
    const NAME: &str = "a_bulk_cancel_killed_midway_resumes_and_compensates_every_run_once";
    if is_child() {
        return child_main();
    }
    keel_testkit::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let spec = ChildSpec {
        test_name: NAME,
        env: vec![
            ("KEEL_DATA_DIR".into(), path_env(dir.path(), "data")),
            (
                "KEEL_EFFECT_LOG".into(),
                path_env(dir.path(), "effects.jsonl"),
            ),
            ("KEEL_TOKENS".into(), path_env(dir.path(), "tokens")),
        ],
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x6261_7463);
    // At each point, the first kill lands within the process's first half-fleet of hits,
    // the second within its first quarter-fleet (counted from each restart; the first call
    // after a restart repeats cancels that already took effect, which are skipped, some of
    // them after a point or two). With this seed the six kills come within about three
    // quarters of the fleet's cancels in all (skips 66 and 51, 204 and 215, 7 and 186), so
    // each is reached; one that is not fails the test.
    let kills = keel_engine::crash::OPERATOR_POINTS
        .iter()
        .flat_map(|point| [(point, runs() / 2), (point, runs() / 4)]);
    for (point, most) in kills {
        let skip = rng.gen_range(0..most.max(1));
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

    let effects = keel_testkit::check::effects_at(&dir.path().join("effects.jsonl"));
    // Per run, the keys its effect and its undo were made under. An undo cut off by a kill
    // runs again under the same key (what a real undo dedupes on): one undo per key.
    let mut done: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    let mut undone: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for effect in &effects {
        let keys = match effect.action {
            Action::Do => &mut done,
            Action::Undo => &mut undone,
        };
        keys.entry(effect.run.as_str())
            .or_default()
            .insert(&effect.key);
    }
    let tokens = std::fs::read_to_string(dir.path().join("tokens")).unwrap();
    let continued = tokens.lines().filter(|t| t.contains("~fleet-")).count();
    assert!(
        continued >= runs() as usize / BATCH_LIMIT / 2,
        "the batch went on over calls, the kills cutting some short: {tokens}"
    );
    keel_testkit::check::read_store_blocking(&dir.path().join("data"), async |engine| {
        for n in 0..runs() {
            let id = run_id(n);
            let history = engine.history(&id).await.unwrap();
            assert_eq!(history.run.status, RunStatus::Compensated, "{id}");
            let started = history
                .entries
                .iter()
                .filter(|e| matches!(e.event, Event::CompensationStarted { .. }))
                .count();
            assert_eq!(started, 1, "{id}: compensation started once");
            let compensated = history
                .entries
                .iter()
                .filter(|e| matches!(e.event, Event::StepCompensated { .. }))
                .count();
            assert_eq!(compensated, 1, "{id}: its step compensated once");
            let did = done.get(id.as_str()).expect("its effect");
            assert_eq!(did.len(), 1, "{id}: one effect, under one key");
            assert_eq!(
                undone.get(id.as_str()),
                Some(did),
                "{id}: undone under its key"
            );
        }
    });
    assert_eq!(undone.len(), runs() as usize, "no other run was undone");
}
