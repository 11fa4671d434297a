//! The `engine_batch` suite on the PostgreSQL store (`keel_testkit::store`: binaries named `pg_*`).

#[path = "engine_batch.rs"]
mod suite;
