//! The `engine_recreate` suite on the PostgreSQL store (`keel_testkit::store`: binaries named `pg_*`).

#[path = "engine_recreate.rs"]
mod suite;
