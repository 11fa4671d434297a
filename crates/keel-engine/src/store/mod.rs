//! The storage API. Everything above this module talks to a [`JournalStore`]; only
//! `store/sled/mod.rs` knows about sled trees and key encodings, so a server-backed store can be
//! added without touching replay or saga code.
//!
//! Contract:
//! - every method that writes is one atomic write: after a crash, all of it or none of it;
//! - writes become durable only when a [`SyncTicket`] requested after them resolves; a store
//!   batches every waiting ticket into one sync (group commit);
//! - reads return what was written, durable or not (the executor never acts on an undurable
//!   record: it waits for a ticket before any side effect and before telling anyone);
//! - a store several engines share (PostgreSQL) hands each run to one of them at a time, with
//!   a [`Token`] its writes carry; a write whose token is no longer the run's is dropped,
//!   and [`JournalStore::fenced`] says so once the sync after it resolved. The sled store
//!   belongs to one engine: every run is its own, and tokens are ignored.

mod commit;
mod mark;
pub(crate) mod postgres;
pub(crate) mod sled;

use std::collections::BTreeMap;

use futures_util::future::BoxFuture;
use tokio::sync::watch;

use crate::error::{EngineError, Result};
use crate::ids::{JournalIndex, RunId};
use crate::journal::{Entry, RunRecord, RunStatus};

pub use commit::Durability;
pub(crate) use commit::SyncTicket;
pub use postgres::Leases;

/// What a store's read returns: a future, so that a store on a server does not hold a
/// runtime thread while it waits; the embedded store answers before the first poll returns.
pub(crate) type Read<'a, T> = BoxFuture<'a, Result<T>>;

/// The right to write one run, as the store handed it to this engine: on a shared store, the
/// run's epoch when this engine took it (`store/postgres/lease.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Token(pub(crate) i64);

impl Token {
    /// The token of a run this engine created.
    pub(crate) const CREATED: Token = Token(1);
}

/// Whether [`JournalStore::take`] takes a run from a live owner.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Takeover {
    /// Only a run nobody holds (no owner, or an owner whose lease expired).
    IfFree,
    /// From any owner (an operator call on the run).
    Always,
}

/// The runs an engine may drive, as [`JournalStore::claim`] answers.
#[derive(Debug)]
pub(crate) enum Claimed {
    /// Every run in the store (the store belongs to this engine).
    Everything,
    /// These runs, newly this engine's, with their tokens, and the earliest wake time after
    /// the claim's of a run whose owner is gone (the next claim is due then, if not sooner).
    Runs {
        runs: Vec<(RunId, Token)>,
        next_wake_ms: Option<u64>,
    },
}

/// Which run records [`JournalStore::runs_page`] visits.
#[derive(Clone, Debug)]
pub(crate) struct RunsScan {
    /// Start after this id; at the first when `None`.
    pub(crate) after: Option<RunId>,
    /// Only records in this status; every status when `None`.
    pub(crate) status: Option<RunStatus>,
    /// Only runs whose id begins with this; the scan starts at the first such id and ends
    /// after the last, so a page costs what the prefix holds, not the store.
    pub(crate) prefix: Option<String>,
    /// Most records returned (records that do not decode are returned beside them, as their
    /// errors, and not counted).
    pub(crate) limit: usize,
    /// With `status`: most records a store that cannot look runs up by status (sled) reads
    /// before it ends the page, full or not, with `resume_after`; unbounded when `None`. A
    /// store with an index by status (PostgreSQL) reads only matches and ignores it.
    pub(crate) examine_max: Option<usize>,
}

/// The first string after every string that begins with `prefix` (non-empty ASCII), in
/// byte order: `prefix` with its last byte incremented; `None` when there is none.
pub(crate) fn prefix_end(prefix: &str) -> Option<String> {
    let mut bytes = prefix.as_bytes().to_vec();
    while let Some(last) = bytes.pop() {
        if last < 0x7f {
            bytes.push(last + 1);
            return String::from_utf8(bytes).ok();
        }
    }
    None
}

/// A page of run records in id order.
#[derive(Debug, Default)]
pub(crate) struct ScannedRuns {
    /// The records; a record that does not decode is its error, so one corrupt record cannot
    /// hide the others.
    pub(crate) records: Vec<Result<RunRecord>>,
    /// Whether more records match after the last one returned.
    pub(crate) more: bool,
    /// Set when the scan stopped at `examine_max` records read: the last id read, after which
    /// the next page goes on (`more` is then true).
    pub(crate) resume_after: Option<RunId>,
}

