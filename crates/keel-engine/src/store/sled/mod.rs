//! The embedded store: run records and journals in one sled tree, read and written through
//! `kv.rs` (`Kv`) only, except by the sync and the open's checks. `recovery.rs` opens and
//! checks it (sled's own recovery, torn snapshots, the high-water mark, records left
//! behind); `sync.rs` is the sync the committer (or a lone writer) runs; `journal.rs` a
//! run's journal (its keys, grouped values, the record's state in a transition's entry, its
//! reads and writes).
//!
//! Key encoding (one tree, so that a record and an entry can change in one atomic batch):
//! - `r` + run id: the run record (JSON); once the run settled, with the journal's last
//!   entries in its field `journal_tail` (`journal.rs`);
//! - `j` + run id + `0x00` + entry index (u32, big-endian): a journal entry (a JSON object),
//!   or entries written together, from that index on (a JSON array of two or more: a
//!   step's completion and the entry after it, see `journal.rs`);
//! - `l` + run id: the run's load count (u32, big-endian; absent when 0), `poison.rs`;
//! - `s` + operation: latency statistics;
//! - `k` + space + `0x00` + key: a keyed record beside the runs (a schedule, a notification);
//! - `w` + wake time + run id, `v` + run id (for an entry not at 0), `W2`: the wake index
//!   (`wakes.rs`);
//! - `C`: the runs per status, left by a clean close for the next open (`recovery.rs`);
//! - in the tree `commit`, `m`: the commit sequence, written by every sync (`store/mark.rs`).
//!
//! Beside sled's files, `keel.mark` holds the high-water mark: the last commit known durable,
//! so that a store whose log lost acknowledged writes is refused at open instead of silently
//! rolled back (`store/mark.rs`).
//!
//! Run ids never contain `0x00` (see `ids.rs`), so one run's journal prefix is never a prefix
//! of another's, and big-endian indexes keep a journal in order under sled's byte ordering.
//!
//! **Every write is one key.** A status transition changes the journal and the run record.
//! One that settles the run is one write of the record, which holds the journal's last
//! entries (moved to keys first if the run changes again). Any other's journal entry
//! carries the record's new state (a `"record"` field beside the event) and is the
//! transition's one atomic write; the run record is rewritten right after it, as a view,
//! and [`SledStore::open`] repairs a view a crash left behind its journal. The store
//! never uses sled batches or transactions on the hot path: in sled 0.34 both take a
//! process-wide write lock that `flush` holds in read mode while it waits for the disk, so
//! every batch stalls until the current sync ends, blocks the runtime thread that applies
//! it, and (the lock being fair) every read and insert queued behind it. Measured, durable
//! starts ran at 1.3x the baseline with a batch per transition and at 4.5 - 6x without.
//! Only garbage collection still applies a batch, one per many runs (`delete_runs`), off the
//! runtime's threads.

use std::collections::BTreeMap;
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crate::error::{EngineError, Result};
use crate::ids::{JournalIndex, RunId};
use crate::journal::{Entry, RunRecord, RunStatus};
use crate::limits::RUN_RECORD_BYTES_MAX;
use crate::store::commit::{Committer, Durability, SyncTicket, Syncers};
use crate::store::mark::{self, Mark, Marker};
use crate::store::{Claimed, JournalStore, Read, RunsScan, ScannedRuns, Space, Takeover, Token};

mod counts;
mod journal;
mod keyed;
mod kv;
mod recovery;
mod scan;
mod sync;
mod wakes;

use counts::{status_of, StatusCounts};
use journal::{journal_key, journal_prefix};
use kv::Kv;
use recovery::{db_bytes, held_commit, keep_if_shorter, loss, open_db, repair_records, with_kept};
use scan::runs_page;
use sync::{sync_all, sync_fn, Writes};

const RUN_PREFIX: u8 = b'r';
const JOURNAL_PREFIX: u8 = b'j';
const STATS_PREFIX: u8 = b's';
const LOADS_PREFIX: u8 = b'l';

/// What opening a store that lost acknowledged data does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum LostData {
    /// Refuse it ([`EngineError::LostData`]), changing nothing. The default.
    #[default]
    Refuse,
    /// Open it with what is left, and move the high-water mark back to it: for an operator
    /// who knows of the loss and accepts it.
    Accept,
}

