//! The `engine_children` suite on the PostgreSQL store (`keel_testkit::store`: binaries named `pg_*`).

#[path = "engine_children.rs"]
mod suite;