/// The kinds of small keyed records a store keeps beside runs ([`JournalStore::put_keyed`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Space {
    /// A schedule's definition, by schedule name (`schedule.rs`).
    Schedule,
    /// How far a schedule has fired, by schedule name: written by the engines that fire it,
    /// apart from the definition an operator writes, so that neither overwrites the other.
    ScheduleFired,
    /// A notification not yet delivered everywhere, by its event id (`notice.rs`).
    Notice,
    /// The workflows and compensable step kinds the store's runs use (`types_used.rs`),
    /// under one key.
    TypesUsed,
}

impl Space {
    /// The space's name, as stores key it.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Space::Schedule => "schedule",
            Space::ScheduleFired => "schedule-fired",
            Space::Notice => "notice",
            Space::TypesUsed => "types-used",
        }
    }
}

/// Persistent home of run records and journals.
///
/// Reads are futures; writes are made at once (to the store, or to what it will write with
/// the next sync) and are durable when a [`SyncTicket`] asked for after them resolves.
pub(crate) trait JournalStore: Send + Sync + std::fmt::Debug + 'static {
    /// Inserts `record` unless a run with its id exists; returns the existing record if so.
    /// A store that keeps a wake index ([`JournalStore::keeps_wakes`]) gives a new run its
    /// entry at 0 (it is loaded), written before the record, and leaves a found run's index
    /// as it was. Durable with the next sync.
    fn create_run<'a>(&'a self, record: &'a RunRecord) -> Read<'a, Option<RunRecord>>;

    /// The run record of `id`, if any.
    fn run<'a>(&'a self, id: &'a RunId) -> Read<'a, Option<RunRecord>>;

    /// Every run record; a record that does not decode is returned as its error, so one
    /// corrupt record cannot hide the others.
    fn runs(&self) -> Read<'_, Vec<Result<RunRecord>>>;

    /// One page of run records in id order, as `scan` asks: a page costs what it skips and
    /// holds, not the store.
    fn runs_page<'a>(&'a self, scan: &'a RunsScan) -> Read<'a, ScannedRuns>;

    /// How many readable run records there are in each status (statuses with none left out).
    fn run_counts(&self) -> Read<'_, BTreeMap<RunStatus, u64>>;

    /// The journal of `id`, checked to be dense from index 0.
    fn journal<'a>(&'a self, id: &'a RunId) -> Read<'a, Vec<Entry>>;

    /// Writes `entries` (at least one) as entries `index`, `index + 1`, ... of `id`'s journal
    /// and, if given, the new run record with the last of them, atomically: after a crash,
    /// either the last entry and the record are both as written, or neither is, as the next
    /// open of the store sees them. The entries are written in order, and a crash may keep a
    /// prefix of them (as it would of the same entries appended one by one); the sled store
    /// writes two small ones as one value, so that a step's completion costs no write of its
    /// own (`cell.rs`). On a shared store, written only while `token` is still the run's
    /// (else dropped: see [`JournalStore::fenced`]).
    fn append(
        &self,
        id: &RunId,
        index: JournalIndex,
        entries: &[Entry],
        record: Option<&RunRecord>,
        token: Token,
    ) -> Result<()>;

    /// Deletes the run records, journals and load counts of `ids`, atomically. Durable with
    /// the next sync.
    fn delete_runs<'a>(&'a self, ids: &'a [RunId]) -> Read<'a, ()>;

    /// How many times in a row run `id` was loaded to be driven without showing that it
    /// survives being driven (`poison.rs`); 0 when none is recorded.
    fn load_count<'a>(&'a self, id: &'a RunId) -> Read<'a, u32>;

    /// Records `loads` for run `id`; 0 forgets the count. Durable with the next sync.
    fn set_load_count(&self, id: &RunId, loads: u32) -> Result<()>;

    /// Writes the latency statistics of `operation` (an opaque record), replacing the old.
    fn put_stats(&self, operation: &str, record: &[u8]) -> Result<()>;

    /// Every operation's statistics record, as this engine wrote them.
    fn stats(&self) -> Read<'_, Vec<(String, Vec<u8>)>>;

    /// The statistics records the other engines sharing the store wrote (operation, record;
    /// an operation once per engine); none on a store of its own.
    fn others_stats(&self) -> Read<'_, Vec<(String, Vec<u8>)>>;

    /// Writes the record `key` of `space` (JSON text, at most
    /// [`crate::limits::KEYED_RECORD_BYTES_MAX`] bytes), replacing the old. Durable with the
    /// next sync; on a shared store, the last write of a key wins.
    fn put_keyed(&self, space: Space, key: &str, value: &str) -> Result<()>;

    /// Writes the record `key` of `space` unless one is there, durable when this resolves. On
    /// a shared store it is written on its own, outside the transaction that holds this
    /// engine's other writes, so that engines adding the same key never wait on (or
    /// deadlock with) each other's transactions; on a store of one engine it is written as
    /// [`JournalStore::put_keyed`] writes, in order with the others, and synced.
    fn add_keyed<'a>(&'a self, space: Space, key: &'a str, value: &'a str) -> Read<'a, ()> {
        Box::pin(async move {
            self.put_keyed(space, key, value)?;
            self.sync().wait().await
        })
    }

    /// Deletes the record `key` of `space`, if any. Durable with the next sync.
    fn delete_keyed(&self, space: Space, key: &str) -> Result<()>;

    /// Every record of `space`, in key order.
    fn keyed(&self, space: Space) -> Read<'_, Vec<(String, String)>>;

    /// Whether this store keeps a durable wake index (`engine/parking.rs`) that an open
    /// reads: when each drivable run must be driven next, so that an open loads only what is
    /// due. The sled store does. PostgreSQL keeps each run's wake time in its row instead
    /// ([`JournalStore::set_wake`]), and resumes by claims, which take only runs that are
    /// due; its other index methods do nothing.
    fn keeps_wakes(&self) -> bool {
        false
    }

    /// Records that run `id` must be driven at `wake_ms` at the latest (0: it is loaded, and
    /// must be at the next open; `u64::MAX`: when something arrives for it), replacing its
    /// entry: the new entry is written before the old one is removed, so a crash leaves one
    /// or both, never neither. Durable with the next sync, in order with the store's other
    /// writes. On PostgreSQL, the run's `wake_at`, written only while this engine owns the
    /// run (a stale cell of a run another engine took over cannot move its wake time).
    fn set_wake(&self, _id: &RunId, _wake_ms: u64) -> Result<()> {
        Ok(())
    }

    /// Sets run `id`'s entry to 0 (loaded: the next open drives it) if it has one, because
    /// something it may be parked for arrived: a child of it settled. A run with no entry
    /// (settled, or on a store that keeps no index) is left without one. Durable with the
    /// next sync, in order with the store's other writes.
    fn wake_if_indexed(&self, _id: &RunId) -> Result<()> {
        Ok(())
    }

    /// Removes run `id`'s entry (the run settled). Durable with the next sync.
    fn clear_wake(&self, _id: &RunId) -> Result<()> {
        Ok(())
    }

    /// Removes run `id`'s index entry at `wake_ms` as read by [`JournalStore::wakes`] (a run
    /// gone or settled), with what else of the index names it.
    fn clear_wake_at(&self, _id: &RunId, _wake_ms: u64) -> Result<()> {
        Ok(())
    }

    /// Every entry of the wake index in wake-time order, once it was built
    /// ([`JournalStore::wakes_built`]); `None` before, or on a store that keeps none.
    fn wakes(&self) -> Read<'_, Option<Vec<(u64, RunId)>>> {
        Box::pin(async { Ok(None) })
    }

    /// Records that every drivable run has an entry in the wake index. Durable with the next
    /// sync.
    fn wakes_built(&self) -> Result<()> {
        Ok(())
    }

    /// Takes the runs this engine should drive and nobody does: on a shared store, running
    /// runs of `workflows` (those it can drive) and compensating runs, whose owner is gone and
    /// whose wake time is at or before `now_ms` (at open, and then every
    /// [`JournalStore::claim_every`]); [`Claimed::Everything`] on a store of its own.
    fn claim<'a>(&'a self, workflows: &'a [String], now_ms: u64) -> Read<'a, Claimed>;

    /// How often a shared store wants [`JournalStore::claim`] called; `None` for a store of
    /// its own (everything is claimed at open).
    fn claim_every(&self) -> Option<std::time::Duration>;

    /// The token to write run `id` with, taking the run over as `takeover` allows; `None`
    /// when another engine keeps it, or the run does not exist.
    fn take<'a>(&'a self, id: &'a RunId, takeover: Takeover) -> Read<'a, Option<Token>>;

    /// Whether a write of run `id` made with `token` was dropped because another engine
    /// took the run over. Known once a sync asked for after the write resolved.
    fn fenced(&self, id: &RunId, token: Token) -> bool;

    /// `Some(reason)` once the store can make nothing durable any more (a failed sync, a
    /// lost lease): the engine stops.
    fn broken(&self) -> watch::Receiver<Option<String>>;

    /// Whether this engine's runs are still its own by its own clock: false from the moment
    /// its lease on a shared store would have ended without a renewal (checked without
    /// waiting, so that a process resumed after a pause learns it before anything else);
    /// always true on a store of its own. See [`while_leased`].
    fn leased(&self) -> bool;

    /// A ticket that resolves once every write made before this call is durable.
    fn sync(&self) -> SyncTicket;

    /// [`JournalStore::sync`] for a writer that waits for nothing else until it is answered
    /// (a run's main lane): a store may then run the sync on the writer's own thread while
    /// writers come one at a time (sled: `store/commit.rs`).
    fn sync_alone(&self) -> SyncTicket {
        self.sync()
    }

    /// Called once the engine has shut down and every write it acknowledged is durable: a
    /// store another engine may open while this one lives (PostgreSQL) lets it; later writes
    /// fail, reads go on. The sled store is released when it is dropped.
    fn release(&self) -> Read<'_, ()>;
}

