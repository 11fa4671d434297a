//! Crash loops: a run whose step aborts the whole process (`std::process::abort`, as a stack
//! overflow or an out-of-memory kill would end it) is driven into the same death at every
//! start; after 5 such loads it is suspended as poisoned, naming the count, and the process
//! lives again. A run asleep on a timer through all those deaths is not poisoned, and one
//! whose step is SIGKILLed mid-attempt only once is not either. After the fix, `resume`
//! takes the poisoned run up and it completes.

use std::path::Path;
use std::time::Duration;

use keel::{
    Ctx, Engine, EngineError, RunStatus, Step, StepContext, StepError, Workflow, WorkflowError,
};
use keel_testkit::crash::{is_child, path_env, ChildSpec, Ending};
use keel_testkit::effects::{self, Action};
use serde::{Deserialize, Serialize};

const CHILD_TIMEOUT: Duration = Duration::from_secs(60);

/// Records its effect, then aborts the process while `<log>.abort` exists.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Aborting {
    log: String,
}

impl Step for Aborting {
    const KIND: &'static str = "test.aborting";
    type Output = ();

    async fn execute(&self, ctx: &StepContext) -> Result<(), StepError> {
        effects::record(&self.log, Action::Do, ctx)?;
        if Path::new(&format!("{}.abort", self.log)).exists() {
            std::process::abort();
        }
        Ok(())
    }
}

/// One [`Aborting`] step.
struct AbortingFlow;

impl Workflow for AbortingFlow {
    const NAME: &'static str = "test.aborting-flow";
    type Input = String;
    type Output = ();

    async fn run(ctx: &mut Ctx, log: String) -> Result<(), WorkflowError> {
        ctx.step(Aborting { log }).await
    }
}

/// Sleeps an hour.
struct Sleeper;

impl Workflow for Sleeper {
    const NAME: &'static str = "test.poison-sleeper";
    type Input = ();
    type Output = ();

    async fn run(ctx: &mut Ctx, _: ()) -> Result<(), WorkflowError> {
        ctx.sleep(Duration::from_secs(3600)).await
    }
}

async fn open(data: &Path) -> Engine {
    Engine::builder(data)
        .workflow::<AbortingFlow>()
        .workflow::<Sleeper>()
        .step::<Aborting>()
        .open()
        .await
        .unwrap()
}

/// The child: start (idempotently) the sleeper, let it fall asleep, start the aborting run
/// and wait for it. It ends when the aborting run settles (poisoned), or dies with it.
fn child_main() {
    let dir = std::env::var("KEEL_DATA_DIR").expect("KEEL_DATA_DIR");
    let log = std::env::var("KEEL_EFFECT_LOG").expect("KEEL_EFFECT_LOG");
    keel_testkit::crash::runtime().block_on(async {
        let engine = open(Path::new(&dir)).await;
        engine.start::<Sleeper>("sleeper", ()).await.unwrap();
        keel_testkit::poll::until(&engine, "sleeper", |h| h.entries.len() == 1).await;
        let aborting = engine.start::<AbortingFlow>("poison", log).await.unwrap();
        let err = aborting.result().await.unwrap_err();
        assert!(
            matches!(&err, EngineError::RunEnded { status, .. } if *status == RunStatus::Suspended),
            "{err}"
        );
        engine.shutdown().await;
    });
}

#[test]
fn a_run_that_kills_the_process_at_every_load_is_poisoned_after_five() {
    const NAME: &str = "a_run_that_kills_the_process_at_every_load_is_poisoned_after_five";
    if is_child() {
        return child_main();
    }
    keel_testkit::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let log = path_env(dir.path(), "effects.jsonl");
    std::fs::write(format!("{log}.abort"), "").unwrap();
    let spec = ChildSpec {
        test_name: NAME,
        env: vec![
            ("KEEL_DATA_DIR".into(), path_env(dir.path(), "data")),
            ("KEEL_EFFECT_LOG".into(), log.clone()),
        ],
    };
    let mut endings = Vec::new();
    for _ in 0..7 {
        let ending = spec.run(&[], CHILD_TIMEOUT);
        endings.push(ending);
        if ending == Ending::Finished {
            break;
        }
    }
    assert_eq!(
        endings,
        [vec![Ending::Aborted; 5], vec![Ending::Finished]].concat(),
        "five deaths, then the run is poisoned and the process lives"
    );
    let attempts = effects::read(Path::new(&log)).len();
    assert_eq!(
        attempts, 5,
        "the step ran once per load, and not after the fifth"
    );

    keel_testkit::crash::runtime().block_on(async {
        let engine = open(&dir.path().join("data")).await;
        let poisoned = engine.status("poison").await.unwrap();
        assert_eq!(poisoned.status, RunStatus::Suspended);
        let reason = poisoned.error.unwrap_or_default();
        assert!(
            reason.starts_with("poisoned") && reason.contains("last 5 loads"),
            "{reason}"
        );
        assert_eq!(
            engine.status("sleeper").await.unwrap().status,
            RunStatus::Running,
            "the run asleep through every death is not poisoned"
        );
        // Reopened again, nothing drives the poisoned run into the abort.
        assert!(engine.list().await.unwrap().len() == 2);
        std::fs::remove_file(format!("{log}.abort")).unwrap();
        engine.resume("poison").await.unwrap();
        let record = engine.wait("poison").await.unwrap();
        assert_eq!(record.status, RunStatus::Completed, "{:?}", record.error);
        engine.shutdown().await;
    });
    assert_eq!(
        effects::read(Path::new(&log)).len(),
        6,
        "resumed, it ran once more"
    );
}
