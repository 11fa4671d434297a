//! The `engine_start_races` suite on the PostgreSQL store (`keel_testkit::store`: binaries named `pg_*`).

#[path = "engine_start_races.rs"]
mod suite;
