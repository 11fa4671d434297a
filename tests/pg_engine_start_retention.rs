//! The `engine_start_retention` suite on the PostgreSQL store (`keel_testkit::store`: binaries named `pg_*`).

#[path = "engine_start_retention.rs"]
mod suite;
