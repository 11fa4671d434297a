//! The types a store's runs use: every workflow a run was started under and every step kind
//! a run started as compensable. An open that finds every one of them registered knows that
//! no run lacks a type, and resumes without reading the runs (`resume.rs`: from the wake
//! index on sled, by claims on PostgreSQL); otherwise it reads every run to name those that
//! lack one, as before, and the list is rewritten to what the unfinished runs still need.
//!
//! A type is written the first time this engine sees it, before the write that uses it (the
//! run's record, the step's start), so that the store never holds a use of a type the list
//! does not hold. Two forms:
//! - **One record** (sled, a store of one engine): the whole list under one key. A record
//!   that cannot be written is removed: an absent record means "not known", and the next open
//!   reads every run.
//! - **One key per type** (PostgreSQL, shared by several engines, where a record rewritten
//!   whole by each would lose the others' additions): `w:<workflow>` and `s:<step kind>`,
//!   never removed, and `complete` once an open has read every run and written what they
//!   use. Every engine writes each type it uses whether or not the list is complete, so an
//!   open that reads the runs while another engine starts one cannot mark the list complete
//!   without that engine's type. Each key is committed on its own (`add_keyed`), outside the
//!   transaction holding the engine's other writes, so engines adding the same type never
//!   wait on each other's transactions. The value is the name; a name too long for a key is
//!   keyed by its first bytes and two checksums of the whole. A type no run uses any more
//!   stays listed: an engine without it reads every run at each open, until an operator
//!   deletes its key (`DELETE FROM keel_keyed WHERE space = 'types-used' AND key = 'w:...'`).

use std::collections::BTreeSet;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};
use crate::store::{JournalStore, Space};

/// The key of the one-record form.
const KEY: &str = "used";

/// The key that says the per-type list is complete.
const COMPLETE: &str = "complete";

/// The prefixes of the per-type keys.
const WORKFLOW_PREFIX: &str = "w:";
const STEP_KIND_PREFIX: &str = "s:";

/// The longest key a keyed record may have (`store::check_keyed`).
const KEY_BYTES_MAX: usize = 256;

/// How much of a name too long for a key its key holds.
const KEYED_PREFIX_BYTES: usize = 180;

/// The record's content.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Types {
    pub(crate) workflows: BTreeSet<String>,
    pub(crate) step_kinds: BTreeSet<String>,
}

/// How a store keeps the list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Form {
    /// Not at all.
    None,
    /// One record (sled).
    Record,
    /// One key per type (a store several engines share).
    PerType,
}

/// What this engine knows of the list.
#[derive(Default)]
struct Known {
    /// The types listed (per type: those written or read, also while incomplete); `None`
    /// in the one-record form when the record is not known.
    types: Option<Types>,
    /// Whether the list holds every type the store's runs use.
    complete: bool,
}

/// The types the store's runs use, as this engine knows them.
pub(crate) struct TypesUsed {
    known: Mutex<Known>,
    form: Form,
}

impl TypesUsed {
    /// Reads the list of `store`, if it keeps one.
    pub(crate) async fn load(store: &dyn JournalStore) -> Result<TypesUsed> {
        let form = if store.keeps_wakes() {
            Form::Record
        } else if store.claim_every().is_some() {
            Form::PerType
        } else {
            Form::None
        };
        let mut known = Known::default();
        match form {
            Form::None => {}
            Form::Record => {
                for (key, value) in store.keyed(Space::TypesUsed).await? {
                    if key == KEY {
                        let types =
                            serde_json::from_str(&value).map_err(|e| EngineError::Corrupt {
                                key: format!("{} record {KEY}", Space::TypesUsed.as_str()),
                                detail: e.to_string(),
                            })?;
                        known = Known {
                            types: Some(types),
                            complete: true,
                        };
                    }
                }
            }
            Form::PerType => {
                let mut types = Types::default();
                for (key, value) in store.keyed(Space::TypesUsed).await? {
                    if key == COMPLETE {
                        known.complete = true;
                    } else if key.starts_with(WORKFLOW_PREFIX) {
                        types.workflows.insert(value);
                    } else if key.starts_with(STEP_KIND_PREFIX) {
                        types.step_kinds.insert(value);
                    }
                }
                known.types = Some(types);
            }
        }
        Ok(TypesUsed {
            known: Mutex::new(known),
            form,
        })
    }

    /// Whether every type the store's runs use is known, and registered as the engine says
    /// (`workflow`: is this workflow registered; `step_kind`: this step kind).
    pub(crate) fn all_registered(
        &self,
        workflow: impl Fn(&str) -> bool,
        step_kind: impl Fn(&str) -> bool,
    ) -> bool {
        let known = self.known.lock().expect("types lock");
        match &known.types {
            Some(types) if known.complete => {
                types.workflows.iter().all(|w| workflow(w))
                    && types.step_kinds.iter().all(|k| step_kind(k))
            }
            _ => false,
        }
    }

    /// Notes that a run is started under `workflow`, before its record is written.
    pub(crate) async fn workflow(&self, store: &dyn JournalStore, workflow: &str) -> Result<()> {
        self.note(store, Kind::Workflow, workflow).await
    }

