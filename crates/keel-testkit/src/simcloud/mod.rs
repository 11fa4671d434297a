//! A simulated EC2-like cloud for load tests of Keel's waits, rate limits and saga, kept
//! outside the engine's process so that it outlives every SIGKILL and holds the ground truth.
//!
//! - [`model`]: the cloud itself: instances and volumes created idempotently by client token,
//!   readiness times drawn from a heavy-tailed distribution, reads that lie around readiness,
//!   random throttling and a token bucket of capacity, and the ground truth of every resource
//!   and every call.
//! - [`wire`], [`server`], [`client`]: the cloud served on a loopback port as JSON lines, and
//!   the client the engine's steps use (registered as an engine resource).
//! - [`create`], [`attach`], [`probes`]: the steps (with their compensations) and the probes
//!   of a BOSH-like flow, all rate limited under the service name [`SERVICE`].
//! - [`machine`]: the workflow: create an instance, wait until it runs, create a volume, wait
//!   until it is available, attach it (the first two with recreation on a wait's deadline).
//! - [`load`]: the scenario driver: many concurrent runs in a child engine process killed at
//!   random moments and restarted until every run settles, then [`report`] and [`figures`]:
//!   what the ground truth says the engine did, against the goals.
//!
//! **Invariant:** the cloud listens on 127.0.0.1 only.

pub mod attach;
pub mod client;
pub mod create;
pub mod figures;
pub mod load;
pub mod machine;
pub mod model;
pub mod probes;
pub mod report;
pub mod server;
pub mod wire;

pub use attach::AttachVolume;
pub use client::SimClient;
pub use create::{CreateInstance, CreateVolume};
pub use load::{ChildProgram, LoadError, LoadParams};
pub use machine::{Machine, MachineSpec, ProvisionMachine};
pub use model::{Cloud, CloudConfig, GroundTruth, Resource};
pub use probes::{InstanceRunning, VolumeAvailable};
pub use report::LoadReport;
pub use server::CloudServer;

/// The rate limit service every step and probe of the simulated cloud names.
pub const SERVICE: &str = "sim";
