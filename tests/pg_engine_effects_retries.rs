//! The `engine_effects_retries` suite on the PostgreSQL store (`keel_testkit::store`: binaries named `pg_*`).

#[path = "engine_effects_retries.rs"]
mod suite;
