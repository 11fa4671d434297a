//! A run's journal in the sled tree: its keys, values that hold several entries (a step's
//! completion and the entry after it), the run record's state in a transition's entry, and
//! the journal's reads and writes.

use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::counts::status_of;
use super::{encode, readable_key, run_key, SledStore, JOURNAL_PREFIX};
use crate::error::{EngineError, Result};
use crate::ids::{JournalIndex, RunId};
use crate::journal::{Entry, RunRecord, RunStatus};
use crate::limits::{ENTRY_BYTES_MAX, RUN_RECORD_BYTES_MAX, TRANSITION_ENTRY_BYTES_MAX};

/// The part of a run record a status transition changes, as stored in the transition's
/// journal entry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(super) struct RecordState {
    pub(super) status: RunStatus,
    updated_at_ms: u64,
    finished_at_ms: Option<u64>,
    output: Option<Value>,
    error: Option<String>,
}

impl RecordState {
    pub(super) fn of(record: &RunRecord) -> RecordState {
        RecordState {
            status: record.status,
            updated_at_ms: record.updated_at_ms,
            finished_at_ms: record.finished_at_ms,
            output: record.output.clone(),
            error: record.error.clone(),
        }
    }

    pub(super) fn apply_to(self, record: &mut RunRecord) {
        record.status = self.status;
        record.updated_at_ms = self.updated_at_ms;
        record.finished_at_ms = self.finished_at_ms;
        record.output = self.output;
        record.error = self.error;
    }
}

/// The `"record"` field of a stored journal entry; an [`Entry`] decodes past it.
#[derive(Deserialize)]
pub(super) struct StoredRecordState {
    pub(super) record: Option<RecordState>,
}

/// The stored bytes of a transition's journal entry: the entry with the record's new state
/// (its `"record"` field), serialised in one pass, with nothing copied.
pub(super) fn encode_transition(entry: &Entry, record: &RunRecord) -> Result<Vec<u8>> {
    /// [`RecordState`], borrowed from the record.
    #[derive(Serialize)]
    struct StateOf<'a> {
        status: RunStatus,
        updated_at_ms: u64,
        finished_at_ms: Option<u64>,
        output: &'a Option<Value>,
        error: &'a Option<String>,
    }
    #[derive(Serialize)]
    struct Transition<'a> {
        #[serde(flatten)]
        entry: &'a Entry,
        record: StateOf<'a>,
    }
    let transition = Transition {
        entry,
        record: StateOf {
            status: record.status,
            updated_at_ms: record.updated_at_ms,
            finished_at_ms: record.finished_at_ms,
            output: &record.output,
            error: &record.error,
        },
    };
    encode(
        "journal entry with its run record's state",
        &transition,
        TRANSITION_ENTRY_BYTES_MAX,
    )
}

pub(super) fn journal_prefix(id: &RunId) -> Vec<u8> {
    let mut key = Vec::with_capacity(2 + id.as_str().len() + 4);
    key.push(JOURNAL_PREFIX);
    key.extend_from_slice(id.as_str().as_bytes());
    key.push(0);
    key
}

pub(super) fn journal_key(id: &RunId, index: JournalIndex) -> Vec<u8> {
    let mut key = journal_prefix(id);
    key.extend_from_slice(&index.0.to_be_bytes());
    key
}

/// Largest value that holds several journal entries (see [`group`]): no larger than one
/// transition's entry, so that grouping moves no value into a blob file.
pub(super) const GROUP_BYTES_MAX: usize = TRANSITION_ENTRY_BYTES_MAX;

/// The keyed values that store the encoded journal entries `values`, the first at `index`:
/// consecutive entries whose encodings fit in [`GROUP_BYTES_MAX`] together share one value,
/// a JSON array of them keyed by the first one's index, so that they cost one sled insert
/// (a step's completion and the next entry, `cell.rs`); any other entry is a value of its
/// own, a JSON object. The journal stays dense: a group of n entries at index i is followed
/// by index i + n.
pub(super) fn group(index: JournalIndex, values: Vec<Vec<u8>>) -> Vec<(JournalIndex, Vec<u8>)> {
    // Each group: its first index, its values, and their bytes with a separator each.
    let mut groups: Vec<(JournalIndex, Vec<Vec<u8>>, usize)> = Vec::new();
    for (offset, value) in values.into_iter().enumerate() {
        match groups.last_mut() {
            // `[`, the values, a `,` between two, `]`.
            Some((_, group, bytes)) if *bytes + value.len() + 2 <= GROUP_BYTES_MAX => {
                *bytes += value.len() + 1;
                group.push(value);
            }
            _ => {
                let bytes = value.len() + 1;
                groups.push((JournalIndex(index.0 + offset as u32), vec![value], bytes));
            }
        }
    }
    groups
        .into_iter()
        .map(|(index, mut group, _)| match group.len() {
            1 => (index, group.pop().expect("one value")),
            _ => {
                let mut joined = b"[".to_vec();
                joined.extend_from_slice(&group.join(&b","[..]));
                joined.push(b']');
                (index, joined)
            }
        })
        .collect()
}

