//! Test support for Keel.
//!
//! - [`crash`]: runs a test's own binary as a child process, kills it (SIGKILL) at a named
//!   crash point or at a seeded random moment, and restarts it until it finishes.
//! - [`effects`]: a ground-truth log of side effects kept outside the child, in a plain file,
//!   so a test can check what really happened against what the journal says.
//! - [`flows`]: test workflows whose steps write to that log.

pub mod check;
pub mod crash;
pub mod effects;
pub mod flows;
pub mod poll;

/// Installs a `tracing` subscriber that writes to the test's captured output (once).
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}
