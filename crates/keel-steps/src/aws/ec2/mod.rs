//! EC2 steps: launch an instance, create a volume, attach and detach it, and the probes that
//! tell when each is usable, as the BOSH AWS CPI does it.
//!
//! Idempotency: `RunInstances` and `CreateVolume` carry the step's key as their
//! `ClientToken`, so EC2 itself answers a retry (after a lost response, a throttled SDK retry
//! or a crash) with the instance or volume the first call made; the same token with other
//! parameters is `IdempotentParameterMismatch`, a permanent conflict naming both. Every
//! instance and volume also carries the key in the tag `keel:key`: a retry looks it up first,
//! and a compensation in doubt finds it there.
//!
//! Reads lag and flap: right after a create, "not found" is the resource not being visible
//! yet (retried, never taken as absence before the service's visibility lag has passed), and
//! an instance may read running, missing, running. The probes answer "not yet" to a miss, so a
//! wait with two confirmations needs two running reads in a row.
//!
//! Termination takes the CPI's fast path: the compensation tags the instance
//! `keel:to-be-deleted`, asks EC2 to terminate it and does not wait (EC2 takes about 50 s, at
//! worst minutes). The sweep ([`SweepInstances`], workflow `ec2.sweep`) terminates again
//! whatever carries the tag and is not terminated.

mod attach;
mod instance;
mod sweep;
mod volume;

pub use attach::{AttachVolume, Attachment, DetachVolume, VolumeAttached};
pub use instance::{Instance, InstanceRunning, RunInstance, Running};
pub use sweep::{InstancesTerminated, SweepInstances, Swept};
pub use volume::{CreateVolume, Volume, VolumeAvailable};

use std::collections::BTreeMap;
use std::time::Duration;

use aws_sdk_ec2::types::{ResourceType, Tag, TagSpecification};
use keel_engine::{LearnedDeadline, WaitPolicy};

use super::KEY_TAG;

/// The tag the fast-path termination puts on an instance before it asks EC2 to terminate it;
/// its value is the key of the step whose compensation did.
pub const TO_BE_DELETED_TAG: &str = "keel:to-be-deleted";

const INSTANCE_NOT_FOUND: &str = "InvalidInstanceID.NotFound";

const VOLUME_NOT_FOUND: &str = "InvalidVolume.NotFound";

const ATTACHMENT_NOT_FOUND: &str = "InvalidAttachment.NotFound";

/// Instance states in which an instance still exists for its owner (not shutting down or
/// terminated).
const LIVE_STATES: &[&str] = &["pending", "running", "stopping", "stopped"];

/// The wait for an instance to run, as the CPI learned it: poll every second (growing to 5 s),
/// two running reads in a row (reads flap), give up at `deadline` (the CPI's lesson: about
/// 60 s) while the kind has fewer than 20 samples, then at twice the learned p90 (a fresh
/// instance usually runs in about p50, so replacing one that is past the usual tail costs
/// less than waiting on it: [`LearnedDeadline::UsualTail`]).
pub fn instance_running_policy(deadline: Duration) -> WaitPolicy {
    recreatable(Duration::from_secs(1), Duration::from_secs(5), deadline)
}

/// The wait for a volume to be available: as [`instance_running_policy`], polling from
/// 250 ms (the CPI's lesson for the deadline: about 10 s).
pub fn volume_available_policy(deadline: Duration) -> WaitPolicy {
    recreatable(Duration::from_millis(250), Duration::from_secs(2), deadline)
}

/// The wait for an attachment: it cannot be recreated, so the learned deadline stays at the
/// far tail; polls from 500 ms.
pub fn volume_attached_policy(deadline: Duration) -> WaitPolicy {
    let mut policy = WaitPolicy::every(Duration::from_millis(500), deadline)
        .confirmations(2)
        .learned();
    policy.interval_max = Duration::from_secs(5);
    policy
}

fn recreatable(interval: Duration, interval_max: Duration, deadline: Duration) -> WaitPolicy {
    let mut policy = WaitPolicy::every(interval, deadline)
        .confirmations(2)
        .learned()
        .learned_deadline(LearnedDeadline::UsualTail);
    policy.interval_max = interval_max;
    policy
}

/// The tag specification of a create: the key tag and `extra`.
fn tags(resource: ResourceType, key: &str, extra: &BTreeMap<String, String>) -> TagSpecification {
    let mut spec = TagSpecification::builder()
        .resource_type(resource)
        .tags(tag(KEY_TAG, key));
    for (k, v) in extra {
        spec = spec.tags(tag(k, v));
    }
    spec.build()
}

fn tag(key: &str, value: &str) -> Tag {
    Tag::builder().key(key).value(value).build()
}
