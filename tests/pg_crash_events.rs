//! The `crash_events` suite on the PostgreSQL store (`keel_testkit::store`: binaries named `pg_*`).

#[path = "crash_events.rs"]
mod suite;
