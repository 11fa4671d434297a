//! The high-water mark: how the sled store notices that it lost data it had acknowledged.
//!
//! sled 0.34 recovers a prefix of its log. When its `db` file is cut short or damaged, it
//! opens with whatever prefix it can read, silently: on a store of 3,000 finished runs cut
//! anywhere from 10% to 90%, every run was gone (measured, 2026-12); on a small one, finished
//! runs rolled back and ran their last steps against AWS again. So the store keeps two
//! numbers, one inside sled's log and one outside it:
//!
//! 1. Every sync of the committer first writes its sequence number (and the time) under the
//!    key `m` of sled's tree `commit`, then makes everything durable. A sync covers every write made before
//!    it began, and those precede the `m` write in sled's log; so a store whose recovered
//!    `m` is `n` holds every write acknowledged by syncs up to `n`.
//! 2. After a sync, the number is written to `keel.mark` beside sled's files (its own file,
//!    so that damage to sled's log cannot take it along), by a thread of its own, so no
//!    writer waits for it, at most every 100 ms: the mark trails the last sync by at most
//!    that plus one mark write.
//!
//! At open, a store whose `m` is below the mark lost acknowledged data: it is refused, naming
//! the commits and the time span that are missing, unless the operator accepts the loss
//! (`EngineBuilder::accept_data_loss`), and then the mark is moved back to what is left.
//! What the mark does not cover: the writes of the last syncs before a crash, which the mark
//! had not reached yet (at most about 100 ms of work); sled's prefix recovery is all that
//! protects those. A clean shutdown writes the mark of the very last sync.
//!
//! sled's recovery rewrites what it cannot read of its log when it opens, so opening a
//! damaged store destroys the evidence of the damage. Each mark also records the length of
//! `db` at that sync; a `db` found shorter at open (cut short, say; sled also shrinks it
//! itself now and then, so this is a hint, not a verdict) is copied aside, as found, before
//! sled opens it, and the copy is removed again if the store turns out whole.
//!
//! The file holds two 40-byte slots, written alternately, each `KEELMARK`, the sequence
//! number, the time (ms since the Unix epoch), the length of `db` (all big-endian) and a CRC-32
//! of the 32 bytes before it: a write torn by a crash spoils one slot and leaves the other,
//! older, whole.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use crate::store::commit::Durability;

/// The name of the mark file in the store's directory.
pub(crate) const MARK_FILE: &str = "keel.mark";

/// The sled tree of the commit sequence: a tree of its own, so that rewriting it after every
/// sync rewrites a one-key leaf, not a leaf of run records (sled 0.34 copies a leaf on every
/// update; in the main tree the copies raised a benchmark's peak memory by about 14 MiB).
/// All trees share one log, so the prefix argument holds across them.
pub(crate) const SEQUENCE_TREE: &[u8] = b"commit";

/// The key of the commit sequence in [`SEQUENCE_TREE`].
pub(crate) const SEQUENCE_KEY: &[u8] = b"m";

const MAGIC: &[u8; 8] = b"KEELMARK";

/// The least time between two writes of the mark file: each is an `fdatasync` of its own,
/// which after every sync of a busy store would compete with the store's own syncs for the
/// disk. So the mark trails the last sync by at most this much plus one write.
const MARK_INTERVAL_MIN: std::time::Duration = std::time::Duration::from_millis(100);
const SLOT_BYTES: usize = 40;

/// A commit sequence number and when its sync began.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Commit {
    pub(crate) sequence: u64,
    pub(crate) at_ms: u64,
}

impl Commit {
    /// The 16 bytes stored under [`SEQUENCE_KEY`].
    pub(crate) fn to_bytes(self) -> [u8; 16] {
        let mut bytes = [0; 16];
        bytes[..8].copy_from_slice(&self.sequence.to_be_bytes());
        bytes[8..].copy_from_slice(&self.at_ms.to_be_bytes());
        bytes
    }

    /// Reads the bytes stored under [`SEQUENCE_KEY`].
    pub(crate) fn from_bytes(bytes: &[u8]) -> Option<Commit> {
        let bytes: [u8; 16] = bytes.try_into().ok()?;
        Some(Commit {
            sequence: u64::from_be_bytes(bytes[..8].try_into().expect("8 bytes")),
            at_ms: u64::from_be_bytes(bytes[8..].try_into().expect("8 bytes")),
        })
    }
}

/// One mark: a durable commit and the length of sled's `db` file after its sync.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Mark {
    pub(crate) commit: Commit,
    pub(crate) db_bytes: u64,
}

impl Mark {
    fn slot(self) -> [u8; SLOT_BYTES] {
        let mut slot = [0; SLOT_BYTES];
        slot[..8].copy_from_slice(MAGIC);
        slot[8..24].copy_from_slice(&self.commit.to_bytes());
        slot[24..32].copy_from_slice(&self.db_bytes.to_be_bytes());
        let crc = crc32fast::hash(&slot[..32]);
        slot[32..36].copy_from_slice(&crc.to_be_bytes());
        slot
    }

