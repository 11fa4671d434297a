//! The embedded store: run records and journals in one sled tree.
//!
//! Key encoding (one tree, so that a record and an entry can change in one atomic batch):
//! - `r` + run id: the run record (JSON);
//! - `j` + run id + `0x00` + entry index (u32, big-endian): a journal entry (JSON);
//! - `l` + run id: the run's load count (u32, big-endian; absent when 0), `poison.rs`;
//! - `s` + operation: latency statistics;
//! - `m`: the commit sequence, written by every sync (`store/mark.rs`).
//!
//! Beside sled's files, `keel.mark` holds the high-water mark: the last commit known durable,
//! so that a store whose log lost acknowledged writes is refused at open instead of silently
//! rolled back (`store/mark.rs`).
//!
//! Run ids never contain `0x00` (see `ids.rs`), so one run's journal prefix is never a prefix
//! of another's, and big-endian indexes keep a journal in order under sled's byte ordering.
//!
//! **Every write is one key.** A status transition changes the journal and the run record;
//! its journal entry carries the record's new state (a `"record"` field beside the event) and
//! is the transition's one atomic write. The run record is rewritten right after it, as a
//! view, and [`SledStore::open`] repairs a view a crash left behind its journal. The store
//! never uses sled batches or transactions on the hot path: in sled 0.34 both take a
//! process-wide write lock that `flush` holds in read mode while it waits for the disk, so
//! every batch stalls until the current sync ends, blocks the runtime thread that applies
//! it, and (the lock being fair) every read and insert queued behind it. Measured, durable
//! starts ran at 1.3x the baseline with a batch per transition and at 4.5 - 6x without.
//! Only garbage collection still applies a batch, one per many runs (`delete_runs`), off the
//! runtime's threads.

use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::contain::contained_sync;
use crate::error::{EngineError, Result};
use crate::ids::{JournalIndex, RunId};
use crate::journal::{Entry, RunRecord, RunStatus};
use crate::limits::{
    ENTRY_BYTES_MAX, OPEN_LOCK_WAIT_MAX, RUN_RECORD_BYTES_MAX, STATS_RECORD_BYTES_MAX,
    TRANSITION_ENTRY_BYTES_MAX,
};
use crate::store::commit::{Committer, Durability, SyncTicket};
use crate::store::mark::{self, Commit, Mark, MarkHandle, Marked, Marker};
use crate::store::JournalStore;

const RUN_PREFIX: u8 = b'r';
const JOURNAL_PREFIX: u8 = b'j';
const STATS_PREFIX: u8 = b's';
const LOADS_PREFIX: u8 = b'l';

/// What opening a store that lost acknowledged data does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LostData {
    /// Refuse it ([`EngineError::LostData`]), changing nothing. The default.
    #[default]
    Refuse,
    /// Open it with what is left, and move the high-water mark back to it: for an operator
    /// who knows of the loss and accepts it.
    Accept,
}

/// How a [`SledStore`] is opened.
#[derive(Clone, Copy, Debug, Default)]
pub struct SledOptions {
    /// What a durable write survives.
    pub durability: Durability,
    /// Whether a store that lost acknowledged data is opened.
    pub lost_data: LostData,
}

/// A [`JournalStore`] on sled 0.34.
pub struct SledStore {
    path: PathBuf,
    db: sled::Db,
    // Dropped in this order: the committer's last sync hands its commit to the marker,
    // which marks it before it ends.
    committer: Committer,
    _marker: Marker,
}

