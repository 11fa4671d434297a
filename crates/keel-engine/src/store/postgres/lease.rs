//! Leases: which worker drives which run, and for how long nobody else may.
//!
//! Every engine on the database is a worker with a row in `keel_workers` and a lease it
//! renews on a connection of its own (so that a slow commit never delays a renewal). A run is
//! owned by at most one worker (`keel_runs.owner`) and carries an epoch that every change of
//! owner increments: the token the owner's writes are checked against (`writer.rs`).
//!
//! The protocol (docs/guarantees.md repeats it for users):
//! 1. Opening registers the worker with a lease of [`Leases::length`] from the database's
//!    clock, under a fresh id and its name (the host and the engine's directory), and ends
//!    the lease of any earlier worker of the same name at once: a worker restarted after a
//!    crash takes its runs back without waiting for its old lease to run out (were the old
//!    one still alive, it is fenced like any other). Every [`Leases::renew_every`] the
//!    worker extends its lease, only while it has not expired. A renewal that finds it expired, or that cannot reach the database before the
//!    lease would have expired by the worker's own clock, loses the lease: the store fails
//!    for good (every later sync fails) and the engine stops.
//! 2. A new run is owned by the worker that created it, at epoch 1.
//! 3. Every [`Leases::claim_every`], a worker claims running and compensating runs whose owner
//!    is gone (no owner, or an owner whose lease expired) and that are due (their wake time,
//!    `keel_runs.wake_at`, has come by the claimer's clock): it sets itself as owner and
//!    increments the epoch, skipping rows another transaction holds (`FOR UPDATE SKIP
//!    LOCKED`), and records the claim in `keel_claims`. A run parked until later stays with
//!    its gone owner until its time, or until an operator call or a send takes it over.
//! 4. An operator call on a run another worker owns takes the run over the same way, waiting
//!    for the owner's open transaction: the owner's next write to it is refused.
//! 5. Every journal append and record change is made only if the run's owner and epoch are
//!    still those the writer's cell was loaded with, read `FOR SHARE` in the same transaction
//!    as the write: a claim skips the row while that transaction holds it, a takeover waits
//!    for it, and a write after either finds the new epoch and is dropped. The engine learns it at its next sync and stops driving the
//!    run.
//! 6. Shutting down, once every write is committed, gives every owned run up (owner cleared)
//!    and deletes the worker's row: the others claim its runs at once.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{mpsc, oneshot, watch};
use tokio_postgres::Client;

use crate::error::{EngineError, Result};
use crate::ids::RunId;
use crate::store::{Space, Takeover, Token};

use super::renewer::Renewer;
use super::writer::Fenced;

/// How a worker holds its runs on a shared database.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Leases {
    /// How long a worker's runs stay its own without a renewal: the longest another worker
    /// waits before it takes them over.
    pub length: Duration,
    /// How often a worker renews its lease; well under `length`.
    pub renew_every: Duration,
    /// How often a worker looks for runs whose owner is gone.
    pub claim_every: Duration,
}

impl Default for Leases {
    /// A 5 s lease renewed every second, and a claim every second: a dead worker's runs move
    /// within about 6 s plus their loading.
    fn default() -> Leases {
        Leases {
            length: Duration::from_secs(5),
            renew_every: Duration::from_secs(1),
            claim_every: Duration::from_secs(1),
        }
    }
}

impl Leases {
    /// Refuses settings that could not keep a lease: a lease of at least 1 s (the writer's
    /// transactions stay open up to 200 ms, and the server ends a session idle in one for a
    /// lease), renewals and claims at least every 10 ms, and a renewal at most a third of
    /// the lease (a renewal may be late by one interval).
    pub(crate) fn check(&self) -> std::result::Result<(), String> {
        let floor = Duration::from_millis(10);
        if self.length < Duration::from_secs(1) {
            return Err(format!("a lease must be at least 1 s: {self:?}"));
        }
        if self.renew_every < floor || self.claim_every < floor {
            return Err(format!(
                "lease renewals and claims must be at least 10 ms apart: {self:?}"
            ));
        }
        if self.renew_every * 3 > self.length {
            return Err(format!(
                "the lease renewal ({:?}) must be at most a third of the lease ({:?})",
                self.renew_every, self.length
            ));
        }
        Ok(())
    }
}

