//! Several engines on one PostgreSQL database: each run is driven by one of them at a time;
//! any of them reads and operates any run; a run moves to another engine when its owner
//! shuts down, when an operator calls another engine about it, and when its owner's lease
//! expires, and the old owner's writes are then refused by the database. Ground truth: the
//! effect log (each step's effect under one key, compensations complete) and the database's
//! own record of who wrote what under which epoch (`fencing_breaches`).
//!
//! In-process, with short leases; `pg_failover.rs` does the same with worker processes
//! killed and stopped for real. Needs the server `scripts/test.sh` starts.

use std::path::Path;
use std::time::Duration;

use keel::{
    Ctx, Engine, EngineError, Leases, RunStatus, Step, StepContext, StepError, Workflow,
    WorkflowError,
};
use keel_testkit::effects::{self, Action};
use keel_testkit::flows::{EffectFlow, EffectFlowInput, EffectStep};
use keel_testkit::postgres::{execute, fencing_breaches, fresh_database, query_texts};
use serde::{Deserialize, Serialize};

/// Short leases, so that a takeover after an expiry happens within the test. The tests end
/// leases with SQL (`end_lease`) where they need an expiry, so the length only has to outlast
/// a renewal's round trip: 1 s was too little on the 2-core CI machine with the other test lane
/// syncing the same disk (a clean CI run lost a lease to one late renewal), 3 s is not.
const LEASES: Leases = Leases {
    length: Duration::from_millis(3_000),
    renew_every: Duration::from_millis(200),
    claim_every: Duration::from_millis(100),
};

async fn open(dir: &Path, url: &str) -> Engine {
    Engine::builder(dir)
        .postgres(url)
        .leases(LEASES)
        .workflow::<EffectFlow>()
        .step::<EffectStep>()
        .workflow::<SlowFlow>()
        .step::<SlowEffect>()
        .workflow::<Waiter>()
        .open()
        .await
        .unwrap()
}

/// A step that takes `ms` before it makes its effect (in the ground-truth log at `log`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct SlowEffect {
    ms: u64,
    log: String,
}

impl Step for SlowEffect {
    const KIND: &'static str = "test.slow-effect";
    type Output = u32;

    async fn execute(&self, ctx: &StepContext) -> Result<u32, StepError> {
        tokio::time::sleep(Duration::from_millis(self.ms)).await;
        effects::record(&self.log, Action::Do, ctx)?;
        Ok(1)
    }
}

/// One [`SlowEffect`].
#[derive(Debug)]
struct SlowFlow;

impl Workflow for SlowFlow {
    const NAME: &'static str = "test.slow-flow";
    type Input = SlowEffect;
    type Output = u32;

    async fn run(ctx: &mut Ctx, input: SlowEffect) -> Result<u32, WorkflowError> {
        ctx.step(input).await
    }
}

/// Takes one event `go`, publishes its payload as `got` and returns it.
#[derive(Debug)]
struct Waiter;

impl Workflow for Waiter {
    const NAME: &'static str = "test.waiter";
    type Input = ();
    type Output = u32;

    async fn run(ctx: &mut Ctx, (): ()) -> Result<u32, WorkflowError> {
        let got: u32 = ctx.receive("go").await?;
        ctx.publish("got", &got).await?;
        Ok(got)
    }
}

fn input(log: &Path, steps: u32, sleep_ms: u64) -> EffectFlowInput {
    EffectFlowInput {
        steps,
        fail_at: None,
        sleep_ms,
        log: log.display().to_string(),
    }
}

/// Ends worker `id`'s lease now, as a lease ends when its worker stops renewing it: the row
/// is locked first, so that the end is stamped after every write the worker made before it
/// (each holds the row `FOR SHARE` until its transaction ends).
async fn end_lease(url: &str, id: &str) {
    execute(
        url,
        &format!(
            "BEGIN; SELECT 1 FROM keel_workers WHERE id = '{id}' FOR UPDATE; \
             UPDATE keel_workers SET lease_until = clock_timestamp() WHERE id = '{id}'; COMMIT"
        ),
    )
    .await;
}

/// The workers registered on the database, oldest first.
async fn workers(url: &str) -> Vec<String> {
    query_texts(url, "SELECT id FROM keel_workers ORDER BY started_at").await
}

