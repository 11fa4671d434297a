//! The PostgreSQL store: run records and journals in tables, every write of the engine made
//! on one connection inside an open transaction that the committer commits (group commit:
//! every write made before a ticket shares the commit that answers it).
//!
//! Schema (`schema.rs`, versioned migrations): `keel_runs` (one row per run: the record as
//! JSON text, its status and parent for listing, its owner and epoch, and its wake time, which
//! claims go by), `keel_journal` (one row per entry, keyed by
//! run and index), `keel_load_counts`, `keel_stats`, and `keel_schema` (the schema version).
//!
//! **One connection, one transaction at a time.** Reads go through the same connection as
//! writes, so they see the engine's own writes before they are durable, as the store contract
//! asks; a status transition writes its entry and its record in that transaction, so both
//! commit or neither does (no view to repair, unlike sled). A statement that fails aborts the
//! transaction, so the commit that follows fails, and, as on sled, a failed sync is final:
//! the engine stops driving runs and the next open reads what was committed.
//!
//! **Several engines per database.** Each is a worker with a lease, and each run has one owner
//! at a time; every write is checked against the run's owner and epoch in the database
//! (`lease.rs` has the protocol).

mod fences;
mod lease;
mod renewer;
mod schema;
mod writer;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio_postgres::Client;

use crate::error::{EngineError, Result};
use crate::ids::{JournalIndex, RunId};
use crate::journal::{Entry, RunRecord, RunStatus};
use crate::limits::{ENTRY_BYTES_MAX, RUN_RECORD_BYTES_MAX};
use crate::store::commit::{Committer, SyncTicket, Syncers};
use crate::store::{
    check_keyed, check_stats_size, encode, Claimed, JournalStore, Read, RunsScan, ScannedRuns,
    Space, Takeover, Token,
};

use lease::Lease;
pub use lease::Leases;
use writer::{Fenced, Request, Writer};

/// How many runs one claim takes at most.
const CLAIM_BATCH: i64 = 500;

/// A wake time (ms) as `keel_runs.wake_at` holds it: `u64::MAX` (only when something arrives
/// for the run) and anything past `i64::MAX` are the largest bigint, which no clock reaches.
fn wake_column(wake_ms: u64) -> i64 {
    i64::try_from(wake_ms).unwrap_or(i64::MAX)
}

/// How long opening waits for the database to answer before it gives up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Starts the writer's thread (`keel-postgres`) with a runtime of its own, which runs until
/// the returned sender is dropped; returns the sender and the runtime's handle.
fn writer_thread(database: &str) -> Result<(oneshot::Sender<()>, tokio::runtime::Handle)> {
    let failed = |source: Box<dyn std::error::Error + Send + Sync>| EngineError::Database {
        database: database.to_string(),
        source,
    };
    let (done, ended) = oneshot::channel::<()>();
    let (started, handle) = std::sync::mpsc::sync_channel(1);
    // The runtime is made on its thread, and dropped there: never in the caller's async
    // context, where dropping a runtime panics.
    std::thread::Builder::new()
        .name("keel-postgres".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            let runtime = match runtime {
                Ok(runtime) => runtime,
                Err(error) => return drop(started.send(Err(error))),
            };
            if started.send(Ok(runtime.handle().clone())).is_ok() {
                runtime.block_on(async move { ended.await.unwrap_or_default() });
            }
        })
        .map_err(|e| failed(format!("starting the store's thread: {e}").into()))?;
    let handle = handle
        .recv()
        .map_err(|_| failed("the store's thread ended at its start".into()))?
        .map_err(|e| failed(format!("starting the store's runtime: {e}").into()))?;
    Ok((done, handle))
}

/// A [`JournalStore`] on PostgreSQL.
pub(crate) struct PostgresStore {
    /// The database, as named in errors (the URL without its password).
    database: String,
    requests: mpsc::UnboundedSender<Request>,
    /// Set when the store is dropped: the committer stops waiting for the writer.
    closing: Arc<AtomicBool>,
    committer: Committer,
    lease: Lease,
    leases: Leases,
    fenced: Fenced,
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        // Before the committer is dropped and joined: a commit in flight is given up, not
        // waited for. (Needed while the writer ran on the engine's runtime: a store dropped
        // on a runtime thread waited for a writer task that this very thread had to poll.)
        self.closing.store(true, Ordering::SeqCst);
    }
}

