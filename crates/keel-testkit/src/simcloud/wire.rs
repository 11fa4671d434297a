//! The simulated cloud's protocol: one JSON object per line each way, a request and its reply,
//! on a connection the client may reuse.

use serde::{Deserialize, Serialize};

/// A kind of resource.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A virtual machine: pending, then running.
    Instance,
    /// A block volume: creating, then available (and in use once attached).
    Volume,
}

impl Kind {
    /// The id prefix, as EC2 spells it.
    pub fn prefix(self) -> &'static str {
        match self {
            Kind::Instance => "i",
            Kind::Volume => "vol",
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kind::Instance => "instance",
            Kind::Volume => "volume",
        })
    }
}

/// A call to the cloud.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Creates a resource, or returns the one created earlier with the same client token.
    /// `run` and `generation` are tags: ground truth for the report, never read back.
    Create {
        /// What to create.
        kind: Kind,
        /// The client token (the step's idempotency key).
        token: String,
        /// The run that asked (a tag).
        run: String,
        /// Which generation of the run's resource this is (a tag).
        generation: u32,
    },
    /// Reads a resource's state; eventually consistent: the answer may lie.
    Describe {
        /// The resource's kind.
        kind: Kind,
        /// Its id.
        id: String,
    },
    /// Finds the resource created with a client token (consistent).
    FindByToken {
        /// The resource's kind.
        kind: Kind,
        /// The client token.
        token: String,
    },
    /// Terminates an instance (detaching its volumes) or deletes a volume. Idempotent.
    Delete {
        /// The resource's kind.
        kind: Kind,
        /// Its id.
        id: String,
    },
    /// Attaches a volume to an instance; both must really be ready. Idempotent.
    Attach {
        /// The volume.
        volume: String,
        /// The instance.
        instance: String,
    },
    /// Detaches a volume from an instance. Idempotent.
    Detach {
        /// The volume.
        volume: String,
        /// The instance.
        instance: String,
    },
}

impl Request {
    /// The resource the call names by id, if any (the volume, for attach and detach).
    pub fn resource_id(&self) -> Option<&str> {
        match self {
            Request::Describe { id, .. } | Request::Delete { id, .. } => Some(id),
            Request::Attach { volume, .. } | Request::Detach { volume, .. } => Some(volume),
            Request::Create { .. } | Request::FindByToken { .. } => None,
        }
    }

    /// The operation's name, for the call log.
    pub fn op(&self) -> Op {
        match self {
            Request::Create { .. } => Op::Create,
            Request::Describe { .. } => Op::Describe,
            Request::FindByToken { .. } => Op::FindByToken,
            Request::Delete { .. } => Op::Delete,
            Request::Attach { .. } => Op::Attach,
            Request::Detach { .. } => Op::Detach,
        }
    }
}

/// The operation of a call, without its arguments.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// [`Request::Create`].
    Create,
    /// [`Request::Describe`].
    Describe,
    /// [`Request::FindByToken`].
    FindByToken,
    /// [`Request::Delete`].
    Delete,
    /// [`Request::Attach`].
    Attach,
    /// [`Request::Detach`].
    Detach,
}

/// What a read says about a resource (which may be a lie around its readiness).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Observed {
    /// Not found (yet): a read inside the visibility window after the create.
    Missing,
    /// Pending (instance) or creating (volume).
    Pending,
    /// Running (instance) or available (volume).
    Ready,
    /// Terminated or deleted.
    Gone,
}

/// Why a call was throttled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Throttle {
    /// The account's token bucket was empty.
    Capacity,
    /// At random (the service's own load).
    Random,
}

/// The cloud's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    /// The resource created (or found by its client token).
    Created {
        /// Its id.
        id: String,
    },
    /// A read's answer.
    State {
        /// What the read says.
        state: Observed,
    },
    /// The resource created with the token, if any.
    Found {
        /// Its id.
        id: Option<String>,
    },
    /// The call took effect (or had nothing left to do).
    Done,
    /// The call was refused for the rate; nothing happened.
    Throttled {
        /// Why.
        cause: Throttle,
    },
    /// No resource has that id.
    NotFound {
        /// The id.
        id: String,
    },
    /// The resource is not in a state that allows the call (not ready yet, in use).
    IncorrectState {
        /// What is wrong.
        message: String,
    },
    /// The call can never succeed (a resource it needs is gone, a malformed request).
    Invalid {
        /// What is wrong.
        message: String,
    },
}
