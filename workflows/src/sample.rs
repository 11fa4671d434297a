//! Sample inputs, shared by the tests, the fleet benchmark and the demo: devices with a
//! connect-only policy, a core whose service role Greengrass can assume, a fleet, a machine
//! with a disk. And one sample workflow, [`Inbox`] (`sample.inbox`), that receives events and
//! publishes values without calling AWS, for trying the events API.

use std::collections::BTreeMap;
use std::time::Duration;

use keel_engine::limits::EVENT_NAME_LEN_MAX;
use keel_engine::{Ctx, InvalidInput, Workflow, WorkflowError};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ec2::MachineInput;
use crate::files::DeliveryInput;
use crate::fleet::FleetInput;
use crate::greengrass::CoreInput;
use crate::iam::ServiceRoleInput;
use crate::iot::DeviceInput;

/// A trust policy that lets Greengrass assume the role.
pub const GREENGRASS_TRUST: &str = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"Service":"greengrass.amazonaws.com"},"Action":"sts:AssumeRole"}]}"#;

/// A device policy that allows connecting and nothing else.
pub const CONNECT_ONLY: &str = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"iot:Connect","Resource":"*"}]}"#;

/// The managed policy Greengrass groups' roles usually carry.
pub const GREENGRASS_RESOURCE_ACCESS: &str =
    "arn:aws:iam::aws:policy/service-role/AWSGreengrassResourceAccessRolePolicy";

/// An image moto knows (Amazon Linux, x86_64).
pub const MACHINE_IMAGE: &str = "ami-760aaa0f";

/// A `t3.micro` named `name` with an 8 GiB `gp3` disk, every other field at its default.
pub fn machine(name: &str) -> MachineInput {
    MachineInput {
        name: name.into(),
        image_id: MACHINE_IMAGE.into(),
        instance_type: "t3.micro".into(),
        availability_zone: None,
        disk_size_gib: 8,
        disk_type: Some("gp3".into()),
        device: None,
        generations: None,
        instance_wait_s: None,
        volume_wait_s: None,
        attach_wait_s: None,
    }
}

/// The object `s3://bucket/key` delivered to `port` on the local host as `user`, staged in
/// `/var/lib/keel/staging` and written to `/srv/inbox`, with the key and known-hosts files
/// under `/etc/keel/sftp`.
pub fn delivery(bucket: &str, key: &str, port: u16, user: &str) -> DeliveryInput {
    DeliveryInput {
        bucket: bucket.into(),
        key: key.into(),
        sha256: None,
        staging_dir: "/var/lib/keel/staging".into(),
        server: keel_steps::sftp::Server {
            host: "127.0.0.1".into(),
            port,
            user: user.into(),
            known_hosts: "/etc/keel/sftp/known_hosts".into(),
            credential: keel_steps::sftp::Credential::KeyFile {
                path: "/etc/keel/sftp/id_ed25519".into(),
            },
        },
        remote_dir: "/srv/inbox".into(),
        name: None,
        parts: None,
    }
}

/// A device named `name` with the [`CONNECT_ONLY`] policy.
pub fn device(name: &str) -> DeviceInput {
    DeviceInput {
        thing_name: name.into(),
        policy_document: CONNECT_ONLY.into(),
        attributes: BTreeMap::new(),
    }
}

/// A core `name` (role `<name>-role`, core thing `<name>-core`) with `clients` client devices
/// `<name>-client-<i>`, four onboarded at a time, one minute for the role and the deployment.
pub fn core(name: &str, clients: usize) -> CoreInput {
    CoreInput {
        name: name.into(),
        role: ServiceRoleInput {
            name: format!("{name}-role"),
            trust_policy: GREENGRASS_TRUST.into(),
            managed_policy_arns: vec![GREENGRASS_RESOURCE_ACCESS.into()],
            inline_policies: BTreeMap::new(),
            assume_timeout_s: Some(60),
        },
        core: device(&format!("{name}-core")),
        client_devices: (0..clients).map(|i| format!("{name}-client-{i}")).collect(),
        client_policy_document: CONNECT_ONLY.into(),
        concurrency: 4,
        deployment_timeout_s: Some(60),
        wait_for_check_in: None,
    }
}

