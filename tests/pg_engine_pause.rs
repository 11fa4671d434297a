//! The `engine_pause` suite on the PostgreSQL store (`keel_testkit::store`: binaries named `pg_*`).

#[path = "engine_pause.rs"]
mod suite;
