//! The `engine_panics` suite on the PostgreSQL store (`keel_testkit::store`: binaries named `pg_*`).

#[path = "engine_panics.rs"]
mod suite;