/// Runs `future`, an effect of run `id` made by a cell holding `token`, while `store` says
/// this engine's runs are its own ([`JournalStore::leased`]) and that run is still this
/// cell's ([`JournalStore::fenced`]), checked before every poll: `None`, with the future
/// dropped and never polled again, once either is not. A step or compensation runs this way, so that a worker paused past its lease
/// (SIGSTOP, a long GC) makes no effect of it once resumed: by then another worker may have
/// taken the run over, retried the step, or compensated it. (A request already sent before
/// the pause cannot be called back; it lands like a lost response.)
pub(crate) async fn while_leased<F: std::future::Future>(
    store: &dyn JournalStore,
    (id, token): (&RunId, Token),
    future: F,
) -> Option<F::Output> {
    let mut future = std::pin::pin!(future);
    std::future::poll_fn(|cx| {
        if !store.leased() || store.fenced(id, token) {
            return std::task::Poll::Ready(None);
        }
        future.as_mut().poll(cx).map(Some)
    })
    .await
}

/// `value` as JSON, refused when longer than `limit` bytes: every store checks what it
/// writes against the limits of `limits.rs` the same way.
pub(crate) fn encode<T: serde::Serialize>(what: &str, value: &T, limit: usize) -> Result<String> {
    let text = serde_json::to_string(value).map_err(|source| EngineError::Serialise {
        what: what.into(),
        source,
    })?;
    if text.len() > limit {
        return Err(EngineError::TooLarge {
            what: what.into(),
            bytes: text.len(),
            limit,
        });
    }
    Ok(text)
}

