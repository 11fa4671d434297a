//! The `saga_compensation` suite on the PostgreSQL store (`keel_testkit::store`: binaries named `pg_*`).

#[path = "saga_compensation.rs"]
mod suite;