impl SledStore {
    /// Opens (creating with owner-only permissions if needed) the store in `path`. A store
    /// whose log holds less than its high-water mark says it acknowledged is refused (see
    /// [`LostData`]), and so is one sled cannot recover, each with an error naming the file
    /// and what to do.
    pub fn open(path: &Path, options: SledOptions) -> Result<SledStore> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
            .map_err(|e| storage(path, sled::Error::Io(e)))?;
        let marked = mark::read(path).map_err(|e| storage(path, sled::Error::Io(e)))?;
        let kept = keep_if_shorter(path, &marked)?;
        let db = open_db(path).map_err(|e| with_kept(e, kept.as_deref()))?;
        let held = held_commit(path, &db)?;
        match (
            loss(path, &db, held, marked, kept.as_deref()),
            options.lost_data,
        ) {
            (None, _) => {
                if let Some(copy) = &kept {
                    // The store is whole: sled shrank its own file after the last mark.
                    std::fs::remove_file(copy).map_err(|e| storage(path, sled::Error::Io(e)))?;
                }
            }
            (Some(refusal), LostData::Refuse) => return Err(refusal),
            (Some(refusal), LostData::Accept) => {
                tracing::error!(error = %refusal, "opening anyway: the operator accepted the loss");
            }
        }
        let start = Mark {
            commit: held,
            db_bytes: db_bytes(path),
        };
        let (marker, mark) = Marker::start(path, options.durability, start)
            .map_err(|e| sync_error(&path.join(mark::MARK_FILE), e))?;
        let mut sync = sync_fn(path, db.clone(), options.durability, held, mark)
            .map_err(|e| sync_error(path, e))?;
        if repair_records(path, &db)? > 0 {
            // Durable before anyone reads the repaired records.
            sync().map_err(|e| sync_error(path, e))?;
        }
        let committer = Committer::start(sync);
        Ok(SledStore {
            path: path.to_owned(),
            db,
            committer,
            _marker: marker,
        })
    }

    fn storage(&self, error: sled::Error) -> EngineError {
        storage(&self.path, error)
    }
}

fn storage(path: &Path, source: sled::Error) -> EngineError {
    EngineError::Storage {
        path: path.to_owned(),
        source,
    }
}

fn sync_error(path: &Path, source: std::io::Error) -> EngineError {
    EngineError::Sync {
        path: path.to_owned(),
        source,
    }
}

