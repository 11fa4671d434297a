//! Schedules on a real store and a test clock: cron and interval schedules fire at their
//! times, under run ids derived from the schedule's name and the fire time; pause, resume
//! and delete; overlap skip; each catch-up policy after the engine was shut down and opened
//! again later on the same store; bad definitions refused with nothing stored; creation
//! idempotent, and another definition under a taken name refused.

use std::path::Path;
use std::time::Duration;

use keel::testing::TestClock;
use keel::{
    CatchUp, Ctx, Engine, EngineError, Every, InvalidInput, Overlap, RunStatus, Schedule,
    ScheduleSpec, Workflow, WorkflowError,
};
use serde::{Deserialize, Serialize};

/// 2026-01-01T00:00:00Z, where a test clock starts.
const T0: u64 = TestClock::START_MS;
const MINUTE: u64 = 60_000;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TickInput {
    label: String,
}

/// Returns its label at once; refuses an empty one.
struct Tick;

impl Workflow for Tick {
    const NAME: &'static str = "test.tick";
    type Input = TickInput;
    type Output = String;

    fn validate(input: &TickInput) -> Result<(), InvalidInput> {
        if input.label.is_empty() {
            return Err(InvalidInput::new("label", "must not be empty"));
        }
        Ok(())
    }

    async fn run(_ctx: &mut Ctx, input: TickInput) -> Result<String, WorkflowError> {
        Ok(input.label)
    }
}

/// Sleeps on a durable timer for the input's seconds: a run that stays unfinished.
struct Hold;

impl Workflow for Hold {
    const NAME: &'static str = "test.hold";
    type Input = u64;
    type Output = ();

    async fn run(ctx: &mut Ctx, seconds: u64) -> Result<(), WorkflowError> {
        ctx.sleep(Duration::from_secs(seconds)).await?;
        Ok(())
    }
}

async fn open(data: &Path, clock: &TestClock) -> Engine {
    keel_testkit::store::builder(data)
        .clock(clock.clone())
        .workflow::<Tick>()
        .workflow::<Hold>()
        .open()
        .await
        .unwrap()
}

fn tick(name: &str, every: Every) -> ScheduleSpec {
    ScheduleSpec {
        name: name.into(),
        workflow: Tick::NAME.into(),
        input: serde_json::json!({"label": name}),
        every,
        catch_up: CatchUp::Skip,
        overlap: Overlap::Allow,
    }
}

fn every_minute(name: &str, catch_up: CatchUp) -> ScheduleSpec {
    ScheduleSpec {
        catch_up,
        ..tick(name, Every::Interval { seconds: 60 })
    }
}

/// The ids of the runs schedule `name` started, in order.
async fn runs_of(engine: &Engine, name: &str) -> Vec<String> {
    let prefix = format!("{name}@");
    let mut ids: Vec<String> = engine
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id.as_str().to_string())
        .filter(|id| id.starts_with(&prefix))
        .collect();
    ids.sort();
    ids
}

/// The run id of the fire of `name` at `T0 + offset_ms`, as the engine derives it.
fn fire_id(name: &str, offset_ms: u64) -> String {
    let seconds = (T0 + offset_ms) / 1000 - T0 / 1000;
    let (h, m, s) = (seconds / 3600, seconds / 60 % 60, seconds % 60);
    assert!(h < 24, "the helper names times of 2026-01-01 only");
    format!("{name}@20260101T{h:02}{m:02}{s:02}Z")
}

