//! The durable wake index (`engine/parking.rs`): when each drivable run must be driven next,
//! so that opening a store loads only the runs that are due and parks the others unread.
//!
//! Keys, in the runs' tree (every write is one key, as for the rest of the store):
//! - `w` + wake time (u64, big-endian) + run id: an entry (empty value). Wake time 0: the run
//!   is loaded (or must be at the next open); `u64::MAX`: it waits only for something to
//!   arrive (an event, an operator call);
//! - `v` + run id: the run's current wake time (u64, big-endian), to find its entry;
//! - `W`: present once every drivable run has an entry (the index was built).
//!
//! A new entry is written before the old one is removed, so a crash between leaves both
//! (the earlier one wins at the next open, which is safe), never neither. An entry whose run
//! is gone or settled is stale and harmless: the next open drops it.

use crate::error::Result;
use crate::ids::RunId;

use super::SledStore;

const WAKE_PREFIX: u8 = b'w';
const WAKE_OF_PREFIX: u8 = b'v';
const BUILT_KEY: &[u8] = b"W";

fn wake_key(wake_ms: u64, id: &RunId) -> Vec<u8> {
    let mut key = Vec::with_capacity(9 + id.as_str().len());
    key.push(WAKE_PREFIX);
    key.extend_from_slice(&wake_ms.to_be_bytes());
    key.extend_from_slice(id.as_str().as_bytes());
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

impl SledStore {
    pub(super) fn write_wake(&self, id: &RunId, wake_ms: u64) -> Result<()> {
        let _one_at_a_time = self.wakes_lock.lock().expect("wakes lock");
        let of = wake_of_key(id);
        let old = self
            .db
            .get(&of)
            .map_err(|e| self.storage(e))?
            .as_deref()
            .and_then(be_u64);
        if old == Some(wake_ms) {
            return Ok(());
        }
        self.db
            .insert(wake_key(wake_ms, id), &[])
            .map_err(|e| self.storage(e))?;
        self.db
            .insert(of, &wake_ms.to_be_bytes())
            .map_err(|e| self.storage(e))?;
        if let Some(old) = old {
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

    /// Every run's entry in wake-time order, once the index is built (one per run: see
    /// below).
    pub(super) fn read_wakes(&self) -> Result<Option<Vec<(u64, RunId)>>> {
        if !self
            .db
            .contains_key(BUILT_KEY)
            .map_err(|e| self.storage(e))?
        {
            return Ok(None);
        }
        let _one_at_a_time = self.wakes_lock.lock().expect("wakes lock");
        let (mut wakes, mut seen) = (Vec::new(), std::collections::HashSet::new());
        for item in self.db.scan_prefix([WAKE_PREFIX]) {
            let (key, _) = item.map_err(|e| self.storage(e))?;
            let (Some(wake_ms), Ok(id)) = (
                key.get(1..9).and_then(be_u64),
                std::str::from_utf8(&key[9.min(key.len())..]),
            ) else {
                tracing::warn!(key = %super::readable_key(&key), "wake index entry unreadable: dropped");
                self.db.remove(&key).map_err(|e| self.storage(e))?;
                continue;
            };
            match RunId::existing(id) {
                // An entry a crash left beside the run's earlier one (the new one is written
                // before the old one is removed): the earliest stands, and the run's `v` key
                // is set to it, so that the next change of the entry removes it.
                Ok(id) if !seen.insert(id.clone()) => {
                    self.db.remove(&key).map_err(|e| self.storage(e))?;
                }
                Ok(id) => {
                    let of = wake_of_key(&id);
                    let recorded = self.db.get(&of).map_err(|e| self.storage(e))?;
                    if recorded.as_deref().and_then(be_u64) != Some(wake_ms) {
                        self.db
                            .insert(of, &wake_ms.to_be_bytes())
                            .map_err(|e| self.storage(e))?;
                    }
                    wakes.push((wake_ms, id));
                }
                Err(error) => {
                    tracing::warn!(%error, "wake index entry names no run id: dropped");
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
        self.wrote();
        Ok(())
    }
}
