//! Every operation's statistics in memory ([`StatsBook`]): what this engine records at each
//! step and wait, written to the store at each flush, and the other engines' sharing the
//! store, as last read, merged in for what is reported.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::Duration;

use super::{LatencyStats, OperationStats};
use crate::error::Result;
use crate::store::JournalStore;

/// All operations' statistics, in memory, with the set changed since the last flush.
#[derive(Default)]
pub(crate) struct StatsBook {
    inner: Mutex<Book>,
}

#[derive(Default)]
struct Book {
    /// This engine's own statistics: what it records and writes.
    by_operation: BTreeMap<String, LatencyStats>,
    dirty: BTreeSet<String>,
    /// The other engines' sharing the store, as last read (`StatsBook::refresh_others`):
    /// reported merged with this engine's own.
    others: BTreeMap<String, LatencyStats>,
}

impl Book {
    /// This engine's statistics of `operation` merged with the other engines'.
    fn shared(&self, operation: &str) -> Option<LatencyStats> {
        match (self.by_operation.get(operation), self.others.get(operation)) {
            (Some(mine), Some(theirs)) => Some(mine.merged(theirs)),
            (Some(one), None) | (None, Some(one)) => Some(one.clone()),
            (None, None) => None,
        }
    }
}

impl StatsBook {
    /// Loads what the store holds. A record that does not decode is reported and started
    /// afresh: statistics are advisory, and losing one operation's must not stop the engine.
    pub(crate) async fn load(store: &dyn JournalStore) -> Result<StatsBook> {
        let mut book = Book::default();
        for (operation, bytes) in store.stats().await? {
            match serde_json::from_slice::<LatencyStats>(&bytes) {
                Ok(stats) => {
                    book.by_operation.insert(operation, stats);
                }
                Err(error) => {
                    tracing::warn!(%operation, %error, "latency statistics do not decode; starting them afresh")
                }
            }
        }
        Ok(StatsBook {
            inner: Mutex::new(book),
        })
    }

    pub(crate) fn record(&self, operation: &str, duration: Duration, run_id: &str, at_ms: u64) {
        let mut book = self.inner.lock().expect("stats lock");
        // Looked up by `&str` first: an operation's name is copied only the first time it is
        // seen, not at every step.
        match book.by_operation.get_mut(operation) {
            Some(stats) => stats.record(duration, run_id, at_ms),
            None => {
                let mut stats = LatencyStats::default();
                stats.record(duration, run_id, at_ms);
                book.by_operation.insert(operation.to_string(), stats);
            }
        }
        if !book.dirty.contains(operation) {
            book.dirty.insert(operation.to_string());
        }
    }

    /// The statistics of `operation`, this engine's merged with those of the other engines
    /// sharing the store.
    pub(crate) fn summary(&self, operation: &str) -> Option<OperationStats> {
        let book = self.inner.lock().expect("stats lock");
        book.shared(operation).map(|s| s.summary(operation))
    }

    /// How many executions of `operation` (this engine's and the other engines') took at
    /// most each of `bounds_us`, as [`LatencyStats::counts_at_or_below`].
    pub(crate) fn counts_at_or_below(
        &self,
        operation: &str,
        bounds_us: &[u64],
    ) -> Option<Vec<u64>> {
        let book = self.inner.lock().expect("stats lock");
        book.shared(operation)
            .map(|s| s.counts_at_or_below(bounds_us))
    }

    /// Every operation's statistics, as [`StatsBook::summary`].
    pub(crate) fn all(&self) -> Vec<OperationStats> {
        let book = self.inner.lock().expect("stats lock");
        let operations: BTreeSet<&String> =
            book.by_operation.keys().chain(book.others.keys()).collect();
        operations
            .into_iter()
            .filter_map(|op| book.shared(op).map(|s| s.summary(op)))
            .collect()
    }

    /// Reads the statistics the other engines sharing the store wrote, each operation's
    /// merged over them, for [`StatsBook::summary`]. Records that do not decode are skipped.
    pub(crate) async fn refresh_others(&self, store: &dyn JournalStore) -> Result<()> {
        let mut others: BTreeMap<String, LatencyStats> = BTreeMap::new();
        for (operation, bytes) in store.others_stats().await? {
            let Ok(stats) = serde_json::from_slice::<LatencyStats>(&bytes) else {
                continue;
            };
            let merged = match others.get(&operation) {
                Some(so_far) => so_far.merged(&stats),
                None => stats,
            };
            others.insert(operation, merged);
        }
        self.inner.lock().expect("stats lock").others = others;
        Ok(())
    }

    /// Writes every operation changed since the last flush (durable with the store's next
    /// sync). Returns how many were written.
    pub(crate) fn flush(&self, store: &dyn JournalStore) -> Result<usize> {
        let changed: Vec<(String, Vec<u8>)> = {
            let mut book = self.inner.lock().expect("stats lock");
            let dirty = std::mem::take(&mut book.dirty);
            dirty
                .into_iter()
                .filter_map(|op| {
                    let bytes =
                        serde_json::to_vec(book.by_operation.get(&op)?).expect("stats serialise");
                    Some((op, bytes))
                })
                .collect()
        };
        for (operation, bytes) in &changed {
            store.put_stats(operation, bytes)?;
        }
        Ok(changed.len())
    }
}