/// How a [`SledStore`] is opened.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct SledOptions {
    /// What a durable write survives.
    pub durability: Durability,
    /// Whether a store that lost acknowledged data is opened.
    pub lost_data: LostData,
    /// The most bytes sled's cache of the store's pages holds; sled's default (1 GiB) when
    /// `None`. The engine always passes one (`EngineBuilder::sled_cache_bytes`).
    pub cache_bytes: Option<u64>,
}

/// A [`JournalStore`] on sled 0.34.
pub(crate) struct SledStore {
    /// The store's tree (`kv.rs`), and its path.
    kv: Kv,
    /// Writes begun and done so far (`sync.rs`).
    writes: Arc<Writes>,
    /// Runs in each status (`counts.rs`).
    counts: Arc<StatusCounts>,
    /// The open's count of every record, while it runs in the background (`counts.rs`), and
    /// what stops it.
    counting: Option<(std::thread::JoinHandle<()>, Arc<AtomicBool>)>,
    /// The writes done when the engine released the store after a clean shutdown
    /// (`u64::MAX`: not released): a store dropped with no write since leaves its counts for
    /// the next open.
    released_at: AtomicU64,
    /// Set when the store is dropped; held while runs are deleted (`remove_runs`).
    closed: Arc<std::sync::Mutex<bool>>,
    /// Transitions between their entry and their record's rewrite, or that failed between
    /// them (a record behind its journal without a crash): none, for a clean close.
    transitions_open: AtomicU64,
    /// One of them held while a run's wake index entry changes (`wakes.rs`).
    wakes_locks: wakes::IndexLocks,
    // Dropped in this order: the committer's last sync hands its commit to the marker,
    // which marks it before it ends.
    committer: Committer,
    _marker: Marker,
}

impl Drop for SledStore {
    /// After a clean shutdown with nothing written since, and once the open's count ended,
    /// leaves the counts per status for the next open, which then reads no record
    /// (`recovery.rs`, `repair_records`). Best effort: a store without them is counted in
    /// full.
    fn drop(&mut self) {
        if let Some((count, stop)) = self.counting.take() {
            stop.store(true, Ordering::SeqCst);
            // It stops after the batch it reads (a panic in it was reported already).
            let _ = count.join();
        }
        let mut closed = self.closed.lock().unwrap_or_else(|p| p.into_inner());
        *closed = true;
        if self.released_at.load(Ordering::SeqCst) != self.writes.done()
            || self.transitions_open.load(Ordering::SeqCst) != 0
        {
            return;
        }
        let left = (|| {
            let sequence_tree = self
                .kv
                .sled()
                .open_tree(mark::SEQUENCE_TREE)
                .map_err(|e| e.to_string())?;
            let held = held_commit(self.path(), &sequence_tree).map_err(|e| e.to_string())?;
            let Some(counts) = self.counts.now() else {
                tracing::info!(
                    "the run counts are not whole (the open's count had not ended, or failed): \
                     the next open counts every run"
                );
                return Ok(());
            };
            let bytes = recovery::CleanClose::bytes(held, counts)?;
            self.kv
                .insert(recovery::CLEAN_CLOSE_KEY, bytes)
                .and_then(|_| self.kv.flush())
                .map_err(|e| e.to_string())
        })();
        if let Err(error) = left {
            tracing::warn!(%error, "the run counts could not be left for the next open: it counts every run");
        }
    }
}

impl std::fmt::Debug for SledStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledStore")
            .field("path", &self.path())
            .field("writes_done", &self.writes.done())
            .finish_non_exhaustive()
    }
}

