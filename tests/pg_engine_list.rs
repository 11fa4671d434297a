//! The `engine_list` suite on the PostgreSQL store (`keel_testkit::store`: binaries named `pg_*`).

#[path = "engine_list.rs"]
mod suite;
