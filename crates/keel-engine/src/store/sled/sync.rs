//! The sync the committer runs for the sled store.

use std::collections::HashSet;
use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::store::commit::Durability;
use crate::store::mark::{self, Commit, MarkHandle};

/// The sync the committer runs. sled's `flush` writes its buffers; at `PowerLoss` sled was
/// opened with `sync_data_on_write` (`recovery::open_db`), so each buffer write ends in an
/// `fdatasync` of the log and the flush returns with the log durable: one device round trip.
/// Every blob file sled has created since is then synced here (sled writes blobs without
/// syncing them), found by listing the blob directory, which is done only when sled's count
/// of blobs written (`Db::blobs_written`, Keel's patch 9) moved since the last listing: a
/// listing is three system calls, and was about a fifth of a sequential run's commit. At
/// `ProcessCrash` sled's flush ends in `sync_file_range` and nothing more.
///
/// Each sync first writes its commit sequence (`store/mark.rs`), then hands the commit to
/// the marker once it is durable. A sync with nothing to do returns at once: the store
/// counts its writes (`written`), and when the count has not moved since the last sync
/// began, every write made before this sync was made before that one began and is durable
/// by its end. (Reads ask for syncs too, so that nothing they report can be undone by a
/// crash; they cost no disk write this way.)
pub(super) fn sync_fn(
    path: &Path,
    db: sled::Db,
    sequence_tree: sled::Tree,
    durability: Durability,
    held: Commit,
    mark: MarkHandle,
    written: Arc<AtomicU64>,
) -> std::io::Result<impl FnMut() -> std::io::Result<()> + Send + 'static> {
    let blobs_dir = path.join("blobs");
    // The directory entries of the store's files must be durable too.
    File::open(path)?.sync_all()?;
    let mut synced_blobs: HashSet<std::ffi::OsString> = HashSet::new();
    // sled's count of blobs written at the last listing; none yet, so the first sync lists.
    let mut listed_at: Option<u64> = None;
    let mut sequence = held.sequence;
    let mut synced_writes = written.load(Ordering::SeqCst);
    Ok(move || {
        let writes = written.load(Ordering::SeqCst);
        if writes == synced_writes {
            return Ok(());
        }
        synced_writes = writes;
        sequence += 1;
        let commit = Commit {
            sequence,
            at_ms: wall_clock_ms(),
        };
        sequence_tree
            .insert(mark::SEQUENCE_KEY, &commit.to_bytes())
            .map_err(std::io::Error::other)?;
        db.flush().map_err(std::io::Error::other)?;
        if durability == Durability::ProcessCrash {
            mark.durable(commit);
            return Ok(());
        }
        // Read after the flush: a blob the flushed log points at was counted before it.
        let blobs_written = db.blobs_written();
        if listed_at == Some(blobs_written) {
            mark.durable(commit);
            return Ok(());
        }
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
        listed_at = Some(blobs_written);
        mark.durable(commit);
        Ok(())
    })
}

/// Makes everything sled holds durable (at `PowerLoss`: its configuration, log and blob
/// files), before the store's first mark claims it: what sled recovered at open may be in the
/// page cache only (the process died after a flush and before its `fdatasync`), and sled
/// never syncs the configuration file it writes at a store's first open.
pub(super) fn sync_all(path: &Path, db: &sled::Db, durability: Durability) -> std::io::Result<()> {
    db.flush().map_err(std::io::Error::other)?;
    if durability == Durability::ProcessCrash {
        return Ok(());
    }
    File::open(path.join("conf"))?.sync_all()?;
    File::open(path.join("db"))?.sync_data()?;
    let blobs_dir = path.join("blobs");
    if let Ok(entries) = std::fs::read_dir(&blobs_dir) {
        for entry in entries {
            File::open(entry?.path())?.sync_all()?;
        }
        File::open(&blobs_dir)?.sync_all()?;
    }
    Ok(())
}

/// The system's time, for the commit sequence (which says when a sync happened, for
/// operators; not the engine's clock, which the store does not know).
pub(super) fn wall_clock_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