/// Claims runs whose owner is gone and that are due: running ones of a workflow in `$3` and
/// compensating ones (whose saga needs step kinds, not the workflow), owned by nobody or by a
/// worker whose lease expired, whose wake time is at or before `$4` (the claimer's clock, in
/// ms), the most overdue first; only while the claimer's own lease holds. `$1` the worker,
/// `$2` the most runs. A run parked until later stays where it is until its time (or until
/// something arrives for it: a send takes it over).
///
/// The candidates are read per gone owner, from the indexes the next wake time uses (no
/// owner; each expired worker's runs by time), so that runs of live workers, loaded or
/// parked, cost a claim nothing. Each is then locked and checked again (`NOT EXISTS` rather
/// than a join: a row another claim changed meanwhile is rechecked against its new owner's
/// lease).
const CLAIM: &str = "
    WITH candidates AS (
        (SELECT r.id FROM keel_runs r
         WHERE r.owner IS NULL AND r.status IN ('running', 'compensating') AND r.wake_at <= $4
           AND (r.status = 'compensating' OR (r.record::jsonb ->> 'workflow') = ANY($3))
         ORDER BY r.wake_at LIMIT $2)
        UNION ALL
        (SELECT first.id FROM keel_workers w,
            LATERAL (SELECT r.id FROM keel_runs r
                     WHERE r.owner = w.id AND r.status IN ('running', 'compensating')
                       AND r.wake_at <= $4
                       AND (r.status = 'compensating'
                            OR (r.record::jsonb ->> 'workflow') = ANY($3))
                     ORDER BY r.wake_at LIMIT $2) first
         WHERE w.lease_until < clock_timestamp())),
    due AS (
        SELECT r.id FROM keel_runs r
        WHERE r.id IN (SELECT id FROM candidates)
          AND r.status IN ('running', 'compensating') AND r.wake_at <= $4
          AND (r.status = 'compensating' OR (r.record::jsonb ->> 'workflow') = ANY($3))
          AND NOT EXISTS (SELECT 1 FROM keel_workers w
                          WHERE w.id = r.owner AND w.lease_until >= clock_timestamp())
          AND EXISTS (SELECT 1 FROM keel_workers me
                      WHERE me.id = $1 AND me.lease_until > clock_timestamp())
        ORDER BY r.wake_at, r.id LIMIT $2
        FOR UPDATE OF r SKIP LOCKED),
    claimed AS (
        UPDATE keel_runs r SET owner = $1, epoch = r.epoch + 1
        FROM due WHERE r.id = due.id
        RETURNING r.id, r.epoch),
    logged AS (
        INSERT INTO keel_claims (run_id, epoch, worker, claimed_at)
        SELECT id, epoch, $1, clock_timestamp() FROM claimed)
    SELECT id, epoch FROM claimed";

/// The earliest wake time after `$1` of a running or compensating run whose owner is gone:
/// owned by nobody (from the index of such runs), or by a worker whose lease expired (each
/// such worker's earliest, from the index on owner and wake time), so that runs parked by
/// live workers cost nothing. Runs waiting only for something to arrive (the largest bigint)
/// have no time.
const NEXT_WAKE: &str = "
    SELECT min(next.wake_at) FROM (
        (SELECT r.wake_at FROM keel_runs r
         WHERE r.owner IS NULL AND r.status IN ('running', 'compensating')
           AND r.wake_at > $1 AND r.wake_at < 9223372036854775807
         ORDER BY r.wake_at LIMIT 1)
        UNION ALL
        (SELECT first.wake_at FROM keel_workers w,
            LATERAL (SELECT r.wake_at FROM keel_runs r
                     WHERE r.owner = w.id AND r.status IN ('running', 'compensating')
                       AND r.wake_at > $1 AND r.wake_at < 9223372036854775807
                     ORDER BY r.wake_at LIMIT 1) first
         WHERE w.lease_until < clock_timestamp())) next";

/// Takes run `$2` for worker `$1` from another owner, waiting for a transaction that holds
/// it; from a live owner only when `$3`; only while the taker's own lease holds. Returns the
/// new epoch, and whether the owner it was taken from was live.
const TAKE: &str = "
    WITH before AS (
        SELECT r.id, EXISTS (SELECT 1 FROM keel_workers w
                             WHERE w.id = r.owner AND w.lease_until >= clock_timestamp()) AS live
        FROM keel_runs r
        WHERE r.id = $2 AND r.owner IS DISTINCT FROM $1
          AND EXISTS (SELECT 1 FROM keel_workers me
                      WHERE me.id = $1 AND me.lease_until > clock_timestamp())
        FOR UPDATE OF r),
    taken AS (
        UPDATE keel_runs r SET owner = $1, epoch = r.epoch + 1
        FROM before WHERE r.id = before.id AND ($3 OR NOT before.live)
        RETURNING r.id, r.epoch, before.live),
    logged AS (
        INSERT INTO keel_claims (run_id, epoch, worker, claimed_at)
        SELECT id, epoch, $1, clock_timestamp() FROM taken)
    SELECT epoch, live FROM taken";