    fn from_slot(slot: &[u8]) -> Option<Mark> {
        if slot.len() < SLOT_BYTES || &slot[..8] != MAGIC {
            return None;
        }
        let crc = u32::from_be_bytes(slot[32..36].try_into().expect("4 bytes"));
        if crc32fast::hash(&slot[..32]) != crc {
            return None;
        }
        Some(Mark {
            commit: Commit::from_bytes(&slot[8..24])?,
            db_bytes: u64::from_be_bytes(slot[24..32].try_into().expect("8 bytes")),
        })
    }
}

/// What the mark file holds.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Marked {
    /// No mark file: a new store, or one written before marks existed.
    Absent,
    /// The newest whole slot.
    At(Mark),
    /// A mark file with no whole slot.
    Unreadable,
}

/// Reads the mark file of the store in `dir`.
pub(crate) fn read(dir: &Path) -> std::io::Result<Marked> {
    let bytes = match std::fs::read(dir.join(MARK_FILE)) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Marked::Absent),
        Err(e) => return Err(e),
    };
    let newest = bytes
        .chunks(SLOT_BYTES)
        .take(2)
        .filter_map(Mark::from_slot)
        .max_by_key(|mark| mark.commit);
    Ok(newest.map_or(Marked::Unreadable, Marked::At))
}

/// The mark file, open for writing.
struct MarkFile {
    file: File,
    durability: Durability,
    /// The slot the next write goes to.
    next_slot: u64,
}

impl MarkFile {
    /// Writes a fresh mark file holding `start` in both slots, in a temporary file renamed
    /// over the old one, so that the mark file is whole from the moment it exists: a crash
    /// before the rename leaves the old file (or none), never an empty or half-written one.
    fn create(dir: &Path, durability: Durability, start: Mark) -> std::io::Result<MarkFile> {
        let path = dir.join(MARK_FILE);
        let temporary = dir.join(format!("{MARK_FILE}.new"));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&temporary)?;
        let slot = start.slot();
        file.write_all_at(&[slot, slot].concat(), 0)?;
        if durability == Durability::PowerLoss {
            file.sync_data()?;
        }
        crate::crash::point("open.before_mark_rename");
        std::fs::rename(&temporary, &path)?;
        if durability == Durability::PowerLoss {
            // The rename must survive a power loss as the content does.
            File::open(dir)?.sync_all()?;
        }
        Ok(MarkFile {
            file,
            durability,
            next_slot: 0,
        })
    }

    fn write(&mut self, mark: Mark) -> std::io::Result<()> {
        let offset = (self.next_slot % 2) * SLOT_BYTES as u64;
        self.file.write_all_at(&mark.slot(), offset)?;
        if self.durability == Durability::PowerLoss {
            self.file.sync_data()?;
        }
        self.next_slot += 1;
        Ok(())
    }
}

#[derive(Default)]
struct Pending {
    /// The newest durable commit not yet marked.
    commit: Option<Commit>,
    stop: bool,
}

struct Shared {
    pending: Mutex<Pending>,
    wake: Condvar,
}

/// The thread that writes durable commits to the mark file, newest first, coalescing.
pub(crate) struct Marker {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// Hands durable commits to the [`Marker`]; cheap to call after every sync.
#[derive(Clone)]
pub(crate) struct MarkHandle {
    shared: Arc<Shared>,
}

impl MarkHandle {
    /// `commit` is durable in sled: mark it (soon, without waiting). Called by the
    /// committer after every sync, so it does as little as it can: every microsecond here
    /// delays every writer waiting for that sync (an `fstat` of `db` here cost a sequential
    /// run about 8% of its steps per second; the marker reads the length itself).
    pub(crate) fn durable(&self, commit: Commit) {
        let mut pending = self.shared.pending.lock().expect("marker lock");
        // A marker with a commit pending is writing or waiting out its interval, and takes
        // the newest when it gets to it: waking it for each sync would only cost a switch
        // of threads per sync.
        let idle = pending.commit.is_none();
        if pending.commit.is_none_or(|c| c < commit) {
            pending.commit = Some(commit);
        }
        drop(pending);
        if idle {
            self.shared.wake.notify_one();
        }
    }
}

impl Marker {
    /// Starts the marker of the store in `dir`, first making the mark file anew with `start`
    /// (what the store holds now), so the file exists, is whole and agrees with the store.
    pub(crate) fn start(
        dir: &Path,
        durability: Durability,
        start: Mark,
    ) -> std::io::Result<(Marker, MarkHandle)> {
        let file = MarkFile::create(dir, durability, start)?;
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending::default()),
            wake: Condvar::new(),
        });
        let thread_shared = Arc::clone(&shared);
        let dir = dir.to_owned();
        let thread = std::thread::Builder::new()
            .name("keel-marker".into())
            .spawn(move || mark(&thread_shared, file, &dir))?;
        let handle = MarkHandle {
            shared: Arc::clone(&shared),
        };
        Ok((
            Marker {
                shared,
                thread: Some(thread),
            },
            handle,
        ))
    }
}

