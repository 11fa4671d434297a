//! The `engine_parallel` suite on the PostgreSQL store (`keel_testkit::store`: binaries named `pg_*`).

#[path = "engine_parallel.rs"]
mod suite;
