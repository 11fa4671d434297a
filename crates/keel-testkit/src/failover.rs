//! The harness of the failover torture (`tests/pg_failover.rs`): several worker processes,
//! the test binary re-run as children, share one PostgreSQL database while the test kills
//! and stops them. The scenario (what a worker does, the schedule, the final checks) stays in
//! the test; this module holds what does not depend on it:
//!
//! - [`workers`]: the worker slots over their successive processes: spawning, restarting,
//!   SIGKILL, SIGSTOP and SIGCONT, reaping, their logs, and what a stopped worker did once
//!   continued.
//! - [`database`]: what the shared database says: who owns which unfinished runs, how long a
//!   killed worker's runs took to move, what a continued worker wrote.
//! - [`report`]: the failover figures (median and max) and the torture's report.
//!
//! A worker and the parent agree on a few things, named here: the environment a worker is
//! started with, the exit code and log line of a worker that lost its lease.

pub mod database;
pub mod report;
pub mod workers;

use std::str::FromStr;

/// The exit code of a worker whose engine broke (its lease lost).
pub const LEASE_LOST_EXIT: i32 = 75;

/// The line a worker writes to its log before it exits for a lost lease.
pub const EXIT_LINE: &str = "worker exits: its engine broke:";

/// The environment variable that gives a worker the shared database's URL.
pub const URL_ENV: &str = "KEEL_FAILOVER_URL";

/// The environment variable that gives a worker its engine's directory.
pub const DIR_ENV: &str = "KEEL_FAILOVER_DIR";

/// The environment variable that gives a worker the effect log's path.
pub const EFFECTS_ENV: &str = "KEEL_FAILOVER_EFFECTS";

/// The environment variable that gives a worker its slot's number.
pub const SLOT_ENV: &str = "KEEL_FAILOVER_SLOT";

/// The value of the environment variable `name`, or `default` when it is not set.
///
/// # Panics
/// When the variable is set but does not parse as a `T`.
pub fn knob<T: FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(text) => text
            .parse()
            .unwrap_or_else(|_| panic!("{name}={text:?} does not parse")),
        Err(_) => default,
    }
}