impl Drop for Marker {
    fn drop(&mut self) {
        self.shared.pending.lock().expect("marker lock").stop = true;
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            // The thread writes the newest pending commit before it ends.
            let _ = thread.join();
        }
    }
}

/// The marker's loop: writes the newest pending commit, with the length `db` has then, at
/// most once per [`MARK_INTERVAL_MIN`] (the last one at once when the store closes). The
/// length may include growth after that commit's sync: it is only a hint (`store/mark.rs`).
fn mark(shared: &Shared, mut file: MarkFile, dir: &Path) {
    let path = dir.join(MARK_FILE);
    let db = dir.join("db");
    let mark_of = |commit| Mark {
        commit,
        db_bytes: std::fs::metadata(&db).map_or(0, |m| m.len()),
    };
    let mut last_write: Option<std::time::Instant> = None;
    loop {
        let (commit, stop) = {
            let mut pending = shared.pending.lock().expect("marker lock");
            loop {
                if pending.stop {
                    break;
                }
                let now = std::time::Instant::now();
                let due = last_write.map_or(now, |at| at + MARK_INTERVAL_MIN);
                if pending.commit.is_some() && now >= due {
                    break;
                }
                pending = match pending.commit {
                    // Something to mark, not yet due: wait out the interval (or a stop).
                    Some(_) => {
                        let wait = due.saturating_duration_since(now);
                        shared
                            .wake
                            .wait_timeout(pending, wait)
                            .expect("marker lock")
                            .0
                    }
                    None => shared.wake.wait(pending).expect("marker lock"),
                };
            }
            (pending.commit.take(), pending.stop)
        };
        last_write = Some(std::time::Instant::now());
        if let Some(commit) = commit {
            if let Err(error) = file.write(mark_of(commit)) {
                // The store goes on; only the detection of a later loss is weaker until a
                // write succeeds again.
                tracing::error!(file = %path.display(), %error, "the high-water mark could not be written");
            }
        }
        if stop {
            let last = shared.pending.lock().expect("marker lock").commit.take();
            if let Some(commit) = last {
                let _ = file.write(mark_of(commit));
            }
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A new mark file holds its first mark in both slots; the newest whole slot is the
    /// mark; a torn slot leaves the other; a file with no whole slot is unreadable, and no
    /// file is absent.
    #[test]
    fn the_newest_whole_slot_is_the_mark() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(dir.path()).unwrap(), Marked::Absent);
        let commit = |sequence| Mark {
            commit: Commit {
                sequence,
                at_ms: 1_000 + sequence,
            },
            db_bytes: 4_096 * sequence,
        };
        let mut file = MarkFile::create(dir.path(), Durability::PowerLoss, commit(1)).unwrap();
        assert_eq!(read(dir.path()).unwrap(), Marked::At(commit(1)));
        file.write(commit(2)).unwrap();
        file.write(commit(3)).unwrap();
        assert_eq!(read(dir.path()).unwrap(), Marked::At(commit(3)));
        // Slot 0 holds 2, slot 1 holds 3. Tear the newest: the older one is the mark.
        file.file.write_all_at(b"garbage!", 48).unwrap();
        assert_eq!(read(dir.path()).unwrap(), Marked::At(commit(2)));
        file.file.write_all_at(b"garbage!", 8).unwrap();
        assert_eq!(read(dir.path()).unwrap(), Marked::Unreadable);
    }

    /// The marker writes what it is handed, and the newest pending commit when it stops,
    /// with the length of `db` as it finds it.
    #[test]
    fn the_marker_writes_the_newest_commit_by_its_end() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("db"), [0; 40]).unwrap();
        let start = Mark {
            commit: Commit {
                sequence: 5,
                at_ms: 9,
            },
            db_bytes: 1,
        };
        let (marker, handle) = Marker::start(dir.path(), Durability::PowerLoss, start).unwrap();
        assert_eq!(read(dir.path()).unwrap(), Marked::At(start));
        let commit = |sequence| Commit {
            sequence,
            at_ms: 9 + sequence,
        };
        for sequence in 6..=40 {
            handle.durable(commit(sequence));
        }
        drop(marker);
        assert_eq!(
            read(dir.path()).unwrap(),
            Marked::At(Mark {
                commit: commit(40),
                db_bytes: 40
            })
        );
    }
}