/// Waits (bounded) until schedule `name` satisfies `done`, as its fired-state says.
async fn until_schedule(
    engine: &Engine,
    name: &str,
    what: &str,
    done: impl Fn(&Schedule) -> bool,
) -> Schedule {
    for _ in 0..2_000 {
        let schedule = engine.schedule(name).await.unwrap();
        if done(&schedule) {
            return schedule;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!(
        "schedule {name} never got to {what}: {:?}",
        engine.schedule(name).await.unwrap()
    );
}

/// Waits (bounded) until the firing loop sleeps on the clock until `at_ms`.
async fn loop_sleeps_until(clock: &TestClock, at_ms: u64) {
    for _ in 0..2_000 {
        if clock.next_wake_ms() == Some(at_ms) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!(
        "nothing sleeps until {at_ms}: the next wake is {:?}",
        clock.next_wake_ms()
    );
}

/// An interval schedule fires at its creation time plus whole intervals, not before, each
/// fire under the id `name@<fire time>`.
#[tokio::test]
async fn an_interval_schedule_fires_at_creation_plus_whole_intervals() {
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::new();
    let engine = open(dir.path(), &clock).await;
    let created = engine
        .create_schedule(&tick("ten", Every::Interval { seconds: 600 }))
        .await
        .unwrap();
    assert_eq!(created.created_at_ms, T0);
    assert_eq!(created.next_fire_ms, Some(T0 + 10 * MINUTE));
    // The loop sleeps until the first fire time, so nothing fires before it.
    loop_sleeps_until(&clock, T0 + 10 * MINUTE).await;
    assert!(runs_of(&engine, "ten").await.is_empty());
    clock.advance_to(T0 + 10 * MINUTE);
    until_schedule(&engine, "ten", "one fire", |s| s.fires == 1).await;
    loop_sleeps_until(&clock, T0 + 20 * MINUTE).await;
    clock.advance_to(T0 + 20 * MINUTE);
    let schedule = until_schedule(&engine, "ten", "two fires", |s| s.fires == 2).await;
    let expected = vec![fire_id("ten", 10 * MINUTE), fire_id("ten", 20 * MINUTE)];
    assert_eq!(runs_of(&engine, "ten").await, expected);
    assert_eq!(schedule.last_run.as_deref(), Some(expected[1].as_str()));
    assert_eq!(schedule.last_fire_ms, Some(T0 + 20 * MINUTE));
    assert_eq!((schedule.skipped, schedule.failed), (0, 0));
    let record = engine.wait(&expected[0]).await.unwrap();
    assert_eq!(record.status, RunStatus::Completed);
    assert_eq!(record.output, Some(serde_json::json!("ten")));
    engine.shutdown().await;
}

/// A cron schedule fires at the UTC matches of its expression.
#[tokio::test]
async fn a_cron_schedule_fires_at_its_utc_matches() {
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::new();
    let engine = open(dir.path(), &clock).await;
    let three = T0 + 3 * 60 * MINUTE;
    let day = 24 * 60 * MINUTE;
    let created = engine
        .create_schedule(&tick("nightly", Every::Cron("0 3 * * *".into())))
        .await
        .unwrap();
    assert_eq!(created.next_fire_ms, Some(three));
    loop_sleeps_until(&clock, three).await;
    clock.advance_to(three + 5_000);
    until_schedule(&engine, "nightly", "one fire", |s| s.fires == 1).await;
    loop_sleeps_until(&clock, three + day).await;
    clock.advance_to(three + day);
    until_schedule(&engine, "nightly", "two fires", |s| s.fires == 2).await;
    assert_eq!(
        runs_of(&engine, "nightly").await,
        vec![
            "nightly@20260101T030000Z".to_string(),
            "nightly@20260102T030000Z".to_string()
        ]
    );
    engine.shutdown().await;
}

/// A paused schedule starts nothing, a resumed one fires from its resume on and never
/// catches up the pause (even with `catch_up: all`), and a deleted one is gone, with the
/// runs it started kept.
#[tokio::test]
async fn pause_resume_and_delete() {
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::new();
    let engine = open(dir.path(), &clock).await;
    engine
        .create_schedule(&every_minute("m", CatchUp::All { max: 100 }))
        .await
        .unwrap();
    loop_sleeps_until(&clock, T0 + MINUTE).await;
    clock.advance_to(T0 + MINUTE);
    until_schedule(&engine, "m", "one fire", |s| s.fires == 1).await;
    let paused = engine.pause_schedule("m").await.unwrap();
    assert!(paused.paused);
    assert_eq!(paused.next_fire_ms, None);
    assert_eq!(engine.pause_schedule("m").await.unwrap(), paused);
    clock.advance_to(T0 + 10 * MINUTE + 30_000);
    let resumed = engine.resume_schedule("m").await.unwrap();
    assert!(!resumed.paused);
    assert_eq!(resumed.not_before_ms, Some(T0 + 10 * MINUTE + 30_000));
    assert_eq!(resumed.next_fire_ms, Some(T0 + 11 * MINUTE));
    loop_sleeps_until(&clock, T0 + 11 * MINUTE).await;
    clock.advance_to(T0 + 11 * MINUTE);
    until_schedule(&engine, "m", "two fires", |s| s.fires == 2).await;
    // Nothing of the pause (+2 to +10 minutes) was started.
    assert_eq!(
        runs_of(&engine, "m").await,
        vec![fire_id("m", MINUTE), fire_id("m", 11 * MINUTE)]
    );
    let deleted = engine.delete_schedule("m").await.unwrap();
    assert_eq!(deleted.fires, 2);
    assert!(matches!(
        engine.schedule("m").await,
        Err(EngineError::ScheduleNotFound { .. })
    ));
    assert!(matches!(
        engine.pause_schedule("m").await,
        Err(EngineError::ScheduleNotFound { .. })
    ));
    // Another schedule firing at +12 minutes shows the loop passed that time: the deleted
    // one did not fire, and its runs are kept.
    engine
        .create_schedule(&every_minute("other", CatchUp::Skip))
        .await
        .unwrap();
    loop_sleeps_until(&clock, T0 + 12 * MINUTE).await;
    clock.advance_to(T0 + 12 * MINUTE);
    until_schedule(&engine, "other", "one fire", |s| s.fires == 1).await;
    assert_eq!(runs_of(&engine, "m").await.len(), 2);
    assert_eq!(engine.schedules().await.unwrap().len(), 1);
    engine.shutdown().await;
}

/// With `overlap: skip`, a fire is skipped while the previous fire's run is unfinished.
#[tokio::test]
async fn overlap_skip_skips_fires_while_the_previous_run_is_unfinished() {
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::new();
    let engine = open(dir.path(), &clock).await;
    let spec = ScheduleSpec {
        name: "hold".into(),
        workflow: Hold::NAME.into(),
        input: serde_json::json!(150),
        every: Every::Interval { seconds: 60 },
        catch_up: CatchUp::Skip,
        overlap: Overlap::Skip,
    };
    engine.create_schedule(&spec).await.unwrap();
    loop_sleeps_until(&clock, T0 + MINUTE).await;
    clock.advance_to(T0 + MINUTE);
    until_schedule(&engine, "hold", "one fire", |s| s.fires == 1).await;
    // The first run sleeps until +3.5 minutes: the fires at +2 and +3 are skipped.
    for (at, skipped) in [(2, 1), (3, 2)] {
        loop_sleeps_until(&clock, T0 + at * MINUTE).await;
        clock.advance_to(T0 + at * MINUTE);
        until_schedule(&engine, "hold", "a skip", |s| s.skipped == skipped).await;
    }
    clock.advance_to(T0 + 3 * MINUTE + 30_000);
    let first = engine.wait(&fire_id("hold", MINUTE)).await.unwrap();
    assert_eq!(first.status, RunStatus::Completed);
    loop_sleeps_until(&clock, T0 + 4 * MINUTE).await;
    clock.advance_to(T0 + 4 * MINUTE);
    let schedule = until_schedule(&engine, "hold", "two fires", |s| s.fires == 2).await;
    assert_eq!(schedule.skipped, 2);
    assert_eq!(
        runs_of(&engine, "hold").await,
        vec![fire_id("hold", MINUTE), fire_id("hold", 4 * MINUTE)]
    );
    engine.shutdown().await;
}

/// Opens an engine on a fresh store, lets a schedule every `minutes` with `catch_up` fire
/// once, shuts it down, opens it again at `reopen_ms` on the same store, and returns the
/// reopened engine with its clock once the catch-up is decided.
async fn down_until(
    dir: &Path,
    minutes: u64,
    catch_up: CatchUp,
    reopen_ms: u64,
) -> (Engine, TestClock) {
    let every_ms = minutes * MINUTE;
    let clock = TestClock::new();
    let engine = open(dir, &clock).await;
    let spec = ScheduleSpec {
        catch_up,
        ..tick(
            "c",
            Every::Interval {
                seconds: minutes * 60,
            },
        )
    };
    engine.create_schedule(&spec).await.unwrap();
    loop_sleeps_until(&clock, T0 + every_ms).await;
    clock.advance_to(T0 + every_ms);
    until_schedule(&engine, "c", "one fire", |s| s.fires == 1).await;
    engine.shutdown().await;
    drop(engine);
    let clock = TestClock::starting_at(reopen_ms);
    let engine = open(dir, &clock).await;
    // The catch-up is decided once the loop sleeps until the next fire.
    let next = (reopen_ms - T0) / every_ms * every_ms + every_ms + T0;
    loop_sleeps_until(&clock, next).await;
    (engine, clock)
}

/// After a downtime, `skip` starts a missed fire only within 60 s of its time, `latest` the
/// latest missed fire however late, and `all` the latest `max`; every other missed fire is
/// skipped and counted; and the schedule goes on firing on time.
#[tokio::test]
async fn each_catch_up_policy_after_a_downtime() {
    // Every minute, down from +1 minute to +10 minutes 30 s: the fire at +10 is 30 s late,
    // on time for `skip`.
    let dir = tempfile::tempdir().unwrap();
    let (engine, _clock) =
        down_until(dir.path(), 1, CatchUp::Skip, T0 + 10 * MINUTE + 30_000).await;
    let schedule = engine.schedule("c").await.unwrap();
    assert_eq!((schedule.fires, schedule.skipped), (2, 8));
    assert_eq!(
        runs_of(&engine, "c").await,
        vec![fire_id("c", MINUTE), fire_id("c", 10 * MINUTE)]
    );
    engine.shutdown().await;

    // Every 5 minutes, down until 90 s after the fire at +20: nothing is on time, nothing is
    // caught up, and the next fire starts on time.
    let dir = tempfile::tempdir().unwrap();
    let (engine, clock) = down_until(dir.path(), 5, CatchUp::Skip, T0 + 20 * MINUTE + 90_000).await;
    let schedule = engine.schedule("c").await.unwrap();
    assert_eq!((schedule.fires, schedule.skipped), (1, 3));
    clock.advance_to(T0 + 25 * MINUTE);
    until_schedule(&engine, "c", "a fire on time", |s| s.fires == 2).await;
    assert_eq!(
        runs_of(&engine, "c").await,
        vec![fire_id("c", 5 * MINUTE), fire_id("c", 25 * MINUTE)]
    );
    engine.shutdown().await;

    // The same downtime with `latest`: the fire at +20 starts, 90 s late.
    let dir = tempfile::tempdir().unwrap();
    let (engine, _clock) =
        down_until(dir.path(), 5, CatchUp::Latest, T0 + 20 * MINUTE + 90_000).await;
    let schedule = engine.schedule("c").await.unwrap();
    assert_eq!((schedule.fires, schedule.skipped), (2, 2));
    assert_eq!(
        runs_of(&engine, "c").await,
        vec![fire_id("c", 5 * MINUTE), fire_id("c", 20 * MINUTE)]
    );
    engine.shutdown().await;

    // Every minute with `all: 3`, down until +10 minutes 30 s: +8, +9 and +10 start.
    let dir = tempfile::tempdir().unwrap();
    let (engine, _clock) = down_until(
        dir.path(),
        1,
        CatchUp::All { max: 3 },
        T0 + 10 * MINUTE + 30_000,
    )
    .await;
    let schedule = engine.schedule("c").await.unwrap();
    assert_eq!((schedule.fires, schedule.skipped), (4, 6));
    assert_eq!(
        runs_of(&engine, "c").await,
        vec![
            fire_id("c", MINUTE),
            fire_id("c", 8 * MINUTE),
            fire_id("c", 9 * MINUTE),
            fire_id("c", 10 * MINUTE)
        ]
    );
    for id in runs_of(&engine, "c").await {
        assert_eq!(engine.wait(&id).await.unwrap().status, RunStatus::Completed);
    }
    engine.shutdown().await;
}

/// Every kind of bad definition is refused with an error naming the field, and nothing is
/// stored.
#[tokio::test]
async fn bad_definitions_are_refused_and_nothing_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::new();
    let engine = open(dir.path(), &clock).await;
    let good = tick("good", Every::Interval { seconds: 60 });
    let refusals: Vec<(ScheduleSpec, &str)> = vec![
        (
            ScheduleSpec {
                name: "-x".into(),
                ..good.clone()
            },
            "schedule field name",
        ),
        (
            ScheduleSpec {
                name: "a/b".into(),
                ..good.clone()
            },
            "schedule field name",
        ),
        (
            ScheduleSpec {
                name: String::new(),
                ..good.clone()
            },
            "schedule field name",
        ),
        (
            ScheduleSpec {
                workflow: "test.nope".into(),
                ..good.clone()
            },
            "unknown workflow",
        ),
        (
            ScheduleSpec {
                input: serde_json::json!({"label": 7}),
                ..good.clone()
            },
            "field label",
        ),
        (
            ScheduleSpec {
                input: serde_json::json!({"label": "a", "more": 1}),
                ..good.clone()
            },
            "more",
        ),
        (
            ScheduleSpec {
                input: serde_json::json!({"label": ""}),
                ..good.clone()
            },
            "must not be empty",
        ),
        (
            ScheduleSpec {
                every: Every::Cron("0 3 * *".into()),
                ..good.clone()
            },
            "schedule field every.cron",
        ),
        (
            ScheduleSpec {
                every: Every::Cron("0 0 30 2 *".into()),
                ..good.clone()
            },
            "never matches",
        ),
        (
            ScheduleSpec {
                every: Every::Interval { seconds: 0 },
                ..good.clone()
            },
            "schedule field every.interval.seconds",
        ),
        (
            ScheduleSpec {
                catch_up: CatchUp::All { max: 0 },
                ..good.clone()
            },
            "schedule field catch_up",
        ),
        (
            ScheduleSpec {
                catch_up: CatchUp::All { max: 1001 },
                ..good.clone()
            },
            "schedule field catch_up",
        ),
    ];
    for (spec, words) in refusals {
        let error = engine.create_schedule(&spec).await.unwrap_err();
        assert!(
            matches!(
                error,
                EngineError::InvalidRequest(_)
                    | EngineError::InvalidInput { .. }
                    | EngineError::MalformedInput { .. }
                    | EngineError::UnknownWorkflow { .. }
            ),
            "{spec:?}: {error:?}"
        );
        assert!(error.to_string().contains(words), "{spec:?}: {error}");
        assert!(
            engine.schedules().await.unwrap().is_empty(),
            "{spec:?} stored"
        );
    }
    engine.shutdown().await;
    drop(engine);
    // Nothing stored survives a reopen either.
    let engine = open(dir.path(), &clock).await;
    assert!(engine.schedules().await.unwrap().is_empty());
    engine.shutdown().await;
}

/// Creating the same definition again returns the existing schedule (also after a reopen);
/// another definition under the name is refused until the schedule is deleted.
#[tokio::test]
async fn creation_is_idempotent_and_refuses_another_definition() {
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::new();
    let engine = open(dir.path(), &clock).await;
    let spec = tick("same", Every::Cron("0 3 * * *".into()));
    let first = engine.create_schedule_outcome(&spec).await.unwrap();
    assert!(first.new);
    clock.advance(Duration::from_secs(5));
    let again = engine.create_schedule_outcome(&spec).await.unwrap();
    assert!(!again.new);
    assert_eq!(again.schedule.created_at_ms, first.schedule.created_at_ms);
    let other = ScheduleSpec {
        input: serde_json::json!({"label": "else"}),
        ..spec.clone()
    };
    let error = engine.create_schedule(&other).await.unwrap_err();
    assert!(
        matches!(error, EngineError::ScheduleExists { .. }),
        "{error:?}"
    );
    assert!(error.to_string().contains("delete it first"), "{error}");
    engine.shutdown().await;
    drop(engine);
    let engine = open(dir.path(), &clock).await;
    let reopened = engine.create_schedule_outcome(&spec).await.unwrap();
    assert!(!reopened.new);
    assert_eq!(reopened.schedule.spec, spec);
    engine.delete_schedule("same").await.unwrap();
    let replaced = engine.create_schedule_outcome(&other).await.unwrap();
    assert!(replaced.new);
    assert_eq!(replaced.schedule.created_at_ms, T0 + 5_000);
    assert_eq!(engine.schedules().await.unwrap(), vec![replaced.schedule]);
    engine.shutdown().await;
}

/// An engine that does not register a schedule's workflow leaves its fires to the engines
/// that do (on a shared store, another worker): it neither starts nor decides them, so none
/// is lost as failed.
#[tokio::test]
async fn an_engine_without_the_workflow_leaves_the_fires_to_one_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::new();
    let engine = open(dir.path(), &clock).await;
    engine
        .create_schedule(&every_minute("w", CatchUp::Latest))
        .await
        .unwrap();
    engine.shutdown().await;
    drop(engine);

    // Three fire times pass under an engine that registers only `Hold`.
    let clock = TestClock::starting_at(T0 + 3 * MINUTE + 10_000);
    let without = keel_testkit::store::builder(dir.path())
        .clock(clock.clone())
        .workflow::<Hold>()
        .open()
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let schedule = without.schedule("w").await.unwrap();
    assert_eq!(
        (schedule.fires, schedule.skipped, schedule.failed),
        (0, 0, 0),
        "{schedule:?}"
    );
    without.shutdown().await;
    drop(without);

    // The engine that registers it catches the latest fire up.
    let engine = open(dir.path(), &clock).await;
    until_schedule(&engine, "w", "the catch-up", |s| s.fires == 1).await;
    assert_eq!(runs_of(&engine, "w").await, vec![fire_id("w", 3 * MINUTE)]);
    engine.shutdown().await;
}
