//! Notices (the outbox of transitions someone outside wants to hear of): an engine built
//! with `notify_on` leaves one notice per transition into a chosen status (a pause, a
//! suspension, a failed compensation), with the run's fields; other statuses leave none;
//! a notice survives a reopen until it is done, and its delivered targets with it.

use std::path::Path;
use std::time::Duration;

use keel::{
    Compensation, Ctx, Engine, Notice, RunStatus, Step, StepContext, StepError, Workflow,
    WorkflowError,
};
use keel_testkit::poll::CONDITION_TIMEOUT;
use serde::{Deserialize, Serialize};

/// The statuses the worker notifies by default.
const NEEDS_A_HUMAN: [RunStatus; 3] = [
    RunStatus::Paused,
    RunStatus::Suspended,
    RunStatus::CompensationFailed,
];

/// Waits for an event named `go` (so that it can be paused), then finishes.
struct Inbox;

impl Workflow for Inbox {
    const NAME: &'static str = "test.notice-inbox";
    type Input = ();
    type Output = String;
    async fn run(ctx: &mut Ctx, _: ()) -> Result<String, WorkflowError> {
        ctx.receive_until("go", Duration::from_secs(3600)).await
    }
}

/// A body with a bug: the run is suspended.
struct Buggy;

impl Workflow for Buggy {
    const NAME: &'static str = "test.notice-buggy";
    type Input = ();
    type Output = ();
    async fn run(_ctx: &mut Ctx, _: ()) -> Result<(), WorkflowError> {
        panic!("the body's own bug")
    }
}

/// A step that succeeds, and whose undo fails for good when `undo_fails`; with `fails` it
/// fails for good itself.
#[derive(Serialize, Deserialize)]
struct Sticky {
    fails: bool,
    undo_fails: bool,
}

impl Step for Sticky {
    const KIND: &'static str = "test.notice-sticky";
    type Output = u32;
    async fn execute(&self, _ctx: &StepContext) -> Result<u32, StepError> {
        if self.fails {
            return Err(StepError::permanent("refused for good"));
        }
        Ok(1)
    }
    async fn compensate(
        &self,
        _ctx: &StepContext,
        _output: Option<u32>,
    ) -> Result<Compensation, StepError> {
        if self.undo_fails {
            return Err(StepError::permanent("the undo is refused"));
        }
        Ok(Compensation::Done)
    }
}

/// A step, then a step that fails for good: the run compensates the first, whose undo
/// fails when the input says so.
struct Doomed;

impl Workflow for Doomed {
    const NAME: &'static str = "test.notice-doomed";
    type Input = bool;
    type Output = ();
    async fn run(ctx: &mut Ctx, undo_fails: bool) -> Result<(), WorkflowError> {
        ctx.step(Sticky {
            fails: false,
            undo_fails,
        })
        .await?;
        ctx.step(Sticky {
            fails: true,
            undo_fails: false,
        })
        .await?;
        Ok(())
    }
}

async fn open(data: &Path, statuses: &[RunStatus]) -> Engine {
    Engine::builder(data)
        .notify_on(statuses)
        .workflow::<Inbox>()
        .workflow::<Buggy>()
        .workflow::<Doomed>()
        .step::<Sticky>()
        .open()
        .await
        .unwrap()
}

/// Waits until run `id` has settled (or is parked for an operator).
async fn settled(engine: &Engine, id: &str) -> keel::RunRecord {
    tokio::time::timeout(CONDITION_TIMEOUT, engine.wait(id))
        .await
        .unwrap_or_else(|_| panic!("run {id} did not settle"))
        .unwrap()
}

/// The journal index of the last entry of run `id`, as an event id.
async fn last_entry_event_id(engine: &Engine, id: &str) -> String {
    let history = engine.history(id).await.unwrap();
    format!("{id}:{}", history.entries.len() - 1)
}

fn notice_of<'a>(notices: &'a [Notice], run: &str) -> Vec<&'a Notice> {
    notices
        .iter()
        .filter(|n| n.run_id.as_str() == run)
        .collect()
}

