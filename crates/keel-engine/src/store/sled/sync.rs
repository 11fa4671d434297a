//! The sync the committer (or a lone writer, `store/commit.rs`) runs for the sled store.

use std::fs::File;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::store::commit::Durability;
use crate::store::mark::{self, Commit, MarkHandle};

/// The sync the committer (or a lone writer) runs. sled's `flush` writes its buffers; at
/// `PowerLoss` sled was opened with `sync_data_on_write` (`recovery::open_db`), so each buffer
/// write ends in an `fdatasync` of the log and the flush returns with the log durable: one
/// device round trip.
/// sled syncs each blob file (a message too large for the log) and its directory entry as
/// it writes it, before the message that points at it can be written (Keel's patch 9), so
/// nothing is left to sync here. At `ProcessCrash` sled's flush ends in `sync_file_range`
/// and nothing more.
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
    held: Commit,
    mark: MarkHandle,
    writes: Arc<Writes>,
) -> std::io::Result<impl FnMut() -> std::io::Result<()> + Send + 'static> {
    // The directory entries of the store's files must be durable too.
    File::open(path)?.sync_all()?;
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
        mark.durable(commit);
        Ok(())
    })
}

/// Syncs every blob file in the store at `path` and the blob directory, before sled opens
/// it at `PowerLoss`: sled syncs the blobs it writes at that level (Keel's patch 9), but a
/// store last written at `ProcessCrash` may hold blobs that were never synced, and sled's
/// recovery writes a snapshot that can point at them.
pub(super) fn sync_blobs(path: &Path) -> std::io::Result<()> {
    let blobs_dir = path.join("blobs");
    if let Some(listed) = list_blobs(&blobs_dir)? {
        sync_listed_blobs(listed)?;
        File::open(&blobs_dir)?.sync_all()?;
    }
    Ok(())
}

/// The blob files in `blobs_dir`, or `None` when there is no such directory (sled makes it
/// when it opens a store; a store not opened yet has none).
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

/// Syncs each blob of `listed`, skipping one that is gone: sled removes a blob once the log
/// entry that replaced it is durable (`vendor/sled/src/pagecache/segment.rs`), so one gone
/// since the listing is not needed.
fn sync_listed_blobs(listed: Vec<PathBuf>) -> std::io::Result<()> {
    for path in listed {
        match File::open(&path) {
            Ok(file) => file.sync_all()?,
            Err(e) if e.kind() == ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
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
/// files; the blobs were synced before it opened too, [`sync_blobs`], and sled syncs those
/// it writes), before the store's first mark claims it: what sled recovered at open may be
/// in the page cache only (the process died after a flush and before its `fdatasync`), and
/// sled never syncs the configuration file it writes at a store's first open.
pub(super) fn sync_all(path: &Path, db: &sled::Db, durability: Durability) -> std::io::Result<()> {
    db.flush().map_err(std::io::Error::other)?;
    if durability == Durability::ProcessCrash {
        return Ok(());
    }
    File::open(path.join("conf"))?.sync_all()?;
    File::open(path.join("db"))?.sync_data()?;
    // Again, now that sled holds the store: another process's engine at `ProcessCrash`,
    // still closing when the first sync ran, may have written more.
    sync_blobs(path)
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
    use super::{list_blobs, sync_listed_blobs, Writes};

    /// sled removes a blob once the log entry that replaced it is durable, at any time: one
    /// gone between the listing and its sync is skipped. (The committer once listed blobs
    /// after each flush and failed on such a one: `keel-bench cpu --output-bytes 49152`
    /// stopped on "sync of <store> failed: No such file or directory". sled now syncs each
    /// blob as it writes it, and the listing is left at open.)
    #[test]
    fn a_blob_removed_between_the_listing_and_its_sync_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = dir.path().join("blobs");
        assert_eq!(list_blobs(&blobs).unwrap(), None, "no directory yet");
        std::fs::create_dir(&blobs).unwrap();
        for name in ["100", "200", "300"] {
            std::fs::write(blobs.join(name), name).unwrap();
        }
        let listed = list_blobs(&blobs).unwrap().unwrap();
        assert_eq!(listed.len(), 3);
        std::fs::remove_file(blobs.join("200")).unwrap();
        sync_listed_blobs(listed).unwrap();
    }

    /// A blob sled cannot write (here its directory has become a file) is sled's global
    /// error: the write fails, and so does every flush after it, instead of waiting for
    /// ever on a log buffer whose writer never left it (as sled did before Keel's patch 9
    /// made a failed blob the global error).
    #[test]
    fn a_blob_sled_cannot_write_fails_the_flush_instead_of_hanging_it() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new()
            .path(dir.path())
            .sync_data_on_write(true)
            .open()
            .unwrap();
        db.insert("small", "value").unwrap();
        db.flush().unwrap();
        let blobs = dir.path().join("blobs");
        std::fs::remove_dir_all(&blobs).unwrap();
        std::fs::write(&blobs, "not a directory").unwrap();
        // Over a quarter of sled's 512 KiB segment: a blob.
        let written = db.insert("large", vec![7_u8; 200 * 1024]);
        assert!(
            written.is_err(),
            "the blob's write cannot succeed: {written:?}"
        );
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = sender.send(db.flush().map(|_| ()));
        });
        let flushed = receiver
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("the flush returns instead of waiting for ever");
        assert!(flushed.is_err(), "the failed blob is the flush's error too");
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
