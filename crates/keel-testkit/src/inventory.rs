//! Ground truth: what exists in moto, read through the real SDK straight from moto (never
//! through a fault proxy), so tests can assert "exactly one of each" or "nothing left".

use std::collections::BTreeMap;

use aws_config::SdkConfig;

/// Everything one account holds in the services Keel provisions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inventory {
    /// IAM roles.
    pub roles: Vec<Role>,
    /// Customer-managed IAM policies (ARNs).
    pub iam_policies: Vec<String>,
    /// IoT things.
    pub things: Vec<Thing>,
    /// IoT certificates.
    pub certificates: Vec<Certificate>,
    /// IoT policies.
    pub iot_policies: Vec<IotPolicy>,
    /// Greengrass groups.
    pub groups: Vec<Group>,
    /// Greengrass core definition ids.
    pub core_definitions: Vec<String>,
    /// Greengrass device definition ids.
    pub device_definitions: Vec<String>,
    /// EC2 instances short of `terminated`.
    pub instances: Vec<Instance>,
    /// EC2 instances that are terminated (moto keeps them for ever, EC2 for about an hour):
    /// not counted by [`Inventory::is_empty`].
    pub terminated_instances: Vec<Instance>,
    /// EC2 volumes, the instances' root volumes among them.
    pub volumes: Vec<Volume>,
}

/// An EC2 instance.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Instance {
    /// Id.
    pub id: String,
    /// State name (`pending`, `running`, ...).
    pub state: String,
    /// Image.
    pub image_id: String,
    /// Type.
    pub instance_type: String,
    /// Tags.
    pub tags: BTreeMap<String, String>,
}

/// An EC2 volume.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Volume {
    /// Id.
    pub id: String,
    /// State (`available`, `in-use`, ...).
    pub state: String,
    /// Size (GiB).
    pub size_gib: i32,
    /// The instances it is attached to, with the device.
    pub attached_to: Vec<(String, String)>,
    /// Tags.
    pub tags: BTreeMap<String, String>,
}

/// An IAM role and what hangs off it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Role {
    /// Name.
    pub name: String,
    /// ARN.
    pub arn: String,
    /// Tags.
    pub tags: BTreeMap<String, String>,
    /// Attached managed policy ARNs.
    pub attached_policies: Vec<String>,
    /// Inline policy names.
    pub inline_policies: Vec<String>,
}

/// An IoT thing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Thing {
    /// Name.
    pub name: String,
    /// ARN.
    pub arn: String,
    /// Attributes.
    pub attributes: BTreeMap<String, String>,
    /// Attached principals (certificate ARNs).
    pub principals: Vec<String>,
}

/// An IoT certificate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Certificate {
    /// Id.
    pub id: String,
    /// ARN.
    pub arn: String,
    /// Status (`ACTIVE`, `INACTIVE`, ...).
    pub status: String,
    /// Names of the IoT policies attached to it.
    pub policies: Vec<String>,
}

/// An IoT policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IotPolicy {
    /// Name.
    pub name: String,
    /// Targets it is attached to (certificate ARNs).
    pub targets: Vec<String>,
}

/// A Greengrass group.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Group {
    /// Id.
    pub id: String,
    /// Name.
    pub name: String,
    /// The associated role, if any.
    pub role_arn: Option<String>,
    /// Deployment ids.
    pub deployments: Vec<String>,
}

/// A listing call failed.
#[derive(Debug, thiserror::Error)]
#[error("reading the inventory from moto failed at {call}: {detail}")]
pub struct InventoryError {
    /// The SDK call.
    pub call: &'static str,
    /// The SDK's error, with its causes.
    pub detail: String,
}

fn failed<E: std::error::Error>(call: &'static str) -> impl FnOnce(E) -> InventoryError {
    move |e| InventoryError {
        call,
        detail: aws_sdk_iam::error::DisplayErrorContext(e).to_string(),
    }
}

impl Inventory {
    /// Reads everything the account holds. `config` must point at moto itself.
    pub async fn read(config: &SdkConfig) -> Result<Inventory, InventoryError> {
        let mut inventory = Inventory::default();
        read_iam(config, &mut inventory).await?;
        read_iot(config, &mut inventory).await?;
        read_greengrass(config, &mut inventory).await?;
        read_ec2(config, &mut inventory).await?;
        Ok(inventory)
    }

    /// Nothing at all (terminated instances aside): what a compensated workflow must leave.
    pub fn is_empty(&self) -> bool {
        Inventory {
            terminated_instances: Vec::new(),
            ..self.clone()
        } == Inventory::default()
    }

    /// The live instances whose tag `key` has the value `value`.
    pub fn instances_tagged(&self, key: &str, value: &str) -> Vec<&Instance> {
        let tagged = |i: &&Instance| i.tags.get(key).map(String::as_str) == Some(value);
        self.instances.iter().filter(tagged).collect()
    }