/// A pause, a suspension and a failed compensation each leave exactly one notice whose
/// fields are the transition's: its run, workflow, both statuses, the error, the time of its
/// journal entry, and an event id naming that entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_notified_transition_leaves_one_notice_with_its_fields() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), &NEEDS_A_HUMAN).await;

    engine.start::<Inbox>("paused-run", ()).await.unwrap();
    engine.pause("paused-run").await.unwrap();
    assert_eq!(
        settled(&engine, "paused-run").await.status,
        RunStatus::Paused
    );
    engine.start::<Buggy>("suspended-run", ()).await.unwrap();
    let suspended = settled(&engine, "suspended-run").await;
    assert_eq!(suspended.status, RunStatus::Suspended);
    engine.start::<Doomed>("stuck-run", true).await.unwrap();
    let stuck = settled(&engine, "stuck-run").await;
    assert_eq!(stuck.status, RunStatus::CompensationFailed);

    let notices = engine.notices().await.unwrap();
    assert_eq!(notices.len(), 3, "{notices:#?}");
    for (run, workflow, status, previous) in [
        (
            "paused-run",
            Inbox::NAME,
            RunStatus::Paused,
            RunStatus::Running,
        ),
        (
            "suspended-run",
            Buggy::NAME,
            RunStatus::Suspended,
            RunStatus::Running,
        ),
        (
            "stuck-run",
            Doomed::NAME,
            RunStatus::CompensationFailed,
            RunStatus::Compensating,
        ),
    ] {
        let found = notice_of(&notices, run);
        assert_eq!(found.len(), 1, "{run}: {notices:#?}");
        let notice = found[0];
        let history = engine.history(run).await.unwrap();
        let last = history.entries.last().unwrap();
        assert_eq!(notice.event_id, last_entry_event_id(&engine, run).await);
        assert_eq!(notice.workflow, workflow);
        assert_eq!(notice.status, status);
        assert_eq!(notice.previous_status, previous);
        assert_eq!(
            notice.at_ms, last.at_ms,
            "{run}: the transition entry's time"
        );
        assert_eq!(notice.error, history.run.error, "{run}");
        assert_eq!(notice.parent, None);
        assert!(notice.delivered_to.is_empty());
    }
    assert!(
        notice_of(&notices, "suspended-run")[0]
            .error
            .as_deref()
            .unwrap_or("")
            .contains("the body's own bug"),
        "{notices:#?}"
    );
    let times: Vec<u64> = notices.iter().map(|n| n.at_ms).collect();
    assert!(times.is_sorted(), "oldest first: {times:?}");
    engine.shutdown().await;
}

/// Transitions into statuses outside the set leave no notice: a completed run, a run that
/// compensated (through `compensating`), and a pause when only suspensions are asked for;
/// and an engine built without `notify_on` writes none at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statuses_outside_the_set_leave_no_notice() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(&dir.path().join("suspended-only"), &[RunStatus::Suspended]).await;
    engine.start::<Inbox>("done", ()).await.unwrap();
    engine.send("done", "go", "e1", "ok").await.unwrap();
    assert_eq!(settled(&engine, "done").await.status, RunStatus::Completed);
    engine.start::<Doomed>("undone", false).await.unwrap();
    assert_eq!(
        settled(&engine, "undone").await.status,
        RunStatus::Compensated
    );
    engine.start::<Inbox>("paused", ()).await.unwrap();
    engine.pause("paused").await.unwrap();
    assert_eq!(settled(&engine, "paused").await.status, RunStatus::Paused);
    assert_eq!(engine.notices().await.unwrap(), vec![]);
    // The set does work in this engine: a suspension is noticed.
    engine.start::<Buggy>("buggy", ()).await.unwrap();
    settled(&engine, "buggy").await;
    let notices = engine.notices().await.unwrap();
    assert_eq!(notices.len(), 1, "{notices:#?}");
    assert_eq!(notices[0].status, RunStatus::Suspended);
    engine.shutdown().await;

    let engine = open(&dir.path().join("none"), &[]).await;
    engine.start::<Buggy>("buggy", ()).await.unwrap();
    engine.start::<Inbox>("paused", ()).await.unwrap();
    engine.pause("paused").await.unwrap();
    settled(&engine, "buggy").await;
    settled(&engine, "paused").await;
    assert_eq!(engine.notices().await.unwrap(), vec![]);
    engine.shutdown().await;
}

