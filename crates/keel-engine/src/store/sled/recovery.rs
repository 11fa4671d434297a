//! Opening the sled store: sled's own recovery (contained, its errors in Keel's words), the
//! torn snapshots a crash can leave, the high-water mark's verdict (`store/mark.rs`), and run
//! records a crash left behind their journals.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use super::counts::status_of;
use super::journal::{is_group, journal_prefix, tail_from, RecordState, StoredRecordState};
use super::sync::{sync_blobs, wall_clock_ms};
use super::{decode_record, encode, readable_key, storage, sync_error, Kv, RUN_PREFIX};
use crate::contain::contained_sync;
use crate::error::{EngineError, Result};
use crate::journal::{RunRecord, RunStatus};
use crate::limits::{OPEN_LOCK_WAIT_MAX, RUN_RECORD_BYTES_MAX};
use crate::store::commit::Durability;
use crate::store::mark::{self, Commit, Marked};

/// Opens sled, waiting up to `OPEN_LOCK_WAIT_MAX` for the lock: sled 0.34 releases its file
/// lock on background threads after its last handle is dropped, so an engine reopened in the
/// same process right after a shutdown can find the lock still held for a moment (about 1.5%
/// of immediate reopens here). A lock held longer is another process's.
///
/// At `PowerLoss` sled makes each of its log writes durable itself (`sync_data_on_write`, a
/// patch Keel carries in `vendor/sled`): one `fdatasync` in place of sled's waited
/// `sync_file_range` followed by the committer's own `fdatasync`. It also allocates each segment
/// that grows the log file before writing into it (`zero_new_segments`, same patches), so
/// that those `fdatasync`s write no new file size (docs/benchmarks.md, "A log that does not
/// grow with each commit"), and syncs each blob file it writes before the message that
/// points at it; blob files already there are synced first ([`sync_blobs`]).
///
/// `cache_bytes` bounds sled's cache of pages (its default, 1 GiB, when `None`).
pub(super) fn open_db(
    path: &Path,
    durability: Durability,
    cache_bytes: Option<u64>,
) -> Result<sled::Db> {
    remove_torn_config(path)?;
    remove_torn_snapshots(path)?;
    if durability == Durability::PowerLoss {
        sync_blobs(path).map_err(|e| sync_error(path, e))?;
    }
    let deadline = std::time::Instant::now() + OPEN_LOCK_WAIT_MAX;
    loop {
        // sled 0.34 panics on some damaged logs (a `db` file cut short, say) instead of
        // returning an error.
        let opened = contained_sync(|| {
            let config = sled::Config::new()
                .path(path)
                .sync_data_on_write(durability == Durability::PowerLoss)
                .zero_new_segments(durability == Durability::PowerLoss);
            match cache_bytes {
                Some(bytes) => config.cache_capacity(bytes),
                None => config,
            }
            .open()
        })
        .map_err(|panic| EngineError::StoreDamaged {
            file: path.join("db"),
            detail: format!("sled cannot recover its log from it (sled panicked: {panic})"),
            advice: RESTORE_ADVICE.into(),
        })?;
        match opened.map_err(|e| open_error(path, e)) {
            Err(EngineError::Locked { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            other => return other,
        }
    }
}

/// Removes sled's configuration file `conf` when a crash tore it before the store held
/// anything.
///
/// sled 0.34.7 writes `conf` at the first open of a store, before it creates its log `db`,
/// with two writes: the settings as text, then their CRC-32 (and no sync). A process killed
/// between the two leaves the text without its CRC; every later open reads the text's last four
/// bytes as the CRC, warns that it does not match, parses the rest (`version: 0`) and fails
/// with `Corruption` (the crash tests met it once in CI). Such a file can only be left by a
/// first open that never got as far as the log, so while `db` is absent or empty the store
/// holds nothing and removing the file lets sled write it again. A torn `conf` beside a log
/// that holds data did not come from a crash: the store is refused, naming the file, and
/// nothing is changed. Files of 8 bytes or less sled rewrites itself.
fn remove_torn_config(path: &Path) -> Result<()> {
    let conf = path.join("conf");
    let bytes = match std::fs::read(&conf) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(storage(path, sled::Error::Io(e))),
    };
    if bytes.len() <= 8 || config_is_whole(&bytes) {
        return Ok(());
    }
    if db_bytes(path) > 0 {
        return Err(EngineError::StoreDamaged {
            file: conf,
            detail: format!(
                "sled's configuration file ({} bytes) fails its checksum, beside a log that holds data",
                bytes.len()
            ),
            advice: RESTORE_ADVICE.into(),
        });
    }
    tracing::warn!(file = %conf.display(), bytes = bytes.len(), "removing sled's configuration file, torn by a crash during the store's first open");
    std::fs::remove_file(&conf).map_err(|e| storage(path, sled::Error::Io(e)))?;
    File::open(path)
        .and_then(|dir| dir.sync_all())
        .map_err(|e| sync_error(path, e))
}

/// sled's configuration layout: the settings, then a 4-byte little-endian CRC-32 of them.
fn config_is_whole(bytes: &[u8]) -> bool {
    ends_in_crc_of_body(bytes, 0)
}

/// Whether `bytes` end in a little-endian CRC-32 of everything before the last
/// `between + 4` bytes (sled's trailers: `between` bytes of other fields, then the CRC).
fn ends_in_crc_of_body(bytes: &[u8], between: usize) -> bool {
    let Some(body_len) = bytes.len().checked_sub(between + 4) else {
        return false;
    };
    let crc = &bytes[bytes.len() - 4..];
    crc32fast::hash(&bytes[..body_len]) == u32::from_le_bytes(crc.try_into().expect("4 bytes"))
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
    bytes.len() > 12 && ends_in_crc_of_body(bytes, 8)
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
pub(super) fn held_commit(path: &Path, sequence_tree: &sled::Tree) -> Result<Commit> {
    let bytes = sequence_tree
        .get(mark::SEQUENCE_KEY)
        .map_err(|e| storage(path, e))?;
    match bytes {
        None => Ok(Commit::default()),
        Some(bytes) => Commit::from_bytes(&bytes).ok_or_else(|| EngineError::Corrupt {
            key: format!("commit/{}", readable_key(mark::SEQUENCE_KEY)),
            detail: format!("commit sequence of {} bytes, not 16", bytes.len()),
        }),
    }
}

/// The length of the store's `db` file (0 if it has none).
pub(super) fn db_bytes(path: &Path) -> u64 {
    std::fs::metadata(path.join("db")).map_or(0, |m| m.len())
}

/// Copies `db`, as found, aside when it is shorter than at the last mark, before sled's
/// recovery rewrites it (`store/mark.rs`); returns the copy's path.
pub(super) fn keep_if_shorter(path: &Path, marked: &Marked) -> Option<PathBuf> {
    let Marked::At(mark) = marked else {
        return None;
    };
    let found = db_bytes(path);
    if found >= mark.db_bytes {
        return None;
    }
    let copy = path.join(format!("db.as-found-{}", wall_clock_ms()));
    tracing::warn!(found, marked = mark.db_bytes, copy = %copy.display(), "the store's log is shorter than at its last mark: keeping it as found before sled opens it");
    match std::fs::copy(path.join("db"), &copy) {
        Ok(_) => Some(copy),
        // Evidence kept when possible; a store sled merely shrank must open all the same.
        Err(error) => {
            tracing::error!(copy = %copy.display(), %error, "the log could not be kept as found");
            let _ = std::fs::remove_file(&copy);
            None
        }
    }
}

/// `error`, telling where the damaged log was kept, if it was.
pub(super) fn with_kept(error: EngineError, kept: Option<&Path>) -> EngineError {
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
pub(super) fn loss(
    kv: &Kv,
    held: Commit,
    marked: Marked,
    kept: Option<&Path>,
) -> Option<EngineError> {
    let path = kv.path();
    match marked {
        Marked::Absent => {
            if !kv.is_empty() {
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

/// What a clean close left (`SledStore`'s `Drop`): the last thing it wrote, after every
/// run's writes ended, so a store that still holds it at the commit it names was not written
/// since (by any version: every sync moves the commit on).
pub(super) const CLEAN_CLOSE_KEY: &[u8] = b"C";

/// The value under [`CLEAN_CLOSE_KEY`].
#[derive(serde::Serialize, serde::Deserialize)]
pub(super) struct CleanClose {
    /// The commit sequence the store held when it was closed.
    sequence: u64,
    /// The runs per status then.
    counts: BTreeMap<RunStatus, u64>,
}

impl CleanClose {
    pub(super) fn bytes(
        held: Commit,
        counts: BTreeMap<RunStatus, u64>,
    ) -> std::result::Result<Vec<u8>, String> {
        let close = CleanClose {
            sequence: held.sequence,
            counts,
        };
        serde_json::to_vec(&close).map_err(|e| e.to_string())
    }
}

/// How the open brought the run records up to their journals.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Repaired {
    /// Nothing to repair: the store was closed cleanly, and its counts were kept.
    Clean,
    /// The runs the wake index has as loaded (the only ones that can have written since
    /// their last park; how many records were checked); every record is counted after the
    /// open, in the background (`counts.rs`).
    Loaded(u64),
    /// Every record (a store without a built wake index).
    Every,
}

/// Brings run records up to the state their journals' last entries give them, where a crash
/// came between a transition's entry and the record's rewrite, and counts the readable
/// records in each status (the store keeps the counts from here on: `counts.rs`), unless
/// the counts are left to the background (`None`). Only a run
/// that wrote since its last park can be behind: it writes its record right after the
/// entry, within one store call, so a clean close leaves none behind, and a parked run's
/// writes were all durable before its wake index entry left 0 (`wakes.rs`). So:
/// - after a clean close: nothing is read, and the counts it left are taken (and removed,
///   durable with the open's sync, before anything else is written);
/// - with the wake index built: the runs whose entry is 0 are repaired; every record is
///   counted by its status alone after the open, while the store is used (a million records
///   take seconds to read);
/// - else every record is read and repaired.
///
/// Records or entries that do not decode are left for the engine to report.
pub(super) fn repair_records(
    kv: &Kv,
    held: Commit,
) -> Result<(Option<BTreeMap<RunStatus, u64>>, Repaired)> {
    if let Some(bytes) = kv.remove(CLEAN_CLOSE_KEY)? {
        match serde_json::from_slice::<CleanClose>(&bytes) {
            Ok(close) if close.sequence == held.sequence => {
                return Ok((Some(close.counts), Repaired::Clean))
            }
            Ok(close) => tracing::warn!(
                closed_at = close.sequence,
                held = held.sequence,
                "the store was written after its clean close: counting every run"
            ),
            Err(error) => {
                tracing::warn!(%error, "what a clean close left does not decode: counting every run")
            }
        }
    }
    if let Some(loaded) = super::wakes::loaded_runs(kv)? {
        let mut repaired = 0;
        for id in &loaded {
            let key = super::run_key(id);
            if let Some(bytes) = kv.get(&key)? {
                repair_one(kv, &key, &bytes)?;
                repaired += 1;
            }
        }
        return Ok((None, Repaired::Loaded(repaired)));
    }
    let mut counts = BTreeMap::new();
    for item in kv.scan_prefix([RUN_PREFIX]) {
        let (key, bytes) = item?;
        if let Some(status) = repair_one(kv, &key, &bytes)? {
            *counts.entry(status).or_default() += 1;
        }
    }
    Ok((Some(counts), Repaired::Every))
}

/// Repairs the record stored as `bytes` under `key` if its journal is ahead of it; returns
/// its status. A record that does not decode is left as it is, and its status is what its
/// first bytes say (`None` if nothing), as a write that replaces it or a delete takes it
/// from the counts ([`status_of`]).
fn repair_one(kv: &Kv, key: &[u8], bytes: &[u8]) -> Result<Option<RunStatus>> {
    let Ok(mut record) = decode_record(key, bytes) else {
        return Ok(status_of(bytes));
    };
    if let Some(state) = ahead_of(kv, &record, tail_from(bytes))? {
        tracing::warn!(run_id = %record.id, status = %state.status, "repairing a run record a crash left behind its journal");
        state.apply_to(&mut record);
        kv.insert(key, encode("run record", &record, RUN_RECORD_BYTES_MAX)?)?;
    }
    Ok(Some(record.status))
}

/// The record state of `record`'s last journal entry, if it has one that differs from it.
///
/// A record that holds the journal's last entries from index `tail_from` on is newer than
/// every key before that index: only a key from there on (a transition after the run
/// settled, a completed child its parent compensates) can be ahead of it.
fn ahead_of(kv: &Kv, record: &RunRecord, tail_from: Option<u32>) -> Result<Option<RecordState>> {
    let prefix = journal_prefix(&record.id);
    let last = kv.scan_prefix(&prefix).next_back().transpose()?;
    let Some((key, entry)) = last else {
        return Ok(None);
    };
    let index = key[prefix.len()..].try_into().map(u32::from_be_bytes);
    if let (Some(from), Ok(index)) = (tail_from, index) {
        if index < from {
            return Ok(None);
        }
    }
    // The last entry of a group (`group` in mod.rs) is the last of the journal.
    let last = if is_group(&entry) {
        serde_json::from_slice::<Vec<StoredRecordState>>(&entry)
            .map(|group| group.into_iter().last())
    } else {
        serde_json::from_slice::<StoredRecordState>(&entry).map(Some)
    };
    let Ok(Some(StoredRecordState {
        record: Some(state),
    })) = last
    else {
        return Ok(None);
    };
    Ok((state != RecordState::of(record)).then_some(state))
}
