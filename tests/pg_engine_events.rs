//! The `engine_events` suite on the PostgreSQL store (`keel_testkit::store`: binaries named `pg_*`).

#[path = "engine_events.rs"]
mod suite;
