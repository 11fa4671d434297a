//! Operator actions at fleet scale: batches by filter (dry run, bounded calls with a
//! continuation, per-run outcomes and skip reasons), purges and retention per workflow.
//! Reruns are in `engine_rerun.rs`.

mod common;

use std::path::Path;
use std::time::Duration;

use common::batch::{
    batch, filter, ids_of, open, settle, start_held, statuses, undos, Brief, Gated, GatedInput,
    Hold,
};
use common::{Scratch, Undoable};
use keel::{Batch, BatchAction, BatchOutcome, EngineError, RunFilter, RunStatus, Workflow};

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
