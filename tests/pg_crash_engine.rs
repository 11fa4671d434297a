//! The `crash_engine` suite on the PostgreSQL store (`keel_testkit::store`: binaries named `pg_*`).

#[path = "crash_engine.rs"]
mod suite;