/// The committer's sync: asks the writer to commit, and waits for its answer, in slices, so
/// that a store being dropped ends the wait (the commit's outcome is then unknown: a
/// failure, final).
fn commit(requests: &mpsc::UnboundedSender<Request>, closing: &AtomicBool) -> std::io::Result<()> {
    const SLICE: Duration = Duration::from_millis(50);
    let stopped = || std::io::Error::other("the database writer has stopped");
    let (reply, answer) = std::sync::mpsc::sync_channel(1);
    requests
        .send(Request::Commit { reply })
        .map_err(|_| stopped())?;
    loop {
        match answer.recv_timeout(SLICE) {
            Ok(outcome) => return outcome.map_err(std::io::Error::other),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return Err(stopped()),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                if closing.load(Ordering::SeqCst) {
                    return Err(std::io::Error::other(
                        "the store was dropped while a commit was in flight",
                    ));
                }
            }
        }
    }
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("database", &self.database)
            .finish_non_exhaustive()
    }
}

/// Connects to the database at `url` as `role` (the connection's application name says
/// which of the worker's connections it is), with `options` set for the session.
async fn connect(url: &str, database: &str, role: &str, options: &str) -> Result<Client> {
    let failed = |source: Box<dyn std::error::Error + Send + Sync>| EngineError::Database {
        database: database.to_string(),
        source,
    };
    let mut config: tokio_postgres::Config = url
        .parse()
        .map_err(|e| failed(format!("not a PostgreSQL URL: {e}").into()))?;
    config.connect_timeout(CONNECT_TIMEOUT);
    config.application_name(format!("keel {role}"));
    config.options(options);
    let (client, connection) = config
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(|e| failed(Box::new(e)))?;
    let name = database.to_string();
    let role = role.to_string();
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::error!(database = %name, connection = %role, %error, "database connection lost");
        }
    });
    Ok(client)
}

impl PostgresStore {
    /// Connects to the database at `url`, creates or migrates its schema, and registers this
    /// engine as a worker named `name` (with the host) holding its runs as `leases` says. Refused, with an error naming
    /// the database, when it cannot be reached or its schema is newer than this binary's.
    ///
    /// The writer and its connection run on a thread of their own (`keel-postgres`, a
    /// runtime of one thread), not on the caller's runtime: a task that a worker of that
    /// runtime wakes waits in the worker's slot for its next task, which no other worker
    /// takes, so a worker held up right after a store request (a step's blocking code; a
    /// thread the system does not schedule) held the writer with it, and every run's reads
    /// and writes waited as long (seen in `tests/engine_delete_races.rs`). The lease's tasks
    /// stay on the caller's runtime: a runtime that drives nothing any more stops renewing,
    /// and its runs go to other workers.
    pub(crate) async fn open(url: &str, leases: Leases, name: &str) -> Result<PostgresStore> {
        let database = redacted(url);
        leases.check().map_err(|why| EngineError::Database {
            database: database.clone(),
            source: why.into(),
        })?;
        // Dropped when the writer ends (the store and every sender of its requests dropped),
        // or when this open fails: then the writer's runtime and its thread end.
        let (done, writer_runtime) = writer_thread(&database)?;
        // A worker stopped inside a transaction (SIGSTOP, a partition) holds its runs' rows
        // locked: the server ends such a session after a lease, so that a takeover waits no
        // longer than that. (The writer's own transactions idle 200 ms at most.)
        let lease_ms = leases.length.as_millis();
        // Connected on the writer's runtime: its socket is that runtime's to drive.
        let connecting = {
            let (url, database) = (url.to_owned(), database.clone());
            let options = format!("-c idle_in_transaction_session_timeout={lease_ms}");
            async move { connect(&url, &database, "writer", &options).await }
        };
        let writes = match writer_runtime.spawn(connecting).await {
            Ok(connected) => connected?,
            Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
            Err(error) => {
                return Err(EngineError::Database {
                    database,
                    source: format!("connecting the writer was cancelled: {error}").into(),
                })
            }
        };
        schema::migrate(&writes, &database).await?;
        let renewals = connect(url, &database, "lease", "").await?;
        let control = connect(
            url,
            &database,
            "claims",
            &format!("-c lock_timeout={}", lease_ms * 2),
        )
        .await?;
        let (requests, receiver) = mpsc::unbounded_channel();
        let commits = requests.clone();
        let closing = Arc::new(AtomicBool::new(false));
        let committer_closing = Arc::clone(&closing);
        let committer = Committer::start(
            move || commit(&commits, &committer_closing),
            Syncers::CommitterOnly,
        );
        let broken = committer.break_with();
        let losing = requests.clone();
        let lost = move |why: String| {
            let _ = losing.send(Request::Lose { why: why.clone() });
            broken(format!("the lease was lost: {why}"));
        };
        let connections = [renewals, control];
        let fenced = Fenced::default();
        let lease = Lease::start(
            connections,
            &database,
            leases,
            name,
            Arc::clone(&fenced),
            lost,
        )
        .await?;
        let writer = Writer::new(
            writes,
            database.clone(),
            [lease.worker.clone(), lease.name.clone()],
            Arc::clone(&fenced),
            lease.valid_until(),
        )
        .await?;
        writer_runtime.spawn(async move {
            writer.serve(receiver).await;
            drop(done);
        });
        Ok(PostgresStore {
            database,
            requests,
            closing,
            committer,
            lease,
            leases,
            fenced,
        })
    }

