//! Operator actions at fleet scale: batches by filter (dry run, bounded calls with a
//! continuation, per-run outcomes and skip reasons), reruns, purges and retention per
//! workflow.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use common::{Scratch, Undoable};
use keel::{
    Batch, BatchAction, BatchOutcome, BatchReport, Ctx, Engine, EngineError, Event, Rerun,
    RunFilter, RunStatus, Step, StepContext, StepError, Workflow, WorkflowError,
};
use keel_testkit::effects::{self as ground_truth, Action};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
struct HoldInput {
    log: String,
    /// Fail (with nothing to undo) instead of holding.
    #[serde(default)]
    fail: bool,
}

/// Takes an effect (undone when it compensates), then holds for a day; or fails at once.
struct Hold;

impl Workflow for Hold {
    const NAME: &'static str = "test.hold";
    type Input = HoldInput;
    type Output = u32;

    async fn run(ctx: &mut Ctx, input: HoldInput) -> Result<u32, WorkflowError> {
        if input.fail {
            return Err(WorkflowError::failed("asked to fail"));
        }
        ctx.step(Undoable { log: input.log }).await?;
        ctx.sleep(Duration::from_secs(24 * 3600)).await?;
        Ok(1)
    }
}

/// Completes at once; kept for an hour when finished.
struct Brief;

impl Workflow for Brief {
    const NAME: &'static str = "test.brief";
    const RETENTION: Option<Duration> = Some(Duration::from_secs(3600));
    type Input = u32;
    type Output = u32;

    async fn run(_: &mut Ctx, input: u32) -> Result<u32, WorkflowError> {
        Ok(input)
    }
}

/// Stays in flight until the file `<gate>.open` exists; `<gate>.entered` says it began.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Gate {
    gate: String,
}

impl Step for Gate {
    const KIND: &'static str = "test.gate";
    const COMPENSABLE: bool = false;
    type Output = ();

    async fn execute(&self, _: &StepContext) -> Result<(), StepError> {
        std::fs::write(format!("{}.entered", self.gate), "").unwrap();
        while !Path::new(&format!("{}.open", self.gate)).exists() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct GatedInput {
    log: String,
    gate: String,
}

/// Takes an effect (undone when it compensates), waits at its gate, then holds for a day.
struct Gated;

impl Workflow for Gated {
    const NAME: &'static str = "test.gated";
    type Input = GatedInput;
    type Output = ();

    async fn run(ctx: &mut Ctx, input: GatedInput) -> Result<(), WorkflowError> {
        ctx.step(Undoable { log: input.log }).await?;
        ctx.step(Gate { gate: input.gate }).await?;
        ctx.sleep(Duration::from_secs(24 * 3600)).await?;
        Ok(())
    }
}

async fn open(scratch: &Scratch) -> Engine {
    keel_testkit::store::builder(&scratch.data)
        .workflow::<Hold>()
        .workflow::<Brief>()
        .workflow::<Gated>()
        .step::<Undoable>()
        .step::<Gate>()
        .clock(scratch.clock.clone())
        .open()
        .await
        .unwrap()
}

fn hold(scratch: &Scratch) -> serde_json::Value {
    serde_json::to_value(HoldInput {
        log: scratch.log.clone(),
        fail: false,
    })
    .unwrap()
}

/// Starts held runs `ids` and waits until each took its effect and sleeps (its timer is
/// journaled: the run sleeps loaded, or parked).
async fn start_held(engine: &Engine, scratch: &Scratch, ids: &[String]) {
    for id in ids {
        engine
            .start_json(Hold::NAME, id, hold(scratch))
            .await
            .unwrap();
    }
    for id in ids {
        keel_testkit::poll::until(engine, id, |history| {
            history
                .entries
                .iter()
                .any(|e| matches!(e.event, keel::Event::TimerSet { .. }))
        })
        .await;
    }
}

fn filter(statuses: &[RunStatus]) -> RunFilter {
    RunFilter {
        statuses: statuses.to_vec(),
        ..RunFilter::default()
    }
}

fn batch(action: BatchAction, filter: RunFilter, limit: usize) -> Batch {
    Batch {
        action,
        filter,
        dry_run: false,
        after: None,
        limit,
    }
}

fn ids_of(report: &BatchReport, outcome: BatchOutcome) -> Vec<String> {
    report
        .runs
        .iter()
        .filter(|r| r.outcome == outcome)
        .map(|r| r.id.to_string())
        .collect()
}

async fn statuses(engine: &Engine) -> BTreeMap<String, RunStatus> {
    engine
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.id.to_string(), r.status))
        .collect()
}