impl SledStore {
    /// Opens (creating with owner-only permissions if needed) the store in `path`. A store
    /// whose log holds less than its high-water mark says it acknowledged is refused (see
    /// [`LostData`]), and so is one sled cannot recover, each with an error naming the file
    /// and what to do.
    pub(crate) fn open(path: &Path, options: SledOptions) -> Result<SledStore> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
            .map_err(|e| storage(path, sled::Error::Io(e)))?;
        let marked = mark::read(path).map_err(|e| storage(path, sled::Error::Io(e)))?;
        let kept = keep_if_shorter(path, &marked);
        let opening = std::time::Instant::now();
        let db = open_db(path, options.durability, options.cache_bytes)
            .map_err(|e| with_kept(e, kept.as_deref()))?;
        let kv = Kv::new(path, db);
        let recovered_ms = opening.elapsed().as_millis();
        let sequence_tree = kv
            .sled()
            .open_tree(mark::SEQUENCE_TREE)
            .map_err(|e| storage(path, e))?;
        let held = held_commit(path, &sequence_tree)?;
        match (loss(&kv, held, marked, kept.as_deref()), options.lost_data) {
            (None, _) => {
                if let Some(copy) = &kept {
                    // The store is whole: sled shrank its own file after the last mark.
                    if let Err(error) = std::fs::remove_file(copy) {
                        tracing::warn!(copy = %copy.display(), %error, "the copy of the log is not needed and could not be removed");
                    }
                }
            }
            (Some(refusal), LostData::Refuse) => return Err(refusal),
            (Some(refusal), LostData::Accept) => {
                tracing::error!(error = %refusal, "opening anyway: the operator accepted the loss");
            }
        }
        let repairing = std::time::Instant::now();
        let (counts, repaired) = repair_records(&kv, held)?;
        tracing::info!(
            path = %path.display(),
            db_bytes = db_bytes(path),
            recovered_ms,
            ?repaired,
            repaired_ms = repairing.elapsed().as_millis(),
            runs = counts.as_ref().map(|c| c.values().sum::<u64>()),
            cache_bytes = options.cache_bytes,
            "sled store open"
        );
        // Durable before anyone reads a repaired record, and before the mark claims what
        // sled recovered.
        sync_all(path, kv.sled(), options.durability).map_err(|e| sync_error(path, e))?;
        let start = Mark {
            commit: held,
            db_bytes: db_bytes(path),
        };
        let (marker, mark) = Marker::start(path, options.durability, start)
            .map_err(|e| sync_error(&path.join(mark::MARK_FILE), e))?;
        let writes = Arc::new(Writes::default());
        let sync = sync_fn(
            path,
            kv.sled().clone(),
            sequence_tree,
            held,
            mark,
            Arc::clone(&writes),
        )
        .map_err(|e| sync_error(path, e))?;
        let committer = Committer::start(sync, Syncers::LoneWriter);
        let (counts, counting) = match counts {
            Some(counts) => (Arc::new(StatusCounts::new(counts)), None),
            None => {
                let counts = Arc::new(StatusCounts::to_count());
                let stop = Arc::new(AtomicBool::new(false));
                let count = counts::count_in_background(
                    kv.clone(),
                    Arc::clone(&counts),
                    Arc::clone(&stop),
                    counts::pause_of(path),
                )
                .map_err(|e| EngineError::Storage {
                    path: path.to_owned(),
                    source: Box::new(e),
                })?;
                (counts, Some((count, stop)))
            }
        };
        Ok(SledStore {
            kv,
            writes,
            counts,
            counting,
            released_at: AtomicU64::new(u64::MAX),
            closed: Default::default(),
            transitions_open: AtomicU64::new(0),
            wakes_locks: wakes::IndexLocks::new(),
            committer,
            _marker: marker,
        })
    }

    fn path(&self) -> &Path {
        self.kv.path()
    }
}

fn storage(path: &Path, source: sled::Error) -> EngineError {
    EngineError::Storage {
        path: path.to_owned(),
        source: Box::new(source),
    }
}

fn sync_error(path: &Path, source: std::io::Error) -> EngineError {
    EngineError::Sync {
        path: path.to_owned(),
        source,
    }
}

fn run_key(id: &RunId) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + id.as_str().len());
    key.push(RUN_PREFIX);
    key.extend_from_slice(id.as_str().as_bytes());
    key
}

fn loads_key(id: &RunId) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + id.as_str().len());
    key.push(LOADS_PREFIX);
    key.extend_from_slice(id.as_str().as_bytes());
    key
}

fn readable_key(key: &[u8]) -> String {
    String::from_utf8_lossy(key).replace('\u{0}', "/")
}

