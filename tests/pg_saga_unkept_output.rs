//! The `saga_unkept_output` suite on the PostgreSQL store (`keel_testkit::store`: binaries named `pg_*`).

#[path = "saga_unkept_output.rs"]
mod suite;