/// A notice outlives its engine: after a reopen it is still pending, with the targets it
/// was delivered to; `notice_done` deletes it durably, so the next reopen finds nothing;
/// and a run that pauses again (a new transition, a new journal index) has a new notice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notice_survives_reopens_until_it_is_done() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), &NEEDS_A_HUMAN).await;
    let mut written = engine.notices_written();
    engine.start::<Inbox>("run", ()).await.unwrap();
    engine.pause("run").await.unwrap();
    settled(&engine, "run").await;
    tokio::time::timeout(CONDITION_TIMEOUT, written.changed())
        .await
        .expect("the notice's writing woke no sender")
        .unwrap();
    let first = engine.notices().await.unwrap();
    assert_eq!(first.len(), 1);
    let event_id = first[0].event_id.clone();
    engine
        .notice_delivered(&event_id, "http://a.example/hook")
        .await
        .unwrap();
    // Recording a target twice keeps it once.
    engine
        .notice_delivered(&event_id, "http://a.example/hook")
        .await
        .unwrap();
    engine.shutdown().await;
    drop(engine);

    let engine = open(dir.path(), &NEEDS_A_HUMAN).await;
    let again = engine.notices().await.unwrap();
    assert_eq!(again.len(), 1, "{again:#?}");
    assert_eq!(again[0].event_id, event_id);
    assert_eq!(again[0].delivered_to, vec!["http://a.example/hook"]);
    assert_eq!(
        Notice {
            delivered_to: vec![],
            ..again[0].clone()
        },
        first[0],
        "the same notice"
    );
    engine.notice_done(&event_id).await.unwrap();
    assert_eq!(engine.notices().await.unwrap(), vec![]);
    // Delivering a notice that is done changes nothing.
    engine
        .notice_delivered(&event_id, "http://b.example/hook")
        .await
        .unwrap();
    engine.shutdown().await;
    drop(engine);

    let engine = open(dir.path(), &NEEDS_A_HUMAN).await;
    assert_eq!(engine.notices().await.unwrap(), vec![], "done is durable");
    engine.resume("run").await.unwrap();
    engine.pause("run").await.unwrap();
    assert_eq!(settled(&engine, "run").await.status, RunStatus::Paused);
    let next = engine.notices().await.unwrap();
    assert_eq!(next.len(), 1, "{next:#?}");
    assert_ne!(
        next[0].event_id, event_id,
        "a new transition, a new event id"
    );
    assert_eq!(next[0].event_id, last_entry_event_id(&engine, "run").await);
    engine.shutdown().await;
}

/// A run deleted (here by a purge) before its notice went out still has its notice handed
/// out: its transition was durable, and it is not lost for want of the journal to check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notice_outlives_its_purged_run() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), &NEEDS_A_HUMAN).await;
    engine.start::<Inbox>("gone", ()).await.unwrap();
    engine.pause("gone").await.unwrap();
    assert_eq!(settled(&engine, "gone").await.status, RunStatus::Paused);
    let event_id = last_entry_event_id(&engine, "gone").await;
    engine.cancel("gone").await.unwrap();
    settled(&engine, "gone").await;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let purge = keel::Batch {
        action: keel::BatchAction::Purge,
        filter: keel::RunFilter {
            finished_before_ms: Some(now_ms + 60_000),
            ..keel::RunFilter::default()
        },
        dry_run: false,
        after: None,
        limit: 10,
    };
    // A settled run's cell can stay loaded a moment longer, and a purge skips a loaded run
    // ("is loaded"): ask again until it is deleted.
    let deadline = std::time::Instant::now() + CONDITION_TIMEOUT;
    loop {
        let report = engine.batch(&purge).await.unwrap();
        if report.done == 1 {
            break;
        }
        assert_eq!(report.skipped, 1, "{report:?}");
        assert!(std::time::Instant::now() < deadline, "{report:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(engine.status("gone").await.is_err(), "purged");
    engine.shutdown().await;
    drop(engine);

    let engine = open(dir.path(), &NEEDS_A_HUMAN).await;
    let pending = engine.notices().await.unwrap();
    let ids: Vec<&str> = pending.iter().map(|n| n.event_id.as_str()).collect();
    assert_eq!(ids, vec![event_id.as_str()]);
    engine.shutdown().await;
}
