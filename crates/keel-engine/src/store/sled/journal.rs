//! A run's journal in the sled tree: its keys, values that hold several entries (a step's
//! completion and the entry after it), the run record's state in a transition's entry, a
//! settled run's record holding the journal's last entries, and the journal's reads and
//! writes.

use std::io::Write;
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

/// The stored bytes of a settled run's record: `record`, with the journal's last entries
/// (`entries`, encoded, the first at index `from`) in its `"journal_tail"` field. A terminal
/// transition is this one write (see [`SledStore::write_entries`]): the record is its own
/// view, and the entries are read back as the journal's (see [`SledStore::read_journal`]).
fn settled_record(record: &RunRecord, from: JournalIndex, entries: &[Vec<u8>]) -> Result<Vec<u8>> {
    let mut bytes = encode("run record", record, RUN_RECORD_BYTES_MAX)?;
    // A struct's JSON object ends with its `}`: the tail goes in as its last field.
    debug_assert_eq!(bytes.last(), Some(&b'}'));
    bytes.pop();
    // Written into the record's buffer: no string of its own.
    write!(bytes, r#","{TAIL_FIELD}":{{"from":{},"entries":["#, from.0)
        .expect("a Vec takes every write");
    bytes.extend_from_slice(&entries.join(&b","[..]));
    bytes.extend_from_slice(b"]}}");
    Ok(bytes)
}

/// The field of a settled run's stored record that holds the journal's last entries.
const TAIL_FIELD: &str = "journal_tail";

/// The journal's last entries held in a settled run's stored record.
#[derive(Deserialize)]
struct JournalTail {
    /// The index of the first.
    from: u32,
    entries: Vec<Entry>,
}

/// The [`JournalTail`] field of a stored run record, read without decoding the rest of it
/// (`None`: the run has not settled, or settled before records held tails).
#[derive(Deserialize)]
struct StoredTail {
    journal_tail: Option<JournalTail>,
}

/// The index of the first of the journal's last entries that the stored run record `bytes`
/// holds, if it holds any (read without decoding them); `None` also for bytes that do not
/// decode.
pub(super) fn tail_from(bytes: &[u8]) -> Option<u32> {
    #[derive(Deserialize)]
    struct Held {
        from: u32,
    }
    #[derive(Deserialize)]
    struct Stored {
        journal_tail: Option<Held>,
    }
    serde_json::from_slice::<Stored>(bytes)
        .ok()?
        .journal_tail
        .map(|tail| tail.from)
}

/// The journal's last entries held in run `id`'s stored record `bytes`, if it holds any.
fn journal_tail(id: &RunId, bytes: &[u8]) -> Result<Option<JournalTail>> {
    serde_json::from_slice::<StoredTail>(bytes)
        .map(|stored| stored.journal_tail)
        .map_err(|e| EngineError::Corrupt {
            key: readable_key(&run_key(id)),
            detail: format!("run record: {e}"),
        })
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
pub(super) fn group(index: JournalIndex, mut values: Vec<Vec<u8>>) -> Vec<(JournalIndex, Vec<u8>)> {
    // First the groups' bounds: each group's first and last offset in `values`, and its
    // bytes as an array (`[`, the values, a `,` between two, `]`).
    let mut bounds: Vec<(usize, usize, usize)> = Vec::new();
    for (offset, value) in values.iter().enumerate() {
        match bounds.last_mut() {
            Some((_, last, bytes)) if *bytes + 1 + value.len() <= GROUP_BYTES_MAX => {
                *bytes += 1 + value.len();
                *last = offset;
            }
            _ => bounds.push((offset, offset, value.len() + 2)),
        }
    }
    // Then each group's value, written once into a buffer of its size: a step's two
    // entries (its completion and the next one) are grouped at every step.
    bounds
        .into_iter()
        .map(|(first, last, _)| {
            let at = JournalIndex(index.0 + first as u32);
            (at, one_value(&mut values[first..=last]))
        })
        .collect()
}

/// The stored value of the encoded entries `values` (one at least): the entry itself when
/// it is alone (taken out of `values`), else a JSON array of them (see [`group`]), written
/// once into a buffer of its size.
fn one_value(values: &mut [Vec<u8>]) -> Vec<u8> {
    if let [one] = values {
        return std::mem::take(one);
    }
    // `[`, the values, a `,` between two, `]`.
    let bytes = values.iter().map(|value| value.len() + 1).sum::<usize>() + 1;
    let mut array = Vec::with_capacity(bytes);
    for (n, value) in values.iter().enumerate() {
        array.push(if n == 0 { b'[' } else { b',' });
        array.extend_from_slice(value);
    }
    array.push(b']');
    array
}

/// Whether a stored journal value holds several entries (a JSON array), not one (an object).
pub(super) fn is_group(bytes: &[u8]) -> bool {
    bytes.first() == Some(&b'[')
}

/// The journal's reads and writes.
impl SledStore {
    /// Run `id`'s journal: its keys' entries, in order, with the entries its record holds
    /// if it settled ([`settled_record`]) in their place (after the keys before them, before
    /// any written after the run settled, as a rerun's note).
    ///
    /// The record and the keys are read one after the other, not at one instant: a read
    /// that finds them disagreeing while the record changed meanwhile (the run settled and
    /// was given a note, or was deleted) is made again.
    pub(super) fn read_journal(&self, id: &RunId) -> Result<Vec<Entry>> {
        /// Reads made while the record keeps changing under them, at most.
        const TRIES: usize = 3;
        let key = run_key(id);
        let get = || self.kv.get(&key);
        let mut record = get()?;
        let mut tries = 1;
        loop {
            let read = self.journal_with(id, record.as_deref());
            if read.is_ok() || tries == TRIES {
                return read;
            }
            let now = get()?;
            if now == record {
                return read;
            }
            record = now;
            tries += 1;
        }
    }

    /// Run `id`'s journal, its record's bytes being `record`.
    fn journal_with(&self, id: &RunId, record: Option<&[u8]>) -> Result<Vec<Entry>> {
        let mut tail = match record {
            Some(bytes) => journal_tail(id, bytes)?,
            None => None,
        };
        let prefix = journal_prefix(id);
        let mut entries = Vec::new();
        for item in self.kv.scan_prefix(&prefix) {
            let (key, bytes) = item?;
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
            if index as usize > entries.len() {
                if let Some(held) = tail.take_if(|t| t.from as usize == entries.len()) {
                    entries.extend(held.entries);
                }
            }
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
        match tail {
            Some(held) if held.from as usize == entries.len() => entries.extend(held.entries),
            // Moved out to a key before a later transition (`move_tail_out`), which a crash
            // (or this read) met before the record's rewrite.
            Some(held) if held.from as usize + held.entries.len() <= entries.len() => {}
            Some(held) => {
                return Err(EngineError::Corrupt {
                    key: readable_key(&run_key(id)),
                    detail: format!(
                        "run record: its journal's last entries begin at index {}, but the \
                         journal holds {} entries before them",
                        held.from,
                        entries.len()
                    ),
                })
            }
            None => {}
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
        if let Some(record) = record.filter(|r| r.status.is_terminal()) {
            if self.settle(id, index, before, last, record)? {
                return Ok(());
            }
        }
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
        if view.is_some() {
            self.move_tail_out(id)?;
        }
        for (index, value) in keyed {
            self.kv.insert(journal_key(id, index), value)?;
        }
        let Some((record, record_bytes)) = view else {
            self.kv.insert(journal_key(id, last_index), last_value)?;
            return Ok(());
        };
        // Until the view is rewritten, the store may not be closed cleanly.
        self.transitions_open.fetch_add(1, Ordering::SeqCst);
        // The commit point: the entry with the record's new state.
        self.kv.insert(journal_key(id, last_index), last_value)?;
        crate::crash::point("store.after_transition_entry");
        // The view; `repair_records` redoes it if a crash comes first.
        let key = run_key(id);
        let mut counting = self.counts.writing();
        let before = self.kv.insert(&key, record_bytes)?;
        let from = before.as_deref().and_then(status_of);
        counting.moved(&key, from, Some(record.status));
        self.transitions_open.fetch_sub(1, Ordering::SeqCst);
        Ok(())
    }

    /// Before a transition of a run that had settled (a completed child its parent
    /// compensates), whose record's rewrite drops the entries it holds: writes them as one
    /// key (a value of several entries, as [`group`] makes, whatever its size, so that a
    /// crash leaves all of them or none), where reads then take them from (see
    /// [`SledStore::read_journal`]). Nothing when the record holds none.
    pub(super) fn move_tail_out(&self, id: &RunId) -> Result<()> {
        let record = self.kv.get(run_key(id))?;
        let held = match record {
            Some(bytes) => journal_tail(id, &bytes)?,
            None => None,
        };
        let Some(tail) = held.filter(|t| !t.entries.is_empty()) else {
            return Ok(());
        };
        let mut values = tail
            .entries
            .iter()
            .map(|entry| encode("journal entry", entry, TRANSITION_ENTRY_BYTES_MAX))
            .collect::<Result<Vec<_>>>()?;
        self.kv.insert(
            journal_key(id, JournalIndex(tail.from)),
            one_value(&mut values),
        )?;
        Ok(())
    }

    /// A terminal transition, `last` (with the entries `before` it, the first at `index`):
    /// one write, of the run's record holding them ([`settled_record`]). It is the
    /// transition's commit point, and leaves no view behind a journal for the open to repair.
    /// An entry appended later (a rerun's note) is a key of its own, after them; a later
    /// transition (a completed child its parent compensates) moves them to keys first
    /// ([`SledStore::move_tail_out`]). The record this one replaces holds no entries: a run
    /// settles only from a status that is not settled (the table at [`RunStatus`]), whose
    /// record that move left without them.
    ///
    /// A record that would pass [`RUN_RECORD_BYTES_MAX`] with them (large input, output and
    /// entries together) is not written: `false`, and the transition is written as any other
    /// (its entry, then the record's view), so that no record grows into a blob file of its
    /// own (`limits.rs`).
    fn settle(
        &self,
        id: &RunId,
        index: JournalIndex,
        before: &[Entry],
        last: &Entry,
        record: &RunRecord,
    ) -> Result<bool> {
        // Everything encoded (and checked) before anything is written. The last entry is
        // held to the bound of a transition's entry, as when it carried the record's state.
        let mut values = before
            .iter()
            .map(|entry| encode("journal entry", entry, ENTRY_BYTES_MAX))
            .collect::<Result<Vec<_>>>()?;
        values.push(encode("journal entry", last, TRANSITION_ENTRY_BYTES_MAX)?);
        let bytes = settled_record(record, index, &values)?;
        if bytes.len() > RUN_RECORD_BYTES_MAX {
            return Ok(false);
        }
        let _writing = self.writes.begin();
        let key = run_key(id);
        let mut counting = self.counts.writing();
        let before = self.kv.insert(&key, bytes)?;
        let from = before.as_deref().and_then(status_of);
        counting.moved(&key, from, Some(record.status));
        // Not at the crash point with the counts' lock held (a hanging crash point would
        // stop every write and the open's count).
        drop(counting);
        crate::crash::point("store.after_transition_entry");
        Ok(true)
    }
}