    /// Sends `request` to the writer; an error when the writer has stopped.
    fn send(&self, request: Request) -> Result<()> {
        self.requests
            .send(request)
            .map_err(|_| self.failed("the database writer has stopped".into()))
    }

    /// Sends a request that answers, and awaits its answer.
    fn ask<'a, T: Send + 'a>(
        &'a self,
        request: impl FnOnce(oneshot::Sender<Result<T>>) -> Request,
    ) -> Read<'a, T> {
        let (reply, answer) = oneshot::channel();
        let sent = self.send(request(reply));
        Box::pin(async move {
            sent?;
            answer
                .await
                .map_err(|_| self.failed("the database writer stopped before it answered".into()))?
        })
    }

    fn failed(&self, source: Box<dyn std::error::Error + Send + Sync>) -> EngineError {
        EngineError::Database {
            database: self.database.clone(),
            source,
        }
    }
}

/// `url` without its password, to name the database in logs and errors.
pub(crate) fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "<a database URL that does not parse>".into();
    };
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let host = match authority.rsplit_once('@') {
        Some((user, host)) => {
            let user = user.split_once(':').map_or(user, |(user, _)| user);
            format!("{user}@{host}")
        }
        None => authority.to_string(),
    };
    let path = path.split_once('?').map_or(path, |(path, _)| path);
    format!("{scheme}://{host}/{path}")
}

impl JournalStore for PostgresStore {
    fn create_run<'a>(&'a self, record: &'a RunRecord) -> Read<'a, Option<RunRecord>> {
        match encode("run record", record, RUN_RECORD_BYTES_MAX) {
            Ok(text) => self.ask(|reply| Request::CreateRun {
                record: writer::RecordRow::of(record, text),
                reply,
            }),
            Err(error) => Box::pin(std::future::ready(Err(error))),
        }
    }

    fn run<'a>(&'a self, id: &'a RunId) -> Read<'a, Option<RunRecord>> {
        self.ask(|reply| Request::Run {
            id: id.clone(),
            reply,
        })
    }

