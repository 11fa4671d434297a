//! The `engine_schedules` suite on the PostgreSQL store (`keel_testkit::store`: binaries named
//! `pg_*`), and two engines sharing one database firing one schedule: each fire time gets
//! one run, however both engines race to start it. Needs the server `scripts/test.sh` starts.

#[path = "engine_schedules.rs"]
mod suite;

use std::time::Duration;

use keel::testing::TestClock;
use keel::{
    CatchUp, Ctx, Engine, Every, Overlap, RunStatus, ScheduleSpec, Workflow, WorkflowError,
};
use keel_testkit::postgres::{fencing_breaches, fresh_database};

/// Returns its input at once.
struct Echo;

impl Workflow for Echo {
    const NAME: &'static str = "test.echo";
    type Input = u32;
    type Output = u32;

    async fn run(_ctx: &mut Ctx, n: u32) -> Result<u32, WorkflowError> {
        Ok(n)
    }
}

async fn open(dir: &std::path::Path, url: &str, clock: &TestClock) -> Engine {
    Engine::builder(dir)
        .postgres(url)
        .clock(clock.clone())
        .workflow::<Echo>()
        .open()
        .await
        .unwrap()
}

/// Two engines on one database, both asleep until the next fire time when the clock moves
/// there, fire a per-minute schedule: every fire time has one run, the fired-state counts it
/// once, and no write broke fencing.
#[tokio::test]
async fn two_engines_fire_each_fire_time_once() {
    const FIRES: u64 = 5;
    const MINUTE: u64 = 60_000;
    let url = fresh_database().await;
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::new();
    let a = open(&dir.path().join("a"), &url, &clock).await;
    let spec = ScheduleSpec {
        name: "shared".into(),
        workflow: Echo::NAME.into(),
        input: serde_json::json!(1),
        every: Every::Interval { seconds: 60 },
        catch_up: CatchUp::All { max: 10 },
        overlap: Overlap::Allow,
    };
    a.create_schedule(&spec).await.unwrap();
    // B reads the schedule as it opens.
    let b = open(&dir.path().join("b"), &url, &clock).await;
    let t0 = clock.now_ms();
    for n in 1..=FIRES {
        let at = t0 + n * MINUTE;
        // Both loops sleep until the fire time, so both wake to fire it.
        for _ in 0..2_000 {
            let sleeping = clock.next_wake_ms() == Some(at) && clock.sleepers() >= 2;
            if sleeping {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(clock.sleepers(), 2, "both loops asleep before fire {n}");
        clock.advance_to(at);
        for engine in [&a, &b] {
            for _ in 0..2_000 {
                if engine.schedule("shared").await.unwrap().fires >= n {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
    let mut ids: Vec<String> = a
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id.as_str().to_string())
        .collect();
    ids.sort();
    assert_eq!(ids.len() as u64, FIRES, "{ids:?}");
    for id in &ids {
        assert!(id.starts_with("shared@20260101T00"), "{id}");
        assert_eq!(a.wait(id).await.unwrap().status, RunStatus::Completed);
    }
    for engine in [&a, &b] {
        let schedule = engine.schedule("shared").await.unwrap();
        assert_eq!(schedule.fires, FIRES, "{schedule:?}");
        assert_eq!((schedule.skipped, schedule.failed), (0, 0));
    }
    a.shutdown().await;
    b.shutdown().await;
    assert_eq!(fencing_breaches(&url).await, Vec::<String>::new());
}
