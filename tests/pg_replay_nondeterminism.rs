//! The `replay_nondeterminism` suite on the PostgreSQL store (`keel_testkit::store`: binaries named `pg_*`).

#[path = "replay_nondeterminism.rs"]
mod suite;
