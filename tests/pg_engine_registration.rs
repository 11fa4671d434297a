//! The `engine_registration` suite on the PostgreSQL store (`keel_testkit::store`: binaries named `pg_*`).

#[path = "engine_registration.rs"]
mod suite;