async fn settle(engine: &Engine, ids: &[String]) {
    for id in ids {
        engine.wait(id).await.unwrap();
    }
}

/// Undo lines per run in the ground-truth log.
fn undos(log: &str) -> BTreeMap<String, usize> {
    let mut undos = BTreeMap::new();
    for effect in ground_truth::read(Path::new(log)) {
        if effect.action == Action::Undo {
            *undos.entry(effect.run).or_default() += 1;
        }
    }
    undos
}

/// Each filter field narrows the match; a dry run counts every match, lists the first
/// `limit` with what would happen to each, and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_narrow_the_match_and_a_dry_run_changes_nothing() {
    let scratch = Scratch::new();
    let engine = open(&scratch).await;
    let held: Vec<String> = (0..6).map(|n| format!("fleet-a-{n}")).collect();
    start_held(&engine, &scratch, &held).await;
    scratch.clock.advance(Duration::from_secs(60));
    let later: Vec<String> = (0..3).map(|n| format!("fleet-b-{n}")).collect();
    start_held(&engine, &scratch, &later).await;
    for n in 0..4 {
        engine
            .start_json(Brief::NAME, &format!("brief-{n}"), serde_json::json!(n))
            .await
            .unwrap();
        engine.wait(&format!("brief-{n}")).await.unwrap();
    }
    let before = statuses(&engine).await;

    let mut dry = batch(
        BatchAction::Cancel,
        RunFilter {
            id_prefix: Some("fleet-".into()),
            ..RunFilter::default()
        },
        4,
    );
    dry.dry_run = true;
    let report = engine.batch(&dry).await.unwrap();
    assert_eq!((report.matched, report.done, report.skipped), (9, 9, 0));
    assert_eq!(
        report.runs.len(),
        4,
        "a dry run lists the first `limit` matches"
    );
    assert!(report
        .runs
        .iter()
        .all(|r| r.outcome == BatchOutcome::WouldAct));
    assert_eq!(report.next, None);

    // A dry run over finished and running runs says which would be skipped, and why.
    dry.filter = RunFilter {
        workflow: Some(Brief::NAME.into()),
        ..RunFilter::default()
    };
    let report = engine.batch(&dry).await.unwrap();
    assert_eq!((report.matched, report.done, report.skipped), (4, 0, 4));
    let reason = report.runs[0].reason.as_deref().unwrap();
    assert!(
        reason.contains("is completed") && reason.contains("cancel needs running"),
        "{reason}"
    );

    // created_after / created_before split the two waves; parent and workflow narrow.
    let count = |filter: RunFilter| {
        let engine = engine.clone();
        async move {
            let mut dry = batch(BatchAction::Pause, filter, 100);
            dry.dry_run = true;
            engine.batch(&dry).await.unwrap().matched
        }
    };
    let start = keel::testing::TestClock::START_MS;
    let after_first = RunFilter {
        created_after_ms: Some(start + 30_000),
        ..RunFilter::default()
    };
    assert_eq!(count(after_first).await, 3 + 4);
    let before_second = RunFilter {
        created_before_ms: Some(start + 30_000),
        workflow: Some(Hold::NAME.into()),
        ..RunFilter::default()
    };
    assert_eq!(count(before_second).await, 6);
    assert_eq!(
        count(RunFilter {
            parent: Some("fleet-a-1".into()),
            ..RunFilter::default()
        })
        .await,
        0
    );
    assert_eq!(count(filter(&[RunStatus::Completed])).await, 4);
    assert_eq!(
        count(filter(&[RunStatus::Running, RunStatus::Completed])).await,
        13
    );

    assert_eq!(statuses(&engine).await, before, "a dry run changed nothing");
    engine.shutdown().await;
}

