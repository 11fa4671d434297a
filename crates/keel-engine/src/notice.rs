//! Notices: the outbox of status transitions someone outside wants to hear of (a run that
//! paused, was suspended, or whose compensation failed: it needs a human).
//!
//! An engine built with [`crate::EngineBuilder::notify_on`] writes one [`Notice`] per
//! transition of a run into one of the chosen statuses, in the store's keyed records
//! (`Space::Notice`), by the run's cell, under the cell lock, right *before* the transition's
//! journal entry. Both are made durable in the order they were written, and on PostgreSQL
//! they share a transaction, so a transition that is durable always has its notice (no
//! notice is lost for a durable transition). The other way round, a crash (or, on a shared
//! store, a fenced append) can leave a notice whose transition never became durable; the
//! engine therefore hands a notice out ([`crate::Engine::notices`]) only once it found the
//! transition's entry in the journal, and made it durable, and deletes a notice whose journal
//! index holds another entry. Its event id, `<run id>:<journal index>`, is deterministic: a
//! run that makes the same transition again at the same index after a crash writes the same
//! notice again.
//!
//! Delivery is the caller's (the worker's sender): it records each target a notice reached
//! ([`crate::Engine::notice_delivered`]) and deletes the notice once every target has it
//! ([`crate::Engine::notice_done`]). A crash between a delivery and its record repeats the
//! delivery: notices are delivered at least once, and receivers drop duplicates by event id.

use std::collections::HashSet;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::error::{EngineError, Result};
use crate::ids::{JournalIndex, RunId};
use crate::journal::{Entry, RunRecord, RunStatus};
use crate::limits::{NOTICE_TARGETS_MAX, NOTICE_TARGET_BYTES_MAX};
use crate::store::{encode, JournalStore, Space};

/// A run's transition into a status an operator asked to hear of, waiting to be delivered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notice {
    /// `<run id>:<journal index of the transition's entry>`: unique and deterministic, the
    /// key receivers drop duplicates by.
    pub event_id: String,
    /// The run.
    pub run_id: RunId,
    /// The run's workflow.
    pub workflow: String,
    /// The status the run entered.
    pub status: RunStatus,
    /// The status it left.
    pub previous_status: RunStatus,
    /// The run record's error after the transition (why it paused, was suspended, ...), cut
    /// to [`crate::limits::ERROR_MESSAGE_BYTES_MAX`].
    pub error: Option<String>,
    /// When the transition was journaled (ms since the Unix epoch): its entry's time.
    pub at_ms: u64,
    /// The run's parent, for a child run.
    pub parent: Option<RunId>,
    /// The targets (the caller's names for them, e.g. URLs) that already have the notice.
    #[serde(default)]
    pub delivered_to: Vec<String>,
    /// The type of the journal entry that made the transition (`run_paused`, ...): what the
    /// engine checks the journal against before it hands the notice out.
    pub entry_type: String,
}

impl Notice {
    /// The journal index of the transition, from the event id.
    pub(crate) fn index(&self) -> Option<JournalIndex> {
        let (_, index) = self.event_id.rsplit_once(':')?;
        index.parse().ok().map(JournalIndex)
    }

    /// Whether `entry` is the one this notice was written with.
    pub(crate) fn made_by(&self, entry: &Entry) -> bool {
        entry.at_ms == self.at_ms && entry_type(entry).as_deref() == Some(&self.entry_type)
    }

    /// Records that `target` has the notice; false when it had it already.
    pub(crate) fn deliver(&mut self, target: &str) -> Result<bool> {
        if self.delivered_to.iter().any(|t| t == target) {
            return Ok(false);
        }
        if target.is_empty() || target.len() > NOTICE_TARGET_BYTES_MAX {
            return Err(EngineError::InvalidRequest(format!(
                "notice target of {} bytes: must be 1 to {NOTICE_TARGET_BYTES_MAX}",
                target.len()
            )));
        }
        if self.delivered_to.len() >= NOTICE_TARGETS_MAX {
            return Err(EngineError::LimitReached {
                what: format!("targets of notice {}", self.event_id),
                limit: NOTICE_TARGETS_MAX as u64,
            });
        }
        self.delivered_to.push(target.to_string());
        Ok(true)
    }

    /// Writes the notice (durable with the next sync).
    pub(crate) fn put(&self, store: &dyn JournalStore) -> Result<()> {
        let what = format!("notice {}", self.event_id);
        let text = encode(&what, self, crate::limits::KEYED_RECORD_BYTES_MAX)?;
        store.put_keyed(Space::Notice, &self.event_id, &text)
    }
}

/// The `type` tag a journal entry is stored with.
fn entry_type(entry: &Entry) -> Option<String> {
    let value = serde_json::to_value(&entry.event).ok()?;
    value.get("type")?.as_str().map(str::to_string)
}

/// What an engine's cells share about notices: which statuses are notified, the channel
/// that wakes a sender, and which notices this engine knows to be durable with their
/// transitions.
#[derive(Debug)]
pub(crate) struct Outbox {
    /// The statuses a transition into which writes a notice; empty: none is written.
    statuses: Vec<RunStatus>,
    /// Bumped after every notice a cell wrote.
    written: watch::Sender<u64>,
    /// Event ids whose transitions were found in the journal and synced: handed out
    /// without looking again.
    pub(crate) confirmed: Mutex<HashSet<String>>,
    /// Serialises the read-modify-write of a notice's targets.
    pub(crate) updating: tokio::sync::Mutex<()>,
}

impl Outbox {
    pub(crate) fn new(statuses: &[RunStatus]) -> Outbox {
        let mut statuses = statuses.to_vec();
        statuses.sort();
        statuses.dedup();
        Outbox {
            statuses,
            written: watch::channel(0).0,
            confirmed: Mutex::new(HashSet::new()),
            updating: tokio::sync::Mutex::new(()),
        }
    }

    /// The notice a transition from `before` to `after`, journaled as entry `index`, must
    /// write; `None` unless the run enters a notified status.
    pub(crate) fn notice(
        &self,
        before: &RunRecord,
        after: &RunRecord,
        index: JournalIndex,
        entry: &Entry,
    ) -> Option<Notice> {
        if before.status == after.status || !self.statuses.contains(&after.status) {
            return None;
        }
        Some(Notice {
            event_id: format!("{}:{}", after.id, index.0),
            run_id: after.id.clone(),
            workflow: after.workflow.clone(),
            status: after.status,
            previous_status: before.status,
            error: after.error.clone().map(crate::step::truncate),
            at_ms: entry.at_ms,
            parent: after.parent.clone(),
            delivered_to: Vec::new(),
            entry_type: entry_type(entry).unwrap_or_default(),
        })
    }

    /// Tells a waiting sender that a notice was written (it checks durability itself).
    pub(crate) fn wrote(&self) {
        self.written.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// What a sender waits on: bumped after every notice written.
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.written.subscribe()
    }
}
