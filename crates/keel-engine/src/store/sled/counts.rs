//! How many runs the store holds in each status, kept in memory: taken from what a clean
//! close left, or counted from every record, then moved by every write of a record, so that
//! counting costs nothing however many runs the store holds (the console asks every few
//! seconds). One engine owns a sled store, so every write passes here.
//!
//! After a crash, a store whose wake index is built is counted in the background
//! ([`count_in_background`]): the open does not wait for a read of every record (a million
//! records take seconds), and [`StatusCounts::counted`] waits for it instead. Writes go on
//! meanwhile, and each one must be counted once, either by the count's read of its record or
//! by its own move:
//! - the count reads the records in key order, a batch at a time, holding the counts' lock
//!   while it reads a batch and counts it (sled's iterator serves later keys from a copy of
//!   their leaf, so a batch is read whole under the lock, from a fresh iterator);
//! - a write of records while the count runs ([`StatusCounts::writing`]) holds the same lock
//!   from before its write until it has moved the counts, and moves them only for a record
//!   the count has passed. The count reads a record it has not passed later, with this write
//!   in it.
//!
//! While the count runs the lock is handed over fairly (to whoever waited longest), so a
//! write waits for the batch being read and the writes queued before it, not for the whole
//! count. A count that fails (or
//! panics) leaves the counts unavailable until the next open: `run_counts` returns the
//! store's error.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, MutexGuard};
use serde::Deserialize;
use tokio::sync::watch;

use crate::error::{EngineError, Result};
use crate::journal::RunStatus;

use super::{Kv, RUN_PREFIX};

/// Records the background count reads under one hold of the lock: a write of records waits
/// for the batch being read (a few milliseconds when its leaves are read from disk), and for
/// the writes queued before it.
const COUNT_BATCH: usize = 128;

/// The counts per status.
#[derive(Debug)]
pub(super) struct StatusCounts {
    state: Mutex<State>,
    /// Whether the open's count still runs: read without the lock by writes, which then take
    /// it. Only ever goes from `true` to `false`.
    counting: AtomicBool,
    /// `true` once the counts are whole (or the count failed).
    done: watch::Sender<bool>,
}

#[derive(Debug, Default)]
struct State {
    counts: BTreeMap<RunStatus, u64>,
    /// While the open's count runs: the last record key it counted (empty: none yet).
    counted_to: Option<Vec<u8>>,
    /// Why the open's count stopped, if it failed: the counts are not whole.
    failed: Option<String>,
}

impl StatusCounts {
    /// Counts as read at open.
    pub(super) fn new(counts: BTreeMap<RunStatus, u64>) -> StatusCounts {
        StatusCounts {
            state: Mutex::new(State {
                counts,
                ..State::default()
            }),
            counting: AtomicBool::new(false),
            done: watch::Sender::new(true),
        }
    }

    /// Counts that [`count_in_background`] is to make whole.
    pub(super) fn to_count() -> StatusCounts {
        StatusCounts {
            state: Mutex::new(State {
                counted_to: Some(Vec::new()),
                ..State::default()
            }),
            counting: AtomicBool::new(true),
            done: watch::Sender::new(false),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock()
    }

    /// To be taken before a write of records and kept until the write has moved the counts
    /// ([`Writing::moved`]); holds the counts' lock while the open's count runs.
    pub(super) fn writing(&self) -> Writing<'_> {
        Writing {
            counts: self,
            held: self.counting.load(Ordering::SeqCst).then(|| self.lock()),
        }
    }

    /// The counts, statuses with none left out; `None` while the open's count runs or after
    /// it failed.
    pub(super) fn now(&self) -> Option<BTreeMap<RunStatus, u64>> {
        let state = self.lock();
        if state.counted_to.is_some() || state.failed.is_some() {
            return None;
        }
        Some(whole(&state.counts))
    }

