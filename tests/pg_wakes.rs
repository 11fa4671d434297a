//! PostgreSQL keeps each run's wake time in its row (`keel_runs.wake_at`), and claims take
//! only the runs that are due: a run parked until later whose engine shut down or died stays
//! in the database, read by nobody, until its time, and is then claimed and driven by
//! whichever engine's clock reaches it first. Checked against the database itself (who owns
//! each run, every claim made) and the steps' ground-truth log. Also here: the list of the
//! types the runs use, which lets an open read no run at all, keeps every engine's types.

mod common;

use std::time::Duration;

use common::{Scratch, Undoable};
use keel::testing::TestClock;
use keel::{Ctx, Engine, Leases, Resident, RunStatus, Workflow, WorkflowError};
use keel_testkit::effects::{self as ground_truth, Action};
use keel_testkit::postgres::{execute, query_texts};
use serde::{Deserialize, Serialize};

const HOUR_MS: u64 = 3_600_000;
const RUNS: usize = 12;

/// Short leases, as in `pg_workers.rs`: a lease ended with SQL is seen within the test.
const LEASES: Leases = Leases {
    length: Duration::from_millis(3_000),
    renew_every: Duration::from_millis(200),
    claim_every: Duration::from_millis(100),
};

/// A step's effect, an hour's sleep, another step's effect.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct NapInput {
    log: String,
}

struct Nap;

impl Workflow for Nap {
    const NAME: &'static str = "test.pg-nap";
    type Input = NapInput;
    type Output = ();

    async fn run(ctx: &mut Ctx, input: NapInput) -> Result<(), WorkflowError> {
        ctx.step(Undoable {
            log: input.log.clone(),
        })
        .await?;
        ctx.sleep(Duration::from_millis(HOUR_MS)).await?;
        ctx.step(Undoable { log: input.log }).await?;
        Ok(())
    }
}

/// Takes one event `go`, with no deadline: parked, it has no wake time.
struct Receiver;

impl Workflow for Receiver {
    const NAME: &'static str = "test.pg-receiver";
    type Input = ();
    type Output = u32;

    async fn run(ctx: &mut Ctx, (): ()) -> Result<u32, WorkflowError> {
        ctx.receive("go").await
    }
}

/// [`Nap`] under another name: a second workflow type.
struct OtherNap;

impl Workflow for OtherNap {
    const NAME: &'static str = "test.pg-other-nap";
    type Input = NapInput;
    type Output = ();

    async fn run(ctx: &mut Ctx, input: NapInput) -> Result<(), WorkflowError> {
        Nap::run(ctx, input).await
    }
}

/// An engine on the scratch's database, with its own clock (each engine its own: what one
/// sleeps on is then its own).
async fn open(scratch: &Scratch, clock: &TestClock) -> Engine {
    keel_testkit::store::builder(&scratch.data)
        .clock(clock.clone())
        .leases(LEASES)
        .workflow::<Nap>()
        .workflow::<Receiver>()
        .step::<Undoable>()
        .open()
        .await
        .expect("opening the engine")
}

/// The scratch's database URL, as `keel_testkit::store` names it.
fn url_of(scratch: &Scratch) -> String {
    keel_testkit::store::database_url(&scratch.data)
}

async fn count(url: &str, sql: &str) -> usize {
    query_texts(url, sql).await[0].parse().unwrap()
}

/// Waits until `engine` holds exactly `runs` runs, all parked.
async fn all_parked(engine: &Engine, runs: usize) {
    let want = Resident {
        loaded: 0,
        parked: runs,
    };
    keel_testkit::poll::resident(engine, want).await;
}

/// Run `id`'s record once it completed on `engine`, within the tests' bound.
async fn ended(engine: &Engine, id: &str) -> keel::RunRecord {
    let record = tokio::time::timeout(keel_testkit::poll::CONDITION_TIMEOUT, engine.wait(id))
        .await
        .unwrap_or_else(|_| panic!("run {id} did not end"))
        .unwrap();
    assert_eq!(record.status, RunStatus::Completed, "{:?}", record.error);
    record
}

/// The effects the steps of run `id` made, as the ground-truth log has them.
fn effects_of(scratch: &Scratch, id: &str) -> Vec<(Action, u32, u32)> {
    ground_truth::read(std::path::Path::new(&scratch.log))
        .into_iter()
        .filter(|e| e.run == id)
        .map(|e| (e.action, e.step, e.attempt))
        .collect()
}

