//! The store's one sled tree, as the rest of the store reads and writes it: every key's get,
//! insert, removal and scan goes through [`Kv`], which names sled's errors by the store's
//! path. It is the one place where what reaches sled is decided, so that a log and a memtable
//! in front of sled (docs/plans/issue-28-plan.md, section E) change this file and not the
//! thirty call sites of the store's operations.
//!
//! Blocking, as sled is; the store's callers decide which thread that is on.

use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sled::IVec;

use super::storage;
use crate::error::Result;

/// The store's tree and its path (shared by clones: the open's count and the store's work
/// off the runtime hold one each).
#[derive(Clone)]
pub(super) struct Kv {
    db: sled::Db,
    path: Arc<PathBuf>,
}

impl Kv {
    pub(super) fn new(path: &Path, db: sled::Db) -> Kv {
        Kv {
            db,
            path: Arc::new(path.to_owned()),
        }
    }

    /// The store's directory.
    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// sled itself, for what works on sled as a whole rather than on keys: its flush (the
    /// sync, `sync.rs`), the commit sequence's tree (`store/mark.rs`), its recovery checks.
    pub(super) fn sled(&self) -> &sled::Db {
        &self.db
    }

    pub(super) fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<IVec>> {
        self.db.get(key).map_err(|e| self.error(e))
    }

    pub(super) fn contains(&self, key: impl AsRef<[u8]>) -> Result<bool> {
        self.db.contains_key(key).map_err(|e| self.error(e))
    }

    /// Sets `key` to `value`; the value it had.
    pub(super) fn insert(
        &self,
        key: impl AsRef<[u8]>,
        value: impl Into<IVec>,
    ) -> Result<Option<IVec>> {
        self.db.insert(key, value).map_err(|e| self.error(e))
    }

    /// Removes `key` (nothing is written when it is absent); the value it had.
    pub(super) fn remove(&self, key: impl AsRef<[u8]>) -> Result<Option<IVec>> {
        self.db.remove(key).map_err(|e| self.error(e))
    }

    /// Sets `key` to `value` unless it has a value: `None` when it was set, else the value
    /// it has (and nothing was written).
    pub(super) fn create(
        &self,
        key: impl AsRef<[u8]>,
        value: impl Into<IVec>,
    ) -> Result<Option<IVec>> {
        match self
            .db
            .compare_and_swap(key, None as Option<&[u8]>, Some(value))
        {
            Ok(Ok(())) => Ok(None),
            Ok(Err(cas)) => Ok(Some(
                cas.current
                    .expect("compare_and_swap from None fails only on an existing value"),
            )),
            Err(e) => Err(self.error(e)),
        }
    }

    /// The keys beginning with `prefix` and their values, in key order.
    pub(super) fn scan_prefix(
        &self,
        prefix: impl AsRef<[u8]>,
    ) -> impl DoubleEndedIterator<Item = Result<(IVec, IVec)>> + '_ {
        self.db
            .scan_prefix(prefix)
            .map(|item| item.map_err(|e| self.error(e)))
    }

    /// The keys beginning with `prefix`, in order.
    pub(super) fn keys_with_prefix(
        &self,
        prefix: impl AsRef<[u8]>,
    ) -> impl Iterator<Item = Result<IVec>> + '_ {
        self.db
            .scan_prefix(prefix)
            .keys()
            .map(|item| item.map_err(|e| self.error(e)))
    }

    /// The keys from `from` (up to `to`) and their values, in key order.
    pub(super) fn range(
        &self,
        from: Bound<Vec<u8>>,
        to: Bound<Vec<u8>>,
    ) -> impl Iterator<Item = Result<(IVec, IVec)>> + '_ {
        self.db
            .range::<Vec<u8>, _>((from, to))
            .map(|item| item.map_err(|e| self.error(e)))
    }

    /// Removes every key of `keys` at once. It takes sled's process-wide write lock, which
    /// waits for any flush in progress (see the module doc of `mod.rs`): off the runtime's
    /// threads, and never on the hot path.
    pub(super) fn remove_all(&self, keys: Vec<IVec>) -> Result<()> {
        let mut batch = sled::Batch::default();
        for key in keys {
            batch.remove(key);
        }
        self.db.apply_batch(batch).map_err(|e| self.error(e))
    }

    /// Whether the tree holds no key.
    pub(super) fn is_empty(&self) -> bool {
        self.db.is_empty()
    }

    /// Writes sled's buffers (durable at `PowerLoss`: `recovery::open_db`).
    pub(super) fn flush(&self) -> Result<()> {
        self.db.flush().map(drop).map_err(|e| self.error(e))
    }

    fn error(&self, error: sled::Error) -> crate::error::EngineError {
        storage(&self.path, error)
    }
}
