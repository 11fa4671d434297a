//! Identifier newtypes: run ids, step indexes, attempts and idempotency keys.
//!
//! Ids are validated once, where they enter the engine, so that everything below can rely on
//! them (for example the store's key encoding relies on a run id never containing a NUL byte).

use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::limits::RUN_ID_LEN_MAX;

/// A run's id: the caller's idempotency key of a run it starts, or `<parent>/<operation>` for
/// a child run (see [`crate::child_id`]).
///
/// Every id is 1 to [`RUN_ID_LEN_MAX`] bytes of ASCII letters, digits and `. _ - : / @` (so
/// never a NUL byte, which the store's key encoding relies on). Three constructors, one per
/// way an id enters:
///
/// - [`RunId::new_top_level`], an id a caller gives to start a run: also holds no `/`, which
///   is reserved for child runs' ids, so a caller can never take a child's id;
/// - [`RunId::new`], any id a run is made under now (the caller's, or a child's): also does
///   not begin with `-` or `.` and holds no `..`, so that it never reads as a command-line
///   flag (`keel status -rf`) or a path (`../x`, `.x`) wherever it is passed on;
/// - [`RunId::existing`], an id that names a run which may already exist (reads, operator
///   calls, the store's own records): only the alphabet and the length, so that runs made
///   under earlier rules (a user's `.x` or `p/1`) still load and can be read and operated.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RunId(String);

/// Why an id is not a run id: the id and the rule it breaks. Becomes
/// [`crate::EngineError::InvalidRunId`] at the engine's boundary.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid run id {id:?}: {reason}")]
pub struct InvalidRunId {
    /// The rejected id.
    pub id: String,
    /// Why it was rejected.
    pub reason: String,
}

/// Why a caller's id holding `/` is refused.
const SLASH_RESERVED: &str = "`/` is reserved for child runs' ids (parent/N)";

impl RunId {
    /// An id for a run made now: [`RunId::existing`]'s rules, and no leading `-` or `.` and no
    /// `..`. Child ids made from such a parent obey them too (`<parent>/<n>` adds neither).
    pub fn new(id: impl Into<String>) -> Result<Self, InvalidRunId> {
        let id = Self::existing(id)?;
        let reason = if id.0.starts_with('-') {
            "must not begin with `-` (it would read as a command-line flag)"
        } else if id.0.starts_with('.') {
            "must not begin with `.` (it would read as a hidden file or a relative path)"
        } else if id.0.contains("..") {
            "must not contain `..` (it would read as a parent directory)"
        } else {
            return Ok(id);
        };
        Err(InvalidRunId {
            id: id.0,
            reason: reason.into(),
        })
    }

    /// The id a caller gives to start a run ([`crate::Engine::start`],
    /// [`crate::Engine::start_json`]): [`RunId::new`]'s rules, and no `/`, since only the
    /// engine makes ids with `/` (its child runs', `<parent>/<operation>`).
    pub fn new_top_level(id: impl Into<String>) -> Result<Self, InvalidRunId> {
        let id = Self::new(id)?;
        if id.0.contains('/') {
            return Err(InvalidRunId {
                id: id.0,
                reason: SLASH_RESERVED.into(),
            });
        }
        Ok(id)
    }

    /// An id that names a run which may exist: 1 to [`RUN_ID_LEN_MAX`] bytes of the alphabet
    /// above, and nothing more, so that every id an earlier version made still names its
    /// run. Reads, operator calls and the store's records take ids this way, and so does
    /// [`crate::child_id`], so that a parent stored under earlier rules derives the child ids
    /// it journaled then; never use it for an id a caller gives.
    pub fn existing(id: impl Into<String>) -> Result<Self, InvalidRunId> {
        let id = id.into();
        if id.is_empty() || id.len() > RUN_ID_LEN_MAX {
            return Err(InvalidRunId {
                id,
                reason: format!("length must be 1..={RUN_ID_LEN_MAX} bytes"),
            });
        }
        if let Some(c) = id.chars().find(|c| !is_run_id_char(*c)) {
            return Err(InvalidRunId {
                reason: format!(
                    "character {c:?} is not allowed (use letters, digits and . _ - : / @)"
                ),
                id,
            });
        }
        Ok(Self(id))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn is_run_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':' | '/' | '@')
}