/// A bulk cancel goes on over bounded calls, each naming where the next goes on; every
/// matched run compensates once; repeating a call acts on nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_cancel_goes_on_in_bounded_calls_and_a_repeated_call_acts_on_nothing_twice() {
    let scratch = Scratch::new();
    let engine = open(&scratch).await;
    let ids: Vec<String> = (0..25).map(|n| format!("run-{n:02}")).collect();
    start_held(&engine, &scratch, &ids).await;

    let mut request = batch(BatchAction::Cancel, filter(&[RunStatus::Running]), 10);
    let mut done = Vec::new();
    let mut calls = 0;
    let mut first_token = None;
    loop {
        let report = engine.batch(&request).await.unwrap();
        calls += 1;
        assert!(report.runs.len() <= 10);
        done.extend(ids_of(&report, BatchOutcome::Done));
        if calls == 1 {
            first_token = report.next.clone();
        }
        match report.next {
            Some(next) => request.after = Some(next),
            None => break,
        }
    }
    assert_eq!(calls, 3, "25 runs at 10 a call");
    assert_eq!(done, ids, "every run once, in id order");
    settle(&engine, &ids).await;

    // The second call again (its answer lost): every run it names moved on.
    request.after = first_token;
    request.filter = RunFilter {
        id_prefix: Some("run-".into()),
        ..RunFilter::default()
    };
    let again = engine.batch(&request).await.unwrap();
    assert_eq!(again.done, 0);
    assert_eq!(again.skipped, 10);
    assert!(again.runs[0]
        .reason
        .as_deref()
        .unwrap()
        .starts_with("is compensated"));

    let undone = undos(&scratch.log);
    for id in &ids {
        assert_eq!(
            engine.status(id).await.unwrap().status,
            RunStatus::Compensated
        );
        assert_eq!(undone.get(id), Some(&1), "run {id} undone once");
    }
    engine.shutdown().await;
}