    /// Whether noting `workflow` ([`TypesUsed::workflow`]) would write: the list is kept
    /// (and, as one record, known), and does not hold `workflow` yet.
    pub(crate) fn would_note_workflow(&self, workflow: &str) -> bool {
        self.form != Form::None
            && self
                .known
                .lock()
                .expect("types lock")
                .types
                .as_ref()
                .is_some_and(|types| !types.workflows.contains(workflow))
    }

    /// Notes that a compensable step of `kind` starts, before its start is written.
    pub(crate) async fn step_kind(&self, store: &dyn JournalStore, kind: &str) -> Result<()> {
        self.note(store, Kind::StepKind, kind).await
    }

    /// Makes the list `types` (what the store's runs need, found by reading them all): the
    /// one record is replaced; per type, what is missing is added (nothing is removed: another
    /// engine may have just written a type its new run uses) and the list marked complete.
    pub(crate) async fn replace(&self, store: &dyn JournalStore, types: Types) -> Result<()> {
        match self.form {
            Form::None => Ok(()),
            Form::Record => {
                let mut known = self.known.lock().expect("types lock");
                *known = Known {
                    types: Some(types),
                    complete: true,
                };
                Self::write(store, &mut known)
            }
            Form::PerType => {
                for (kind, names) in [
                    (Kind::Workflow, &types.workflows),
                    (Kind::StepKind, &types.step_kinds),
                ] {
                    for name in names {
                        self.note(store, kind, name).await?;
                    }
                }
                store.add_keyed(Space::TypesUsed, COMPLETE, "").await?;
                self.known.lock().expect("types lock").complete = true;
                Ok(())
            }
        }
    }

    /// Adds a type (new to this engine) and writes the list if it changed. Per type, the
    /// key is written (committed on its own) before the type counts as listed here, so a
    /// concurrent use of the same new type writes it too rather than going on before it is
    /// durable, and a failed write is tried again at the next use.
    async fn note(&self, store: &dyn JournalStore, kind: Kind, name: &str) -> Result<()> {
        match self.form {
            Form::None => Ok(()),
            Form::Record => {
                let mut known = self.known.lock().expect("types lock");
                let added = match known.types.as_mut() {
                    Some(types) => added(kind.names(types), name),
                    // Not known: nothing to keep up to date until an open reads every run.
                    None => false,
                };
                if added {
                    Self::write(store, &mut known)?;
                }
                Ok(())
            }
            Form::PerType => {
                let listed = {
                    let known = self.known.lock().expect("types lock");
                    known
                        .types
                        .as_ref()
                        .is_some_and(|types| kind.lists(types, name))
                };
                if listed {
                    return Ok(());
                }
                store
                    .add_keyed(Space::TypesUsed, &kind.key(name), name)
                    .await?;
                let mut known = self.known.lock().expect("types lock");
                let types = known.types.get_or_insert_with(Types::default);
                added(kind.names(types), name);
                Ok(())
            }
        }
    }

    /// Writes the one record; on failure it is removed and forgotten (not known any more).
    fn write(store: &dyn JournalStore, known: &mut Known) -> Result<()> {
        let Some(types) = known.types.as_ref() else {
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
            *known = Known::default();
            store.delete_keyed(Space::TypesUsed, KEY)?;
        }
        Ok(())
    }
}

/// A kind of type.
#[derive(Clone, Copy)]
enum Kind {
    Workflow,
    StepKind,
}

impl Kind {
    /// Whether `types` holds `name` among this kind's.
    fn lists(self, types: &Types, name: &str) -> bool {
        match self {
            Kind::Workflow => types.workflows.contains(name),
            Kind::StepKind => types.step_kinds.contains(name),
        }
    }

    fn names(self, types: &mut Types) -> &mut BTreeSet<String> {
        match self {
            Kind::Workflow => &mut types.workflows,
            Kind::StepKind => &mut types.step_kinds,
        }
    }

    /// The key of type `name` in the per-type form: the prefix and the name, or, for a name
    /// too long for that, its first bytes, two checksums of it and its length.
    fn key(self, name: &str) -> String {
        let prefix = match self {
            Kind::Workflow => WORKFLOW_PREFIX,
            Kind::StepKind => STEP_KIND_PREFIX,
        };
        if prefix.len() + name.len() <= KEY_BYTES_MAX && !name.contains('\0') {
            return format!("{prefix}{name}");
        }
        let mut cut = KEYED_PREFIX_BYTES;
        while !name.is_char_boundary(cut) {
            cut -= 1;
        }
        let forward = crc32fast::hash(name.as_bytes());
        let backward: Vec<u8> = name.bytes().rev().collect();
        let backward = crc32fast::hash(&backward);
        let head = name[..cut].replace('\0', " ");
        format!("{prefix}{head}#{forward:08x}{backward:08x}#{}", name.len())
    }
}

/// Adds `name` to `names` unless it is there (no copy made then); true if it was added.
fn added(names: &mut BTreeSet<String>, name: &str) -> bool {
    !names.contains(name) && names.insert(name.to_owned())
}