    /// The volumes whose tag `key` has the value `value`.
    pub fn volumes_tagged(&self, key: &str, value: &str) -> Vec<&Volume> {
        let tagged = |v: &&Volume| v.tags.get(key).map(String::as_str) == Some(value);
        self.volumes.iter().filter(tagged).collect()
    }

    /// The role named `name`.
    pub fn role(&self, name: &str) -> Option<&Role> {
        self.roles.iter().find(|r| r.name == name)
    }

    /// The thing named `name`.
    pub fn thing(&self, name: &str) -> Option<&Thing> {
        self.things.iter().find(|t| t.name == name)
    }

    /// A one-line count of each kind, for assertion messages.
    pub fn summary(&self) -> String {
        format!(
            "{} roles, {} IAM policies, {} things, {} certificates, {} IoT policies, {} groups, {} core definitions, {} device definitions, {} instances ({} terminated), {} volumes",
            self.roles.len(),
            self.iam_policies.len(),
            self.things.len(),
            self.certificates.len(),
            self.iot_policies.len(),
            self.groups.len(),
            self.core_definitions.len(),
            self.device_definitions.len(),
            self.instances.len(),
            self.terminated_instances.len(),
            self.volumes.len()
        )
    }
}

async fn read_iam(config: &SdkConfig, inventory: &mut Inventory) -> Result<(), InventoryError> {
    let iam = aws_sdk_iam::Client::new(config);
    let roles: Vec<_> = iam
        .list_roles()
        .into_paginator()
        .items()
        .send()
        .collect::<Result<_, _>>()
        .await
        .map_err(failed("iam:ListRoles"))?;
    for role in roles {
        let name = role.role_name().to_string();
        let tags = iam
            .list_role_tags()
            .role_name(&name)
            .send()
            .await
            .map_err(failed("iam:ListRoleTags"))?
            .tags()
            .iter()
            .map(|t| (t.key().to_string(), t.value().to_string()))
            .collect();
        let attached_policies = iam
            .list_attached_role_policies()
            .role_name(&name)
            .send()
            .await
            .map_err(failed("iam:ListAttachedRolePolicies"))?
            .attached_policies()
            .iter()
            .filter_map(|p| p.policy_arn().map(str::to_string))
            .collect();
        let inline_policies = iam
            .list_role_policies()
            .role_name(&name)
            .send()
            .await
            .map_err(failed("iam:ListRolePolicies"))?
            .policy_names()
            .to_vec();
        inventory.roles.push(Role {
            arn: role.arn().to_string(),
            name,
            tags,
            attached_policies,
            inline_policies,
        });
    }
    inventory.iam_policies = iam
        .list_policies()
        .scope(aws_sdk_iam::types::PolicyScopeType::Local)
        .send()
        .await
        .map_err(failed("iam:ListPolicies"))?
        .policies()
        .iter()
        .filter_map(|p| p.arn().map(str::to_string))
        .collect();
    Ok(())
}

/// Reads the IoT things, certificates and policies into `inventory`.
async fn read_iot(config: &SdkConfig, inventory: &mut Inventory) -> Result<(), InventoryError> {
    let iot = aws_sdk_iot::Client::new(config);
    inventory.things.extend(read_things(&iot).await?);
    inventory
        .certificates
        .extend(read_certificates(&iot).await?);
    inventory
        .iot_policies
        .extend(read_iot_policies(&iot).await?);
    Ok(())
}