fn decode_record(key: &[u8], bytes: &[u8]) -> Result<RunRecord> {
    serde_json::from_slice(bytes).map_err(|e| EngineError::Corrupt {
        key: readable_key(key),
        detail: format!("run record: {e}"),
    })
}

/// `value` as JSON bytes, refused when longer than `limit` (see [`crate::store::encode`]).
fn encode<T: serde::Serialize>(what: &str, value: &T, limit: usize) -> Result<Vec<u8>> {
    crate::store::encode(what, value, limit).map(String::into_bytes)
}

/// The store's operations, answered on the calling thread (the trait's futures are ready).
impl SledStore {
    /// Creates `record`'s run, with its wake index entry at 0 (written first), unless the
    /// run exists: then its record is returned, and the store holds what it held.
    fn insert_run(&self, record: &RunRecord) -> Result<Option<RunRecord>> {
        let key = run_key(&record.id);
        let bytes = encode("run record", record, RUN_RECORD_BYTES_MAX)?;
        self.create_with_entry(&record.id, || self.insert_record(&key, record, bytes))
    }

    fn insert_record(
        &self,
        key: &[u8],
        record: &RunRecord,
        bytes: Vec<u8>,
    ) -> Result<Option<RunRecord>> {
        let writing = self.writes.begin();
        let mut counting = self.counts.writing();
        match self.kv.create(key, bytes)? {
            None => {
                drop(writing);
                counting.moved(key, None, Some(record.status));
                Ok(None)
            }
            Some(current) => {
                writing.changed_nothing();
                decode_record(key, &current).map(Some)
            }
        }
    }

    fn read_run(&self, id: &RunId) -> Result<Option<RunRecord>> {
        let key = run_key(id);
        match self.kv.get(&key)? {
            Some(bytes) => decode_record(&key, &bytes).map(Some),
            None => Ok(None),
        }
    }

    fn read_load_count(&self, id: &RunId) -> Result<u32> {
        let key = loads_key(id);
        match self.kv.get(&key)? {
            None => Ok(0),
            Some(bytes) => {
                let bytes: [u8; 4] =
                    bytes
                        .as_ref()
                        .try_into()
                        .map_err(|_| EngineError::Corrupt {
                            key: readable_key(&key),
                            detail: format!("load count of {} bytes, not 4", bytes.len()),
                        })?;
                Ok(u32::from_be_bytes(bytes))
            }
        }
    }

    fn write_load_count(&self, id: &RunId, loads: u32) -> Result<()> {
        let key = loads_key(id);
        let _writing = self.writes.begin();
        if loads == 0 {
            self.kv.remove(key)?;
        } else {
            self.kv.insert(key, &loads.to_be_bytes())?;
        }
        Ok(())
    }

    fn write_stats(&self, operation: &str, record: &[u8]) -> Result<()> {
        crate::store::check_stats_size(operation, record)?;
        let mut key = vec![STATS_PREFIX];
        key.extend_from_slice(operation.as_bytes());
        let _writing = self.writes.begin();
        self.kv.insert(key, record)?;
        Ok(())
    }

    fn read_stats(&self) -> Result<Vec<(String, Vec<u8>)>> {
        let mut out = Vec::new();
        for item in self.kv.scan_prefix([STATS_PREFIX]) {
            let (key, bytes) = item?;
            out.push((
                String::from_utf8_lossy(&key[1..]).into_owned(),
                bytes.to_vec(),
            ));
        }
        Ok(out)
    }
}

impl JournalStore for SledStore {
    fn create_run<'a>(&'a self, record: &'a RunRecord) -> Read<'a, Option<RunRecord>> {
        ready(self.insert_run(record))
    }

    fn run<'a>(&'a self, id: &'a RunId) -> Read<'a, Option<RunRecord>> {
        ready(self.read_run(id))
    }

