//! The `engine_park_wake_races` suite on the PostgreSQL store (`keel_testkit::store`: binaries named `pg_*`).

#[path = "engine_park_wake_races.rs"]
mod suite;
