//! The PostgreSQL store: runs complete, compensate and read back across engines on one
//! database; the schema is versioned. (Engines sharing a database: `pg_workers.rs`.)
//! Needs the server `scripts/test.sh` starts (`KEEL_TEST_POSTGRES_URL`).

use std::path::Path;

use keel::{Engine, EngineError, RunStatus};
use keel_testkit::effects::{self, Action};
use keel_testkit::flows::{EffectFlow, EffectFlowInput, EffectStep};
use keel_testkit::postgres::{execute, fresh_database, query_texts};

async fn open(dir: &Path, url: &str) -> Result<Engine, EngineError> {
    Engine::builder(dir)
        .postgres(url)
        .workflow::<EffectFlow>()
        .step::<EffectStep>()
        .open()
        .await
}

fn input(log: &Path, fail_at: Option<u32>) -> EffectFlowInput {
    EffectFlowInput {
        steps: 6,
        fail_at,
        sleep_ms: 5,
        log: log.display().to_string(),
    }
}

/// A run completes on PostgreSQL with each step's effect made under one key, and a second engine on the
/// database reads it back: its record, its journal, and an idempotent start of it.
#[tokio::test]
async fn a_run_completes_and_reads_back_from_another_engine() {
    let (dir, url) = (tempfile::tempdir().unwrap(), fresh_database().await);
    let log = dir.path().join("effects.log");
    let engine = open(dir.path(), &url).await.unwrap();
    let run = engine
        .start::<EffectFlow>("pg-1", input(&log, None))
        .await
        .unwrap();
    let output = run.result().await.unwrap();
    let history = engine.history("pg-1").await.unwrap();
    engine.shutdown().await;
    drop(engine);

    // Each step's effect was made under one key (a lost response is retried with the same
    // key), and only once the run is done.
    let done = effects::read(&log);
    let mut keys = std::collections::BTreeMap::new();
    for effect in done.iter().filter(|e| e.action == Action::Do) {
        let key = keys.entry(effect.step).or_insert(effect.key.as_str());
        assert_eq!(
            *key, effect.key,
            "step {} made under two keys: {done:?}",
            effect.step
        );
    }
    assert!(keys.len() >= 6, "every step made its effect: {done:?}");

    let engine = open(dir.path(), &url).await.unwrap();
    let record = engine.status("pg-1").await.unwrap();
    assert_eq!(record.status, RunStatus::Completed);
    assert_eq!(record.output, Some(serde_json::json!(output)));
    assert_eq!(engine.history("pg-1").await.unwrap(), history);
    let again = engine
        .start::<EffectFlow>("pg-1", input(&log, None))
        .await
        .unwrap();
    assert_eq!(again.result().await.unwrap(), output);
    let other = engine
        .start::<EffectFlow>("pg-1", input(&log, Some(1)))
        .await;
    assert!(
        matches!(other, Err(EngineError::IdempotencyMismatch { .. })),
        "another input under the same id is refused: {other:?}"
    );
    let rows = query_texts(
        &url,
        "SELECT count(*)::text FROM keel_journal WHERE run_id = 'pg-1'",
    )
    .await;
    assert_eq!(rows, vec![history.entries.len().to_string()]);
    engine.shutdown().await;
}

/// A run whose step fails for good is compensated on PostgreSQL: every effect it made is
/// undone, newest first, and the run ends compensated.
#[tokio::test]
async fn a_failed_run_is_compensated() {
    let (dir, url) = (tempfile::tempdir().unwrap(), fresh_database().await);
    let log = dir.path().join("effects.log");
    let engine = open(dir.path(), &url).await.unwrap();
    let run = engine
        .start::<EffectFlow>("pg-fail", input(&log, Some(4)))
        .await
        .unwrap();
    assert!(run.result().await.is_err());
    let record = engine.status("pg-fail").await.unwrap();
    assert_eq!(record.status, RunStatus::Compensated, "{record:?}");
    engine.shutdown().await;
    let entries = effects::read(&log);
    let undone: Vec<&str> = entries
        .iter()
        .filter(|e| e.action == Action::Undo)
        .map(|e| e.key.as_str())
        .collect();
    let done: Vec<&str> = entries
        .iter()
        .filter(|e| e.action == Action::Do)
        .map(|e| e.key.as_str())
        .collect();
    for key in &done {
        assert!(
            undone.contains(key),
            "effect {key} was left behind: {entries:?}"
        );
    }
}

