//! The `engine_start_input` suite on the PostgreSQL store (`keel_testkit::store`: binaries named `pg_*`).

#[path = "engine_start_input.rs"]
mod suite;