/// A cancel or a pause requested of a running run stands until its step in flight ends: a
/// second batch in that time, or a dry run, reports the run skipped with the reason, not
/// done again (before, it reported `done` for a run nothing was done to).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_or_pause_standing_on_a_running_run_is_not_reported_done_again() {
    let scratch = Scratch::new();
    let engine = open(&scratch).await;
    let gate = |id: &str| format!("{}.{id}", scratch.log);
    for id in ["gated-cancel", "gated-pause"] {
        let input = GatedInput {
            log: scratch.log.clone(),
            gate: gate(id),
        };
        engine
            .start_json(Gated::NAME, id, serde_json::to_value(input).unwrap())
            .await
            .unwrap();
    }
    for id in ["gated-cancel", "gated-pause"] {
        let deadline = std::time::Instant::now() + keel_testkit::poll::CONDITION_TIMEOUT;
        while !Path::new(&format!("{}.entered", gate(id))).exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "{id} never reached its gate"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    for (action, id, why) in [
        (
            BatchAction::Cancel,
            "gated-cancel",
            "a cancel already requested",
        ),
        (
            BatchAction::Pause,
            "gated-pause",
            "a pause already requested",
        ),
    ] {
        let only = RunFilter {
            id_prefix: Some(id.into()),
            ..RunFilter::default()
        };
        let first = engine
            .batch(&batch(action.clone(), only.clone(), 10))
            .await
            .unwrap();
        assert_eq!(ids_of(&first, BatchOutcome::Done), vec![id], "{first:?}");
        assert_eq!(first.runs[0].now, Some(RunStatus::Running));

        let again = engine
            .batch(&batch(action.clone(), only.clone(), 10))
            .await
            .unwrap();
        assert_eq!(again.done, 0, "{again:?}");
        assert_eq!(ids_of(&again, BatchOutcome::Skipped), vec![id]);
        let reason = again.runs[0].reason.as_deref().unwrap();
        assert!(reason.contains(why), "{reason}");

        let mut dry = batch(action, only, 10);
        dry.dry_run = true;
        let dry = engine.batch(&dry).await.unwrap();
        assert_eq!(ids_of(&dry, BatchOutcome::WouldSkip), vec![id], "{dry:?}");
        assert_eq!(dry.runs[0].reason.as_deref(), Some(reason));
    }

    // A pause of a run whose cancel stands is refused, and a dry run says so too.
    let cancelled = RunFilter {
        id_prefix: Some("gated-cancel".into()),
        ..RunFilter::default()
    };
    let mut pause = batch(BatchAction::Pause, cancelled, 10);
    for dry_run in [true, false] {
        pause.dry_run = dry_run;
        let report = engine.batch(&pause).await.unwrap();
        assert_eq!(report.skipped, 1, "{report:?}");
        assert_eq!(
            report.runs[0].reason.as_deref(),
            Some("is cancelled: cannot pause")
        );
    }

    for id in ["gated-cancel", "gated-pause"] {
        std::fs::write(format!("{}.open", gate(id)), "").unwrap();
    }
    let cancelled = engine.wait("gated-cancel").await.unwrap();
    assert_eq!(cancelled.status, RunStatus::Compensated);
    let paused = engine.wait("gated-pause").await.unwrap();
    assert_eq!(paused.status, RunStatus::Paused);
    assert_eq!(undos(&scratch.log).get("gated-cancel"), Some(&1));
    engine.shutdown().await;
}

/// Each action reports runs its state does not admit as skipped with the reason, and acts
/// on the others: pause, resume, retry-compensation and resolve; and a batch with no filter,
/// a limit out of range, a purge without a date or a resolve without a note is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_action_skips_runs_whose_state_does_not_admit_it_and_says_why() {
    let scratch = Scratch::new();
    let engine = open(&scratch).await;
    let ids: Vec<String> = (0..4).map(|n| format!("op-{n}")).collect();
    start_held(&engine, &scratch, &ids).await;
    engine
        .start_json(Brief::NAME, "op-done", serde_json::json!(1))
        .await
        .unwrap();
    engine.wait("op-done").await.unwrap();
    let ops = || RunFilter {
        id_prefix: Some("op-".into()),
        ..RunFilter::default()
    };

    let report = engine
        .batch(&batch(BatchAction::Pause, ops(), 100))
        .await
        .unwrap();
    assert_eq!(ids_of(&report, BatchOutcome::Done), ids);
    assert_eq!(ids_of(&report, BatchOutcome::Skipped), vec!["op-done"]);
    for id in &ids {
        assert_eq!(engine.wait(id).await.unwrap().status, RunStatus::Paused);
    }
    let report = engine
        .batch(&batch(BatchAction::Resume, ops(), 100))
        .await
        .unwrap();
    assert_eq!(ids_of(&report, BatchOutcome::Done), ids);
    let report = engine
        .batch(&batch(BatchAction::RetryCompensation, ops(), 100))
        .await
        .unwrap();
    assert_eq!(report.done, 0);
    assert_eq!(report.skipped, 5);
    assert!(report.runs[0]
        .reason
        .as_deref()
        .unwrap()
        .contains("retry_compensation needs compensation_failed"));

    // Undo refused: the cancelled runs end compensation_failed; retry, then resolve.
    scratch.refuse_undo();
    let held = || RunFilter {
        workflow: Some(Hold::NAME.into()),
        ..RunFilter::default()
    };
    engine
        .batch(&batch(BatchAction::Cancel, held(), 100))
        .await
        .unwrap();
    for id in &ids {
        assert_eq!(
            engine.wait(id).await.unwrap().status,
            RunStatus::CompensationFailed
        );
    }
    let report = engine
        .batch(&batch(BatchAction::RetryCompensation, held(), 100))
        .await
        .unwrap();
    assert_eq!(report.done, 4);
    for id in &ids {
        assert_eq!(
            engine.wait(id).await.unwrap().status,
            RunStatus::CompensationFailed
        );
    }
    let note = BatchAction::Resolve {
        note: "deleted by hand".into(),
    };
    let report = engine.batch(&batch(note, held(), 100)).await.unwrap();
    assert_eq!(report.done, 4);
    assert!(report
        .runs
        .iter()
        .all(|r| r.now == Some(RunStatus::Resolved)));

    let refused = |b: Batch| {
        let engine = engine.clone();
        async move {
            match engine.batch(&b).await {
                Err(EngineError::InvalidRequest(message)) => message,
                other => panic!("expected a refusal, got {other:?}"),
            }
        }
    };
    let message = refused(batch(BatchAction::Cancel, RunFilter::default(), 10)).await;
    assert!(message.contains("a batch needs a filter"), "{message}");
    let message = refused(batch(BatchAction::Cancel, ops(), 1001)).await;
    assert!(message.contains("limit 1001 is out of range"), "{message}");
    let message = refused(batch(BatchAction::Purge, ops(), 10)).await;
    assert!(
        message.contains("a purge needs finished_before"),
        "{message}"
    );
    let blank = BatchAction::Resolve { note: " ".into() };
    let message = refused(batch(blank, ops(), 10)).await;
    assert!(message.contains("needs a note"), "{message}");
    engine.shutdown().await;
}

