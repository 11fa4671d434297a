//! The wake loop against other loads of the same run. The loop loads a parked run without
//! holding the map lock; a send (or an operator call) may load the run meanwhile, and its
//! driver may park the run again before the loop is done. The loop must then leave that new
//! park alone: it is the only thing that loads the run at its next wake time. Threads are
//! held at the loop's named points (`KEEL_PAUSE_AT`, `keel_engine::crash`) in a child
//! process, as a thread the system leaves unscheduled there would be.

use std::path::Path;
use std::time::Duration;

use keel::testing::TestClock;
use keel::{Ctx, Engine, Resident, Step, StepContext, StepError, Workflow, WorkflowError};
use keel_testkit::crash::{is_child, path_env, ChildSpec, Ending};
use keel_testkit::poll::resident;

const HOUR: Duration = Duration::from_secs(3600);

/// How long each pause point holds the wake loop's thread.
const PAUSE: Duration = Duration::from_secs(2);

/// Takes a while, on the run's loaded driver.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct Slow;

impl Step for Slow {
    const KIND: &'static str = "test.slow";
    const COMPENSABLE: bool = false;
    type Output = ();

    async fn execute(&self, _: &StepContext) -> Result<(), StepError> {
        tokio::time::sleep(PAUSE * 5 / 4).await;
        Ok(())
    }
}

/// Sleeps an hour, takes event `go`, runs [`Slow`], sleeps another hour.
struct Relay;

impl Workflow for Relay {
    const NAME: &'static str = "test.relay";
    type Input = ();
    type Output = ();

    async fn run(ctx: &mut Ctx, (): ()) -> Result<(), WorkflowError> {
        ctx.sleep(HOUR).await?;
        ctx.receive_event::<()>(&["go"], None).await?;
        ctx.step(Slow).await?;
        ctx.sleep(HOUR).await?;
        Ok(())
    }
}

fn parked(parked: usize) -> Resident {
    Resident { loaded: 0, parked }
}

/// The run parks on its first hour. The clock passes it, and the wake loop, about to load
/// the run, is held `PAUSE` (`wake.before_load`). Meanwhile a send loads the run: it takes
/// the event and runs `Slow`, still loaded when the loop's load finds its cell, after which
/// the loop is held again (`wake.after_load`). Meanwhile `Slow` ends and the run parks on
/// its second hour. The loop then goes on: that park must stand, and the run must end when
/// the clock passes its second hour.
fn child_main() {
    let dir = std::env::var("KEEL_DATA_DIR").expect("KEEL_DATA_DIR");
    keel_testkit::crash::runtime().block_on(async {
        let clock = TestClock::new();
        let engine: Engine = keel_testkit::store::builder(Path::new(&dir))
            .clock(clock.clone())
            .park_after(Some(keel::PARK_AFTER_DEFAULT))
            .workflow::<Relay>()
            .step::<Slow>()
            .open()
            .await
            .expect("opening the engine");
        let handle = engine.start::<Relay>("relay", ()).await.unwrap();
        resident(&engine, parked(1)).await;

        clock.advance(HOUR);
        // The loop takes the run as due at once and is held before its load. `Slow` then
        // runs from about PAUSE / 8 to 11 PAUSE / 8 (later on a slower store), over the end of
        // the loop's first pause, and ends before the end of its second.
        tokio::time::sleep(PAUSE / 8).await;
        engine.send("relay", "go", &(), "go-1").await.unwrap();
        // Past both pauses, the second park must stand: before the fix, the loop took it out
        // after its second pause and the run was in no map for good. On a loaded machine the
        // park itself may come later than this, so the test looks until it is there.
        tokio::time::sleep(PAUSE * 2 + PAUSE / 2).await;
        resident(&engine, parked(1)).await;

        clock.advance(HOUR);
        let ended = tokio::time::timeout(Duration::from_secs(30), handle.result()).await;
        assert!(
            matches!(ended, Ok(Ok(()))),
            "the run never woke from its second park: {ended:?}"
        );
        engine.shutdown().await;
    });
}

#[test]
fn a_park_made_while_the_wake_loop_loads_the_run_stands() {
    const NAME: &str = "a_park_made_while_the_wake_loop_loads_the_run_stands";
    if is_child() {
        return child_main();
    }
    keel_testkit::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let spec = ChildSpec {
        test_name: NAME,
        env: vec![("KEEL_DATA_DIR".into(), path_env(dir.path(), "data"))],
    };
    let ending = spec.run(
        &[
            ("KEEL_PAUSE_AT", "wake.before_load,wake.after_load".into()),
            ("KEEL_PAUSE_MS", PAUSE.as_millis().to_string()),
        ],
        Duration::from_secs(120),
    );
    assert_eq!(ending, Ending::Finished);
}
