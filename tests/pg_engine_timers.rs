//! The `engine_timers` suite on the PostgreSQL store (`keel_testkit::store`: binaries named `pg_*`).

#[path = "engine_timers.rs"]
mod suite;
