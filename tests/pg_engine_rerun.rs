//! The `engine_rerun` suite on the PostgreSQL store (`keel_testkit::store`: binaries named `pg_*`).

#[path = "engine_rerun.rs"]
mod suite;