    fn runs(&self) -> Read<'_, Vec<Result<RunRecord>>> {
        // Every record: off the runtime's threads, which a large store would hold up.
        off_runtime(self.kv.clone(), |kv| read_runs(&kv))
    }

    fn runs_page<'a>(&'a self, scan: &'a RunsScan) -> Read<'a, ScannedRuns> {
        if scan.status.is_none() {
            // At most `limit` records and one more: answered here.
            return ready(runs_page(&self.kv, scan));
        }
        // Up to `examine_max` records of other statuses (milliseconds of decoding): off the
        // runtime's threads, so that a console asking every second never stalls runs.
        let scan = scan.clone();
        off_runtime(self.kv.clone(), move |kv| runs_page(&kv, &scan))
    }

    fn run_counts(&self) -> Read<'_, BTreeMap<RunStatus, u64>> {
        Box::pin(self.counts.counted(self.path()))
    }

    fn journal<'a>(&'a self, id: &'a RunId) -> Read<'a, Vec<Entry>> {
        ready(self.read_journal(id))
    }

    fn append(
        &self,
        id: &RunId,
        index: JournalIndex,
        entries: &[Entry],
        record: Option<&RunRecord>,
        _token: Token,
    ) -> Result<()> {
        // One engine owns a sled store: every run is its own, whatever the token.
        self.write_entries(id, index, entries, record)
    }

    fn delete_runs<'a>(&'a self, ids: &'a [RunId]) -> Read<'a, ()> {
        // sled 0.34's batch waits out any sync in progress (see the module doc): off the
        // runtime's threads.
        let (writes, ids) = (Arc::clone(&self.writes), ids.to_vec());
        let (counts, closed) = (Arc::clone(&self.counts), Arc::clone(&self.closed));
        off_runtime(self.kv.clone(), move |kv| {
            remove_runs(&kv, &writes, &counts, &closed, &ids)
        })
    }

    fn load_count<'a>(&'a self, id: &'a RunId) -> Read<'a, u32> {
        ready(self.read_load_count(id))
    }

    fn set_load_count(&self, id: &RunId, loads: u32) -> Result<()> {
        self.write_load_count(id, loads)
    }

    fn put_stats(&self, operation: &str, record: &[u8]) -> Result<()> {
        self.write_stats(operation, record)
    }

    fn stats(&self) -> Read<'_, Vec<(String, Vec<u8>)>> {
        ready(self.read_stats())
    }

    fn put_keyed(&self, space: Space, key: &str, value: &str) -> Result<()> {
        self.write_keyed(space, key, value)
    }

    fn delete_keyed(&self, space: Space, key: &str) -> Result<()> {
        self.remove_keyed(space, key)
    }

    fn keyed(&self, space: Space) -> Read<'_, Vec<(String, String)>> {
        ready(self.read_keyed(space))
    }

    fn sync(&self) -> SyncTicket {
        self.committer.ticket()
    }

    fn sync_alone(&self) -> SyncTicket {
        self.committer.ticket_alone()
    }

    fn release(&self) -> Read<'_, ()> {
        self.released_at.store(self.writes.done(), Ordering::SeqCst);
        ready(Ok(()))
    }

    fn others_stats(&self) -> Read<'_, Vec<(String, Vec<u8>)>> {
        ready(Ok(Vec::new()))
    }

    fn keeps_wakes(&self) -> bool {
        true
    }

    fn set_wake(&self, id: &RunId, wake_ms: u64) -> Result<()> {
        self.write_wake(id, wake_ms)
    }

    fn wake_if_indexed(&self, id: &RunId) -> Result<()> {
        self.write_wake_if_indexed(id, 0)
    }

    fn clear_wake(&self, id: &RunId) -> Result<()> {
        self.remove_wake(id)
    }

    fn clear_wake_at(&self, id: &RunId, wake_ms: u64) -> Result<()> {
        self.remove_wake_at(id, wake_ms)
    }

    fn wakes(&self) -> Read<'_, Option<Vec<(u64, RunId)>>> {
        ready(self.read_wakes())
    }

    fn wakes_built(&self) -> Result<()> {
        self.write_wakes_built()
    }

    fn claim<'a>(&'a self, _workflows: &'a [String], _now_ms: u64) -> Read<'a, Claimed> {
        ready(Ok(Claimed::Everything))
    }

    fn claim_every(&self) -> Option<std::time::Duration> {
        None
    }

    fn take<'a>(&'a self, id: &'a RunId, _takeover: Takeover) -> Read<'a, Option<Token>> {
        ready(self.read_run(id).map(|run| run.map(|_| Token::CREATED)))
    }

    fn fenced(&self, _id: &RunId, _token: Token) -> bool {
        false
    }

    fn leased(&self) -> bool {
        true
    }

    fn broken(&self) -> tokio::sync::watch::Receiver<Option<String>> {
        self.committer.broken()
    }
}

