//! The `engine_park` suite on the PostgreSQL store (`keel_testkit::store`: binaries named `pg_*`).

#[path = "engine_park.rs"]
mod suite;
