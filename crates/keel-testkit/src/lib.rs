//! Test support for Keel.
//!
//! - [`crash`]: runs a test's own binary as a child process, kills it (SIGKILL) at a named
//!   crash point or at a seeded random moment, and restarts it until it finishes.
//! - [`effects`]: a ground-truth log of side effects kept outside the child, in a plain file,
//!   so a test can check what really happened against what the journal says.
//! - [`flows`]: test workflows whose steps write to that log.
//! - [`failover`]: worker processes sharing one PostgreSQL database, killed and stopped by a
//!   schedule, with what the database says about who owned what and how fast runs moved.
//! - [`moto`]: moto's server (the AWS emulator), one per test process, an account per test.
//! - [`proxy`]: the fault proxy between the SDK and moto (throttling, 5xx, lost responses,
//!   eventual-consistency lag, and the AWS behaviour moto lacks).
//! - [`aws`]: the one SDK configuration helper, for tests and the demo.
//! - [`inventory`]: what exists in moto, the ground truth of the AWS tests.
//! - [`postgres`]: a fresh database per test on the PostgreSQL server `scripts/test.sh` starts.
//! - [`raw`]: the raw sled store of a closed engine, to make a store as damage or an earlier
//!   version of Keel would have left it.
//! - [`store`]: which store a test's engines open (sled, or PostgreSQL in `pg_*` binaries).
//! - [`simcloud`]: a simulated EC2-like cloud on a loopback port (heavy-tailed readiness,
//!   lying reads, throttling, a capacity), its steps, probes and workflow, and the load
//!   scenario that kills the engine's process under it.
//! - [`sshd`]: a throwaway OpenSSH server on a loopback port, for the SFTP tests.

pub mod aws;
pub mod check;
pub mod crash;
pub mod demo;
pub mod effects;
pub mod failover;
pub mod flows;
pub mod inventory;
pub mod moto;
pub mod poll;
pub mod postgres;
pub mod proxy;
pub mod raw;
pub mod simcloud;
pub mod sshd;
pub mod store;

/// Installs a `tracing` subscriber that writes to the test's captured output (once).
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Opens the engine `builder` makes, failing the test with the error if it does not open. The
/// engine itself waits for the lock an engine this process has just closed is still
/// releasing, so a test can close and reopen a store back to back.
pub async fn open_engine(
    builder: impl FnOnce() -> keel_engine::EngineBuilder,
) -> keel_engine::Engine {
    builder().open().await.expect("opening the engine")
}