/// Starts [`RUNS`] naps and waits until every one is parked in its sleep.
async fn start_parked(engine: &Engine, scratch: &Scratch) {
    for i in 0..RUNS {
        let input = NapInput {
            log: scratch.log.clone(),
        };
        engine
            .start::<Nap>(&format!("nap-{i}"), input)
            .await
            .unwrap();
    }
    all_parked(engine, RUNS).await;
}

/// Every run's wake time as the database holds it, once all are written (a park's is
/// committed with the writer's next commit).
async fn wake_times(url: &str) -> Vec<String> {
    let sql = "SELECT wake_at::text FROM keel_runs ORDER BY id";
    for _ in 0..500 {
        let times = query_texts(url, sql).await;
        if times.iter().all(|t| t != "0") {
            return times;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the parked runs' wake times were never written");
}

/// After an engine that held runs parked until later is gone, another engine's open claims
/// none of them and reads none of them (nothing loaded or parked, no claim recorded, no owner
/// set), and the wake times stay as written; when its clock reaches them it claims each run
/// and finishes it, each step's effect made once.
async fn parked_runs_wait_in_the_database(scratch: &Scratch, url: &str, second: &TestClock) {
    let claims_before = count(url, "SELECT count(*)::text FROM keel_claims").await;
    let wake_ms = TestClock::START_MS + HOUR_MS;
    let engine = open(scratch, second).await;
    // Several claims' worth (one at open, then every 100 ms).
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        engine.resident(),
        Resident::default(),
        "nothing loaded or parked by the open"
    );
    assert_eq!(
        count(url, "SELECT count(*)::text FROM keel_claims").await,
        claims_before,
        "no run claimed"
    );
    assert_eq!(
        wake_times(url).await,
        vec![wake_ms.to_string(); RUNS],
        "wake times as written"
    );
    // The claims sleep on the engine's clock until the earliest of them.
    assert_eq!(keel_testkit::poll::asleep(second).await, wake_ms);
    second.advance_to(wake_ms);
    for i in 0..RUNS {
        let id = format!("nap-{i}");
        ended(&engine, &id).await;
        assert_eq!(
            effects_of(scratch, &id),
            [(Action::Do, 0, 1), (Action::Do, 2, 1)],
            "{id}"
        );
    }
    assert_eq!(
        count(url, "SELECT count(*)::text FROM keel_claims").await,
        claims_before + RUNS,
        "each run claimed once, when due"
    );
    engine.shutdown().await;
}

/// An engine shut down cleanly gives its runs up (no owner): those parked until later stay
/// unclaimed until their time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_parked_at_a_shutdown_are_claimed_only_when_due() {
    let scratch = Scratch::new();
    let url = url_of(&scratch);
    let engine = open(&scratch, &scratch.clock).await;
    start_parked(&engine, &scratch).await;
    wake_times(&url).await;
    engine.shutdown().await;
    drop(engine);
    assert_eq!(
        count(
            &url,
            "SELECT count(*)::text FROM keel_runs WHERE owner IS NULL"
        )
        .await,
        RUNS,
        "given up at the shutdown"
    );
    parked_runs_wait_in_the_database(&scratch, &url, &TestClock::new()).await;
}

/// An engine whose lease ended (as when its process dies) keeps owning its runs: those
/// parked until later are claimed from it only when due.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_parked_by_a_dead_engine_are_claimed_only_when_due() {
    let scratch = Scratch::new();
    let url = url_of(&scratch);
    let first = open(&scratch, &scratch.clock).await;
    start_parked(&first, &scratch).await;
    wake_times(&url).await;
    let worker = query_texts(&url, "SELECT id FROM keel_workers").await;
    assert_eq!(worker.len(), 1);
    execute(
        &url,
        &format!(
            "BEGIN; SELECT 1 FROM keel_workers WHERE id = '{0}' FOR UPDATE; \
             UPDATE keel_workers SET lease_until = clock_timestamp() WHERE id = '{0}'; COMMIT",
            worker[0]
        ),
    )
    .await;
    parked_runs_wait_in_the_database(&scratch, &url, &TestClock::new()).await;
    // The first engine's store broke when its lease ended: nothing of it to shut down but
    // its tasks.
    first.shutdown().await;
}