/// The runs a claim took, with their tokens, and the earliest wake time after the claim's of
/// a run whose owner is gone.
type ClaimedRuns = (Vec<(RunId, Token)>, Option<u64>);

/// What the control task is asked.
enum Ask {
    Claim {
        limit: i64,
        workflows: Vec<String>,
        now_ms: i64,
        reply: oneshot::Sender<Result<ClaimedRuns>>,
    },
    Take {
        id: RunId,
        takeover: Takeover,
        reply: oneshot::Sender<Result<Option<Taken>>>,
    },
    /// A keyed record, unless one is there, committed on its own.
    AddKeyed {
        space: Space,
        key: String,
        value: String,
        reply: oneshot::Sender<Result<()>>,
    },
}

/// What a takeover found.
#[derive(Clone, Copy, Debug)]
struct Taken {
    token: Token,
    /// Whether the run was taken now (else this worker owned it already).
    now: bool,
    /// Whether it was taken from a worker whose lease held.
    from_live: bool,
}

/// This worker's identity and the tasks that keep its lease and claim runs for it.
pub(crate) struct Lease {
    /// The worker's id: unique to this open of the engine.
    pub(crate) worker: String,
    /// The worker's name: the host and the engine's directory, the same across restarts.
    pub(crate) name: String,
    asks: mpsc::UnboundedSender<Ask>,
    /// Set to stop renewing (the engine shut down).
    stop: watch::Sender<bool>,
    database: String,
    /// When the lease ends by this worker's clock (the renewer moves it on).
    valid_until: Arc<Mutex<Instant>>,
    leases: Leases,
    fences: Fenced,
}

/// The host, and a worker id: the host, the process, and randomness, so that no two opens
/// share one.
fn worker_id() -> (String, String) {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "host".into());
    let id = format!(
        "{host}-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    );
    (host, id)
}

/// Whether a lease that ends at `valid_until` (by this worker's clock) still holds.
pub(super) fn held(valid_until: &Mutex<Instant>) -> bool {
    Instant::now() < *valid_until.lock().expect("lease lock")
}

fn failed(database: &str, source: tokio_postgres::Error) -> EngineError {
    EngineError::Database {
        database: database.to_string(),
        source: Box::new(source),
    }
}

/// A worker as registered: its id and name, when the database registered it, and the
/// processes of live earlier workers of its name on this host whose lease it ended.
struct Registered {
    worker: String,
    name: String,
    at: SystemTime,
    live_predecessors: Vec<i32>,
}

/// Registers a new worker named `name` with a lease of `length`, ending the lease of earlier
/// workers of the same name (step 1 of the protocol).
async fn register(
    client: &Client,
    database: &str,
    name: &str,
    length: Duration,
) -> Result<Registered> {
    let (host, worker) = worker_id();
    let name = format!("{host}:{name}");
    let row = client
        .query_one(
            "INSERT INTO keel_workers (id, name, host, pid, started_at, lease_until) \
             VALUES ($1, $2, $3, $4, clock_timestamp(), \
                     clock_timestamp() + $5::bigint * interval '1 millisecond') \
             RETURNING started_at",
            &[
                &worker,
                &name,
                &host,
                &(std::process::id() as i32),
                &(length.as_millis() as i64),
            ],
        )
        .await
        .map_err(|e| failed(database, e))?;
    // Each earlier worker's row is locked before its lease is ended, so that the end is
    // stamped after every write that worker made (each holds the row `FOR SHARE`).
    let superseded = client
        .query(
            "WITH earlier AS (SELECT id FROM keel_workers \
                 WHERE name = $1 AND id <> $2 AND lease_until > clock_timestamp() FOR UPDATE) \
             UPDATE keel_workers w SET lease_until = clock_timestamp() \
             FROM earlier WHERE w.id = earlier.id RETURNING w.pid",
            &[&name, &worker],
        )
        .await
        .map_err(|e| failed(database, e))?;
    // A predecessor in this process was dropped by its caller; one in another live process
    // on this host may still be in a step.
    let me = std::process::id() as i32;
    let live_predecessors = superseded
        .iter()
        .map(|row| row.get::<_, i32>(0))
        .filter(|pid| *pid != me && std::path::Path::new(&format!("/proc/{pid}")).exists())
        .collect();
    Ok(Registered {
        worker,
        name,
        at: row.get(0),
        live_predecessors,
    })
}

