//! The `engine_park_receives` suite on the PostgreSQL store (`keel_testkit::store`: binaries
//! named `pg_*`).

#[path = "engine_park_receives.rs"]
mod suite;
