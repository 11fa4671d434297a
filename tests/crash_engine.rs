//! Crash tests of the engine: a child process runs a set of workflows and is killed with
//! SIGKILL at every named crash point and at seeded random moments, restarted until it
//! finishes, and the journal is checked against the ground-truth effect log kept outside it.

use std::path::Path;
use std::time::Duration;

use keel_testkit::check::{check_run, effects_at, read_store_blocking, Expect, Tally};
use keel_testkit::crash::{is_child, path_env, ChildSpec, Ending};
use keel_testkit::flows::{EffectFlow, EffectFlowInput, EffectStep};
use rand::{Rng, SeedableRng};

const RUNS: u32 = 6;
const CHILD_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs 2 and 5 fail permanently at their 4th step and compensate; the others complete.
fn input(i: u32, log: &str) -> EffectFlowInput {
    EffectFlowInput {
        steps: 5,
        fail_at: (i % 3 == 2).then_some(3),
        sleep_ms: 15,
        log: log.into(),
    }
}

fn run_id(i: u32) -> String {
    format!("crash-run-{i}")
}

/// The child: start every run (idempotently: a restarted child starts the same ids) and wait
/// for all of them.
fn child_main() {
    let dir = std::env::var("KEEL_DATA_DIR").expect("KEEL_DATA_DIR");
    let log = std::env::var("KEEL_EFFECT_LOG").expect("KEEL_EFFECT_LOG");
    let runtime = keel_testkit::crash::runtime();
    // `KEEL_PARK_AFTER_MS`: runs park at their sleep (`crash_while_parking`).
    let park_after = match std::env::var("KEEL_PARK_AFTER_MS") {
        Ok(ms) => Some(Duration::from_millis(ms.parse().expect("milliseconds"))),
        Err(_) => Some(keel::PARK_AFTER_DEFAULT),
    };
    runtime.block_on(async {
        let engine = keel_testkit::store::builder(&dir)
            .park_after(park_after)
            .workflow::<EffectFlow>()
            // The test's kills, not the run's code, end these loads: none may poison a run
            // (tests/crash_poison.rs tests poisoning).
            .poison_after_loads(u32::MAX)
            .step::<EffectStep>()
            .open()
            .await
            .unwrap();
        let mut runs = Vec::new();
        for i in 0..RUNS {
            runs.push(
                engine
                    .start::<EffectFlow>(&run_id(i), input(i, &log))
                    .await
                    .unwrap(),
            );
        }
        for run in runs {
            // Compensated runs end in an error; both outcomes are checked by the parent.
            let _ = run.result().await;
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
        ],
    }
}

/// The child of [`spec`] with runs that park at their 15 ms sleep (after 5 ms).
fn parking_spec<'a>(test_name: &'a str, dir: &Path) -> ChildSpec<'a> {
    let mut spec = spec(test_name, dir);
    spec.env.push(("KEEL_PARK_AFTER_MS".into(), "5".into()));
    spec
}

/// Checks every run against the effect log and returns the tally.
fn verify(dir: &Path) -> Tally {
    let log = path_env(dir, "effects.jsonl");
    let effects = effects_at(Path::new(&log));
    read_store_blocking(&dir.join("data"), async |engine| {
        let mut tally = Tally::default();
        for i in 0..RUNS {
            let history = engine.history(&run_id(i)).await.unwrap();
            let input = input(i, &log);
            let expect = match input.fail_at {
                Some(_) => Expect::Compensated,
                None => Expect::Completed(EffectFlow::expected_output(&input)),
            };
            check_run(&history, expect, &effects, &mut tally);
            assert!(history.run.status.is_terminal(), "{:?}", history.run.status);
        }
        assert_eq!(
            engine.list().await.unwrap().len(),
            RUNS as usize,
            "a run was created twice or lost"
        );
        tally
    })
}

/// Every named crash point is reached by the scenario, and killing the child there (twice,
/// at seeded hit counts) leaves every run finishing exactly once, no recorded step re-run, and
/// every compensated run without effects.
#[test]
fn crash_at_every_named_point() {
    const NAME: &str = "crash_at_every_named_point";
    if is_child() {
        return child_main();
    }
    keel_testkit::init_tracing();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x6b65_656c);
    let mut kills = 0;
    // Child-run points are met by parents only (tests/engine_children.rs kills there), event
    // points by runs that talk to the outside (tests/crash_events.rs).
    let points: Vec<&str> = keel_testkit::store::crash_points()
        .into_iter()
        .filter(|p| !p.starts_with("child.") && !p.starts_with("event."))
        .collect();
    for point in &points {
        let dir = tempfile::tempdir().unwrap();
        let spec = spec(NAME, dir.path());
        // Every point is met at least twice per child (two runs compensate), start points in
        // the first child only, open points once per child.
        let skip = if point.starts_with("open.") {
            0
        } else {
            rng.gen_range(0..2u32)
        };
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
            "crash point {point} (skip {skip}) was never reached"
        );
        kills += 1;
        if !point.starts_with("start.") {
            let skip = rng.gen_range(0..2u32);
            let env = [
                ("KEEL_CRASH_AT", point.to_string()),
                ("KEEL_CRASH_SKIP", skip.to_string()),
            ];
            if spec.run(&env, CHILD_TIMEOUT) == Ending::Killed {
                kills += 1;
            }
        }
        spec.run_until_finished(CHILD_TIMEOUT);
        let tally = verify(dir.path());
        assert!(
            tally.undos > 0,
            "{point}: the scenario must compensate something"
        );
        assert_eq!(
            tally.abandoned, RUNS as usize,
            "{point}: every run recreates one resource"
        );
    }
    assert!(kills >= points.len());
}