/// Two engines sharing the database each start a run of a type new to the list: both types
/// are listed (one key each: neither engine's write replaces the other's), so an engine that
/// lacks either one reads every run at its open and refuses it, naming the run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engines_sharing_a_database_keep_each_others_types() {
    let scratch = Scratch::new();
    let url = url_of(&scratch);
    let both = |name: &str| {
        Engine::builder(scratch.data.join(name))
            .postgres(&url)
            .clock(scratch.clock.clone())
            .leases(LEASES)
            .workflow::<Nap>()
            .workflow::<OtherNap>()
            .step::<Undoable>()
            .open()
    };
    let (a, b) = (both("a").await.unwrap(), both("b").await.unwrap());
    let input = || NapInput {
        log: scratch.log.clone(),
    };
    a.start::<Nap>("nap", input()).await.unwrap();
    b.start::<OtherNap>("other", input()).await.unwrap();
    // Each run's compensable step started (and listed its kind) before the shutdowns.
    for _ in 0..3_000 {
        let done = ground_truth::read(std::path::Path::new(&scratch.log));
        if ["nap", "other"]
            .iter()
            .all(|run| done.iter().any(|e| e.run == *run))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    a.shutdown().await;
    b.shutdown().await;
    let listed = query_texts(
        &url,
        "SELECT key FROM keel_keyed WHERE space = 'types-used' ORDER BY key",
    )
    .await;
    assert_eq!(
        listed,
        [
            "complete",
            "s:test.undoable",
            "w:test.pg-nap",
            "w:test.pg-other-nap"
        ],
    );

    let refused = Engine::builder(scratch.data.join("c"))
        .postgres(&url)
        .clock(scratch.clock.clone())
        .leases(LEASES)
        .workflow::<OtherNap>()
        .step::<Undoable>()
        .open()
        .await;
    match refused {
        Err(keel::EngineError::Unregistered { runs, examples, .. }) => {
            assert_eq!(runs, 1);
            assert_eq!(examples, "nap");
        }
        other => panic!("expected Unregistered, got {other:?}"),
    }
}

/// A run parked in a receive with no deadline has no wake time: once its engine is gone, no
/// claim takes it and no claim loop sleeps for it (nothing sleeps on the other engine's
/// clock); a send through another engine takes it over and it finishes there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receive_whose_engine_is_gone_waits_for_a_send() {
    let scratch = Scratch::new();
    let url = url_of(&scratch);
    let first = open(&scratch, &scratch.clock).await;
    first.start::<Receiver>("inbox", ()).await.unwrap();
    all_parked(&first, 1).await;
    assert_eq!(wake_times(&url).await, vec![i64::MAX.to_string()]);
    first.shutdown().await;
    drop(first);

    let second_clock = TestClock::new();
    let second = open(&scratch, &second_clock).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(second.resident(), Resident::default());
    assert_eq!(
        count(&url, "SELECT count(*)::text FROM keel_claims").await,
        0,
        "no run claimed"
    );
    assert_eq!(second_clock.next_wake_ms(), None, "nothing sleeps for it");
    second.send("inbox", "go", &7u32, "go-1").await.unwrap();
    let record = ended(&second, "inbox").await;
    assert_eq!(record.output, Some(serde_json::json!(7)));
    second.shutdown().await;
}

/// A change of a run's owner made by SQL alone, as a worker of an earlier version claims or
/// takes a run (it writes no wake times), makes the run due in the database: its new owner
/// can never leave it parked at a time it did not set. Once that owner is gone, the next
/// open claims it at once, and it parks again at its own time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_of_owner_makes_a_run_due() {
    let scratch = Scratch::new();
    let url = url_of(&scratch);
    let first = open(&scratch, &scratch.clock).await;
    first
        .start::<Nap>(
            "nap",
            NapInput {
                log: scratch.log.clone(),
            },
        )
        .await
        .unwrap();
    all_parked(&first, 1).await;
    let wake_ms = TestClock::START_MS + HOUR_MS;
    assert_eq!(wake_times(&url).await, vec![wake_ms.to_string()]);
    first.shutdown().await;
    drop(first);

    // A worker of an earlier version, gone since.
    execute(
        &url,
        "INSERT INTO keel_workers (id, name, host, pid, started_at, lease_until) \
         VALUES ('an-earlier-worker', 'earlier', 'host', 1, now(), now() - interval '1 minute'); \
         UPDATE keel_runs SET owner = 'an-earlier-worker', epoch = epoch + 1 WHERE id = 'nap'",
    )
    .await;
    assert_eq!(
        query_texts(&url, "SELECT wake_at::text FROM keel_runs").await,
        vec!["0".to_string()],
        "due once its owner changed"
    );
    let second_clock = TestClock::new();
    let second = open(&scratch, &second_clock).await;
    all_parked(&second, 1).await;
    assert_eq!(wake_times(&url).await, vec![wake_ms.to_string()]);
    second_clock.advance_to(wake_ms);
    ended(&second, "nap").await;
    assert_eq!(
        effects_of(&scratch, "nap"),
        [(Action::Do, 0, 1), (Action::Do, 2, 1)]
    );
    second.shutdown().await;
}