/// A fleet of `count` devices `<prefix>-<i>`, `concurrency` at a time.
pub fn fleet(prefix: &str, count: usize, concurrency: u32) -> FleetInput {
    FleetInput {
        policy_document: CONNECT_ONLY.into(),
        thing_names: (0..count).map(|i| format!("{prefix}-{i}")).collect(),
        attributes: BTreeMap::new(),
        concurrency,
        approval_above: None,
    }
}

/// Most receives one [`Inbox`] run makes.
pub const INBOX_EVENTS_MAX: usize = 100;

/// Longest an [`Inbox`] receive waits, `within_s` (seconds: 1 day).
pub const INBOX_WITHIN_S_MAX: u64 = 24 * 3600;

/// Input of [`Inbox`]. A field it does not know is refused.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InboxInput {
    /// The name of each event to take, in order (1 to [`INBOX_EVENTS_MAX`]; each 1 to 64 of
    /// ASCII letters, digits, `.`, `_` and `-`).
    pub events: Vec<String>,
    /// How long each receive waits (seconds, 1 to [`INBOX_WITHIN_S_MAX`]); a receive that
    /// times out is skipped. Default: no limit.
    #[serde(default)]
    pub within_s: Option<u64>,
}

/// What an [`Inbox`] run publishes under [`INBOX_PROGRESS`] after each receive.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboxProgress {
    /// Receives done (taken or timed out).
    pub done: usize,
    /// Receives in all.
    pub of: usize,
    /// The ids of the events taken so far, in order.
    pub event_ids: Vec<String>,
}

/// The name under which an [`Inbox`] run publishes its progress.
pub const INBOX_PROGRESS: &str = "progress";

/// `sample.inbox`: the smallest run that talks to the outside, for trying and testing the
/// events API (`keel send`, `keel get`). It takes one event of each name in its input, in
/// order, publishes [`InboxProgress`] after each, and returns the ids of the events it took.
/// It calls no AWS API and has nothing to undo.
#[derive(Debug)]
pub struct Inbox;

impl Workflow for Inbox {
    const NAME: &'static str = "sample.inbox";
    type Input = InboxInput;
    type Output = Vec<String>;

    fn validate(input: &InboxInput) -> Result<(), InvalidInput> {
        if input.events.is_empty() || input.events.len() > INBOX_EVENTS_MAX {
            return Err(InvalidInput::new(
                "events",
                format!(
                    "{} names is outside 1..={INBOX_EVENTS_MAX}",
                    input.events.len()
                ),
            ));
        }
        for (i, name) in input.events.iter().enumerate() {
            event_name(&format!("events[{i}]"), name)?;
        }
        if matches!(input.within_s, Some(s) if s == 0 || s > INBOX_WITHIN_S_MAX) {
            return Err(InvalidInput::new(
                "within_s",
                format!("must be 1 to {INBOX_WITHIN_S_MAX} seconds"),
            ));
        }
        Ok(())
    }

    async fn run(ctx: &mut Ctx, input: InboxInput) -> Result<Vec<String>, WorkflowError> {
        let within = input.within_s.map(Duration::from_secs);
        let mut event_ids = Vec::with_capacity(input.events.len());
        for (i, name) in input.events.iter().enumerate() {
            match ctx.receive_event::<Value>(&[name.as_str()], within).await {
                Ok(event) => event_ids.push(event.event_id),
                Err(WorkflowError::EventTimedOut { .. }) => {}
                Err(e) => return Err(e),
            }
            let progress = InboxProgress {
                done: i + 1,
                of: input.events.len(),
                event_ids: event_ids.clone(),
            };
            ctx.publish(INBOX_PROGRESS, &progress).await?;
        }
        Ok(event_ids)
    }
}

/// An event name as the engine takes it: 1 to 64 bytes of ASCII letters, digits, `.`, `_`
/// and `-`. Checked here too so that a bad name is refused at the start, naming the field,
/// rather than failing the run at its receive.
fn event_name(field: &str, name: &str) -> Result<(), InvalidInput> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if name.is_empty() || name.len() > EVENT_NAME_LEN_MAX || !name.chars().all(allowed) {
        return Err(InvalidInput::new(
            field,
            format!(
                "{name:?} is not an event name (1 to {EVENT_NAME_LEN_MAX} of ASCII letters, \
                 digits, '.', '_' and '-')"
            ),
        ));
    }
    Ok(())
}
