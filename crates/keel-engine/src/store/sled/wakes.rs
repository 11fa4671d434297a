//! The durable wake index (`engine/parking.rs`): when each drivable run must be driven next,
//! so that opening a store loads only the runs that are due and parks the others unread.
//!
//! Keys, in the runs' tree (every write is one key, as for the rest of the store):
//! - `w` + wake time (u64, big-endian) + run id: an entry (empty value). Wake time 0: the run
//!   is loaded (or must be at the next open); `u64::MAX`: it waits only for something to
//!   arrive (an event, an operator call);
//! - `v` + run id: the run's current wake time (u64, big-endian), to find its entry;
//! - `W2`: present once every drivable run has an entry (the index was built) by a version
//!   whose children set their parent's entry when they settle. `W` was the mark of the
//!   versions before: a store holding it was last indexed by one of them (perhaps after
//!   this version, whose mark it does not know to remove), so its index is not trusted:
//!   the open reads every run and builds it again, removing `W`.
//!
//! A new entry is written before the old one is removed, so a crash between leaves both
//! (the earlier one wins at the next open, which is safe), never neither. An entry whose run
//! is gone or settled is stale and harmless: the next open drops it.

use crate::error::Result;
use crate::ids::RunId;

use super::SledStore;

const WAKE_PREFIX: u8 = b'w';
const WAKE_OF_PREFIX: u8 = b'v';
const BUILT_KEY: &[u8] = b"W2";
/// The mark of the index as versions before `BUILT_KEY` built it.
const OLD_BUILT_KEY: &[u8] = b"W";

/// Whether the index was built, by this version's rules, since any older version built it.
fn built(db: &sled::Db) -> sled::Result<bool> {
    Ok(db.contains_key(BUILT_KEY)? && !db.contains_key(OLD_BUILT_KEY)?)
}

fn wake_key(wake_ms: u64, id: &RunId) -> Vec<u8> {
    let mut key = wake_key_prefix(wake_ms);
    key.extend_from_slice(id.as_str().as_bytes());
    key
}

fn wake_key_prefix(wake_ms: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(9);
    key.push(WAKE_PREFIX);
    key.extend_from_slice(&wake_ms.to_be_bytes());
    key
}

pub(super) fn wake_of_key(id: &RunId) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + id.as_str().len());
    key.push(WAKE_OF_PREFIX);
    key.extend_from_slice(id.as_str().as_bytes());
    key
}

fn be_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

/// The index keys of run `id` in `db` (its entry and its `v` key), for deleting the run.
pub(super) fn keys_of(db: &sled::Db, id: &RunId) -> sled::Result<Vec<Vec<u8>>> {
    let of = wake_of_key(id);
    Ok(match db.get(&of)?.as_deref().and_then(be_u64) {
        Some(wake_ms) => vec![wake_key(wake_ms, id), of],
        None => Vec::new(),
    })
}

/// The runs whose entry is 0 (loaded when the store was last open), once the index is built;
/// `None` before.
pub(super) fn loaded_runs(db: &sled::Db) -> sled::Result<Option<Vec<RunId>>> {
    if !built(db)? {
        return Ok(None);
    }
    let mut runs = Vec::new();
    for key in db.scan_prefix(wake_key_prefix(0)).keys() {
        // An entry that names no run is dropped by `read_wakes`, later in the open.
        if let Some(id) = std::str::from_utf8(&key?[9..])
            .ok()
            .and_then(|id| RunId::existing(id).ok())
        {
            runs.push(id);
        }
    }
    Ok(Some(runs))
}

impl SledStore {
    pub(super) fn write_wake(&self, id: &RunId, wake_ms: u64) -> Result<()> {
        let one_at_a_time = self.wakes_lock.lock().expect("wakes lock");
        self.write_wake_locked(&one_at_a_time, id, wake_ms, true)
    }

    /// [`SledStore::write_wake`] for a run that has an entry (its `v` key) only.
    pub(super) fn write_wake_if_indexed(&self, id: &RunId, wake_ms: u64) -> Result<()> {
        let one_at_a_time = self.wakes_lock.lock().expect("wakes lock");
        self.write_wake_locked(&one_at_a_time, id, wake_ms, false)
    }