/// Opens sled, waiting up to `OPEN_LOCK_WAIT_MAX` for the lock: sled 0.34 releases its file
/// lock on background threads after its last handle is dropped, so an engine reopened in the
/// same process right after a shutdown can find the lock still held for a moment (about 1.5%
/// of immediate reopens here). A lock held longer is another process's.
fn open_db(path: &Path) -> Result<sled::Db> {
    remove_torn_snapshots(path)?;
    let deadline = std::time::Instant::now() + OPEN_LOCK_WAIT_MAX;
    loop {
        // sled 0.34 panics on some damaged logs (a `db` file cut short, say) instead of
        // returning an error.
        let opened = contained_sync(|| sled::Config::new().path(path).open()).map_err(|panic| {
            EngineError::StoreDamaged {
                file: path.join("db"),
                detail: format!("sled cannot recover its log from it (sled panicked: {panic})"),
                advice: RESTORE_ADVICE.into(),
            }
        })?;
        match opened.map_err(|e| open_error(path, e)) {
            Err(EngineError::Locked { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            other => return other,
        }
    }
}

/// Removes snapshot files that sled 0.34.7 would choose at recovery and then reject.
///
/// sled writes a snapshot to `snap.<lsn>.generating`, syncs it, and renames it to
/// `snap.<lsn>`: the rename is the commit point. But its recovery lists `.generating` files as
/// candidates too, and picks the one sorting last, so a process killed while writing a
/// snapshot leaves a torn file that makes every later open fail with `Corruption` (sled issues
/// #1166, #1527, #1533; our crash tests met it about once in a thousand kills). A
/// `.generating` file that fails the length and CRC check sled applies could never be used, so
/// removing it returns the store to its last committed snapshot plus the log, which is what
/// sled's write protocol intends. A `.generating` file that passes the check is left alone.
fn remove_torn_snapshots(path: &Path) -> Result<()> {
    let entries = match std::fs::read_dir(path) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(storage(path, sled::Error::Io(e))),
    };
    for entry in entries {
        let entry = entry.map_err(|e| storage(path, sled::Error::Io(e)))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !(name.starts_with("snap.") && name.ends_with(".generating")) {
            continue;
        }
        let bytes = std::fs::read(entry.path()).map_err(|e| storage(path, sled::Error::Io(e)))?;
        if snapshot_is_whole(&bytes) {
            continue;
        }
        tracing::warn!(file = %entry.path().display(), bytes = bytes.len(), "removing a torn sled snapshot left by a crash");
        std::fs::remove_file(entry.path()).map_err(|e| storage(path, sled::Error::Io(e)))?;
        File::open(path)
            .and_then(|dir| dir.sync_all())
            .map_err(|e| sync_error(path, e))?;
    }
    Ok(())
}

/// sled's snapshot layout: body, 8-byte length, 4-byte little-endian CRC-32 of the body.
fn snapshot_is_whole(bytes: &[u8]) -> bool {
    if bytes.len() <= 12 {
        return false;
    }
    let (body, trailer) = bytes.split_at(bytes.len() - 12);
    let crc = u32::from_le_bytes(trailer[8..].try_into().expect("4 bytes"));
    crc32fast::hash(body) == crc
}

/// sled reports a held lock as an `Other` I/O error whose text says so; there is no typed
/// variant in 0.34.
fn open_error(path: &Path, error: sled::Error) -> EngineError {
    match &error {
        sled::Error::Io(io) if io.to_string().contains("could not acquire lock") => {
            EngineError::Locked {
                path: path.to_owned(),
            }
        }
        sled::Error::Corruption { .. } => EngineError::StoreDamaged {
            file: path.join("db"),
            detail: format!("sled reports {error}"),
            advice: RESTORE_ADVICE.into(),
        },
        _ => storage(path, error),
    }
}

/// What to do about a store sled cannot read.
const RESTORE_ADVICE: &str = "restore the data directory from a backup (a store that opens with what is left would silently miss acknowledged work)";

/// The commit sequence the store holds: the last sync whose writes are all in it.
fn held_commit(path: &Path, db: &sled::Db) -> Result<Commit> {
    let bytes = db.get(mark::SEQUENCE_KEY).map_err(|e| storage(path, e))?;
    match bytes {
        None => Ok(Commit::default()),
        Some(bytes) => Commit::from_bytes(&bytes).ok_or_else(|| EngineError::Corrupt {
            key: readable_key(mark::SEQUENCE_KEY),
            detail: format!("commit sequence of {} bytes, not 16", bytes.len()),
        }),
    }
}

/// The length of the store's `db` file (0 if it has none).
fn db_bytes(path: &Path) -> u64 {
    std::fs::metadata(path.join("db")).map_or(0, |m| m.len())
}

/// Copies `db`, as found, aside when it is shorter than at the last mark, before sled's
/// recovery rewrites it (`store/mark.rs`); returns the copy's path.
fn keep_if_shorter(path: &Path, marked: &Marked) -> Result<Option<PathBuf>> {
    let Marked::At(mark) = marked else {
        return Ok(None);
    };
    let found = db_bytes(path);
    if found >= mark.db_bytes {
        return Ok(None);
    }
    let copy = path.join(format!("db.as-found-{}", wall_clock_ms()));
    tracing::warn!(found, marked = mark.db_bytes, copy = %copy.display(), "the store's log is shorter than at its last mark: keeping it as found before sled opens it");
    std::fs::copy(path.join("db"), &copy).map_err(|e| storage(path, sled::Error::Io(e)))?;
    Ok(Some(copy))
}

/// `error`, telling where the damaged log was kept, if it was.
fn with_kept(error: EngineError, kept: Option<&Path>) -> EngineError {
    match (error, kept) {
        (
            EngineError::StoreDamaged {
                file,
                detail,
                advice,
            },
            Some(kept),
        ) => EngineError::StoreDamaged {
            file,
            detail,
            advice: format!("{advice}; the log as found is kept in {}", kept.display()),
        },
        (error, _) => error,
    }
}

/// What is wrong, if the store holds less than its high-water mark says it acknowledged
/// (or the mark cannot be read).
fn loss(
    path: &Path,
    db: &sled::Db,
    held: Commit,
    marked: Marked,
    kept: Option<&Path>,
) -> Option<EngineError> {
    match marked {
        Marked::Absent => {
            if !db.is_empty() {
                tracing::warn!(file = %path.join(mark::MARK_FILE).display(), "the store has no high-water mark (written before marks existed, or the file was removed): starting one");
            }
            None
        }
        Marked::At(marked) if marked.commit.sequence <= held.sequence => None,
        Marked::At(marked) => Some(EngineError::LostData {
            path: path.to_owned(),
            held: held.sequence,
            held_at: time_text(held.at_ms),
            marked: marked.commit.sequence,
            marked_at: time_text(marked.commit.at_ms),
            kept: kept.map(Path::to_owned),
        }),
        Marked::Unreadable => Some(EngineError::StoreDamaged {
            file: path.join(mark::MARK_FILE),
            detail: "it holds no whole high-water mark, so whether the store lost acknowledged data cannot be told".into(),
            advice: "restore the data directory from a backup, or open it with accept_data_loss to trust what sled holds".into(),
        }),
    }
}

/// An instant (ms since the Unix epoch) as RFC 3339 text, or "never" for 0.
fn time_text(at_ms: u64) -> String {
    if at_ms == 0 {
        return "never".into();
    }
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(at_ms);
    humantime::format_rfc3339_millis(at).to_string()
}

/// The sync the committer runs. sled's `flush` writes its buffers and, on Linux, calls
/// `sync_file_range`; for power-loss durability the log file is then `fdatasync`ed, and so is
/// every blob file sled has created since (sled writes blobs without syncing them).
///
/// Each sync first writes its commit sequence (`store/mark.rs`), then hands the commit to
/// the marker once it is durable.
fn sync_fn(
    path: &Path,
    db: sled::Db,
    durability: Durability,
    held: Commit,
    mark: MarkHandle,
) -> std::io::Result<impl FnMut() -> std::io::Result<()> + Send + 'static> {
    let log = File::open(path.join("db"))?;
    let blobs_dir = path.join("blobs");
    // The directory entries of the store's files must be durable too.
    File::open(path)?.sync_all()?;
    let mut synced_blobs: HashSet<std::ffi::OsString> = HashSet::new();
    let mut sequence = held.sequence;
    Ok(move || {
        sequence += 1;
        let commit = Commit {
            sequence,
            at_ms: wall_clock_ms(),
        };
        db.insert(mark::SEQUENCE_KEY, &commit.to_bytes())
            .map_err(std::io::Error::other)?;
        db.flush().map_err(std::io::Error::other)?;
        if durability == Durability::ProcessCrash {
            mark.durable(commit, log.metadata()?.len());
            return Ok(());
        }
        log.sync_data()?;
        let mut new_blob = false;
        if let Ok(entries) = std::fs::read_dir(&blobs_dir) {
            for entry in entries {
                let entry = entry?;
                if synced_blobs.insert(entry.file_name()) {
                    File::open(entry.path())?.sync_all()?;
                    new_blob = true;
                }
            }
        }
        if new_blob {
            File::open(&blobs_dir)?.sync_all()?;
        }
        mark.durable(commit, log.metadata()?.len());
        Ok(())
    })
}