/// SIGKILL at seeded random moments, 25 times per scenario over 9 scenarios (225 kills):
/// after the child finishes, the same checks hold. `KEEL_CRASH_SEEDS` runs more scenarios
/// (`KEEL_CRASH_SEEDS=400`: 10,000 kills, about 20 minutes here), `KEEL_CRASH_SEED_FIRST`
/// starts elsewhere.
#[test]
fn crash_at_random_moments() {
    const NAME: &str = "crash_at_random_moments";
    if is_child() {
        return child_main();
    }
    keel_testkit::init_tracing();
    let knob = |name: &str, default: u64| {
        std::env::var(name).map_or(default, |v| v.parse().expect("a number of scenarios"))
    };
    let first = knob("KEEL_CRASH_SEED_FIRST", 0);
    let mut rerun = 0;
    for seed in first..first + knob("KEEL_CRASH_SEEDS", 9) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let dir = tempfile::tempdir().unwrap();
        let spec = spec(NAME, dir.path());
        spec.kill_repeatedly(
            25,
            || Duration::from_millis(rng.gen_range(1..150)),
            CHILD_TIMEOUT,
            // It finished: start over with a fresh store so the kills keep landing mid-work.
            || {
                verify(dir.path());
                keel_testkit::store::wipe(&dir.path().join("data"));
                std::fs::remove_file(dir.path().join("effects.jsonl")).unwrap();
            },
        );
        spec.run_until_finished(CHILD_TIMEOUT);
        rerun += verify(dir.path()).steps_rerun;
    }
    assert!(
        rerun > 0,
        "no step was ever re-run: the kills never landed mid-step"
    );
}

/// With runs parking at their sleep: killing the child at each point of the wake index and
/// of parking (`keel_engine::crash::PARK_POINTS`: after a new run's index entry, before its
/// record, on sled only; after a parking run's entry; in the wake loop before its load of a
/// due run and after it; after a waking run's entry, before its cell), twice
/// at seeded hit counts, then at 50 seeded random moments, leaves every run finishing exactly
/// once, no recorded step re-run and every compensated run without effects: no run is lost
/// from the index, none driven twice.
#[test]
fn crash_while_parking() {
    const NAME: &str = "crash_while_parking";
    if is_child() {
        return child_main();
    }
    keel_testkit::init_tracing();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x7061_726b);
    let kills = Kills {
        points: keel_testkit::store::park_points(),
        skips_below: 3,
        random: 50,
        random_before_ms: 150,
    };
    kills.run(
        &mut rng,
        |dir| parking_spec(NAME, dir),
        |dir| {
            verify(dir);
        },
    );
}

/// Where a crash test kills its child: at each of `points`, twice, after a seeded number of
/// its hits below `skips_below`; then at `random` seeded moments before `random_before_ms`.
struct Kills {
    points: Vec<&'static str>,
    skips_below: u32,
    random: u32,
    random_before_ms: u64,
}

impl Kills {
    /// Kills the child of `spec` (given its scratch directory) as `self` says, each time on a
    /// fresh directory, restarted until it finishes and then checked by `verify`. A child
    /// that finishes before a random kill is checked and its directory cleared.
    fn run<'a>(
        &self,
        rng: &mut rand::rngs::StdRng,
        spec: impl Fn(&Path) -> ChildSpec<'a>,
        verify: impl Fn(&Path),
    ) {
        for point in &self.points {
            let dir = tempfile::tempdir().unwrap();
            let spec = spec(dir.path());
            let mut killed = 0;
            for _ in 0..2 {
                let skip = rng.gen_range(0..self.skips_below);
                let env = [
                    ("KEEL_CRASH_AT", point.to_string()),
                    ("KEEL_CRASH_SKIP", skip.to_string()),
                ];
                if spec.run(&env, CHILD_TIMEOUT) == Ending::Killed {
                    killed += 1;
                }
            }
            assert!(killed > 0, "crash point {point} was never reached");
            spec.run_until_finished(CHILD_TIMEOUT);
            verify(dir.path());
        }
        let dir = tempfile::tempdir().unwrap();
        let spec = spec(dir.path());
        spec.kill_repeatedly(
            self.random,
            || Duration::from_millis(rng.gen_range(1..self.random_before_ms)),
            CHILD_TIMEOUT,
            || {
                verify(dir.path());
                keel_testkit::store::wipe(&dir.path().join("data"));
                std::fs::remove_file(dir.path().join("effects.jsonl")).unwrap();
            },
        );
        spec.run_until_finished(CHILD_TIMEOUT);
        verify(dir.path());
    }
}

