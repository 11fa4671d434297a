//! Reruns: a new run of a finished run's workflow with its input or a corrected one, linked
//! in both runs, idempotent by its id; the default ids; a bulk rerun that skips runs rerun
//! before and never reruns its own reruns.

mod common;

use std::time::Duration;

use common::batch::{batch, hold, ids_of, open, settle, Hold};
use common::Scratch;
use keel::{BatchAction, BatchOutcome, EngineError, Event, Rerun, RunFilter, RunStatus, Workflow};

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
