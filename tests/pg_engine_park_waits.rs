//! The `engine_park_waits` suite on the PostgreSQL store (`keel_testkit::store`: binaries named `pg_*`).

#[path = "engine_park_waits.rs"]
mod suite;
