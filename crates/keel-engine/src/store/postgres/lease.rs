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
//!    is gone (no owner, or an owner whose lease expired): it sets itself as owner and
//!    increments the epoch, skipping rows another transaction holds (`FOR UPDATE SKIP
//!    LOCKED`), and records the claim in `keel_claims`.
//! 4. An operator call on a run another worker owns takes the run over the same way, waiting
//!    for the owner's open transaction: the owner's next write to it is refused.
//! 5. Every journal append and record change is made only if the run's owner and epoch are
//!    still those the writer's cell was loaded with, read `FOR SHARE` in the same transaction
//!    as the write: a claim waits for that transaction, and a write after a claim finds the
//!    new epoch and is dropped. The engine learns it at its next sync and stops driving the
//!    run.
//! 6. Shutting down, once every write is committed, gives every owned run up (owner cleared)
//!    and deletes the worker's row: the others claim its runs at once.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};
use tokio_postgres::Client;

use crate::error::{EngineError, Result};
use crate::ids::RunId;
use crate::store::{Takeover, Token};

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
    /// Refuses settings that could not keep a lease: each duration at least 10 ms, and a
    /// renewal at most a third of the lease (a renewal may be late by one interval).
    pub(crate) fn check(&self) -> std::result::Result<(), String> {
        let floor = Duration::from_millis(10);
        if self.length < floor || self.renew_every < floor || self.claim_every < floor {
            return Err(format!("lease durations must be at least 10 ms: {self:?}"));
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

/// Claims a run's owner is gone from: running or compensating, owned by nobody or by a
/// worker whose lease expired. `$1` the worker, `$2` the most runs.
const CLAIM: &str = "
    WITH due AS (
        SELECT r.id FROM keel_runs r LEFT JOIN keel_workers w ON w.id = r.owner
        WHERE r.status IN ('running', 'compensating')
          AND (w.id IS NULL OR w.lease_until < clock_timestamp())
        ORDER BY r.id LIMIT $2
        FOR UPDATE OF r SKIP LOCKED),
    claimed AS (
        UPDATE keel_runs r SET owner = $1, epoch = r.epoch + 1
        FROM due WHERE r.id = due.id
        RETURNING r.id, r.epoch),
    logged AS (
        INSERT INTO keel_claims (run_id, epoch, worker, claimed_at)
        SELECT id, epoch, $1, clock_timestamp() FROM claimed)
    SELECT id, epoch FROM claimed";

/// Takes run `$2` for worker `$1` if another worker owns it; `$3` whether a live owner
/// counts (false: only a run nobody holds is taken).
const TAKE: &str = "
    WITH taken AS (
        UPDATE keel_runs r SET owner = $1, epoch = r.epoch + 1
        WHERE r.id = $2 AND r.owner IS DISTINCT FROM $1
          AND ($3 OR NOT EXISTS (SELECT 1 FROM keel_workers w
                                 WHERE w.id = r.owner AND w.lease_until >= clock_timestamp()))
        RETURNING r.id, r.epoch),
    logged AS (
        INSERT INTO keel_claims (run_id, epoch, worker, claimed_at)
        SELECT id, epoch, $1, clock_timestamp() FROM taken)
    SELECT epoch FROM taken";

/// What the control task is asked.
enum Ask {
    Claim {
        limit: i64,
        reply: oneshot::Sender<Result<Vec<(RunId, Token)>>>,
    },
    Take {
        id: RunId,
        takeover: Takeover,
        reply: oneshot::Sender<Result<Option<Token>>>,
    },
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

fn failed(database: &str, source: tokio_postgres::Error) -> EngineError {
    EngineError::Database {
        database: database.to_string(),
        source: Box::new(source),
    }
}

impl Lease {
    /// Registers a new worker on the database with a lease of `leases.length`, and starts
    /// renewing it on `renewals` and answering claims on `control` (two connections of its
    /// own). `lost` is called once, with the reason, if the lease is lost.
    pub(crate) async fn start(
        connections: [Client; 2],
        database: String,
        leases: Leases,
        name: &str,
        lost: impl FnOnce(String) + Send + 'static,
    ) -> Result<Lease> {
        let [renewals, control] = connections;
        let (host, worker) = worker_id();
        let name = format!("{host}:{name}");
        let length_ms = leases.length.as_millis() as i64;
        let sent = Instant::now();
        renewals
            .execute(
                "INSERT INTO keel_workers (id, name, host, pid, started_at, lease_until) \
                 VALUES ($1, $2, $3, $4, clock_timestamp(), \
                         clock_timestamp() + $5::bigint * interval '1 millisecond')",
                &[
                    &worker,
                    &name,
                    &host,
                    &(std::process::id() as i32),
                    &length_ms,
                ],
            )
            .await
            .map_err(|e| failed(&database, e))?;
        let superseded = renewals
            .execute(
                "UPDATE keel_workers SET lease_until = clock_timestamp() \
                 WHERE name = $1 AND id <> $2 AND lease_until > clock_timestamp()",
                &[&name, &worker],
            )
            .await
            .map_err(|e| failed(&database, e))?;
        tracing::info!(%worker, %name, database = %database, lease = ?leases.length, superseded, "worker registered");
        let (stop, stopped) = watch::channel(false);
        let valid_until = Arc::new(Mutex::new(sent + leases.length));
        let renewer = Renewer {
            client: renewals,
            worker: worker.clone(),
            database: database.clone(),
            leases,
            valid_until: Arc::clone(&valid_until),
        };
        tokio::spawn(renewer.serve(stopped, lost));
        let (asks, requests) = mpsc::unbounded_channel();
        tokio::spawn(control_task(
            control,
            worker.clone(),
            database.clone(),
            requests,
        ));
        Ok(Lease {
            worker,
            name,
            asks,
            stop,
            database,
            valid_until,
        })
    }

    /// Claims up to `limit` runs whose owner is gone (step 3 of the protocol).
    pub(crate) async fn claim(&self, limit: i64) -> Result<Vec<(RunId, Token)>> {
        let (reply, answer) = oneshot::channel();
        self.ask(Ask::Claim { limit, reply })?;
        answer.await.map_err(|_| self.stopped())?
    }

    /// The token to write run `id` with: its current one if this worker owns it, a new one
    /// if it took the run over (as `takeover` allows); `None` when another worker keeps it or
    /// the run does not exist.
    pub(crate) async fn take(&self, id: &RunId, takeover: Takeover) -> Result<Option<Token>> {
        let (reply, answer) = oneshot::channel();
        self.ask(Ask::Take {
            id: id.clone(),
            takeover,
            reply,
        })?;
        answer.await.map_err(|_| self.stopped())?
    }

    /// Whether the lease holds by this worker's clock: it started no later than the database
    /// started it, so it ends no later either (clocks drift far less than a lease).
    pub(crate) fn held(&self) -> bool {
        Instant::now() < *self.valid_until.lock().expect("lease lock")
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

/// Keeps the lease (step 1 of the protocol).
struct Renewer {
    client: Client,
    worker: String,
    database: String,
    leases: Leases,
    /// When the lease ends by this worker's clock: the send time of the last renewal that
    /// succeeded, plus the lease (the database's clock started the lease later than that).
    valid_until: Arc<Mutex<Instant>>,
}

impl Renewer {
    async fn serve(mut self, mut stopped: watch::Receiver<bool>, lost: impl FnOnce(String)) {
        let mut tick = tokio::time::interval(self.leases.renew_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stopped.wait_for(|stop| *stop) => return,
            }
            if let Err(why) = self.renew().await {
                if *stopped.borrow() {
                    return;
                }
                // Known lost: nothing of this worker's runs goes on from now.
                *self.valid_until.lock().expect("lease lock") = Instant::now();
                tracing::error!(worker = %self.worker, database = %self.database, %why, "lease lost: this worker stops driving runs");
                lost(why);
                return;
            }
        }
    }

    /// Extends the lease, or says why it is lost. A renewal that fails for want of the
    /// database is retried until the lease would have ended by this worker's clock.
    async fn renew(&mut self) -> std::result::Result<(), String> {
        let length_ms = self.leases.length.as_millis() as i64;
        loop {
            let sent = Instant::now();
            let valid_until = *self.valid_until.lock().expect("lease lock");
            if sent >= valid_until {
                return Err(format!(
                    "the lease of {:?} ended before it could be renewed",
                    self.leases.length
                ));
            }
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] =
                [&self.worker, &length_ms];
            let renewal = self.client.execute(
                "UPDATE keel_workers \
                 SET lease_until = clock_timestamp() + $2::bigint * interval '1 millisecond' \
                 WHERE id = $1 AND lease_until > clock_timestamp()",
                &params,
            );
            let left = valid_until - sent;
            match tokio::time::timeout(left, renewal).await {
                Ok(Ok(1)) => {
                    *self.valid_until.lock().expect("lease lock") = sent + self.leases.length;
                    return Ok(());
                }
                Ok(Ok(_)) => {
                    return Err(
                        "the database says the lease expired (another worker may own its runs now)"
                            .into(),
                    );
                }
                Ok(Err(error)) if error.is_closed() => {
                    return Err(format!("the lease's connection is gone: {error}"));
                }
                Ok(Err(error)) => {
                    tracing::warn!(worker = %self.worker, %error, "lease renewal failed; retrying");
                    tokio::time::sleep(self.leases.renew_every / 4).await;
                }
                Err(_) => {
                    return Err(format!(
                        "the database did not answer a renewal before the lease of {:?} ended",
                        self.leases.length
                    ));
                }
            }
        }
    }
}

/// Answers claims and takeovers, one at a time, on a connection of their own.
async fn control_task(
    client: Client,
    worker: String,
    database: String,
    mut asks: mpsc::UnboundedReceiver<Ask>,
) {
    while let Some(ask) = asks.recv().await {
        match ask {
            Ask::Claim { limit, reply } => {
                let rows = client.query(CLAIM, &[&worker, &limit]).await;
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
                let _ = reply.send(claimed);
            }
            Ask::Take {
                id,
                takeover,
                reply,
            } => {
                let _ = reply.send(take(&client, &worker, &database, &id, takeover).await);
            }
        }
    }
}

async fn take(
    client: &Client,
    worker: &str,
    database: &str,
    id: &RunId,
    takeover: Takeover,
) -> Result<Option<Token>> {
    let from_live = takeover == Takeover::Always;
    let taken = client
        .query_opt(TAKE, &[&worker, &id.as_str(), &from_live])
        .await
        .map_err(|e| failed(database, e))?;
    if let Some(row) = taken {
        let epoch: i64 = row.get(0);
        tracing::info!(run_id = %id, epoch, %worker, ?takeover, "run taken over");
        return Ok(Some(Token(epoch)));
    }
    let own = client
        .query_opt(
            "SELECT epoch FROM keel_runs WHERE id = $1 AND owner = $2",
            &[&id.as_str(), &worker],
        )
        .await
        .map_err(|e| failed(database, e))?;
    Ok(own.map(|row| Token(row.get(0))))
}