/// The system's time, for the commit sequence (which says when a sync happened, for
/// operators; not the engine's clock, which the store does not know).
fn wall_clock_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The part of a run record a status transition changes, as stored in the transition's
/// journal entry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct RecordState {
    status: RunStatus,
    updated_at_ms: u64,
    finished_at_ms: Option<u64>,
    output: Option<Value>,
    error: Option<String>,
}

impl RecordState {
    fn of(record: &RunRecord) -> RecordState {
        RecordState {
            status: record.status,
            updated_at_ms: record.updated_at_ms,
            finished_at_ms: record.finished_at_ms,
            output: record.output.clone(),
            error: record.error.clone(),
        }
    }

    fn apply_to(self, record: &mut RunRecord) {
        record.status = self.status;
        record.updated_at_ms = self.updated_at_ms;
        record.finished_at_ms = self.finished_at_ms;
        record.output = self.output;
        record.error = self.error;
    }
}

/// The `"record"` field of a stored journal entry; an [`Entry`] decodes past it.
#[derive(Deserialize)]
struct StoredRecordState {
    record: Option<RecordState>,
}

/// The stored bytes of a transition's journal entry: the entry with the record's new state.
fn encode_transition(entry: &Entry, record: &RunRecord) -> Result<Vec<u8>> {
    let what = "journal entry with its run record's state";
    let serialise = |source| EngineError::Serialise {
        what: what.into(),
        source,
    };
    let mut value = serde_json::to_value(entry).map_err(serialise)?;
    let state = serde_json::to_value(RecordState::of(record)).map_err(serialise)?;
    value
        .as_object_mut()
        .expect("an entry serialises to a JSON object")
        .insert("record".into(), state);
    encode(what, &value, TRANSITION_ENTRY_BYTES_MAX)
}