    /// The counts once they are whole: waits for the open's count if it still runs. A count
    /// that failed is the store's error, for the store at `path`.
    pub(super) async fn counted(&self, path: &Path) -> Result<BTreeMap<RunStatus, u64>> {
        let mut done = self.done.subscribe();
        // The sender lives in `self`, which outlives this borrow: it cannot close.
        let _ = done.wait_for(|done| *done).await;
        let state = self.lock();
        if let Some(error) = &state.failed {
            return Err(EngineError::Storage {
                path: path.to_owned(),
                source: format!("the open's count of the runs failed: {error}").into(),
            });
        }
        Ok(whole(&state.counts))
    }
}

/// `counts` without the statuses that have none.
fn whole(counts: &BTreeMap<RunStatus, u64>) -> BTreeMap<RunStatus, u64> {
    counts
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(s, n)| (*s, *n))
        .collect()
}

/// A write of records in progress (see [`StatusCounts::writing`]).
pub(super) struct Writing<'a> {
    counts: &'a StatusCounts,
    /// The counts' lock, while the open's count runs.
    held: Option<MutexGuard<'a, State>>,
}

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        if let Some(held) = self.held.take() {
            MutexGuard::unlock_fair(held);
        }
    }
}

impl Writing<'_> {
    /// The record under `key` moved from status `from` (none: it is new, or was unreadable)
    /// to `to` (none: it is gone).
    pub(super) fn moved(&mut self, key: &[u8], from: Option<RunStatus>, to: Option<RunStatus>) {
        if from == to {
            return;
        }
        let mut taken;
        let state = match &mut self.held {
            Some(held) => &mut **held,
            None => {
                taken = self.counts.lock();
                &mut *taken
            }
        };
        if let Some(counted_to) = &state.counted_to {
            if key > counted_to.as_slice() {
                // Not counted yet: the count will read the record as this write left it.
                return;
            }
        }
        if let Some(from) = from {
            if let Some(n) = state.counts.get_mut(&from) {
                *n = n.saturating_sub(1);
            }
        }
        if let Some(to) = to {
            *state.counts.entry(to).or_default() += 1;
        }
    }
}

/// Counts every record of `db` into `counts` (made by [`StatusCounts::to_count`]) on a
/// thread of its own, while the store is used; stops early, its counts not whole, once
/// `stop` is set (the store is dropped). `between` runs before each batch (tests pause
/// there).
pub(super) fn count_in_background(
    kv: Kv,
    counts: Arc<StatusCounts>,
    stop: Arc<AtomicBool>,
    between: impl Fn() + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("keel-count".into())
        .spawn(move || {
            let started = std::time::Instant::now();
            // However the count ends (stopped, failed, panicked), its waiters are told.
            let _ends = Ends(&counts);
            let counted = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                count_batches(&kv, &counts, &stop, between).map_err(|e| match e {
                    // `counted` names the store's path: once is enough.
                    EngineError::Storage { source, .. } => source.to_string(),
                    other => other.to_string(),
                })
            }))
            .unwrap_or_else(|panic| {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                Err(format!("it panicked: {what}"))
            });
            match counted {
                Ok(true) => {
                    let runs: u64 = counts.lock().counts.values().sum();
                    tracing::info!(
                        path = %kv.path().display(),
                        runs,
                        counted_ms = started.elapsed().as_millis(),
                        "sled store counted its runs"
                    );
                }
                Ok(false) => tracing::debug!("the open's count stopped: the store is closing"),
                Err(error) => {
                    tracing::error!(
                        path = %kv.path().display(),
                        %error,
                        "the runs could not be counted: run counts are unavailable until the next open"
                    );
                    counts.lock().failed = Some(error);
                }
            }
        })
}

/// Ends the open's count when dropped, if it did not end whole: its counts are not whole
/// (failed, unless the count's error is there already), writes no longer wait for it, and
/// whoever waits for the counts is told.
struct Ends<'a>(&'a StatusCounts);