/// Who wrote run `id`'s journal rows, in order, one name per run of rows.
async fn writers(url: &str, id: &str) -> Vec<String> {
    let rows = query_texts(
        url,
        &format!(
            "SELECT coalesce(written_by, '?') FROM keel_journal \
             WHERE run_id = '{id}' ORDER BY position"
        ),
    )
    .await;
    let mut runs: Vec<String> = Vec::new();
    for writer in rows {
        if runs.last() != Some(&writer) {
            runs.push(writer);
        }
    }
    runs
}

/// How many journal entries run `id` has.
async fn entries(url: &str, id: &str) -> usize {
    let count = query_texts(
        url,
        &format!("SELECT count(*)::text FROM keel_journal WHERE run_id = '{id}'"),
    )
    .await;
    count[0].parse().unwrap()
}

/// Waits until run `id` has at least `n` journal entries.
async fn until_entries(url: &str, id: &str, n: usize) {
    for _ in 0..500 {
        if entries(url, id).await >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("run {id} never reached {n} journal entries");
}

/// Each step's effect was made under one key, and every step made it.
fn one_key_per_step(log: &Path, run: &str, steps: u32) {
    let made = effects::read(log);
    let mut keys = std::collections::BTreeMap::new();
    for effect in made
        .iter()
        .filter(|e| e.run == run && e.action == Action::Do)
    {
        let key = keys.entry(effect.step).or_insert(effect.key.clone());
        assert_eq!(
            *key, effect.key,
            "run {run} step {} under two keys",
            effect.step
        );
    }
    // (The flow makes a step of its own on either side of the `steps` asked for.)
    assert!(
        keys.len() as u32 >= steps,
        "run {run}: every step made its effect"
    );
}

/// A run started on one engine is read, listed and awaited on another, which does not
/// drive it: every row of its journal was written by the engine that started it.
#[tokio::test]
async fn engines_share_a_database_and_one_drives_each_run() {
    let (dir, url) = (tempfile::tempdir().unwrap(), fresh_database().await);
    let log = dir.path().join("effects.log");
    let a = open(&dir.path().join("a"), &url).await;
    let b = open(&dir.path().join("b"), &url).await;
    assert_eq!(workers(&url).await.len(), 2, "both engines are registered");
    a.start::<EffectFlow>("shared-1", input(&log, 4, 20))
        .await
        .unwrap();
    // The same start at the other engine returns the run; it does not take it over.
    b.start::<EffectFlow>("shared-1", input(&log, 4, 20))
        .await
        .unwrap();
    let record = b.wait("shared-1").await.unwrap();
    assert_eq!(record.status, RunStatus::Completed, "{record:?}");
    assert_eq!(b.status("shared-1").await.unwrap(), record);
    assert!(b
        .list()
        .await
        .unwrap()
        .iter()
        .any(|r| r.id.as_str() == "shared-1"));
    let first = workers(&url).await[0].clone();
    assert_eq!(writers(&url, "shared-1").await, vec![first]);
    one_key_per_step(&log, "shared-1", 4);
    a.shutdown().await;
    b.shutdown().await;
    assert!(workers(&url).await.is_empty(), "both gave their leases up");
}

/// An engine that shuts down gives its runs up, and another engine takes them over at its
/// next claim and finishes them (their durable timers fire there), each step's effect under
/// one key.
#[tokio::test]
async fn runs_of_an_engine_that_shuts_down_move_to_another() {
    let (dir, url) = (tempfile::tempdir().unwrap(), fresh_database().await);
    let log = dir.path().join("effects.log");
    let a = open(&dir.path().join("a"), &url).await;
    let ids: Vec<String> = (0..4).map(|i| format!("moving-{i}")).collect();
    for id in &ids {
        a.start::<EffectFlow>(id, input(&log, 8, 1_500))
            .await
            .unwrap();
    }
    // Asleep on their durable timers, which fire on the engine that takes them over.
    until_entries(&url, &ids[3], 6).await;
    a.shutdown().await;
    let b = open(&dir.path().join("b"), &url).await;
    let b_id = workers(&url).await[0].clone();
    for id in &ids {
        let record = b.wait(id).await.unwrap();
        assert_eq!(record.status, RunStatus::Completed, "{record:?}");
        let by = writers(&url, id).await;
        assert_eq!(by.last(), Some(&b_id), "run {id} was finished by b: {by:?}");
        one_key_per_step(&log, id, 8);
    }
    assert_eq!(fencing_breaches(&url).await, Vec::<String>::new());
    b.shutdown().await;
}

/// An operator call at one engine on a run another engine drives takes the run over: the
/// old owner's next write is refused by the database and it stops driving the run; the run
/// is compensated once, by the engine that was called, and both engines see its end.
#[tokio::test]
async fn an_operator_call_takes_a_run_over_and_fences_its_old_owner() {
    let (dir, url) = (tempfile::tempdir().unwrap(), fresh_database().await);
    let log = dir.path().join("effects.log");
    let a = open(&dir.path().join("a"), &url).await;
    let b = open(&dir.path().join("b"), &url).await;
    let ids = workers(&url).await;
    let (a_id, b_id) = (ids[0].clone(), ids[1].clone());
    a.start::<EffectFlow>("taken", input(&log, 10, 100))
        .await
        .unwrap();
    until_entries(&url, "taken", 4).await;
    b.cancel("taken").await.unwrap();
    let record = b.wait("taken").await.unwrap();
    assert_eq!(record.status, RunStatus::Compensated, "{record:?}");
    assert_eq!(
        a.wait("taken").await.unwrap().status,
        RunStatus::Compensated
    );
    assert_eq!(writers(&url, "taken").await, vec![a_id, b_id]);
    let made = effects::read(&log);
    for done in made.iter().filter(|e| e.action == Action::Do) {
        assert!(
            made.iter()
                .any(|e| e.action == Action::Undo && e.key == done.key),
            "effect {} was left behind: {made:?}",
            done.key
        );
    }
    assert_eq!(fencing_breaches(&url).await, Vec::<String>::new());
    // The old owner goes on with its other runs.
    a.start::<EffectFlow>("after", input(&log, 2, 1))
        .await
        .unwrap();
    assert_eq!(a.wait("after").await.unwrap().status, RunStatus::Completed);
    a.shutdown().await;
    b.shutdown().await;
}

/// An engine whose lease expired (as if it had been paused past it) is refused every write
/// from the expiry on, stops (`Engine::broken`), and its runs move to the other engine,
/// which finishes them: no row written after the lease ended, each effect under one key.
#[tokio::test]
async fn an_engine_whose_lease_expired_is_fenced_and_stops() {
    let (dir, url) = (tempfile::tempdir().unwrap(), fresh_database().await);
    let log = dir.path().join("effects.log");
    let a = open(&dir.path().join("a"), &url).await;
    let a_id = workers(&url).await[0].clone();
    // Busy runs: the engine is writing when its lease ends.
    let ids: Vec<String> = (0..4).map(|i| format!("expiring-{i}")).collect();
    for id in &ids {
        a.start::<EffectFlow>(id, input(&log, 150, 1))
            .await
            .unwrap();
    }
    let b = open(&dir.path().join("b"), &url).await;
    until_entries(&url, &ids[3], 20).await;
    end_lease(&url, &a_id).await;
    let reason = tokio::time::timeout(Duration::from_secs(10), a.broken())
        .await
        .expect("the engine notices its lease is gone");
    assert!(reason.contains("lease"), "{reason}");
    for id in &ids {
        let record = b.wait(id).await.unwrap();
        assert_eq!(record.status, RunStatus::Completed, "{record:?}");
        one_key_per_step(&log, id, 150);
    }
    assert_eq!(fencing_breaches(&url).await, Vec::<String>::new());
    let after = a.start::<EffectFlow>("refused", input(&log, 1, 1)).await;
    assert!(after.is_err(), "a broken engine starts nothing: {after:?}");
    assert!(
        !matches!(after, Err(EngineError::IdempotencyMismatch { .. })),
        "{after:?}"
    );
    b.shutdown().await;
}

/// Latency statistics are shared: each engine reports the samples of every engine on the
/// database, merged (each writes its own, under its name, and reads the others').
#[tokio::test]
async fn engines_report_each_others_latency_statistics() {
    let (dir, url) = (tempfile::tempdir().unwrap(), fresh_database().await);
    let a = open(&dir.path().join("a"), &url).await;
    let b = open(&dir.path().join("b"), &url).await;
    for ms in 1..=30 {
        a.record_duration("step:shared", Duration::from_millis(ms));
    }
    for ms in 31..=40 {
        b.record_duration("step:shared", Duration::from_millis(ms));
    }
    a.flush_stats().await.unwrap();
    b.flush_stats().await.unwrap();
    // Each engine reads the others' every second.
    for engine in [&a, &b] {
        let mut seen = None;
        for _ in 0..100 {
            seen = engine.operation_stats("step:shared");
            if seen.as_ref().is_some_and(|s| s.count == 40) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let seen = seen.expect("statistics");
        assert_eq!(seen.count, 40, "{seen:?}");
        assert_eq!(
            (seen.min, seen.max),
            (Duration::from_millis(1), Duration::from_millis(40))
        );
    }
    a.shutdown().await;
    b.shutdown().await;
}

/// A step in flight when its engine's lease ends makes no effect: the engine stops it before
/// its next poll (here, the end of its sleep), so that the engine taking the run over, which
/// runs the step again under the same key, is the only one to make it.
#[tokio::test]
async fn a_step_in_flight_when_the_lease_ends_makes_no_effect() {
    let (dir, url) = (tempfile::tempdir().unwrap(), fresh_database().await);
    let log = dir.path().join("effects.log");
    let a = open(&dir.path().join("a"), &url).await;
    let a_id = workers(&url).await[0].clone();
    let slow = SlowEffect {
        ms: 3_000,
        log: log.display().to_string(),
    };
    a.start::<SlowFlow>("slow", slow).await.unwrap();
    // The step's start is durable: its attempt is asleep before its effect.
    until_entries(&url, "slow", 1).await;
    let b = open(&dir.path().join("b"), &url).await;
    end_lease(&url, &a_id).await;
    assert_eq!(b.wait("slow").await.unwrap().status, RunStatus::Completed);
    // Past the end of the first attempt's sleep, had it gone on.
    tokio::time::sleep(Duration::from_millis(3_100)).await;
    let made: Vec<_> = effects::read(&log)
        .into_iter()
        .filter(|e| e.run == "slow" && e.action == Action::Do)
        .collect();
    assert_eq!(
        made.len(),
        1,
        "one effect, by the engine that took over: {made:?}"
    );
    let b_id = workers(&url).await[1].clone();
    assert_eq!(writers(&url, "slow").await, vec![a_id, b_id]);
    b.shutdown().await;
}

/// An operator call that takes a run from a live engine in the middle of a step waits until
/// that engine has learned of it: the old owner's step makes no effect after the run was
/// cancelled elsewhere (it made one, after the cancel, before owners learned of takeovers).
#[tokio::test]
async fn a_live_owner_stops_its_step_when_an_operator_call_takes_the_run() {
    let (dir, url) = (tempfile::tempdir().unwrap(), fresh_database().await);
    let log = dir.path().join("effects.log");
    let a = open(&dir.path().join("a"), &url).await;
    let b = open(&dir.path().join("b"), &url).await;
    let slow = SlowEffect {
        ms: 3_000,
        log: log.display().to_string(),
    };
    a.start::<SlowFlow>("taken-mid-step", slow).await.unwrap();
    until_entries(&url, "taken-mid-step", 1).await;
    b.cancel("taken-mid-step").await.unwrap();
    let record = b.wait("taken-mid-step").await.unwrap();
    assert_eq!(record.status, RunStatus::Compensated, "{record:?}");
    // Past the end of the first attempt's sleep, had it gone on.
    tokio::time::sleep(Duration::from_millis(3_300)).await;
    let made: Vec<_> = effects::read(&log)
        .into_iter()
        .filter(|e| e.run == "taken-mid-step")
        .collect();
    assert_eq!(made, vec![], "no effect of a cancelled run's step");
    assert_eq!(fencing_breaches(&url).await, Vec::<String>::new());
    a.shutdown().await;
    b.shutdown().await;
}

/// A batch cancel through another engine of a run whose cancel already stands (its step in
/// flight on its owner) skips it, reading its journal, and leaves it to its owner: before, the
/// call took the run over, fencing the owner's step, only to find the cancel there, and the
/// batch reported it done.
#[tokio::test]
async fn a_batch_cancel_through_another_engine_leaves_a_standing_cancel_to_its_owner() {
    let (dir, url) = (tempfile::tempdir().unwrap(), fresh_database().await);
    let log = dir.path().join("effects.log");
    let a = open(&dir.path().join("a"), &url).await;
    let b = open(&dir.path().join("b"), &url).await;
    let a_id = workers(&url).await[0].clone();
    let slow = SlowEffect {
        ms: 2_000,
        log: log.display().to_string(),
    };
    a.start::<SlowFlow>("standing", slow).await.unwrap();
    until_entries(&url, "standing", 1).await;
    a.cancel("standing").await.unwrap();

    let only = keel::RunFilter {
        id_prefix: Some("standing".into()),
        ..keel::RunFilter::default()
    };
    let cancel = keel::Batch {
        action: keel::BatchAction::Cancel,
        filter: only,
        dry_run: false,
        after: None,
        limit: 10,
    };
    let report = b.batch(&cancel).await.unwrap();
    assert_eq!(report.skipped, 1, "{report:?}");
    let reason = report.runs[0].reason.as_deref().unwrap();
    assert!(reason.contains("a cancel already requested"), "{reason}");

    let record = a.wait("standing").await.unwrap();
    assert_eq!(record.status, RunStatus::Compensated, "{record:?}");
    assert_eq!(
        writers(&url, "standing").await,
        vec![a_id],
        "the run was taken over"
    );
    assert_eq!(fencing_breaches(&url).await, Vec::<String>::new());
    a.shutdown().await;
    b.shutdown().await;
}

/// An event sent through an engine that does not drive the run takes the run over (as an
/// operator's call does) and the run takes it there; the value it publishes is read, and
/// waited for, through either engine; the database records no write out of turn.
#[tokio::test]
async fn an_event_sent_through_another_engine_reaches_its_run() {
    let (dir, url) = (tempfile::tempdir().unwrap(), fresh_database().await);
    let a = open(&dir.path().join("a"), &url).await;
    let b = open(&dir.path().join("b"), &url).await;
    a.start::<Waiter>("waiting", ()).await.unwrap();
    until_entries(&url, "waiting", 1).await;
    let reader = {
        let a = a.clone();
        tokio::spawn(async move {
            a.published_wait("waiting", "got", None, Duration::from_secs(30))
                .await
        })
    };
    // A send with nothing to write (a duplicate, a mismatch) through the engine that does
    // not drive the run is answered from the store, and takes nothing over.
    let claims_sql = "SELECT epoch::text FROM keel_claims WHERE run_id = 'waiting'";
    a.send("waiting", "aside", &1u32, "aside-1").await.unwrap();
    let claims = query_texts(&url, claims_sql).await;
    assert!(
        b.send("waiting", "aside", &1u32, "aside-1")
            .await
            .unwrap()
            .duplicate
    );
    let mismatch = b
        .send("waiting", "aside", &2u32, "aside-1")
        .await
        .unwrap_err();
    assert!(
        matches!(mismatch, EngineError::EventMismatch { .. }),
        "{mismatch}"
    );
    assert_eq!(
        query_texts(&url, claims_sql).await,
        claims,
        "nothing taken over"
    );
    let sent = b.send("waiting", "go", &7u32, "go-1").await.unwrap();
    assert!(!sent.duplicate);
    assert!(
        b.send("waiting", "go", &7u32, "go-1")
            .await
            .unwrap()
            .duplicate
    );
    let record = b.wait("waiting").await.unwrap();
    assert_eq!(record.status, RunStatus::Completed, "{record:?}");
    assert_eq!(record.output, Some(serde_json::json!(7)));
    let published = reader
        .await
        .unwrap()
        .unwrap()
        .expect("a value, seen through a");
    assert_eq!(published.value, serde_json::json!(7));
    assert_eq!(
        a.published("waiting", "got")
            .await
            .unwrap()
            .map(|p| p.value),
        Some(serde_json::json!(7))
    );
    assert_eq!(fencing_breaches(&url).await, Vec::<String>::new());
    a.shutdown().await;
    b.shutdown().await;
}

/// The child's database and data directory, for the paused open below.
const PAUSED_URL_ENV: &str = "KEEL_TEST_PAUSED_URL";
const PAUSED_DIR_ENV: &str = "KEEL_TEST_PAUSED_DIR";

/// A worker paused (SIGSTOP, as a stopped machine is) in its open, after it claimed a run
/// and before it loaded it, past its lease: its open fails, saying the store broke under it
/// (a worker exits so that its supervisor starts a fresh one), and writes nothing after its
/// lease ended; the run goes on at the next engine. A CI run of the failover torture had the
/// open fail with a bare sync error, which its worker could not tell from a broken store.
#[tokio::test]
async fn an_engine_that_loses_its_lease_while_opening_says_so() {
    if keel_testkit::crash::is_child() {
        let var = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set"));
        let opened = Engine::builder(var(PAUSED_DIR_ENV))
            .postgres(var(PAUSED_URL_ENV))
            .leases(LEASES)
            .workflow::<Waiter>()
            .open()
            .await;
        match opened {
            Err(EngineError::BrokeWhileOpening { reason, .. }) => {
                assert!(reason.contains("lease"), "{reason}");
            }
            Err(other) => panic!("the open failed, not saying the store broke: {other:?}"),
            Ok(_) => panic!("the open succeeded although its lease ended during it"),
        }
        return;
    }
    let (dir, url) = (tempfile::tempdir().unwrap(), fresh_database().await);
    // Kept loaded in its receive, never parked (a parked run whose owner is gone stays in
    // the database until something arrives for it): due, so the next open claims it.
    let a = Engine::builder(dir.path().join("a"))
        .postgres(&url)
        .leases(LEASES)
        .park_after(None)
        .workflow::<Waiter>()
        .open()
        .await
        .unwrap();
    a.start::<Waiter>("paused-open", ()).await.unwrap();
    until_entries(&url, "paused-open", 1).await;
    // Given up: the next engine to open claims it.
    a.shutdown().await;
    let spec = keel_testkit::crash::ChildSpec {
        test_name: "an_engine_that_loses_its_lease_while_opening_says_so",
        env: vec![
            (PAUSED_URL_ENV.into(), url.clone()),
            (
                PAUSED_DIR_ENV.into(),
                dir.path().join("b").display().to_string(),
            ),
        ],
    };
    let mut child = spec.spawn_exact(
        spec.test_name,
        &[
            ("KEEL_CRASH_AT", "open.after_claim".into()),
            ("KEEL_CRASH_SIGNAL", "STOP".into()),
        ],
    );
    keel_testkit::crash::until_stopped(&mut child, Duration::from_secs(60));
    let paused = workers(&url)
        .await
        .last()
        .cloned()
        .expect("the child registered");
    let claims_sql = "SELECT owner FROM keel_runs WHERE id = 'paused-open'";
    assert_eq!(query_texts(&url, claims_sql).await, vec![paused.clone()]);
    // The open's load count of the run is written after the claim: not once the lease ended.
    let loads_sql = "SELECT loads::text FROM keel_load_counts WHERE run_id = 'paused-open'";
    let loads = query_texts(&url, loads_sql).await;
    // Its lease ends while it is stopped, by its clock and by the database's.
    tokio::time::sleep(LEASES.length + Duration::from_millis(500)).await;
    let ending = keel_testkit::crash::continue_to_end(child, Duration::from_secs(60));
    assert_eq!(ending, keel_testkit::crash::Ending::Finished);
    assert_eq!(fencing_breaches(&url).await, Vec::<String>::new());
    assert_eq!(query_texts(&url, loads_sql).await, loads, "no load counted");
    let c = open(&dir.path().join("c"), &url).await;
    c.send("paused-open", "go", &3u32, "go-1").await.unwrap();
    let record = c.wait("paused-open").await.unwrap();
    assert_eq!(record.status, RunStatus::Completed, "{record:?}");
    c.shutdown().await;
}