impl Lease {
    /// Registers a new worker on the database with a lease of `leases.length`, and starts
    /// renewing it on the first connection and answering claims on the second. `lost` is
    /// called once, with the reason, if the lease is lost. A live earlier worker of the same
    /// name (the same directory on this host) loses its lease here; opening then waits two
    /// renewals, so that it has stopped its steps before this one claims its runs.
    pub(crate) async fn start(
        connections: [Client; 2],
        database: &str,
        leases: Leases,
        name: &str,
        fences: Fenced,
        lost: impl FnOnce(String) + Send + 'static,
    ) -> Result<Lease> {
        let [renewals, control] = connections;
        let sent = Instant::now();
        let registered = register(&renewals, database, name, leases.length).await?;
        let Registered { worker, name, .. } = &registered;
        tracing::info!(%worker, %name, database, lease = ?leases.length, "worker registered");
        if !registered.live_predecessors.is_empty() {
            tracing::warn!(%worker, pids = ?registered.live_predecessors, "an earlier worker of this name is still running: its lease is ended; waiting for it to stop");
            tokio::time::sleep(leases.renew_every * 2).await;
        }
        let (stop, stopped) = watch::channel(false);
        let valid_until = Arc::new(Mutex::new(sent + leases.length));
        let renewer = Renewer {
            client: renewals,
            worker: registered.worker.clone(),
            database: database.to_string(),
            leases,
            valid_until: Arc::clone(&valid_until),
            fences: Arc::clone(&fences),
            since: registered.at,
        };
        tokio::spawn(renewer.serve(stopped, lost));
        let (asks, requests) = mpsc::unbounded_channel();
        let control_worker = registered.worker.clone();
        tokio::spawn(control_task(
            control,
            control_worker,
            database.to_string(),
            requests,
        ));
        Ok(Lease {
            worker: registered.worker,
            name: registered.name,
            asks,
            stop,
            database: database.to_string(),
            valid_until,
            leases,
            fences,
        })
    }

    /// Claims up to `limit` runs of `workflows` whose owner is gone and whose wake time is at
    /// or before `now_ms` (step 3 of the protocol); returns them, and the earliest wake time
    /// after `now_ms` of a run whose owner is gone.
    pub(crate) async fn claim(
        &self,
        limit: i64,
        workflows: Vec<String>,
        now_ms: u64,
    ) -> Result<ClaimedRuns> {
        let (reply, answer) = oneshot::channel();
        self.ask(Ask::Claim {
            limit,
            workflows,
            now_ms: super::wake_column(now_ms),
            reply,
        })?;
        let (claimed, next_wake_ms) = answer.await.map_err(|_| self.stopped())??;
        for (id, token) in &claimed {
            self.fences.claimed(id.clone(), token.0);
        }
        Ok((claimed, next_wake_ms))
    }

    /// The token to write run `id` with: its current one if this worker owns it, a new one
    /// if it took the run over (as `takeover` allows); `None` when another worker keeps it or
    /// the run does not exist.
    ///
    /// A run taken from a live worker is returned only after two renewal intervals: that
    /// worker learns of the claim at its next renewal (`renewer.rs`) and stops its steps of
    /// the run before then, so that the two never act on the run at once.
    pub(crate) async fn take(&self, id: &RunId, takeover: Takeover) -> Result<Option<Token>> {
        let (reply, answer) = oneshot::channel();
        self.ask(Ask::Take {
            id: id.clone(),
            takeover,
            reply,
        })?;
        let Some(taken) = answer.await.map_err(|_| self.stopped())?? else {
            return Ok(None);
        };
        if taken.now {
            self.fences.claimed(id.clone(), taken.token.0);
        }
        if taken.from_live {
            tokio::time::sleep(self.leases.renew_every * 2).await;
        }
        Ok(Some(taken.token))
    }

    /// Writes the keyed record `key` of `space` unless one is there, committed on its own
    /// (see [`crate::store::JournalStore::add_keyed`]).
    pub(crate) async fn add_keyed(&self, space: Space, key: &str, value: &str) -> Result<()> {
        let (reply, answer) = oneshot::channel();
        self.ask(Ask::AddKeyed {
            space,
            key: key.to_string(),
            value: value.to_string(),
            reply,
        })?;
        answer.await.map_err(|_| self.stopped())?
    }

    /// Whether the lease holds by this worker's clock: it started no later than the database
    /// started it, so it ends no later either (clocks drift far less than a lease).
    pub(crate) fn held(&self) -> bool {
        held(&self.valid_until)
    }