impl Drop for Ends<'_> {
    fn drop(&mut self) {
        if *self.0.done.borrow() {
            return;
        }
        self.0
            .lock()
            .failed
            .get_or_insert_with(|| "it ended before the last run".into());
        self.0.counting.store(false, Ordering::SeqCst);
        self.0.done.send_replace(true);
    }
}

/// The count's loop; `Ok(false)` when stopped before the end.
fn count_batches(
    kv: &Kv,
    counts: &StatusCounts,
    stop: &AtomicBool,
    between: impl Fn(),
) -> Result<bool> {
    let end = [RUN_PREFIX + 1];
    loop {
        between();
        if stop.load(Ordering::SeqCst) {
            return Ok(false);
        }
        let mut state = counts.lock();
        let from = match state.counted_to.as_deref() {
            Some([]) | None => Bound::Included(vec![RUN_PREFIX]),
            Some(key) => Bound::Excluded(key.to_vec()),
        };
        let to = Bound::Excluded(end.to_vec());
        let mut read = 0;
        let mut last = None;
        for item in kv.range(from, to) {
            let (key, value) = item?;
            if let Some(status) = status_of(&value) {
                *state.counts.entry(status).or_default() += 1;
            }
            last = Some(key);
            read += 1;
            if read == COUNT_BATCH {
                break;
            }
        }
        match last {
            Some(key) if read == COUNT_BATCH => {
                state.counted_to = Some(key.to_vec());
                MutexGuard::unlock_fair(state);
            }
            _ => {
                state.counted_to = None;
                counts.counting.store(false, Ordering::SeqCst);
                drop(state);
                counts.done.send_replace(true);
                return Ok(true);
            }
        }
    }
}

/// What the count of the store at `path` runs before each batch: nothing.
#[cfg(not(test))]
pub(super) fn pause_of(_path: &Path) -> impl Fn() + Send + 'static {
    || {}
}

/// What the count of the store at `path` runs before each batch: in tests, what a test
/// registered for the path in [`PAUSES`] (to write while the count is paused).
#[cfg(test)]
pub(super) fn pause_of(path: &Path) -> impl Fn() + Send + 'static {
    let pause = PAUSES.lock().get(path).cloned();
    move || {
        if let Some(pause) = &pause {
            pause();
        }
    }
}

/// A pause of a count, for tests.
#[cfg(test)]
pub(super) type Pause = Arc<dyn Fn() + Send + Sync>;

/// Pauses of the counts by store path, for tests.
#[cfg(test)]
pub(super) static PAUSES: Mutex<BTreeMap<std::path::PathBuf, Pause>> = Mutex::new(BTreeMap::new());

/// The status of a stored run record, read without decoding the rest of it; `None` when the
/// bytes have no status to read (which the counts at open left out too).
///
/// A record's JSON begins with its status (the first field of [`RunRecord`]), so that this
/// reads only that word: every write of a run's record reads the status it replaces, for the
/// counts, and both counts at open read every record's (the repair pass's, of a record that
/// does not decode). Bytes that do not begin so (a record written before the status came
/// first) are decoded as a whole. So a record whose status reads is counted by it even if
/// the rest is damaged, which a read of that run reports.
///
/// [`RunRecord`]: crate::journal::RunRecord
pub(super) fn status_of(bytes: &[u8]) -> Option<RunStatus> {
    #[derive(Deserialize)]
    struct Status {
        status: RunStatus,
    }
    first_status(bytes).or_else(|| {
        serde_json::from_slice::<Status>(bytes)
            .ok()
            .map(|s| s.status)
    })
}

/// The status that `bytes` begin with as a JSON object's first field, if they do.
pub(super) fn first_status(bytes: &[u8]) -> Option<RunStatus> {
    // The value: a string, which ends at the next quote unless it holds an escaped one (no
    // status word does; bytes with one are left to the whole decode, which refuses them too).
    let value = bytes.strip_prefix(br#"{"status":"#)?;
    let end = 1 + value.get(1..)?.iter().position(|&b| b == b'"')?;
    serde_json::from_slice(&value[..=end]).ok()
}
