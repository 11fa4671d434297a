//! The writer: the one task that owns the store's connection. Requests arrive in order on one
//! channel; a write opens a transaction if none is open, a commit request ends it, and reads
//! run inside it when one is open (so they see the engine's own writes).

use std::collections::BTreeMap;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::{Client, Statement};

use crate::error::{EngineError, Result};
use crate::ids::{JournalIndex, RunId};
use crate::journal::{Entry, RunRecord, RunStatus};
use crate::store::{RunsScan, ScannedRuns, Space, Token};

mod queries;

/// How long a transaction may stay open with nothing asked of the writer.
const IDLE_COMMIT: std::time::Duration = std::time::Duration::from_millis(200);

/// A run record as its row holds it.
#[derive(Debug)]
pub(super) struct RecordRow {
    id: String,
    status: &'static str,
    parent: Option<String>,
    /// The record as JSON.
    text: String,
}

impl RecordRow {
    /// The row of `record`, encoded as `text`.
    pub(super) fn of(record: &RunRecord, text: String) -> RecordRow {
        RecordRow {
            id: record.id.as_str().to_string(),
            status: record.status.as_str(),
            parent: record.parent.as_ref().map(|p| p.as_str().to_string()),
            text,
        }
    }
}

type Reply<T> = oneshot::Sender<Result<T>>;

/// What the store asks of the writer.
#[derive(Debug)]
pub(super) enum Request {
    CreateRun {
        record: RecordRow,
        reply: Reply<Option<RunRecord>>,
    },
    Run {
        id: RunId,
        reply: Reply<Option<RunRecord>>,
    },
    Runs {
        reply: Reply<Vec<Result<RunRecord>>>,
    },
    RunsPage {
        scan: RunsScan,
        reply: Reply<ScannedRuns>,
    },
    RunCounts {
        reply: Reply<BTreeMap<RunStatus, u64>>,
    },
    Journal {
        id: RunId,
        reply: Reply<Vec<Entry>>,
    },
    Append {
        id: RunId,
        index: JournalIndex,
        entry: String,
        record: Option<RecordRow>,
        token: Token,
    },
    DeleteRuns {
        ids: Vec<RunId>,
        reply: Reply<()>,
    },
    LoadCount {
        id: RunId,
        reply: Reply<u32>,
    },
    SetLoadCount {
        id: RunId,
        loads: u32,
    },
    /// The run's wake time, as `keel_runs.wake_at` holds it.
    SetWake {
        id: RunId,
        wake_ms: i64,
    },
    PutStats {
        operation: String,
        record: Vec<u8>,
    },
    PutKeyed {
        space: Space,
        key: String,
        value: String,
    },
    DeleteKeyed {
        space: Space,
        key: String,
    },
    Keyed {
        space: Space,
        reply: Reply<Vec<(String, String)>>,
    },
    /// This worker's statistics records (`mine`), or the other workers'.
    Stats {
        mine: bool,
        reply: Reply<Vec<(String, Vec<u8>)>>,
    },
    /// Give the database up to the other workers: unacknowledged writes are rolled back,
    /// every run this worker owns given up, its worker row deleted, later writes refused.
    Release {
        reply: Reply<()>,
    },
    /// The lease is lost: the open transaction is rolled back and every later commit fails.
    Lose {
        why: String,
    },
    /// Commit what was written; answered with the failure that made it impossible, if any.
    /// (A std channel: the committer's thread waits for it with a timeout.)
    Commit {
        reply: std::sync::mpsc::SyncSender<std::result::Result<(), String>>,
    },
}

/// What the worker knows of runs it lost, shared with the store and the lease.
pub(super) type Fenced = Arc<super::fences::Fences>;

/// The hot statements, prepared once.
pub(super) struct Statements {
    append: Statement,
    update_record: Statement,
    /// A run's wake time, set only while this worker owns the run (a cell left over from
    /// before a takeover must not move the new owner's), and only when it changes (an
    /// update of the row touches every index on it).
    pub(super) set_wake: Statement,
    run: Statement,
    journal: Statement,
}

