//! The sync the committer runs for the sled store.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::File;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
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
/// listing is three system calls, and was about a fifth of a sequential run's commit. A blob
/// sled removes meanwhile is skipped, one it was still writing is synced again when it is
/// whole, and the directory is synced at each listing ([`sync_new_blobs`]). At
/// `ProcessCrash` sled's flush ends in `sync_file_range` and nothing more.
///
/// Each sync first writes its commit sequence (`store/mark.rs`), then hands the commit to
/// the marker once it is durable. A sync with nothing to do returns at once: the store
/// counts its writes ([`Writes`]), and when no write has begun beyond those done before
/// the last sync's flush began, every write sled shows was in that flush. (Reads ask for
/// syncs too, so that nothing they report can be undone by a crash; they cost no disk write
/// this way.)
pub(super) fn sync_fn(
    path: &Path,
    db: sled::Db,
    sequence_tree: sled::Tree,
    durability: Durability,
    held: Commit,
    mark: MarkHandle,
    writes: Arc<Writes>,
) -> std::io::Result<impl FnMut() -> std::io::Result<()> + Send + 'static> {
    let blobs_dir = path.join("blobs");
    // The directory entries of the store's files must be durable too.
    File::open(path)?.sync_all()?;
    let mut synced_blobs = SyncedBlobs::new();
    // sled's count of blobs written at the last listing; none yet, so the first sync lists.
    let mut listed_at: Option<u64> = None;
    let mut sequence = held.sequence;
    // The writes done before the last flush began: all in it. At open, everything sled holds
    // was made durable (`sync_all`).
    let mut covered = writes.done();
    Ok(move || {
        if writes.begun() == covered {
            return Ok(());
        }
        // Read before the flush: every write done by now is in sled's buffers, and in it.
        let done = writes.done();
        sequence += 1;
        let commit = Commit {
            sequence,
            at_ms: wall_clock_ms(),
        };
        sequence_tree
            .insert(mark::SEQUENCE_KEY, &commit.to_bytes())
            .map_err(std::io::Error::other)?;
        db.flush().map_err(std::io::Error::other)?;
        covered = done;
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
        if let Some(listed) = list_blobs(&blobs_dir)? {
            sync_new_blobs(listed, &mut synced_blobs)?;
            File::open(&blobs_dir)?.sync_all()?;
        }
        listed_at = Some(blobs_written);
        mark.durable(commit);
        Ok(())
    })
}

/// The blob files in `blobs_dir`, or `None` when there is no such directory (sled makes it
/// when it opens a store; a store made before that has none).
fn list_blobs(blobs_dir: &Path) -> std::io::Result<Option<Vec<PathBuf>>> {
    let entries = match std::fs::read_dir(blobs_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut listed = Vec::new();
    for entry in entries {
        listed.push(entry?.path());
    }
    Ok(Some(listed))
}

/// The blobs synced so far: each one's length when it was synced.
type SyncedBlobs = HashMap<OsString, u64>;

/// Syncs each blob of `listed` that `synced` does not hold at its present length, and keeps
/// in `synced` the blobs of `listed` alone; returns how many it synced. The caller then syncs
/// the directory, whatever this found: it makes new blobs' entries durable, and the removal
/// of blobs sled made and removed since the last listing, which must not come back after a
/// power loss as files whose contents were never synced (recovery reads a blob an old log
/// entry points at when its file is there, and stops at one that is not whole).
///
/// - A blob that is gone is skipped: sled removes a blob only once the log entry that
///   replaced it is durable (`vendor/sled/src/pagecache/segment.rs`), and it may do so at
///   any time, between the listing and the open too.
/// - A blob may be listed while sled is still writing it (its writer makes it while this
///   sync runs, for a later commit). Its length is read before its sync, and a blob that is
///   longer at a later listing is synced again: sled counts a blob written
///   (`Db::blobs_written`) once it is whole, before any log entry points at it, so the
///   listing after the flush that makes such an entry durable sees it whole.
fn sync_new_blobs(listed: Vec<PathBuf>, synced: &mut SyncedBlobs) -> std::io::Result<usize> {
    let mut count = 0;
    let mut still = SyncedBlobs::with_capacity(listed.len());
    for path in listed {
        let Some(name) = path.file_name().map(OsString::from) else {
            continue;
        };
        let gone = |e: &std::io::Error| e.kind() == ErrorKind::NotFound;
        let length = match std::fs::metadata(&path) {
            Ok(metadata) => metadata.len(),
            Err(e) if gone(&e) => continue,
            Err(e) => return Err(e),
        };
        if synced.get(&name) != Some(&length) {
            match File::open(&path) {
                Ok(file) => file.sync_all()?,
                Err(e) if gone(&e) => continue,
                Err(e) => return Err(e),
            }
            count += 1;
        }
        still.insert(name, length);
    }
    *synced = still;
    Ok(count)
}

/// The store's writes, counted twice: when one begins (before sled can show it to a read)
/// and when it is done. Counting only when done let a read see a write that was not counted
/// yet, ask for a sync, and be answered by one that found the count unchanged and flushed
/// nothing: the read reported what a crash could still undo.
#[derive(Debug, Default)]
pub(super) struct Writes {
    begun: AtomicU64,
    done: AtomicU64,
}

impl Writes {
    /// Counts a write that begins now; it is counted done when the guard is dropped, after
    /// its last change to sled (or its failure).
    pub(super) fn begin(&self) -> Writing<'_> {
        self.begun.fetch_add(1, Ordering::SeqCst);
        Writing(self)
    }

    /// Writes begun so far.
    pub(super) fn begun(&self) -> u64 {
        self.begun.load(Ordering::SeqCst)
    }

    /// Writes done so far.
    pub(super) fn done(&self) -> u64 {
        self.done.load(Ordering::SeqCst)
    }
}