    /// When the lease ends by this worker's clock, as the renewer moves it on: the writer
    /// checks it before each COMMIT.
    pub(crate) fn valid_until(&self) -> Arc<Mutex<Instant>> {
        Arc::clone(&self.valid_until)
    }

    /// Stops renewing: the engine is shutting down and gives its runs up.
    pub(crate) fn stop(&self) {
        self.stop.send_replace(true);
    }

    fn ask(&self, ask: Ask) -> Result<()> {
        self.asks.send(ask).map_err(|_| self.stopped())
    }

    fn stopped(&self) -> EngineError {
        EngineError::Database {
            database: self.database.clone(),
            source: "the lease's control connection has stopped".into(),
        }
    }
}

/// Answers claims, takeovers and the keyed records added on their own (`add_keyed`), one at a
/// time, on a connection of their own, each statement its own transaction.
async fn control_task(
    client: Client,
    worker: String,
    database: String,
    mut asks: mpsc::UnboundedReceiver<Ask>,
) {
    while let Some(ask) = asks.recv().await {
        match ask {
            Ask::Claim {
                limit,
                workflows,
                now_ms,
                reply,
            } => {
                let rows = client
                    .query(CLAIM, &[&worker, &limit, &workflows, &now_ms])
                    .await;
                let claimed: Result<Vec<(RunId, Token)>> =
                    rows.map_err(|e| failed(&database, e)).and_then(|rows| {
                        rows.iter()
                            .map(|row| {
                                let id: String = row.get(0);
                                let id = RunId::existing(id)?;
                                Ok((id, Token(row.get(1))))
                            })
                            .collect()
                    });
                if let Ok(claimed) = &claimed {
                    for (id, Token(epoch)) in claimed.iter() {
                        tracing::info!(run_id = %id, epoch, %worker, "run claimed: its owner is gone");
                    }
                }
                let answer = match claimed {
                    // A full batch: more may be due now.
                    Ok(claimed) if claimed.len() as i64 >= limit => {
                        Ok((claimed, u64::try_from(now_ms).ok()))
                    }
                    Ok(claimed) => {
                        let next = next_wake(&client, now_ms).await;
                        Ok((claimed, next))
                    }
                    Err(error) => Err(error),
                };
                let _ = reply.send(answer);
            }
            Ask::Take {
                id,
                takeover,
                reply,
            } => {
                let _ = reply.send(take(&client, &worker, &database, &id, takeover).await);
            }
            Ask::AddKeyed {
                space,
                key,
                value,
                reply,
            } => {
                let added = client
                    .execute(
                        "INSERT INTO keel_keyed (space, key, value) VALUES ($1, $2, $3) \
                         ON CONFLICT (space, key) DO NOTHING",
                        &[&space.as_str(), &key, &value],
                    )
                    .await;
                let _ = reply.send(added.map(drop).map_err(|e| failed(&database, e)));
            }
        }
    }
}

/// The earliest wake time after `now_ms` of a run whose owner is gone ([`NEXT_WAKE`]); `None`
/// when there is none, or when the query failed (logged: the runs claimed before it are this
/// worker's already, and must still be adopted; claims go on every interval).
async fn next_wake(client: &Client, now_ms: i64) -> Option<u64> {
    match client.query_one(NEXT_WAKE, &[&now_ms]).await {
        Ok(row) => row
            .get::<_, Option<i64>>(0)
            .and_then(|ms| u64::try_from(ms).ok()),
        Err(error) => {
            tracing::warn!(%error, "the next wake time of the runs whose owner is gone could not be read");
            None
        }
    }
}

async fn take(
    client: &Client,
    worker: &str,
    database: &str,
    id: &RunId,
    takeover: Takeover,
) -> Result<Option<Taken>> {
    let from_live = takeover == Takeover::Always;
    let taken = client
        .query_opt(TAKE, &[&worker, &id.as_str(), &from_live])
        .await
        .map_err(|e| failed(database, e))?;
    if let Some(row) = taken {
        let (epoch, live): (i64, bool) = (row.get(0), row.get(1));
        tracing::info!(run_id = %id, epoch, %worker, from_live = live, "run taken over");
        return Ok(Some(Taken {
            token: Token(epoch),
            now: true,
            from_live: live,
        }));
    }
    let own = client
        .query_opt(
            "SELECT epoch FROM keel_runs WHERE id = $1 AND owner = $2",
            &[&id.as_str(), &worker],
        )
        .await
        .map_err(|e| failed(database, e))?;
    Ok(own.map(|row| Taken {
        token: Token(row.get(0)),
        now: false,
        from_live: false,
    }))
}
