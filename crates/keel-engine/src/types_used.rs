//! The types a store's runs use: every workflow a run was started under and every step kind
//! a run started as compensable, kept as one keyed record. An open that finds every one of
//! them registered knows that no run lacks a type, and resumes from the wake index without
//! reading the runs (`resume.rs`); otherwise it reads every run to name those that lack one,
//! as before, and the record is rewritten to what the unfinished runs still need.
//!
//! A type is written the first time this engine sees it, before the write that uses it (the
//! run's record, the step's start), so that the store never holds a use of a type the record
//! does not list. A record that cannot be written is removed: an absent record means "not
//! known", and the next open reads every run. Only a store with a wake index keeps it.

use std::collections::BTreeSet;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};
use crate::store::{JournalStore, Space};

const KEY: &str = "used";

/// The record's content.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Types {
    pub(crate) workflows: BTreeSet<String>,
    pub(crate) step_kinds: BTreeSet<String>,
}

/// The types the store's runs use, as this engine knows them.
pub(crate) struct TypesUsed {
    /// `None`: not kept (a store without a wake index), or not known (no record at open).
    known: Mutex<Option<Types>>,
    kept: bool,
}

impl TypesUsed {
    /// Reads the record of `store`, if it keeps one.
    pub(crate) async fn load(store: &dyn JournalStore) -> Result<TypesUsed> {
        let kept = store.keeps_wakes();
        let mut known = None;
        if kept {
            for (key, value) in store.keyed(Space::TypesUsed).await? {
                if key == KEY {
                    known =
                        Some(
                            serde_json::from_str(&value).map_err(|e| EngineError::Corrupt {
                                key: format!("{} record {KEY}", Space::TypesUsed.as_str()),
                                detail: e.to_string(),
                            })?,
                        );
                }
            }
        }
        Ok(TypesUsed {
            known: Mutex::new(known),
            kept,
        })
    }

    /// Whether every type the store's runs use is known, and registered as the engine says
    /// (`workflow`: is this workflow registered; `step_kind`: this step kind).
    pub(crate) fn all_registered(
        &self,
        workflow: impl Fn(&str) -> bool,
        step_kind: impl Fn(&str) -> bool,
    ) -> bool {
        match &*self.known.lock().expect("types lock") {
            Some(types) => {
                types.workflows.iter().all(|w| workflow(w))
                    && types.step_kinds.iter().all(|k| step_kind(k))
            }
            None => false,
        }
    }

    /// Notes that a run is started under `workflow`, before its record is written.
    pub(crate) fn workflow(&self, store: &dyn JournalStore, workflow: &str) -> Result<()> {
        self.note(store, |types| added(&mut types.workflows, workflow))
    }

    /// Whether noting `workflow` ([`TypesUsed::workflow`]) would write the record: it is kept
    /// and known, and does not list `workflow` yet.
    pub(crate) fn would_note_workflow(&self, workflow: &str) -> bool {
        self.kept
            && match &*self.known.lock().expect("types lock") {
                Some(types) => !types.workflows.contains(workflow),
                None => false,
            }
    }

    /// Notes that a compensable step of `kind` starts, before its start is written.
    pub(crate) fn step_kind(&self, store: &dyn JournalStore, kind: &str) -> Result<()> {
        self.note(store, |types| added(&mut types.step_kinds, kind))
    }

    /// Replaces the record by `types` (what the store's runs need, found by reading them all).
    pub(crate) fn replace(&self, store: &dyn JournalStore, types: Types) -> Result<()> {
        if !self.kept {
            return Ok(());
        }
        let mut known = self.known.lock().expect("types lock");
        *known = Some(types);
        Self::write(store, &mut known)
    }

    /// Adds a type with `add` (true: it was new) and writes the record if it changed.
    fn note(&self, store: &dyn JournalStore, add: impl FnOnce(&mut Types) -> bool) -> Result<()> {
        if !self.kept {
            return Ok(());
        }
        let mut known = self.known.lock().expect("types lock");
        let added = match known.as_mut() {
            Some(types) => add(types),
            // Not known: nothing to keep up to date until an open reads every run.
            None => false,
        };
        if added {
            Self::write(store, &mut known)?;
        }
        Ok(())
    }

    /// Writes `known`; on failure the record is removed and forgotten (not known any more).
    fn write(store: &dyn JournalStore, known: &mut Option<Types>) -> Result<()> {
        let Some(types) = known.as_ref() else {
            return Ok(());
        };
        let value = crate::store::encode(
            "the types the runs use",
            types,
            crate::limits::KEYED_RECORD_BYTES_MAX,
        );
        let written = value.and_then(|value| store.put_keyed(Space::TypesUsed, KEY, &value));
        if let Err(error) = written {
            tracing::warn!(%error, "the types the runs use could not be recorded: the next open reads every run");
            *known = None;
            store.delete_keyed(Space::TypesUsed, KEY)?;
        }
        Ok(())
    }
}

/// Adds `name` to `names` unless it is there (no copy made then); true if it was added.
fn added(names: &mut BTreeSet<String>, name: &str) -> bool {
    !names.contains(name) && names.insert(name.to_owned())
}