/// Two default reruns of one run at once make one run, and the next default rerun is the
/// second: before, each call recorded the first in the old run's journal, and the next
/// default id counted it twice (`.rerun-3`). A default id already taken by a given one is
/// passed over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_reruns_at_once_count_as_one() {
    let scratch = Scratch::new();
    let engine = open(&scratch).await;
    let failing = serde_json::json!({"log": scratch.log, "fail": true});
    engine.start_json(Hold::NAME, "bad", failing).await.unwrap();
    assert_eq!(engine.wait("bad").await.unwrap().status, RunStatus::Failed);

    let default = Rerun::default();
    let (one, two) = tokio::join!(engine.rerun("bad", &default), engine.rerun("bad", &default));
    assert_eq!(one.unwrap().id.as_str(), "bad.rerun-1");
    assert_eq!(two.unwrap().id.as_str(), "bad.rerun-1");
    let next = engine.rerun("bad", &default).await.unwrap();
    assert_eq!(next.id.as_str(), "bad.rerun-2");

    // A rerun given the id the next default one would take: the default goes past it, and
    // does not hand back that run (before, every default rerun from then on did).
    let given = Rerun {
        as_id: Some("bad.rerun-4".into()),
        input: None,
    };
    engine.rerun("bad", &given).await.unwrap();
    let past = engine.rerun("bad", &default).await.unwrap();
    assert_eq!(past.id.as_str(), "bad.rerun-5");
    engine.shutdown().await;
}

