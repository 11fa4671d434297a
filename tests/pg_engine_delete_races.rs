//! The `engine_delete_races` suite on the PostgreSQL store (`keel_testkit::store`: binaries named `pg_*`).

#[path = "engine_delete_races.rs"]
mod suite;