/// Brings every run record up to the state its journal's last entry gives it, where a crash
/// came between a transition's entry and the record's rewrite. Only the last entry can be
/// ahead: a run writes its record before its next entry, and sled recovers a prefix of its
/// log. Records or entries that do not decode are left for the engine to report. Returns how
/// many records were rewritten.
fn repair_records(path: &Path, db: &sled::Db) -> Result<usize> {
    let mut repaired = 0;
    for item in db.scan_prefix([RUN_PREFIX]) {
        let (key, bytes) = item.map_err(|e| storage(path, e))?;
        let Ok(mut record) = decode_record(&key, &bytes) else {
            continue;
        };
        let last = db
            .scan_prefix(journal_prefix(&record.id))
            .next_back()
            .transpose()
            .map_err(|e| storage(path, e))?;
        let Some((_, entry)) = last else { continue };
        let Ok(StoredRecordState {
            record: Some(state),
        }) = serde_json::from_slice(&entry)
        else {
            continue;
        };
        if state == RecordState::of(&record) {
            continue;
        }
        tracing::warn!(run_id = %record.id, status = %state.status, "repairing a run record a crash left behind its journal");
        state.apply_to(&mut record);
        db.insert(&key, encode("run record", &record, RUN_RECORD_BYTES_MAX)?)
            .map_err(|e| storage(path, e))?;
        repaired += 1;
    }
    Ok(repaired)
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

fn journal_prefix(id: &RunId) -> Vec<u8> {
    let mut key = Vec::with_capacity(2 + id.as_str().len() + 4);
    key.push(JOURNAL_PREFIX);
    key.extend_from_slice(id.as_str().as_bytes());
    key.push(0);
    key
}

fn journal_key(id: &RunId, index: JournalIndex) -> Vec<u8> {
    let mut key = journal_prefix(id);
    key.extend_from_slice(&index.0.to_be_bytes());
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

fn encode<T: serde::Serialize>(what: &str, value: &T, limit: usize) -> Result<Vec<u8>> {
    let bytes = serde_json::to_vec(value).map_err(|source| EngineError::Serialise {
        what: what.into(),
        source,
    })?;
    if bytes.len() > limit {
        return Err(EngineError::TooLarge {
            what: what.into(),
            bytes: bytes.len(),
            limit,
        });
    }
    Ok(bytes)
}

impl JournalStore for SledStore {
    fn create_run(&self, record: &RunRecord) -> Result<Option<RunRecord>> {
        let key = run_key(&record.id);
        let bytes = encode("run record", record, RUN_RECORD_BYTES_MAX)?;
        match self
            .db
            .compare_and_swap(&key, None as Option<&[u8]>, Some(bytes))
        {
            Ok(Ok(())) => Ok(None),
            Ok(Err(cas)) => {
                let current = cas
                    .current
                    .expect("compare_and_swap from None fails only on an existing value");
                decode_record(&key, &current).map(Some)
            }
            Err(e) => Err(self.storage(e)),
        }
    }

    fn run(&self, id: &RunId) -> Result<Option<RunRecord>> {
        let key = run_key(id);
        match self.db.get(&key).map_err(|e| self.storage(e))? {
            Some(bytes) => decode_record(&key, &bytes).map(Some),
            None => Ok(None),
        }
    }

    fn runs(&self) -> Result<Vec<Result<RunRecord>>> {
        let mut records = Vec::new();
        for item in self.db.scan_prefix([RUN_PREFIX]) {
            let (key, bytes) = item.map_err(|e| self.storage(e))?;
            records.push(decode_record(&key, &bytes));
        }
        Ok(records)
    }

    fn journal(&self, id: &RunId) -> Result<Vec<Entry>> {
        let prefix = journal_prefix(id);
        let mut entries = Vec::new();
        for item in self.db.scan_prefix(&prefix) {
            let (key, bytes) = item.map_err(|e| self.storage(e))?;
            let corrupt = |detail: String| EngineError::Corrupt {
                key: readable_key(&key),
                detail,
            };
            let index_bytes: [u8; 4] = key[prefix.len()..].try_into().map_err(|_| {
                corrupt(format!(
                    "journal key has {} index bytes, not 4",
                    key.len() - prefix.len()
                ))
            })?;
            let index = u32::from_be_bytes(index_bytes);
            if index as usize != entries.len() {
                return Err(corrupt(format!(
                    "journal index {index} follows {} entries: gap",
                    entries.len()
                )));
            }
            let entry: Entry = serde_json::from_slice(&bytes)
                .map_err(|e| corrupt(format!("journal entry: {e}")))?;
            entries.push(entry);
        }
        Ok(entries)
    }

    fn append(
        &self,
        id: &RunId,
        index: JournalIndex,
        entry: &Entry,
        record: Option<&RunRecord>,
    ) -> Result<()> {
        let entry_bytes = encode("journal entry", entry, ENTRY_BYTES_MAX)?;
        match record {
            None => {
                self.db
                    .insert(journal_key(id, index), entry_bytes)
                    .map_err(|e| self.storage(e))?;
            }
            Some(record) => {
                // Both encoded (and checked) before either is written.
                let record_bytes = encode("run record", record, RUN_RECORD_BYTES_MAX)?;
                let transition = encode_transition(entry, record)?;
                // The commit point: the entry with the record's new state.
                self.db
                    .insert(journal_key(id, index), transition)
                    .map_err(|e| self.storage(e))?;
                crate::crash::point("store.after_transition_entry");
                // The view; `repair_records` redoes it if a crash comes first.
                self.db
                    .insert(run_key(id), record_bytes)
                    .map_err(|e| self.storage(e))?;
            }
        }
        Ok(())
    }

    fn delete_runs(&self, ids: &[RunId]) -> Result<()> {
        let mut batch = sled::Batch::default();
        for id in ids {
            for item in self.db.scan_prefix(journal_prefix(id)).keys() {
                batch.remove(item.map_err(|e| self.storage(e))?);
            }
            batch.remove(run_key(id));
            batch.remove(loads_key(id));
        }
        self.db.apply_batch(batch).map_err(|e| self.storage(e))
    }

    fn load_count(&self, id: &RunId) -> Result<u32> {
        let key = loads_key(id);
        match self.db.get(&key).map_err(|e| self.storage(e))? {
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

    fn set_load_count(&self, id: &RunId, loads: u32) -> Result<()> {
        let key = loads_key(id);
        if loads == 0 {
            self.db.remove(key).map_err(|e| self.storage(e))?;
        } else {
            self.db
                .insert(key, &loads.to_be_bytes())
                .map_err(|e| self.storage(e))?;
        }
        Ok(())
    }

    fn put_stats(&self, operation: &str, record: &[u8]) -> Result<()> {
        if record.len() > STATS_RECORD_BYTES_MAX {
            return Err(EngineError::TooLarge {
                what: format!("latency statistics of {operation}"),
                bytes: record.len(),
                limit: STATS_RECORD_BYTES_MAX,
            });
        }
        let mut key = vec![STATS_PREFIX];
        key.extend_from_slice(operation.as_bytes());
        self.db.insert(key, record).map_err(|e| self.storage(e))?;
        Ok(())
    }

    fn stats(&self) -> Result<Vec<(String, Vec<u8>)>> {
        let mut out = Vec::new();
        for item in self.db.scan_prefix([STATS_PREFIX]) {
            let (key, bytes) = item.map_err(|e| self.storage(e))?;
            out.push((
                String::from_utf8_lossy(&key[1..]).into_owned(),
                bytes.to_vec(),
            ));
        }
        Ok(out)
    }

    fn sync(&self) -> SyncTicket {
        self.committer.ticket()
    }
}

/// Test and tooling access to raw records, for corrupting a store on purpose and for reading
/// one that an engine must not open.
#[doc(hidden)]
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{Attempt, StepIndex};
    use crate::journal::Event;

    const PROCESS_CRASH: SledOptions = SledOptions {
        durability: Durability::ProcessCrash,
        lost_data: LostData::Refuse,
    };

    fn running(id: &str) -> RunRecord {
        RunRecord {
            id: RunId::new(id).unwrap(),
            workflow: "test.flow".into(),
            version: 1,
            input: serde_json::json!({"n": 1}),
            status: RunStatus::Running,
            created_at_ms: 10,
            updated_at_ms: 10,
            finished_at_ms: None,
            output: None,
            error: None,
            parent: None,
        }
    }

    fn completed(id: &str) -> RunRecord {
        RunRecord {
            status: RunStatus::Completed,
            updated_at_ms: 20,
            finished_at_ms: Some(20),
            output: Some(serde_json::json!({"sum": 3})),
            ..running(id)
        }
    }

    fn entries() -> [Entry; 2] {
        [
            Entry {
                at_ms: 11,
                event: Event::StepStarted {
                    step: StepIndex(0),
                    kind: "test.add".into(),
                    argument: serde_json::json!({"n": 1}),
                    attempt: Attempt(1),
                    compensable: true,
                },
            },
            Entry {
                at_ms: 20,
                event: Event::RunCompleted {
                    output: serde_json::json!({"sum": 3}),
                },
            },
        ]
    }

    /// Writes run `id` with a step entry and a completing transition.
    fn write_completed_run(store: &SledStore, id: &str) {
        let [started, done] = entries();
        let run = RunId::new(id).unwrap();
        assert_eq!(store.create_run(&running(id)).unwrap(), None);
        store.append(&run, JournalIndex(0), &started, None).unwrap();
        store
            .append(&run, JournalIndex(1), &done, Some(&completed(id)))
            .unwrap();
    }

    /// A transition is one key: the journal entry carries the record's new state, reads give
    /// back the entry as written, and the record view matches.
    #[test]
    fn a_transition_is_one_entry_carrying_the_record_state() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), PROCESS_CRASH).unwrap();
        write_completed_run(&store, "a");
        let id = RunId::new("a").unwrap();
        assert_eq!(store.journal(&id).unwrap(), entries().to_vec());
        assert_eq!(store.run(&id).unwrap(), Some(completed("a")));
        let raw = store
            .db
            .get(journal_key(&id, JournalIndex(1)))
            .unwrap()
            .unwrap();
        let stored: StoredRecordState = serde_json::from_slice(&raw).unwrap();
        assert_eq!(stored.record, Some(RecordState::of(&completed("a"))));
    }

    /// A crash between a transition's entry and the record's rewrite leaves the record behind;
    /// the next open brings it up to the journal, and leaves other runs as they are.
    #[test]
    fn open_repairs_a_record_left_behind_its_journal() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), PROCESS_CRASH).unwrap();
        write_completed_run(&store, "behind");
        write_completed_run(&store, "current");
        let running_only = running("running");
        assert_eq!(store.create_run(&running_only).unwrap(), None);
        let [started, _] = entries();
        store
            .append(&running_only.id, JournalIndex(0), &started, None)
            .unwrap();
        // What a crash before the record's rewrite leaves: the old record.
        let behind = RunId::new("behind").unwrap();
        store
            .db
            .insert(
                run_key(&behind),
                serde_json::to_vec(&running("behind")).unwrap(),
            )
            .unwrap();
        assert_eq!(store.run(&behind).unwrap(), Some(running("behind")));
        store.db.flush().unwrap();
        drop(store);

        let store = SledStore::open(dir.path(), PROCESS_CRASH).unwrap();
        assert_eq!(store.run(&behind).unwrap(), Some(completed("behind")));
        let current = RunId::new("current").unwrap();
        assert_eq!(store.run(&current).unwrap(), Some(completed("current")));
        assert_eq!(store.run(&running_only.id).unwrap(), Some(running_only));
        assert_eq!(store.journal(&behind).unwrap(), entries().to_vec());
    }

    /// `delete_runs` removes the given runs' records and every journal entry, and nothing of
    /// any other run.
    #[test]
    fn delete_runs_removes_records_and_journals_of_those_runs_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), PROCESS_CRASH).unwrap();
        for id in ["a", "b", "c"] {
            write_completed_run(&store, id);
        }
        let ids = ["a", "c"].map(|id| RunId::new(id).unwrap());
        store.delete_runs(&ids).unwrap();
        for id in &ids {
            assert_eq!(store.run(id).unwrap(), None);
            assert_eq!(store.journal(id).unwrap(), Vec::<Entry>::new());
        }
        let b = RunId::new("b").unwrap();
        assert_eq!(store.run(&b).unwrap(), Some(completed("b")));
        assert_eq!(store.journal(&b).unwrap(), entries().to_vec());
        assert_eq!(
            store.db.len(),
            3,
            "b's record and two entries are all that is left"
        );
    }

    /// A transition whose record state would not fit is refused before anything is written.
    #[test]
    fn an_oversized_transition_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), PROCESS_CRASH).unwrap();
        let record = running("big");
        assert_eq!(store.create_run(&record).unwrap(), None);
        let huge = "x".repeat(crate::limits::RUN_RECORD_BYTES_MAX);
        let failed = RunRecord {
            status: RunStatus::Failed,
            error: Some(huge.clone()),
            ..running("big")
        };
        let entry = Entry {
            at_ms: 30,
            event: Event::RunFailed { error: huge },
        };
        let err = store
            .append(&record.id, JournalIndex(0), &entry, Some(&failed))
            .unwrap_err();
        assert!(matches!(err, EngineError::TooLarge { .. }), "{err}");
        assert_eq!(store.journal(&record.id).unwrap(), Vec::<Entry>::new());
        assert_eq!(store.run(&record.id).unwrap(), Some(record));
    }
}
