//! The `engine_effects_saga` suite on the PostgreSQL store (`keel_testkit::store`: binaries named `pg_*`).

#[path = "engine_effects_saga.rs"]
mod suite;
