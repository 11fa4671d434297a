//! The `engine_effects_replay` suite on the PostgreSQL store (`keel_testkit::store`: binaries named `pg_*`).

#[path = "engine_effects_replay.rs"]
mod suite;