/// Whether a stored journal value holds several entries (a JSON array), not one (an object).
pub(super) fn is_group(bytes: &[u8]) -> bool {
    bytes.first() == Some(&b'[')
}

/// The journal's reads and writes.
impl SledStore {
    pub(super) fn read_journal(&self, id: &RunId) -> Result<Vec<Entry>> {
        let prefix = journal_prefix(id);
        let mut entries = Vec::new();
        for item in self.db.scan_prefix(&prefix) {
            let (key, bytes) = item.map_err(|e| self.storage(e))?;
            let corrupt = |detail: String| EngineError::Corrupt {
                key: readable_key(&key),
                detail,
            };
            let index_bytes: [u8; 4] = key[prefix.len()..].try_into().map_err(|_| {
                corrupt(format!(
                    "journal key has {} index bytes, not 4",
                    key.len() - prefix.len()
                ))
            })?;
            let index = u32::from_be_bytes(index_bytes);
            if index as usize != entries.len() {
                let what = if (index as usize) < entries.len() {
                    "overlap"
                } else {
                    "gap"
                };
                return Err(corrupt(format!(
                    "journal index {index} follows {} entries: {what}",
                    entries.len()
                )));
            }
            if is_group(&bytes) {
                let group: Vec<Entry> = serde_json::from_slice(&bytes)
                    .map_err(|e| corrupt(format!("journal entries: {e}")))?;
                if group.len() < 2 {
                    return Err(corrupt(format!(
                        "a group of {} journal entries, not 2 or more",
                        group.len()
                    )));
                }
                entries.extend(group);
            } else {
                let entry: Entry = serde_json::from_slice(&bytes)
                    .map_err(|e| corrupt(format!("journal entry: {e}")))?;
                entries.push(entry);
            }
        }
        Ok(entries)
    }

    pub(super) fn write_entries(
        &self,
        id: &RunId,
        index: JournalIndex,
        entries: &[Entry],
        record: Option<&RunRecord>,
    ) -> Result<()> {
        let Some((last, before)) = entries.split_last() else {
            return Ok(());
        };
        // Everything encoded (and checked) before anything is written.
        let mut values = before
            .iter()
            .map(|entry| encode("journal entry", entry, ENTRY_BYTES_MAX))
            .collect::<Result<Vec<_>>>()?;
        // The run record's view, with its bytes, when a transition changes it.
        let view = match record {
            None => {
                values.push(encode("journal entry", last, ENTRY_BYTES_MAX)?);
                None
            }
            Some(record) => {
                values.push(encode_transition(last, record)?);
                Some((record, encode("run record", record, RUN_RECORD_BYTES_MAX)?))
            }
        };
        let mut keyed = group(index, values);
        let (last_index, last_value) = keyed.pop().expect("one entry at least");
        let _writing = self.writes.begin();
        for (index, value) in keyed {
            self.db
                .insert(journal_key(id, index), value)
                .map_err(|e| self.storage(e))?;
        }
        let Some((record, record_bytes)) = view else {
            self.db
                .insert(journal_key(id, last_index), last_value)
                .map_err(|e| self.storage(e))?;
            return Ok(());
        };
        // Until the view is rewritten, the store may not be closed cleanly.
        self.transitions_open.fetch_add(1, Ordering::SeqCst);
        // The commit point: the entry with the record's new state.
        self.db
            .insert(journal_key(id, last_index), last_value)
            .map_err(|e| self.storage(e))?;
        crate::crash::point("store.after_transition_entry");
        // The view; `repair_records` redoes it if a crash comes first.
        let before = self
            .db
            .insert(run_key(id), record_bytes)
            .map_err(|e| self.storage(e))?;
        let from = before.as_deref().and_then(status_of);
        self.counts.moved(from, Some(record.status));
        self.transitions_open.fetch_sub(1, Ordering::SeqCst);
        Ok(())
    }
}