/// Runs of [`ConfirmedWait`] in `crash_while_waits_park`.
const WAITING_RUNS: u32 = 6;

/// A wait for two ready answers in a row from [`LoggedProbe`], polled every 8 ms: its run
/// parks between polls (after 5 ms). Outputs the number of the call that confirmed.
struct ConfirmedWait;

impl keel::Workflow for ConfirmedWait {
    const NAME: &'static str = "test.confirmed-wait";
    type Input = String;
    type Output = u32;

    async fn run(ctx: &mut keel::Ctx, log: String) -> Result<u32, keel::WorkflowError> {
        let policy = keel::WaitPolicy::every(Duration::from_millis(8), Duration::from_secs(600))
            .growth(1.0)
            .jitter(0.0)
            .confirmations(2);
        ctx.wait(LoggedProbe { log }, policy).await
    }
}

/// Answers by how many times it was called for its run before, across processes (the lines
/// of its log, the ground truth of the polls sent): ready at calls 2, 4 and 5 of every 5 (so
/// a lone "ready" comes before a "not ready"). Each call appends `run call ready` to the log.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct LoggedProbe {
    log: String,
}

/// The answers [`LoggedProbe`] gave run `id`, in call order.
fn answers(log: &str, id: &str) -> Vec<bool> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            (fields.next() == Some(id)).then(|| fields.nth(1) == Some("true"))
        })
        .collect()
}

impl keel::Probe for LoggedProbe {
    const KIND: &'static str = "test.logged";
    type Output = u32;

    async fn probe(&self, ctx: &keel::StepContext) -> Result<Option<u32>, keel::StepError> {
        use std::io::Write;
        let id = ctx.run_id().to_string();
        let call = answers(&self.log, &id).len() as u32 + 1;
        let ready = matches!(call % 5, 2 | 4 | 0);
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| keel::StepError::retryable(e.to_string()))?;
        // One write, so that the appends of runs polled at once do not interleave.
        log.write_all(format!("{id} {call} {ready}\n").as_bytes())
            .map_err(|e| keel::StepError::retryable(e.to_string()))?;
        Ok(ready.then_some(call))
    }
}

/// The child of `crash_while_waits_park`: starts every [`ConfirmedWait`] run and waits for
/// all of them.
fn waits_child_main() {
    let dir = std::env::var("KEEL_DATA_DIR").expect("KEEL_DATA_DIR");
    let log = std::env::var("KEEL_EFFECT_LOG").expect("KEEL_EFFECT_LOG");
    keel_testkit::crash::runtime().block_on(async {
        let engine = keel_testkit::store::builder(&dir)
            .park_after(Some(Duration::from_millis(5)))
            .workflow::<ConfirmedWait>()
            .poison_after_loads(u32::MAX)
            .open()
            .await
            .unwrap();
        let mut runs = Vec::new();
        for i in 0..WAITING_RUNS {
            runs.push(
                engine
                    .start::<ConfirmedWait>(&run_id(i), log.clone())
                    .await
                    .unwrap(),
            );
        }
        for run in runs {
            run.result().await.unwrap();
        }
        engine.shutdown().await;
    });
}

/// Every wait ended ready on two ready answers in a row: the call it reports and the one
/// before it, in the probe's own log, both said ready.
fn verify_waits(dir: &Path) {
    let log = path_env(dir, "effects.jsonl");
    read_store_blocking(&dir.join("data"), async |engine| {
        for i in 0..WAITING_RUNS {
            let id = run_id(i);
            let record = engine.status(&id).await.unwrap();
            assert_eq!(
                record.status,
                keel::RunStatus::Completed,
                "{id}: {:?}",
                record.error
            );
            let call: usize = serde_json::from_value(record.output.unwrap()).unwrap();
            let answers = answers(&log, &id);
            assert!(
                call >= 2 && call <= answers.len(),
                "{id} confirmed at call {call}, but the probe's log holds {answers:?}"
            );
            assert_eq!(
                &answers[call - 2..call],
                [true, true],
                "{id} confirmed at call {call} without two ready answers in a row: {answers:?}"
            );
        }
    });
}

/// Waits whose runs park between polls, killed with SIGKILL at each of the park and wake
/// points and right after a poll (`wait.after_poll`), twice each at seeded hit counts, and
/// then at 20 seeded random moments: every wait still ends on two ready answers in a row, by
/// the probe's own log. (A wait that went on from its journaled polls after a restart would
/// count the "ready" of call 2 with that of call 4 when call 3's "not ready" was lost.)
#[test]
fn crash_while_waits_park() {
    const NAME: &str = "crash_while_waits_park";
    if is_child() {
        return waits_child_main();
    }
    keel_testkit::init_tracing();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x7761_6974);
    let mut points = keel_testkit::store::park_points();
    points.push("wait.after_poll");
    let kills = Kills {
        points,
        // At most 5: `start.after_wake_entry` is met once per run.
        skips_below: WAITING_RUNS,
        random: 20,
        random_before_ms: 100,
    };
    kills.run(&mut rng, |dir| spec(NAME, dir), verify_waits);
}