/// Every run record (see [`JournalStore::runs`]); blocking.
fn read_runs(kv: &Kv) -> Result<Vec<Result<RunRecord>>> {
    let mut records = Vec::new();
    for item in kv.scan_prefix([RUN_PREFIX]) {
        let (key, bytes) = item?;
        records.push(decode_record(&key, &bytes));
    }
    Ok(records)
}

/// Deletes the runs `ids` in one batch (see [`JournalStore::delete_runs`]); blocking.
fn remove_runs(
    kv: &Kv,
    writes: &Writes,
    counts: &StatusCounts,
    closed: &std::sync::Mutex<bool>,
    ids: &[RunId],
) -> Result<()> {
    // One deletion at a time, each read and applied whole before the store is dropped (which
    // may leave the counts: see `Drop`), and never after: a deletion racing another of the
    // same run, or the drop, would move the counts wrongly.
    let closed = closed.lock().unwrap_or_else(|p| p.into_inner());
    if *closed {
        return Err(EngineError::ShutDown);
    }
    // A run named twice is deleted once: its record would otherwise leave the counts twice.
    let mut ids = ids.iter().collect::<Vec<_>>();
    ids.sort();
    ids.dedup();
    let mut keys = Vec::new();
    for id in &ids {
        for key in kv.keys_with_prefix(journal_prefix(id)) {
            keys.push(key?);
        }
        keys.push(run_key(id).into());
        keys.push(loads_key(id).into());
        keys.extend(wakes::keys_of(kv, id)?.into_iter().map(Into::into));
    }
    // The records' statuses read, and the batch applied, under the counts' lock while the
    // open's count runs (`counts.rs`).
    let mut counting = counts.writing();
    let mut removed = Vec::with_capacity(ids.len());
    for id in ids {
        let record = kv.get(run_key(id))?;
        removed.push((run_key(id), record.as_deref().and_then(status_of)));
    }
    let writing = writes.begin();
    kv.remove_all(keys)?;
    drop(writing);
    for (key, status) in removed {
        counting.moved(&key, status, None);
    }
    Ok(())
}

/// Runs the blocking `work` on the store's tree off the runtime's threads.
fn off_runtime<T: Send + 'static>(
    kv: Kv,
    work: impl FnOnce(Kv) -> Result<T> + Send + 'static,
) -> Read<'static, T> {
    Box::pin(async move {
        let path = kv.path().to_owned();
        tokio::task::spawn_blocking(move || work(kv))
            .await
            .map_err(|e| EngineError::Storage {
                path,
                source: format!("the store's blocking thread failed: {e}").into(),
            })?
    })
}

/// A read answered already.
fn ready<'a, T: Send + 'a>(answer: Result<T>) -> Read<'a, T> {
    Box::pin(std::future::ready(answer))
}

/// Test and tooling access to raw records, for corrupting a store on purpose and for reading
/// one that an engine must not open.
// Reached through `crate::test_utilities` only.
#[cfg_attr(not(feature = "test-utilities"), allow(unreachable_pub, dead_code))]
pub mod raw {
    use super::*;

    /// The raw key of a run record.
    pub fn run_key_of(id: &RunId) -> Vec<u8> {
        run_key(id)
    }

    /// The raw key of a journal entry.
    pub fn journal_key_of(id: &RunId, index: JournalIndex) -> Vec<u8> {
        journal_key(id, index)
    }

    /// The length of `db` at the newest high-water mark of the store in `dir`: what its
    /// acknowledged writes span (a clean close writes its run counts after it). `None`
    /// without a readable mark.
    pub fn marked_db_bytes(dir: &Path) -> Option<u64> {
        match mark::read(dir) {
            Ok(mark::Marked::At(mark)) => Some(mark.db_bytes),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests;