/// A rerun starts a new run of the same workflow with the same (or a corrected) input and
/// records the link in both runs; it is idempotent by its id; an unfinished run is refused;
/// a bulk rerun skips runs rerun before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rerun_links_both_runs_and_a_bulk_rerun_skips_runs_rerun_before() {
    let scratch = Scratch::new();
    let engine = open(&scratch).await;
    let failing = serde_json::json!({"log": scratch.log, "fail": true});
    for n in 0..3 {
        let id = format!("bad-{n}");
        engine
            .start_json(Hold::NAME, &id, failing.clone())
            .await
            .unwrap();
        assert_eq!(engine.wait(&id).await.unwrap().status, RunStatus::Failed);
    }

    // Rerun with a corrected input under a given id, twice: the same run.
    let fixed = Rerun {
        as_id: Some("bad-0-fixed".into()),
        input: Some(hold(&scratch)),
    };
    let rerun = engine.rerun("bad-0", &fixed).await.unwrap();
    assert_eq!(rerun.id.as_str(), "bad-0-fixed");
    assert_eq!(rerun.rerun_of.as_ref().map(|r| r.as_str()), Some("bad-0"));
    assert_eq!(rerun.input, hold(&scratch));
    let again = engine.rerun("bad-0", &fixed).await.unwrap();
    assert_eq!(again.id, rerun.id);
    let notes: Vec<String> = engine
        .history("bad-0")
        .await
        .unwrap()
        .entries
        .iter()
        .filter_map(|e| match &e.event {
            Event::RerunStarted { run } => Some(run.to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(
        notes,
        vec!["bad-0-fixed"],
        "the rerun is noted once in the old run"
    );
    assert_eq!(
        engine.status("bad-0").await.unwrap().status,
        RunStatus::Failed
    );

    // An unfinished run is refused, naming what to do.
    match engine.rerun("bad-0-fixed", &Rerun::default()).await {
        Err(EngineError::InvalidState { operation, .. }) => {
            assert!(operation.contains("cancel it first"), "{operation}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }

    // A bulk rerun of the failed runs: bad-0 was rerun already; the others get default ids.
    let failed = || RunFilter {
        statuses: vec![RunStatus::Failed],
        ..RunFilter::default()
    };
    let report = engine
        .batch(&batch(BatchAction::Rerun, failed(), 100))
        .await
        .unwrap();
    assert_eq!(ids_of(&report, BatchOutcome::Done), vec!["bad-1", "bad-2"]);
    assert_eq!(ids_of(&report, BatchOutcome::Skipped), vec!["bad-0"]);
    assert_eq!(
        report.runs[0].reason.as_deref(),
        Some("was rerun already, as bad-0-fixed")
    );
    let made: Vec<String> = report
        .runs
        .iter()
        .filter_map(|r| r.rerun.as_ref().map(|id| id.to_string()))
        .collect();
    assert_eq!(made, vec!["bad-1.rerun-1", "bad-2.rerun-1"]);
    // Repeated once the reruns failed in turn (the same input): no run is rerun twice, and
    // the reruns are rerun in their turn.
    settle(&engine, &made).await;
    scratch.clock.advance(Duration::from_millis(1));
    let again = engine
        .batch(&batch(BatchAction::Rerun, failed(), 100))
        .await
        .unwrap();
    assert_eq!(
        ids_of(&again, BatchOutcome::Skipped),
        vec!["bad-0", "bad-1", "bad-2"]
    );
    assert_eq!(
        ids_of(&again, BatchOutcome::Done),
        vec!["bad-1.rerun-1", "bad-2.rerun-1"]
    );
    let second = engine.rerun("bad-1", &Rerun::default()).await.unwrap();
    assert_eq!(second.id.as_str(), "bad-1.rerun-2");

    // A rerun batch over several calls never reruns its own reruns: each sorts right after
    // its original and has failed in turn by the next call, but it was started after the
    // batch began.
    for n in 0..3 {
        let id = format!("c-{n}");
        engine
            .start_json(Hold::NAME, &id, failing.clone())
            .await
            .unwrap();
        engine.wait(&id).await.unwrap();
    }
    let mut request = batch(
        BatchAction::Rerun,
        RunFilter {
            statuses: vec![RunStatus::Failed],
            id_prefix: Some("c-".into()),
            ..RunFilter::default()
        },
        1,
    );
    let mut acted = Vec::new();
    for call in 0.. {
        assert!(call < 10, "the batch never ended");
        let report = engine.batch(&request).await.unwrap();
        let made: Vec<String> = report
            .runs
            .iter()
            .filter_map(|r| r.rerun.as_ref().map(|id| id.to_string()))
            .collect();
        settle(&engine, &made).await;
        acted.extend(ids_of(&report, BatchOutcome::Done));
        // The first call's rerun shares its millisecond; the later ones come after it.
        scratch
            .clock
            .advance(Duration::from_millis(u64::from(call % 2 == 0)));
        match report.next {
            Some(next) => request.after = Some(next),
            None => break,
        }
    }
    assert_eq!(acted, vec!["c-0", "c-1", "c-2"]);
    // A token that is not one a batch returned is refused.
    request.after = Some("c-1".into());
    assert!(matches!(
        engine.batch(&request).await,
        Err(EngineError::InvalidRequest(m)) if m.contains("is not one a batch returned")
    ));
    engine.shutdown().await;
}

/// A purge deletes runs that finished before its date, with their children, and keeps the
/// rest; garbage collection keeps each workflow's runs for its own retention.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_deletes_finished_runs_before_the_date_and_retention_is_per_workflow() {
    let scratch = Scratch::new();
    let engine = open(&scratch).await;
    for n in 0..3 {
        let id = format!("old-{n}");
        engine
            .start_json(Brief::NAME, &id, serde_json::json!(n))
            .await
            .unwrap();
        engine.wait(&id).await.unwrap();
    }
    let failing = serde_json::json!({"log": scratch.log, "fail": true});
    engine
        .start_json(Hold::NAME, "old-failed", failing)
        .await
        .unwrap();
    engine.wait("old-failed").await.unwrap();
    scratch.clock.advance(Duration::from_secs(600));
    let cut = scratch.clock.now_ms();
    engine
        .start_json(Brief::NAME, "new-0", serde_json::json!(9))
        .await
        .unwrap();
    engine.wait("new-0").await.unwrap();
    start_held(&engine, &scratch, &["held".to_string()]).await;

    let purge = |statuses: &[RunStatus]| {
        batch(
            BatchAction::Purge,
            RunFilter {
                statuses: statuses.to_vec(),
                finished_before_ms: Some(cut),
                ..RunFilter::default()
            },
            100,
        )
    };
    match engine.batch(&purge(&[RunStatus::Running])).await {
        Err(EngineError::InvalidRequest(message)) => {
            assert!(
                message.contains("status running is not finished"),
                "{message}"
            )
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    let report = engine.batch(&purge(&[RunStatus::Completed])).await.unwrap();
    assert_eq!(
        ids_of(&report, BatchOutcome::Done),
        vec!["old-0", "old-1", "old-2"]
    );
    let left: Vec<String> = statuses(&engine).await.into_keys().collect();
    assert_eq!(left, vec!["held", "new-0", "old-failed"]);
    assert!(matches!(
        engine.status("old-0").await,
        Err(EngineError::RunNotFound { .. })
    ));

    // Brief keeps its runs an hour, the engine's default is a week: after two hours only
    // Brief's finished run is collected.
    scratch.clock.advance(Duration::from_secs(2 * 3600));
    assert_eq!(engine.retention_of(Brief::NAME), Duration::from_secs(3600));
    assert_eq!(engine.collect_garbage().await.unwrap(), 1);
    let left: Vec<String> = statuses(&engine).await.into_keys().collect();
    assert_eq!(left, vec!["held", "old-failed"]);
    engine.shutdown().await;
    drop(engine);

    // An operator's retention for a workflow overrides both.
    let engine = keel_testkit::store::builder(&scratch.data)
        .workflow::<Hold>()
        .workflow::<Brief>()
        .step::<Undoable>()
        .retention_for(Hold::NAME, Duration::from_secs(60))
        .clock(scratch.clock.clone())
        .open()
        .await
        .unwrap();
    assert_eq!(engine.retention_of(Hold::NAME), Duration::from_secs(60));
    // The engine's own collection runs at open, and may have taken the run first.
    assert!(engine.collect_garbage().await.unwrap() <= 1);
    let left: Vec<String> = statuses(&engine).await.into_keys().collect();
    assert_eq!(left, vec!["held"]);
    engine.shutdown().await;
}