/// A database whose schema a newer Keel wrote is refused, naming both versions, and left
/// as it was; a database that cannot be reached is refused naming it without its password.
#[tokio::test]
async fn a_newer_schema_or_an_unreachable_database_is_refused() {
    let (dir, url) = (tempfile::tempdir().unwrap(), fresh_database().await);
    open(dir.path(), &url).await.unwrap().shutdown().await;
    execute(&url, "UPDATE keel_schema SET version = 99").await;
    let error = open(dir.path(), &url)
        .await
        .expect_err("refused")
        .to_string();
    assert!(
        error.contains("schema version 99, newer than this binary's 4"),
        "{error}"
    );
    let version = query_texts(&url, "SELECT version::text FROM keel_schema").await;
    assert_eq!(
        version,
        vec!["99".to_string()],
        "the database is left as it was"
    );

    let error = open(dir.path(), "postgres://keel:hunter2@127.0.0.1:1/nothing")
        .await
        .expect_err("refused")
        .to_string();
    assert!(
        error.contains("postgres://keel@127.0.0.1:1/nothing"),
        "{error}"
    );
    assert!(!error.contains("hunter2"), "{error}");
}

/// Writes that no sync follows (the latency statistics, written every second) are committed
/// once the engine is idle, instead of holding a transaction open that the server would end.
#[tokio::test]
async fn an_idle_engine_holds_no_transaction_open() {
    let (dir, url) = (tempfile::tempdir().unwrap(), fresh_database().await);
    let log = dir.path().join("effects.log");
    let engine = open(dir.path(), &url).await.unwrap();
    engine
        .start::<EffectFlow>("pg-idle", input(&log, None))
        .await
        .unwrap()
        .result()
        .await
        .unwrap();
    // The statistics are flushed within a second, and nothing syncs after that: seen from
    // another connection only once they are committed.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let rows = query_texts(&url, "SELECT count(*)::text FROM keel_stats").await;
        if rows != vec!["0".to_string()] {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the statistics were never committed within 10 s: a transaction stayed open"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    engine.shutdown().await;
}

/// A write made after the engine released the database at shutdown (an operator's cancel
/// on its way in) is refused and reported as failed, never as durable; the run is left as
/// the database holds it.
#[tokio::test]
async fn a_write_after_shutdown_is_refused_not_reported_durable() {
    let (dir, url) = (tempfile::tempdir().unwrap(), fresh_database().await);
    let log = dir.path().join("effects.log");
    let engine = open(dir.path(), &url).await.unwrap();
    let mut asleep = input(&log, None);
    asleep.sleep_ms = 3_600_000;
    engine
        .start::<EffectFlow>("pg-late", asleep.clone())
        .await
        .unwrap();
    keel_testkit::poll::until(&engine, "pg-late", |h| {
        h.entries
            .iter()
            .any(|e| matches!(e.event, keel::Event::TimerSet { .. }))
    })
    .await;
    engine.shutdown().await;
    let late = engine.cancel("pg-late").await;
    assert!(
        late.is_err(),
        "a cancel after shutdown was reported done: {late:?}"
    );
    let engine = open(dir.path(), &url).await.unwrap();
    let record = engine.status("pg-late").await.unwrap();
    assert_eq!(record.status, RunStatus::Running, "{record:?}");
    engine.shutdown().await;
}

/// A run record that does not decode neither ends a paged listing early nor hides the
/// runs after it: every readable run is listed once, a page at a time.
#[tokio::test]
async fn a_corrupt_record_hides_no_other_run_from_a_listing() {
    let (dir, url) = (tempfile::tempdir().unwrap(), fresh_database().await);
    let log = dir.path().join("effects.log");
    let engine = open(dir.path(), &url).await.unwrap();
    for id in ["list-a", "list-b", "list-c", "list-d"] {
        let mut quick = input(&log, None);
        quick.steps = 1;
        let run = engine.start::<EffectFlow>(id, quick).await.unwrap();
        run.result().await.unwrap();
    }
    engine.shutdown().await;
    drop(engine);
    execute(
        &url,
        "UPDATE keel_runs SET record = '{' WHERE id IN ('list-a', 'list-b')",
    )
    .await;
    let engine = open(dir.path(), &url).await.unwrap();
    let mut listed = Vec::new();
    let mut after = None;
    for _ in 0..10 {
        let page = engine
            .list_page(&keel::RunsQuery {
                prefix: None,
                status: None,
                after: after.clone(),
                limit: 1,
                ..Default::default()
            })
            .await
            .unwrap();
        listed.extend(page.runs.iter().map(|r| r.id.to_string()));
        match page.next {
            Some(next) => after = Some(next.to_string()),
            None => break,
        }
    }
    assert_eq!(listed, vec!["list-c".to_string(), "list-d".to_string()]);
    engine.shutdown().await;
}
