//! Keel: durable workflows with saga compensation.
//!
//! This crate is the public face of the workspace; it re-exports the engine
//! ([`keel_engine`]). See `docs/ARCHITECTURE.md` for the map of the code.

pub use keel_engine::*;