/// Decoding (a stored record or entry, a request) takes the id as [`RunId::existing`]: a store
/// written under earlier id rules must still open.
impl TryFrom<String> for RunId {
    type Error = InvalidRunId;
    fn try_from(s: String) -> Result<Self, InvalidRunId> {
        Self::existing(s)
    }
}

impl From<RunId> for String {
    fn from(id: RunId) -> String {
        id.0
    }
}

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The sequence number of an operation (a step, an effect, a timer, a wait, a child run, a
/// fan-out and its branches) within a run, in the order the workflow code asked for them.
/// Replay matches operations by this number. Shown as `#3`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct OperationIndex(pub u32);

/// The old name of [`OperationIndex`]: it numbers every operation, not only steps.
#[deprecated(note = "renamed OperationIndex: it numbers every operation, not only steps")]
pub type StepIndex = OperationIndex;

impl fmt::Display for OperationIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// The position of an entry in a run's journal, counted from 0 with no gaps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JournalIndex(pub u32);

/// An attempt number of a step, counted from 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Attempt(pub u32);

impl Attempt {
    /// The first attempt.
    pub const FIRST: Attempt = Attempt(1);

    /// The attempt after this one.
    pub fn next(self) -> Attempt {
        Attempt(self.0 + 1)
    }
}

impl fmt::Display for Attempt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A step's idempotency key: UUID v5 of (run id, step index), identical on every attempt and
/// after every crash, so a retried side effect can find what an earlier attempt did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct IdempotencyKey(pub Uuid);

/// The namespace of step idempotency keys. Changing it changes every key: never do that.
const KEY_NAMESPACE: Uuid = Uuid::from_u128(0x6b65_656c_2d73_7465_702d_6b65_7973_0001);

impl IdempotencyKey {
    /// The key of step `index` of run `run`.
    pub fn for_step(run: &RunId, index: OperationIndex) -> Self {
        // "<run>\0<index>", put together by hand: it runs at every step, and `format!`'s
        // machinery cost a third of the key.
        let mut digits = itoa::Buffer::new();
        let digits = digits.format(index.0).as_bytes();
        let mut name = Vec::with_capacity(run.as_str().len() + 1 + digits.len());
        name.extend_from_slice(run.as_str().as_bytes());
        name.push(0);
        name.extend_from_slice(digits);
        IdempotencyKey(Uuid::new_v5(&KEY_NAMESPACE, &name))
    }
}

impl fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The id of the child run started at operation `index` of run `parent`: `<parent>/<index>`,
/// or `child-<uuid>` (the operation's idempotency key) when that would be too long. Only
/// the engine makes ids with `/`: a caller's id may not hold one ([`RunId::new_top_level`]),
/// so no caller can take a child's id.
pub fn child_id(parent: &RunId, index: OperationIndex) -> RunId {
    // Taken as `existing`, not checked as `new`: a parent stored under earlier id rules (say
    // `.x`) must derive the very id its journal's child was made under (`.x/3`), not another.
    // A parent made now obeys `new`'s rules, and `<parent>/<index>` then does too.
    RunId::existing(format!("{parent}/{}", index.0)).unwrap_or_else(|_| {
        RunId::new(format!("child-{}", IdempotencyKey::for_step(parent, index)))
            .expect("a uuid makes a valid run id")
    })
}

/// Whether every child of run `parent` has the id `<parent>/<index>` ([`child_id`]), so
/// that a scan for its children may read only the ids under `<parent>/`: else a child's may
/// be `child-<uuid>`.
pub(crate) fn children_under(parent: &str) -> bool {
    // The longest index, `u32::MAX`, has 10 digits.
    parent.len() + "/".len() + 10 <= RUN_ID_LEN_MAX
}

/// Checks the name of an event or a published value (`what` says which, for the error): 1 to
/// [`crate::limits::EVENT_NAME_LEN_MAX`] bytes of ASCII letters, digits, `.`, `_` and `-`.
pub(crate) fn check_event_name(what: &str, name: &str) -> Result<(), String> {
    use crate::limits::EVENT_NAME_LEN_MAX;
    if name.is_empty() || name.len() > EVENT_NAME_LEN_MAX {
        return Err(format!(
            "{what} {name:?} must be 1 to {EVENT_NAME_LEN_MAX} bytes long"
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "{what} {name:?} holds {c:?}: only ASCII letters, digits, '.', '_' and '-' are allowed"
        ));
    }
    Ok(())
}

/// Checks an event id: 1 to [`crate::limits::EVENT_ID_LEN_MAX`] bytes of printable ASCII, no
/// spaces.
pub(crate) fn check_event_id(event_id: &str) -> Result<(), String> {
    use crate::limits::EVENT_ID_LEN_MAX;
    if event_id.is_empty() || event_id.len() > EVENT_ID_LEN_MAX {
        return Err(format!(
            "event id {event_id:?} must be 1 to {EVENT_ID_LEN_MAX} bytes long"
        ));
    }
    if let Some(c) = event_id.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(format!(
            "event id {event_id:?} holds {c:?}: only printable ASCII without spaces is allowed"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Run ids accept the documented alphabet and reject everything else with a reason.
    #[test]
    fn run_id_validation() {
        assert!(RunId::new("order-42/device@eu:1.a_b").is_ok());
        let err = RunId::new("").unwrap_err().to_string();
        assert!(err.contains("length"), "{err}");
        let err = RunId::new("a b").unwrap_err().to_string();
        assert!(err.contains("' '"), "{err}");
        let err = RunId::new("a\u{0}b").unwrap_err().to_string();
        assert!(err.contains("not allowed"), "{err}");
        assert!(RunId::new("x".repeat(RUN_ID_LEN_MAX + 1)).is_err());
    }

    /// An id made now never reads as a flag or a path, a caller's never holds `/`, and an
    /// existing id is taken as earlier versions made it (decoding included).
    #[test]
    fn made_ids_are_stricter_than_existing_ones() {
        for id in ["-rf", ".x", "..", "a..b", "../../etc/passwd"] {
            assert!(RunId::new(id).is_err(), "{id}");
            assert!(RunId::new_top_level(id).is_err(), "{id}");
            assert_eq!(RunId::existing(id).unwrap().as_str(), id);
            let decoded: RunId = serde_json::from_value(serde_json::json!(id)).unwrap();
            assert_eq!(decoded.as_str(), id);
        }
        assert!(RunId::new("p/1").is_ok());
        let err = RunId::new_top_level("p/1").unwrap_err().to_string();
        assert_eq!(err, format!("invalid run id \"p/1\": {SLASH_RESERVED}"));
        for id in ["CON", "a.b", "x.", "a-", "v1.2-rc:3@eu_x"] {
            assert!(RunId::new_top_level(id).is_ok(), "{id}");
        }
        // The store's key encoding needs ids without NUL, however they are taken.
        assert!(RunId::existing("a\u{0}b").is_err());
        assert!(serde_json::from_value::<RunId>(serde_json::json!("a\u{0}b")).is_err());
        assert!(RunId::existing("x".repeat(RUN_ID_LEN_MAX + 1)).is_err());
    }

    /// Keys are stable across calls and differ between steps and between runs.
    #[test]
    fn idempotency_keys_are_stable_and_distinct() {
        let a = RunId::new("a").unwrap();
        let b = RunId::new("b").unwrap();
        let k = IdempotencyKey::for_step(&a, OperationIndex(0));
        assert_eq!(k, IdempotencyKey::for_step(&a, OperationIndex(0)));
        assert_ne!(k, IdempotencyKey::for_step(&a, OperationIndex(1)));
        assert_ne!(k, IdempotencyKey::for_step(&b, OperationIndex(0)));
        assert_eq!(k.0.get_version_num(), 5);
        // Pinned (the values are Python's `uuid.uuid5` of the namespace and
        // "<run>\0<index>"): a changed derivation would orphan every resource made before it.
        let pinned = |run: &str, index: u32| {
            IdempotencyKey::for_step(&RunId::existing(run).unwrap(), OperationIndex(index))
                .to_string()
        };
        assert_eq!(pinned("a", 0), "83668a6e-44c7-524c-b193-4ad61350c0f9");
        assert_eq!(
            pinned("a", u32::MAX),
            "3572f630-2a0e-509e-8f9e-1a7d83d64aac"
        );
        assert_eq!(
            pinned("deploy/7", 12),
            "6fe261a8-6d64-51e0-a737-8faa5e3ac9f9"
        );
    }
}
