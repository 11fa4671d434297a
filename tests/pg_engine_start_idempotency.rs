//! The `engine_start_idempotency` suite on the PostgreSQL store (`keel_testkit::store`: binaries named `pg_*`).

#[path = "engine_start_idempotency.rs"]
mod suite;
