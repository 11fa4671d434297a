//! The storage API. Everything above this module talks to a [`JournalStore`]; only
//! `store/sled/mod.rs` knows about sled trees and key encodings, so a server-backed store can be
//! added without touching replay or saga code.
//!
//! Contract:
//! - every method that writes is one atomic write: after a crash, all of it or none of it;
//! - writes become durable only when a [`SyncTicket`] requested after them resolves; a store
//!   batches every waiting ticket into one sync (group commit);
//! - reads return what was written, durable or not (the executor never acts on an undurable
//!   record: it waits for a ticket before any side effect and before telling anyone).

mod commit;
mod mark;
pub(crate) mod sled;

use crate::error::Result;
use crate::ids::{JournalIndex, RunId};
use crate::journal::{Entry, RunRecord};

pub use commit::Durability;
pub(crate) use commit::SyncTicket;

/// Persistent home of run records and journals.
pub(crate) trait JournalStore: Send + Sync + 'static {
    /// Inserts `record` unless a run with its id exists; returns the existing record if so.
    fn create_run(&self, record: &RunRecord) -> Result<Option<RunRecord>>;

    /// The run record of `id`, if any.
    fn run(&self, id: &RunId) -> Result<Option<RunRecord>>;

    /// Every run record; a record that does not decode is returned as its error, so one
    /// corrupt record cannot hide the others.
    fn runs(&self) -> Result<Vec<Result<RunRecord>>>;

    /// Visits run records in id order, starting after `after` (or at the first), until
    /// `visit` says stop: a page of a listing costs what the page holds, not the store. A
    /// record that does not decode is passed as its error.
    fn scan_runs(
        &self,
        after: Option<&RunId>,
        visit: &mut dyn FnMut(Result<RunRecord>) -> std::ops::ControlFlow<()>,
    ) -> Result<()>;

    /// The journal of `id`, checked to be dense from index 0.
    fn journal(&self, id: &RunId) -> Result<Vec<Entry>>;

    /// Writes entry `index` of `id`'s journal and, if given, the new run record, atomically:
    /// after a crash, either the entry and the record are both as written, or neither is, as
    /// the next open of the store sees them.
    fn append(
        &self,
        id: &RunId,
        index: JournalIndex,
        entry: &Entry,
        record: Option<&RunRecord>,
    ) -> Result<()>;

    /// Deletes the run records, journals and load counts of `ids`, atomically.
    fn delete_runs(&self, ids: &[RunId]) -> Result<()>;

    /// How many times in a row run `id` was loaded to be driven without showing that it
    /// survives being driven (`poison.rs`); 0 when none is recorded.
    fn load_count(&self, id: &RunId) -> Result<u32>;

    /// Records `loads` for run `id`; 0 forgets the count. Durable with the next sync.
    fn set_load_count(&self, id: &RunId, loads: u32) -> Result<()>;

    /// Writes the latency statistics of `operation` (an opaque record), replacing the old.
    fn put_stats(&self, operation: &str, record: &[u8]) -> Result<()>;

    /// Every operation's statistics record.
    fn stats(&self) -> Result<Vec<(String, Vec<u8>)>>;

    /// A ticket that resolves once every write made before this call is durable.
    fn sync(&self) -> SyncTicket;
}
