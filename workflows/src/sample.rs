//! Sample inputs, shared by the tests, the fleet benchmark and the demo: devices with a
//! connect-only policy, a core whose service role Greengrass can assume, a fleet.

use std::collections::BTreeMap;

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
    }
}

/// A fleet of `count` devices `<prefix>-<i>`, `concurrency` at a time.
pub fn fleet(prefix: &str, count: usize, concurrency: u32) -> FleetInput {
    FleetInput {
        policy_document: CONNECT_ONLY.into(),
        thing_names: (0..count).map(|i| format!("{prefix}-{i}")).collect(),
        attributes: BTreeMap::new(),
        concurrency,
    }
}