/// The owner of the connection.
pub(super) struct Writer {
    client: Client,
    database: String,
    /// This worker, as the runs' `owner` names it.
    worker: String,
    /// This worker's name, the same across its restarts: its statistics' key.
    name: String,
    fenced: Fenced,
    /// When this worker's lease ends by its own clock (`Lease::valid_until`).
    lease_until: Arc<std::sync::Mutex<std::time::Instant>>,
    statements: Statements,
    /// Whether a transaction is open.
    open: bool,
    /// Why the open transaction cannot commit; final, as a failed sync is on sled.
    failure: Option<String>,
    /// Whether the engine gave the database up (`Request::Release`): writes are refused.
    released: bool,
}

impl Writer {
    /// Prepares the writer's statements on `client`.
    pub(super) async fn new(
        client: Client,
        database: String,
        [worker, name]: [String; 2],
        fenced: Fenced,
        lease_until: Arc<std::sync::Mutex<std::time::Instant>>,
    ) -> Result<Writer> {
        let prepare = |sql: &'static str| {
            let client = &client;
            let database = &database;
            async move {
                client
                    .prepare(sql)
                    .await
                    .map_err(|e| EngineError::Database {
                        database: database.clone(),
                        source: Box::new(e),
                    })
            }
        };
        let statements = Statements {
            // Written only while the run's owner and epoch are the writer's and the writer's
            // lease has not expired at the very time the row says it was written (a lease
            // that expired is never renewed). Both rows are read `FOR SHARE`: a takeover of
            // the run, or an end put to the lease (a newer worker of the same name), waits
            // for this transaction, and this waits for theirs and then reads their rows anew.
            append: prepare(
                "INSERT INTO keel_journal (run_id, position, entry, epoch, written_by, written_at) \
                 SELECT $1, $2, $3, $4, $5, now.at \
                 FROM (SELECT clock_timestamp() AS at) now, keel_runs r, keel_workers w \
                 WHERE r.id = $1 AND r.owner = $5 AND r.epoch = $4 \
                   AND w.id = $5 AND w.lease_until > now.at \
                 FOR SHARE OF r, w \
                 ON CONFLICT (run_id, position) DO UPDATE SET entry = EXCLUDED.entry, \
                   epoch = EXCLUDED.epoch, written_by = EXCLUDED.written_by, \
                   written_at = EXCLUDED.written_at",
            )
            .await?,
            update_record: prepare(
                "UPDATE keel_runs SET status = $2, parent = $3, record = $4 \
                 WHERE id = $1 AND owner = $6 AND epoch = $5",
            )
            .await?,
            set_wake: prepare(
                "UPDATE keel_runs SET wake_at = $2 \
                 WHERE id = $1 AND owner = $3 AND wake_at <> $2",
            )
            .await?,
            run: prepare("SELECT record FROM keel_runs WHERE id = $1").await?,
            journal: prepare(
                "SELECT position, entry FROM keel_journal WHERE run_id = $1 ORDER BY position",
            )
            .await?,
        };
        Ok(Writer {
            client,
            database,
            worker,
            name,
            fenced,
            lease_until,
            statements,
            open: false,
            failure: None,
            released: false,
        })
    }

    /// Answers requests until every sender is gone.
    ///
    /// A transaction left open with no request for [`IDLE_COMMIT`] is committed: writes that
    /// no sync follows soon (the latency statistics, written every second) must not hold a
    /// transaction open on an idle engine, where the server's
    /// `idle_in_transaction_session_timeout` would end the connection. Committing early is
    /// harmless: a write may become durable before its sync, never after.
    pub(super) async fn serve(mut self, mut requests: mpsc::UnboundedReceiver<Request>) {
        loop {
            let request = if self.open {
                match tokio::time::timeout(IDLE_COMMIT, requests.recv()).await {
                    Ok(request) => request,
                    Err(_idle) => {
                        self.end_idle_transaction().await;
                        continue;
                    }
                }
            } else {
                requests.recv().await
            };
            let Some(request) = request else {
                break;
            };
            self.handle(request).await;
        }
        if self.open {
            // Nobody waits for these writes: they were never acknowledged.
            let _ = self.client.batch_execute("ROLLBACK").await;
        }
    }

    async fn handle(&mut self, request: Request) {
        match request {
            Request::Commit { reply } => {
                let _ = reply.send(self.commit().await);
            }
            Request::Release { reply } => {
                let _ = reply.send(self.release().await);
            }
            Request::Lose { why } => {
                self.lose_transaction(why).await;
            }
            Request::CreateRun { record, reply } => {
                let answer = self.write(|w| Box::pin(w.create_run(record))).await;
                let _ = reply.send(answer);
            }
            Request::Append {
                id,
                index,
                entry,
                record,
                token,
            } => {
                let _ = self
                    .write(|w| Box::pin(w.append(id, index, entry, record, token)))
                    .await;
            }
            Request::DeleteRuns { ids, reply } => {
                let _ = reply.send(self.write(|w| Box::pin(w.delete_runs(ids))).await);
            }
            Request::SetLoadCount { id, loads } => {
                let _ = self.write(|w| Box::pin(w.set_load_count(id, loads))).await;
            }
            Request::SetWake { id, wake_ms } => {
                let _ = self.write(|w| Box::pin(w.set_wake(id, wake_ms))).await;
            }
            Request::PutStats { operation, record } => {
                let _ = self
                    .write(|w| Box::pin(w.put_stats(operation, record)))
                    .await;
            }
            Request::PutKeyed { space, key, value } => {
                let _ = self
                    .write(|w| Box::pin(w.put_keyed(space, key, value)))
                    .await;
            }
            Request::DeleteKeyed { space, key } => {
                let _ = self.write(|w| Box::pin(w.delete_keyed(space, key))).await;
            }
            Request::Keyed { space, reply } => {
                let _ = reply.send(self.read(|w| Box::pin(w.keyed(space))).await);
            }
            Request::Run { id, reply } => {
                let _ = reply.send(self.read(|w| Box::pin(w.run(id))).await);
            }
            Request::Runs { reply } => {
                let _ = reply.send(self.read(|w| Box::pin(w.runs())).await);
            }
            Request::RunsPage { scan, reply } => {
                let _ = reply.send(self.read(|w| Box::pin(w.runs_page(scan))).await);
            }
            Request::RunCounts { reply } => {
                let _ = reply.send(self.read(|w| Box::pin(w.run_counts())).await);
            }
            Request::Journal { id, reply } => {
                let _ = reply.send(self.read(|w| Box::pin(w.journal(id))).await);
            }
            Request::LoadCount { id, reply } => {
                let _ = reply.send(self.read(|w| Box::pin(w.load_count(id))).await);
            }
            Request::Stats { mine, reply } => {
                let _ = reply.send(self.read(|w| Box::pin(w.stats(mine))).await);
            }
        }
    }

    /// Runs a write inside the open transaction (opening one if needed). A failure is kept
    /// and final: the write is lost, so the commit that would have covered it must fail. A
    /// write after the engine released the database is refused the same way, so that no
    /// ticket asked for after it reports it durable.
    async fn write<T>(
        &mut self,
        write: impl for<'a> FnOnce(&'a Writer) -> BoxFuture<'a, Result<T>>,
    ) -> Result<T> {
        if let Some(failure) = &self.failure {
            return Err(self.error(failure.clone().into()));
        }
        if self.released {
            let refused = "the engine shut down: a write made after it was refused";
            self.failure = Some(refused.into());
            return Err(self.error(refused.into()));
        }
        if !self.open {
            if let Err(e) = self.client.batch_execute("BEGIN").await {
                self.failure = Some(format!("opening a transaction failed: {e}"));
                return Err(self.db(e));
            }
            self.open = true;
        }
        let outcome = write(self).await;
        if let Err(error) = &outcome {
            self.lose_transaction(format!("a write failed: {error}"))
                .await;
        }
        outcome
    }

    /// Runs a read, inside the open transaction if there is one. A statement that fails
    /// inside a transaction aborts it, so a database error loses the transaction as a
    /// failed write does; a record that does not decode fails only this read.
    async fn read<T>(
        &mut self,
        read: impl for<'a> FnOnce(&'a Writer) -> BoxFuture<'a, Result<T>>,
    ) -> Result<T> {
        let outcome = read(self).await;
        if let Err(error @ EngineError::Database { .. }) = &outcome {
            if self.open {
                let why = format!("a read failed inside it: {error}");
                self.lose_transaction(why).await;
            }
        }
        outcome
    }

    /// Gives up the open transaction after a failure: the failure is kept (final: its
    /// commit and every later one fail, as a failed sync does on sled), and the transaction
    /// is rolled back at once, so that reads go on outside it.
    async fn lose_transaction(&mut self, why: String) {
        let failure = format!("the transaction holding the engine's writes is lost: {why}");
        tracing::error!(database = %self.database, %failure, "store write failed");
        self.failure.get_or_insert(failure);
        if self.open {
            self.open = false;
            let _ = self.client.batch_execute("ROLLBACK").await;
        }
    }

    /// Gives every run this worker owns up, deletes its worker row, and refuses later
    /// writes. Writes no sync covered yet are rolled back and kept as a failure, so the
    /// commit asked for after them fails instead of reporting them durable (and nothing is
    /// given up: the lease then simply expires).
    async fn release(&mut self) -> Result<()> {
        if self.open {
            let why = "the engine shut down before they were synced".to_string();
            self.lose_transaction(why).await;
        }
        self.released = true;
        if let Some(failure) = &self.failure {
            return Err(self.error(format!("runs not given up: {failure}").into()));
        }
        let give_up = async {
            self.client.batch_execute("BEGIN").await?;
            self.client
                .execute(
                    "UPDATE keel_runs SET owner = NULL WHERE owner = $1",
                    &[&self.worker],
                )
                .await?;
            self.client
                .execute("DELETE FROM keel_workers WHERE id = $1", &[&self.worker])
                .await?;
            self.client.batch_execute("COMMIT").await
        };
        give_up.await.map_err(|e| self.db(e))
    }

    /// Ends a transaction nothing was asked of for [`IDLE_COMMIT`]: commits it, or rolls it
    /// back when a failed statement aborted it (its failure stays, final).
    async fn end_idle_transaction(&mut self) {
        if self.failure.is_some() {
            // Rolled back when the failure was kept; nothing is open.
            self.open = false;
            return;
        }
        if let Err(failure) = self.commit().await {
            tracing::error!(database = %self.database, %failure, "committing an idle transaction failed");
        }
    }

    /// Commits the open transaction, if any.
    async fn commit(&mut self) -> std::result::Result<(), String> {
        if let Some(failure) = &self.failure {
            return Err(failure.clone());
        }
        if !self.open {
            return Ok(());
        }
        // A worker paused past its lease (SIGSTOP, a stalled VM) sends no COMMIT once it runs
        // again, whether or not its renewer has noticed yet: its runs may be another's now.
        // The journal's rows check the lease in the database too; the other rows do not, so
        // a pause between this check and the COMMIT can still land them (load counts,
        // statistics), unless the server has ended the idle transaction meanwhile.
        if !super::lease::held(&self.lease_until) {
            let why = "the lease ended (by this worker's clock) before the commit".to_string();
            self.lose_transaction(why).await;
            return Err(self.failure.clone().unwrap_or_default());
        }
        match self.client.batch_execute("COMMIT").await {
            Ok(()) => {
                // Committed, and nobody told yet.
                crate::crash::point("postgres.after_commit");
                self.open = false;
                Ok(())
            }
            Err(e) => {
                // The transaction has ended, committed or not: nobody can tell which.
                let failure = format!("commit failed: {e}");
                self.open = false;
                self.failure = Some(failure.clone());
                Err(failure)
            }
        }
    }
}