/// Refuses a keyed record longer than [`crate::limits::KEYED_RECORD_BYTES_MAX`], or a key
/// that is empty, longer than 256 bytes or holds a NUL byte.
pub(crate) fn check_keyed(space: Space, key: &str, value: &str) -> Result<()> {
    if key.is_empty() || key.len() > 256 || key.contains('\0') {
        return Err(EngineError::InvalidRequest(format!(
            "{} key {key:?}: must be 1 to 256 bytes without NUL",
            space.as_str()
        )));
    }
    let limit = crate::limits::KEYED_RECORD_BYTES_MAX;
    if value.len() > limit {
        return Err(EngineError::TooLarge {
            what: format!("{} record {key}", space.as_str()),
            bytes: value.len(),
            limit,
        });
    }
    Ok(())
}

/// Refuses a statistics record longer than [`crate::limits::STATS_RECORD_BYTES_MAX`].
pub(crate) fn check_stats_size(operation: &str, record: &[u8]) -> Result<()> {
    let limit = crate::limits::STATS_RECORD_BYTES_MAX;
    if record.len() > limit {
        return Err(EngineError::TooLarge {
            what: format!("latency statistics of {operation}"),
            bytes: record.len(),
            limit,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn a_prefix_ends_at_its_last_byte_incremented() {
        assert_eq!(prefix_end("fleet-7/").as_deref(), Some("fleet-70"));
        assert_eq!(prefix_end("a\u{7f}").as_deref(), Some("b"));
        assert_eq!(prefix_end("\u{7f}"), None);
        let (prefix, end) = ("run-1", prefix_end("run-1").unwrap());
        for id in ["run-1", "run-10", "run-1z", "run-1~~"] {
            assert!(id >= prefix && id < end.as_str(), "{id}");
        }
        assert!("run-2" >= end.as_str());
    }
}
