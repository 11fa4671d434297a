//! How many runs the store holds in each status, kept in memory: counted at open by the pass
//! that repairs records (it reads every record anyway), then moved by every write of a record,
//! so that counting costs nothing however many runs the store holds (the console asks every
//! few seconds). One engine owns a sled store, so every write passes here.

use std::collections::BTreeMap;
use std::sync::Mutex;

use serde::Deserialize;

use crate::journal::RunStatus;

/// The counts per status.
#[derive(Debug, Default)]
pub(super) struct StatusCounts(Mutex<BTreeMap<RunStatus, u64>>);

impl StatusCounts {
    /// Counts as read at open.
    pub(super) fn new(counts: BTreeMap<RunStatus, u64>) -> StatusCounts {
        StatusCounts(Mutex::new(counts))
    }

    /// One record moved from status `from` (none: it is new, or was unreadable) to `to`
    /// (none: it is gone).
    pub(super) fn moved(&self, from: Option<RunStatus>, to: Option<RunStatus>) {
        if from == to {
            return;
        }
        let mut counts = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(from) = from {
            if let Some(n) = counts.get_mut(&from) {
                *n = n.saturating_sub(1);
            }
        }
        if let Some(to) = to {
            *counts.entry(to).or_default() += 1;
        }
    }

    /// The counts now, statuses with none left out.
    pub(super) fn now(&self) -> BTreeMap<RunStatus, u64> {
        let counts = self.0.lock().unwrap_or_else(|p| p.into_inner());
        counts
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(s, n)| (*s, *n))
            .collect()
    }
}

/// The status of a stored run record, read without decoding the rest of it; `None` when the
/// bytes are no readable record (which the counts at open left out too).
pub(super) fn status_of(bytes: &[u8]) -> Option<RunStatus> {
    #[derive(Deserialize)]
    struct Status {
        status: RunStatus,
    }
    serde_json::from_slice::<Status>(bytes)
        .ok()
        .map(|s| s.status)
}