/// Every IoT thing, with its attributes and the principals attached to it.
async fn read_things(iot: &aws_sdk_iot::Client) -> Result<Vec<Thing>, InventoryError> {
    let things: Vec<_> = iot
        .list_things()
        .into_paginator()
        .items()
        .send()
        .collect::<Result<_, _>>()
        .await
        .map_err(failed("iot:ListThings"))?;
    let mut read = Vec::with_capacity(things.len());
    for thing in &things {
        let name = thing.thing_name().unwrap_or_default().to_string();
        let principals = iot
            .list_thing_principals()
            .thing_name(&name)
            .send()
            .await
            .map_err(failed("iot:ListThingPrincipals"))?
            .principals()
            .to_vec();
        read.push(Thing {
            arn: thing.thing_arn().unwrap_or_default().to_string(),
            attributes: thing
                .attributes()
                .map(|a| a.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
                .unwrap_or_default(),
            name,
            principals,
        });
    }
    Ok(read)
}

/// Every IoT certificate, with its status and the policies attached to it.
async fn read_certificates(iot: &aws_sdk_iot::Client) -> Result<Vec<Certificate>, InventoryError> {
    let certificates: Vec<_> = iot
        .list_certificates()
        .into_paginator()
        .items()
        .send()
        .collect::<Result<_, _>>()
        .await
        .map_err(failed("iot:ListCertificates"))?;
    let mut read = Vec::with_capacity(certificates.len());
    for certificate in &certificates {
        let arn = certificate
            .certificate_arn()
            .unwrap_or_default()
            .to_string();
        let policies = iot
            .list_attached_policies()
            .target(&arn)
            .send()
            .await
            .map_err(failed("iot:ListAttachedPolicies"))?
            .policies()
            .iter()
            .filter_map(|p| p.policy_name().map(str::to_string))
            .collect();
        read.push(Certificate {
            id: certificate.certificate_id().unwrap_or_default().to_string(),
            arn,
            status: certificate
                .status()
                .map(|s| s.as_str().to_string())
                .unwrap_or_default(),
            policies,
        });
    }
    Ok(read)
}

/// Every IoT policy, with the targets it is attached to.
async fn read_iot_policies(iot: &aws_sdk_iot::Client) -> Result<Vec<IotPolicy>, InventoryError> {
    let policies: Vec<_> = iot
        .list_policies()
        .into_paginator()
        .items()
        .send()
        .collect::<Result<_, _>>()
        .await
        .map_err(failed("iot:ListPolicies"))?;
    let mut read = Vec::with_capacity(policies.len());
    for policy in &policies {
        let name = policy.policy_name().unwrap_or_default().to_string();
        let targets = iot
            .list_targets_for_policy()
            .policy_name(&name)
            .send()
            .await
            .map_err(failed("iot:ListTargetsForPolicy"))?
            .targets()
            .to_vec();
        read.push(IotPolicy { name, targets });
    }
    Ok(read)
}

async fn read_greengrass(
    config: &SdkConfig,
    inventory: &mut Inventory,
) -> Result<(), InventoryError> {
    let gg = aws_sdk_greengrass::Client::new(config);
    let groups = gg
        .list_groups()
        .send()
        .await
        .map_err(failed("greengrass:ListGroups"))?;
    for group in groups.groups() {
        let id = group.id().unwrap_or_default().to_string();
        // moto answers GetAssociatedRole for a group without a role with an error.
        let role_arn = gg
            .get_associated_role()
            .group_id(&id)
            .send()
            .await
            .ok()
            .and_then(|r| r.role_arn().map(str::to_string));
        let deployments = gg
            .list_deployments()
            .group_id(&id)
            .send()
            .await
            .map_err(failed("greengrass:ListDeployments"))?
            .deployments()
            .iter()
            .filter_map(|d| d.deployment_id().map(str::to_string))
            .collect();
        inventory.groups.push(Group {
            name: group.name().unwrap_or_default().to_string(),
            id,
            role_arn,
            deployments,
        });
    }
    inventory.core_definitions = gg
        .list_core_definitions()
        .send()
        .await
        .map_err(failed("greengrass:ListCoreDefinitions"))?
        .definitions()
        .iter()
        .filter_map(|d| d.id().map(str::to_string))
        .collect();
    inventory.device_definitions = gg
        .list_device_definitions()
        .send()
        .await
        .map_err(failed("greengrass:ListDeviceDefinitions"))?
        .definitions()
        .iter()
        .filter_map(|d| d.id().map(str::to_string))
        .collect();
    Ok(())
}

fn ec2_tags(tags: &[aws_sdk_ec2::types::Tag]) -> BTreeMap<String, String> {
    tags.iter()
        .map(|t| {
            (
                t.key().unwrap_or_default().to_string(),
                t.value().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

async fn read_ec2(config: &SdkConfig, inventory: &mut Inventory) -> Result<(), InventoryError> {
    let ec2 = aws_sdk_ec2::Client::new(config);
    let mut pages = ec2.describe_instances().into_paginator().send();
    while let Some(page) = pages.next().await {
        let page = page.map_err(failed("ec2:DescribeInstances"))?;
        for found in page.reservations().iter().flat_map(|r| r.instances()) {
            let instance = Instance {
                id: found.instance_id().unwrap_or_default().to_string(),
                state: found
                    .state()
                    .and_then(|s| s.name())
                    .map(|n| n.as_str().to_string())
                    .unwrap_or_default(),
                image_id: found.image_id().unwrap_or_default().to_string(),
                instance_type: found
                    .instance_type()
                    .map(|t| t.as_str().to_string())
                    .unwrap_or_default(),
                tags: ec2_tags(found.tags()),
            };
            if instance.state == "terminated" {
                inventory.terminated_instances.push(instance);
            } else {
                inventory.instances.push(instance);
            }
        }
    }
    let mut pages = ec2.describe_volumes().into_paginator().send();
    while let Some(page) = pages.next().await {
        let page = page.map_err(failed("ec2:DescribeVolumes"))?;
        for found in page.volumes() {
            inventory.volumes.push(Volume {
                id: found.volume_id().unwrap_or_default().to_string(),
                state: found
                    .state()
                    .map(|s| s.as_str().to_string())
                    .unwrap_or_default(),
                size_gib: found.size().unwrap_or_default(),
                attached_to: found
                    .attachments()
                    .iter()
                    .map(|a| {
                        (
                            a.instance_id().unwrap_or_default().to_string(),
                            a.device().unwrap_or_default().to_string(),
                        )
                    })
                    .collect(),
                tags: ec2_tags(found.tags()),
            });
        }
    }
    Ok(())
}