/// A write in progress ([`Writes::begin`]).
#[must_use = "the write is counted done when this is dropped"]
pub(super) struct Writing<'a>(&'a Writes);

impl Writing<'_> {
    /// The write changed nothing (sled skips a key set to the value it has): it is not
    /// counted at all, so the next sync may still find nothing to do.
    pub(super) fn changed_nothing(self) {
        self.0.begun.fetch_sub(1, Ordering::SeqCst);
        std::mem::forget(self);
    }
}

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        self.0.done.fetch_add(1, Ordering::SeqCst);
    }
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
    if let Some(listed) = list_blobs(&blobs_dir)? {
        sync_new_blobs(listed, &mut SyncedBlobs::new())?;
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

#[cfg(test)]
mod tests {
    use super::{list_blobs, sync_new_blobs, SyncedBlobs, Writes};

    /// sled removes a blob once no page points at it, at any time: between the sync's
    /// listing and its open of the file, too. Before, that open's "not found" failed the
    /// sync, and with it the engine's runs (`keel-bench cpu --output-bytes 49152` stopped on
    /// "sync of <store> failed: No such file or directory"). Now the removed blob is skipped
    /// and forgotten.
    #[test]
    fn a_blob_removed_between_the_listing_and_its_sync_is_skipped_and_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = dir.path().join("blobs");
        assert_eq!(list_blobs(&blobs).unwrap(), None, "no directory yet");
        std::fs::create_dir(&blobs).unwrap();
        for name in ["100", "200", "300"] {
            std::fs::write(blobs.join(name), name).unwrap();
        }
        let mut synced = SyncedBlobs::new();
        let listed = list_blobs(&blobs).unwrap().unwrap();
        std::fs::remove_file(blobs.join("200")).unwrap();
        assert_eq!(
            sync_new_blobs(listed, &mut synced).unwrap(),
            2,
            "100 and 300"
        );
        assert_eq!(names(&synced), ["100", "300"]);

        // Synced blobs are not synced again, and removed ones leave the set.
        std::fs::remove_file(blobs.join("100")).unwrap();
        let listed = list_blobs(&blobs).unwrap().unwrap();
        assert_eq!(
            sync_new_blobs(listed, &mut synced).unwrap(),
            0,
            "nothing new"
        );
        assert_eq!(names(&synced), ["300"]);
    }

    /// A blob listed while sled was still writing it is synced again once it is longer:
    /// before, its name alone was kept, and the rest of it was never synced.
    #[test]
    fn a_blob_listed_while_it_was_written_is_synced_again_once_whole() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = dir.path().join("blobs");
        std::fs::create_dir(&blobs).unwrap();
        let path = blobs.join("400");
        // sled writes a blob's CRC, then its kind, then its data.
        std::fs::write(&path, [1, 2, 3, 4]).unwrap();
        let mut synced = SyncedBlobs::new();
        let listed = list_blobs(&blobs).unwrap().unwrap();
        assert_eq!(sync_new_blobs(listed, &mut synced).unwrap(), 1);
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        std::io::Write::write_all(&mut file, &[7; 1000]).unwrap();
        let listed = list_blobs(&blobs).unwrap().unwrap();
        assert_eq!(
            sync_new_blobs(listed, &mut synced).unwrap(),
            1,
            "synced again"
        );
        assert_eq!(synced.get(std::ffi::OsStr::new("400")), Some(&1004));
        let listed = list_blobs(&blobs).unwrap().unwrap();
        assert_eq!(
            sync_new_blobs(listed, &mut synced).unwrap(),
            0,
            "whole, synced"
        );
    }

    /// The names of `synced`, in order.
    fn names(synced: &SyncedBlobs) -> Vec<String> {
        let mut names: Vec<String> = synced
            .keys()
            .map(|n| n.to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// A write is counted begun before it is made and done once its guard goes; one that
    /// changed nothing is not counted at all.
    #[test]
    fn a_write_is_counted_when_it_begins_and_when_it_is_done() {
        let writes = Writes::default();
        let writing = writes.begin();
        assert_eq!((writes.begun(), writes.done()), (1, 0), "in progress");
        drop(writing);
        assert_eq!((writes.begun(), writes.done()), (1, 1));
        writes.begin().changed_nothing();
        assert_eq!((writes.begun(), writes.done()), (1, 1), "nothing changed");
    }
}
