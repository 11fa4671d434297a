//! The `engine_pause_races` suite on the PostgreSQL store (`keel_testkit::store`: binaries
//! named `pg_*`).

#[path = "engine_pause_races.rs"]
mod suite;