    fn runs(&self) -> Read<'_, Vec<Result<RunRecord>>> {
        self.ask(|reply| Request::Runs { reply })
    }

    fn runs_page<'a>(&'a self, scan: &'a RunsScan) -> Read<'a, ScannedRuns> {
        self.ask(|reply| Request::RunsPage {
            scan: scan.clone(),
            reply,
        })
    }

    fn run_counts(&self) -> Read<'_, BTreeMap<RunStatus, u64>> {
        self.ask(|reply| Request::RunCounts { reply })
    }

    fn journal<'a>(&'a self, id: &'a RunId) -> Read<'a, Vec<Entry>> {
        self.ask(|reply| Request::Journal {
            id: id.clone(),
            reply,
        })
    }

    fn append(
        &self,
        id: &RunId,
        index: JournalIndex,
        entries: &[Entry],
        record: Option<&RunRecord>,
        token: Token,
    ) -> Result<()> {
        debug_assert!(!entries.is_empty(), "an append writes one entry at least");
        // All encoded (and checked) before any is sent.
        let texts = entries
            .iter()
            .map(|entry| encode("journal entry", entry, ENTRY_BYTES_MAX))
            .collect::<Result<Vec<_>>>()?;
        let mut record = match record {
            Some(record) => {
                let text = encode("run record", record, RUN_RECORD_BYTES_MAX)?;
                Some(writer::RecordRow::of(record, text))
            }
            None => None,
        };
        let last = texts.len().saturating_sub(1);
        for (offset, entry) in texts.into_iter().enumerate() {
            // One row per entry, in order; the record goes with the last.
            self.send(Request::Append {
                id: id.clone(),
                index: JournalIndex(index.0 + offset as u32),
                entry,
                record: if offset == last { record.take() } else { None },
                token,
            })?;
        }
        Ok(())
    }

    fn delete_runs<'a>(&'a self, ids: &'a [RunId]) -> Read<'a, ()> {
        self.ask(|reply| Request::DeleteRuns {
            ids: ids.to_vec(),
            reply,
        })
    }

    fn load_count<'a>(&'a self, id: &'a RunId) -> Read<'a, u32> {
        self.ask(|reply| Request::LoadCount {
            id: id.clone(),
            reply,
        })
    }

    fn set_load_count(&self, id: &RunId, loads: u32) -> Result<()> {
        self.send(Request::SetLoadCount {
            id: id.clone(),
            loads,
        })
    }

    fn set_wake(&self, id: &RunId, wake_ms: u64) -> Result<()> {
        self.send(Request::SetWake {
            id: id.clone(),
            wake_ms: wake_column(wake_ms),
        })
    }

    fn put_stats(&self, operation: &str, record: &[u8]) -> Result<()> {
        check_stats_size(operation, record)?;
        self.send(Request::PutStats {
            operation: operation.to_string(),
            record: record.to_vec(),
        })
    }

    fn stats(&self) -> Read<'_, Vec<(String, Vec<u8>)>> {
        self.ask(|reply| Request::Stats { mine: true, reply })
    }

    fn others_stats(&self) -> Read<'_, Vec<(String, Vec<u8>)>> {
        self.ask(|reply| Request::Stats { mine: false, reply })
    }

    fn put_keyed(&self, space: Space, key: &str, value: &str) -> Result<()> {
        check_keyed(space, key, value)?;
        self.send(Request::PutKeyed {
            space,
            key: key.to_string(),
            value: value.to_string(),
        })
    }

    fn add_keyed<'a>(&'a self, space: Space, key: &'a str, value: &'a str) -> Read<'a, ()> {
        Box::pin(async move {
            check_keyed(space, key, value)?;
            self.lease.add_keyed(space, key, value).await
        })
    }

    fn delete_keyed(&self, space: Space, key: &str) -> Result<()> {
        self.send(Request::DeleteKeyed {
            space,
            key: key.to_string(),
        })
    }

    fn keyed(&self, space: Space) -> Read<'_, Vec<(String, String)>> {
        self.ask(|reply| Request::Keyed { space, reply })
    }

    fn sync(&self) -> SyncTicket {
        self.committer.ticket()
    }

    fn release(&self) -> Read<'_, ()> {
        self.lease.stop();
        self.ask(|reply| Request::Release { reply })
    }

    fn claim<'a>(&'a self, workflows: &'a [String], now_ms: u64) -> Read<'a, Claimed> {
        Box::pin(async move {
            let (runs, next_wake_ms) = self
                .lease
                .claim(CLAIM_BATCH, workflows.to_vec(), now_ms)
                .await?;
            Ok(Claimed::Runs { runs, next_wake_ms })
        })
    }

    fn claim_every(&self) -> Option<Duration> {
        Some(self.leases.claim_every)
    }

    fn take<'a>(&'a self, id: &'a RunId, takeover: Takeover) -> Read<'a, Option<Token>> {
        Box::pin(async move {
            if !self.lease.held() {
                return Err(self.failed("this worker's lease has ended: it takes no run".into()));
            }
            self.lease.take(id, takeover).await
        })
    }

    fn fenced(&self, id: &RunId, token: Token) -> bool {
        self.fenced.fenced(id, token)
    }

    fn broken(&self) -> watch::Receiver<Option<String>> {
        self.committer.broken()
    }

    fn leased(&self) -> bool {
        self.lease.held()
    }
}

#[cfg(test)]
mod tests {
    use super::redacted;

    /// A database URL is named in errors and logs without its password or parameters.
    #[test]
    fn the_password_never_reaches_a_message() {
        assert_eq!(
            redacted("postgres://keel:secret@db.example:5432/keel?sslmode=disable"),
            "postgres://keel@db.example:5432/keel"
        );
        assert_eq!(
            redacted("postgresql://127.0.0.1/postgres"),
            "postgresql://127.0.0.1/postgres"
        );
        assert!(!redacted("not a url with secret").contains("secret"));
    }
}