    fn write_wake_locked(
        &self,
        _one_at_a_time: &std::sync::MutexGuard<'_, ()>,
        id: &RunId,
        wake_ms: u64,
        or_new: bool,
    ) -> Result<()> {
        let of = wake_of_key(id);
        let old = self
            .db
            .get(&of)
            .map_err(|e| self.storage(e))?
            .as_deref()
            .and_then(be_u64);
        if old.is_none() && !or_new {
            return Ok(());
        }
        // Unchanged, unless a crash inside `remove_wake` left `v` without its entry.
        if old == Some(wake_ms)
            && self
                .db
                .contains_key(wake_key(wake_ms, id))
                .map_err(|e| self.storage(e))?
        {
            return Ok(());
        }
        self.db
            .insert(wake_key(wake_ms, id), &[])
            .map_err(|e| self.storage(e))?;
        self.db
            .insert(of, &wake_ms.to_be_bytes())
            .map_err(|e| self.storage(e))?;
        if let Some(old) = old.filter(|old| *old != wake_ms) {
            self.db
                .remove(wake_key(old, id))
                .map_err(|e| self.storage(e))?;
        }
        self.wrote();
        Ok(())
    }

    pub(super) fn remove_wake(&self, id: &RunId) -> Result<()> {
        let _one_at_a_time = self.wakes_lock.lock().expect("wakes lock");
        let keys = keys_of(&self.db, id).map_err(|e| self.storage(e))?;
        if keys.is_empty() {
            return Ok(());
        }
        for key in keys {
            self.db.remove(key).map_err(|e| self.storage(e))?;
        }
        self.wrote();
        Ok(())
    }

    /// Removes run `id`'s entry at `wake_ms` and its `v` key: an entry found by
    /// `read_wakes` whose `v` may be missing (a crash between a first entry and its `v`).
    pub(super) fn remove_wake_at(&self, id: &RunId, wake_ms: u64) -> Result<()> {
        let _one_at_a_time = self.wakes_lock.lock().expect("wakes lock");
        let mut keys = keys_of(&self.db, id).map_err(|e| self.storage(e))?;
        keys.push(wake_key(wake_ms, id));
        for key in keys {
            self.db.remove(key).map_err(|e| self.storage(e))?;
        }
        self.wrote();
        Ok(())
    }

    /// Every run's entry in wake-time order, once the index is built (one per run: see
    /// below).
    pub(super) fn read_wakes(&self) -> Result<Option<Vec<(u64, RunId)>>> {
        if !built(&self.db).map_err(|e| self.storage(e))? {
            return Ok(None);
        }
        let _one_at_a_time = self.wakes_lock.lock().expect("wakes lock");
        // Each run's earliest entry (the scan is in wake-time order), by the run's place in
        // `wakes`.
        let mut first: std::collections::HashMap<Vec<u8>, usize> = Default::default();
        let mut wakes = Vec::new();
        for item in self.db.scan_prefix([WAKE_PREFIX]).keys() {
            let key = item.map_err(|e| self.storage(e))?;
            let (Some(wake_ms), Some(id)) = (key.get(1..9).and_then(be_u64), key.get(9..)) else {
                tracing::warn!(key = %super::readable_key(&key), "wake index entry unreadable: dropped");
                self.db.remove(&key).map_err(|e| self.storage(e))?;
                continue;
            };
            if let Some(&at) = first.get(id) {
                // An entry a crash left beside the run's earlier one (the new one is written
                // before the old one is removed, and `v` between): the earliest stands, and
                // `v` is set to it, so that the next change of the entry removes it. A run
                // with one entry has `v` at it, or none (a crash after its first entry), in
                // which case its next change leaves this entry, to be found here next time.
                let (earliest, id): &(u64, RunId) = &wakes[at];
                self.db
                    .insert(wake_of_key(id), &earliest.to_be_bytes())
                    .map_err(|e| self.storage(e))?;
                self.db.remove(&key).map_err(|e| self.storage(e))?;
                continue;
            }
            match std::str::from_utf8(id).map(RunId::existing) {
                Ok(Ok(run)) => {
                    first.insert(id.to_vec(), wakes.len());
                    wakes.push((wake_ms, run));
                }
                _ => {
                    tracing::warn!(key = %super::readable_key(&key), "wake index entry names no run id: dropped");
                    self.db.remove(&key).map_err(|e| self.storage(e))?;
                }
            }
        }
        Ok(Some(wakes))
    }

    pub(super) fn write_wakes_built(&self) -> Result<()> {
        self.db
            .insert(BUILT_KEY, &[1u8])
            .map_err(|e| self.storage(e))?;
        self.db.remove(OLD_BUILT_KEY).map_err(|e| self.storage(e))?;
        self.wrote();
        Ok(())
    }
}
