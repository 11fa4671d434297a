//! Crash tests of schedules: a child process creates a schedule that fires every second (on
//! the system clock, `catch_up: all`, so no fire time is skipped) and waits for its fires;
//! it is killed with SIGKILL at each schedule crash point (before a fire's start, after it,
//! after the fired-state is durable), restarted until it finishes, and then: every fire time
//! from the first to the last has exactly one run, under its derived id, there is no run
//! for any other time, each run was started once (one record, one run start in its
//! journal), and the stored fired-state counts each fire once, with none skipped or failed.

use std::path::Path;
use std::time::Duration;

use keel::{
    CatchUp, Ctx, Engine, Every, Overlap, RunStatus, ScheduleSpec, Workflow, WorkflowError,
};
use keel_testkit::crash::{is_child, path_env, ChildSpec, Ending};
use rand::{Rng, SeedableRng};

const CHILD_TIMEOUT: Duration = Duration::from_secs(60);
/// Fires the child waits for (in all its lives together) before it finishes.
const FIRES: u64 = 4;
const NAME: &str = "tick";

/// Returns its input at once.
struct Tick;

impl Workflow for Tick {
    const NAME: &'static str = "test.tick";
    type Input = u32;
    type Output = u32;

    async fn run(_ctx: &mut Ctx, n: u32) -> Result<u32, WorkflowError> {
        Ok(n)
    }
}

fn spec() -> ScheduleSpec {
    ScheduleSpec {
        name: NAME.into(),
        workflow: Tick::NAME.into(),
        input: serde_json::json!(7),
        every: Every::Interval { seconds: 1 },
        catch_up: CatchUp::All { max: 1000 },
        overlap: Overlap::Allow,
    }
}

async fn open(dir: &str) -> Engine {
    keel_testkit::store::builder(dir)
        .workflow::<Tick>()
        .open()
        .await
        .unwrap()
}

/// The child: create the schedule (idempotent: a restarted child finds it), wait until it
/// fired `FIRES` times, pause it (so that the checks' engine fires nothing) and shut down.
fn child_main() {
    let dir = std::env::var("KEEL_DATA_DIR").expect("KEEL_DATA_DIR");
    let runtime = keel_testkit::crash::runtime();
    runtime.block_on(async {
        let engine = open(&dir).await;
        engine.create_schedule(&spec()).await.unwrap();
        for _ in 0..2_000 {
            if engine.schedule(NAME).await.unwrap().fires >= FIRES {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let schedule = engine.pause_schedule(NAME).await.unwrap();
        assert!(schedule.fires >= FIRES, "{schedule:?}");
        engine.shutdown().await;
    });
}

/// Checks the runs and the fired-state of the store in `dir` against the fire times.
fn verify(dir: &Path) {
    let data = dir.join("data");
    let runtime = keel_testkit::crash::runtime();
    runtime.block_on(async {
        // With the workflow registered, so that a run the last child's shutdown left
        // unfinished ends; the schedule is paused, so this engine fires nothing.
        let engine = open(data.to_str().unwrap()).await;
        let schedule = engine.schedule(NAME).await.unwrap();
        assert!(schedule.paused);
        assert_eq!((schedule.skipped, schedule.failed), (0, 0), "{schedule:?}");
        let anchor_ms = schedule.created_at_ms / 1000 * 1000;
        let last_ms = schedule.last_fire_ms.expect("fired");
        let times: Vec<u64> = (1..)
            .map(|k| anchor_ms + k * 1000)
            .take_while(|t| *t <= last_ms)
            .collect();
        let expected: Vec<String> = times.iter().map(|t| fire_id(*t)).collect();
        let mut ids: Vec<String> = engine
            .list()
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.id.as_str().to_string())
            .collect();
        ids.sort();
        let mut sorted_expected = expected.clone();
        sorted_expected.sort();
        assert_eq!(
            ids, sorted_expected,
            "one run per fire time, and no other run"
        );
        assert_eq!(schedule.fires, expected.len() as u64, "{schedule:?}");
        assert_eq!(
            schedule.last_run.as_deref(),
            expected.last().map(String::as_str)
        );
        for (id, fire_ms) in expected.iter().zip(&times) {
            assert_eq!(
                engine.wait(id).await.unwrap().status,
                RunStatus::Completed,
                "{id}"
            );
            let history = engine.history(id).await.unwrap();
            let ends = history
                .entries
                .iter()
                .filter(|e| matches!(e.event, keel::Event::RunCompleted { .. }))
                .count();
            assert_eq!(ends, 1, "{id} completed once");
            assert!(
                history.run.created_at_ms >= *fire_ms,
                "{id} started before its time"
            );
        }
        engine.shutdown().await;
    });
}

/// The run id of a fire at `fire_ms`, derived independently of the engine's own code.
fn fire_id(fire_ms: u64) -> String {
    let seconds = (fire_ms / 1000) as i64;
    let days = seconds.div_euclid(86_400);
    let of_day = seconds.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{NAME}@{year:04}{month:02}{day:02}T{:02}{:02}{:02}Z",
        of_day / 3600,
        of_day / 60 % 60,
        of_day % 60
    )
}

/// Killing the child at every schedule crash point (at a seeded hit count) leaves one run
/// per fire time, none started twice.
#[test]
fn crash_at_every_schedule_point() {
    const TEST: &str = "crash_at_every_schedule_point";
    if is_child() {
        return child_main();
    }
    keel_testkit::init_tracing();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x7363_6865);
    let points = keel_engine::crash::SCHEDULE_POINTS;
    assert_eq!(points.len(), 3, "{points:?}");
    for point in points {
        let dir = tempfile::tempdir().unwrap();
        let spec = ChildSpec {
            test_name: TEST,
            env: vec![("KEEL_DATA_DIR".into(), path_env(dir.path(), "data"))],
        };
        let skip: u32 = rng.gen_range(0..2);
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
        spec.run_until_finished(CHILD_TIMEOUT);
        verify(dir.path());
    }
}
