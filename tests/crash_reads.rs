//! A read reports only what a crash cannot undo. `Engine::history` (like `status` and
//! `list`) waits for a sync after it reads, and on sled that sync must cover every write the
//! read could see, including one whose writer is still inside the store: sled shows a write
//! to reads as soon as it is made, before it is durable.
//!
//! (On PostgreSQL a read sees only committed transactions, which are durable when they
//! commit, so there is nothing to break there.)

use std::path::Path;
use std::time::Duration;

use keel::{Ctx, Workflow, WorkflowError};
use keel_engine::{Event, RunHistory};
use keel_testkit::check::read_store_blocking;
use keel_testkit::crash::{is_child, until_file, ChildSpec};

const CHILD_TIMEOUT: Duration = Duration::from_secs(120);

/// Returns at once: its terminal transition is the first write of its own after its start.
struct Quick;

impl Workflow for Quick {
    const NAME: &'static str = "test.quick";
    type Input = ();
    type Output = ();

    async fn run(_: &mut Ctx, (): ()) -> Result<(), WorkflowError> {
        Ok(())
    }
}

fn ended(history: &RunHistory) -> bool {
    history
        .entries
        .iter()
        .any(|e| matches!(e.event, Event::RunCompleted { .. }))
}

/// Starts the run, whose terminal transition stops for good right after its one write (the
/// run's record holding its last entries; `store.after_transition_entry`, the thread hung):
/// the write is in sled's memory and visible. Reads the history until it shows the end,
/// says so in a file, and waits to be killed. (The hung thread holds the run's cell, which
/// the history read does not take. sled's own flusher, every 500 ms, could save the write
/// between the report and the kill: the defect's run then passed, about once in a hundred.)
fn child_main() {
    let dir = std::env::var("KEEL_DATA_DIR").expect("KEEL_DATA_DIR");
    let runtime = keel_testkit::crash::runtime();
    runtime.block_on(async {
        let engine = keel_testkit::store::builder(Path::new(&dir).join("data"))
            .workflow::<Quick>()
            .open()
            .await
            .unwrap();
        engine.start::<Quick>("quick", ()).await.unwrap();
        keel_testkit::poll::until(&engine, "quick", ended).await;
        std::fs::write(Path::new(&dir).join("reported"), "").unwrap();
        std::future::pending::<()>().await;
    });
}

/// The history read while the run's terminal write was being made reported the run's
/// end; killed at once after that report, the store still holds the end. (Before: the
/// store counted a write only once it was done, so the read's sync found the count
/// unchanged and flushed nothing, and the kill lost the end the read had reported.)
#[test]
fn a_read_reports_only_what_a_crash_leaves() {
    const NAME: &str = "a_read_reports_only_what_a_crash_leaves";
    if is_child() {
        return child_main();
    }
    keel_testkit::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let spec = ChildSpec {
        test_name: NAME,
        env: vec![(
            "KEEL_DATA_DIR".into(),
            dir.path().to_string_lossy().into_owned(),
        )],
    };
    let mut child = spec.spawn(&[
        ("KEEL_CRASH_AT", "store.after_transition_entry".into()),
        ("KEEL_CRASH_SIGNAL", "HANG".into()),
    ]);
    // Killed as soon as it says it read the run's end.
    until_file(&mut child, &dir.path().join("reported"), CHILD_TIMEOUT);
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    read_store_blocking(&dir.path().join("data"), async |engine| {
        let history = engine.history("quick").await.unwrap();
        assert!(
            ended(&history),
            "a read reported the run's end, and the crash undid it: {:#?}",
            history.entries
        );
    });
}
