//! Corrupt journals: entries out of order, about an operation that is not there, not of
//! their kind or not next, or ending what already ended, are rejected at the offending
//! entry with what broke.

use super::{completed, started};
use crate::replay::RunState;

/// Entries that break the state machine are rejected with the entry's position.
#[test]
fn corrupt_journals_are_rejected() {
    let err = RunState::from_entries(&[started(0, 1), completed(0, 2)]).unwrap_err();
    assert!(err.starts_with("entry 1:"), "{err}");
    assert!(
        RunState::from_entries(&[started(1, 1)]).is_err(),
        "gap in step numbers"
    );
    assert!(RunState::from_entries(&[started(0, 1), completed(0, 1), started(0, 2)]).is_err());
    assert!(RunState::from_entries(&[started(0, 2)]).is_err());
}
