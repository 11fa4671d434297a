//! `CreateCoreDefinition` and `CreateDeviceDefinition`: a definition and its first version in
//! one call (`InitialVersion`), so no definition ever exists without its members.

use aws_sdk_greengrass::types::{
    Core, CoreDefinitionVersion, DefinitionInformation, Device, DeviceDefinitionVersion,
};
use keel_engine::{Compensation, RetryPolicy, Step, StepContext, StepError};
use serde::{Deserialize, Serialize};

use super::super::error::AwsFailure;
use super::super::{
    clients, confirm_absence, gone_after_lag, AWS_COMPENSATION_RETRY_POLICY, AWS_RETRY_POLICY,
    KEY_TAG,
};
use super::{all_pages, is_missing, keyed_name, lag_if_missing, single_attempt};

/// A core or client device in a definition: its thing and certificate.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Member {
    /// Its id in the definition (unique within it).
    pub id: String,
    /// The IoT thing's ARN.
    pub thing_arn: String,
    /// The certificate's ARN.
    pub certificate_arn: String,
    /// Whether its shadow is synced to the cloud.
    pub sync_shadow: bool,
}

/// A definition as created or adopted, with its (first) version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Definition {
    /// Its id.
    pub id: String,
    /// Its ARN.
    pub arn: String,
    /// Its name: `<prefix>-<key>`.
    pub name: String,
    /// The version holding the members.
    pub version_id: String,
    /// That version's ARN (what a group version refers to).
    pub version_arn: String,
}

/// Creates a Greengrass core definition named `<prefix>-<step key>` with one version holding
/// `cores` (Greengrass V1 allows one core per group). A definition of that name holding the
/// same cores is adopted; one holding others is a conflict and is left unchanged.
///
/// Compensation: deletes the definitions of that name that hold these cores (the group that
/// refers to them is deleted first, being created later).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateCoreDefinition {
    /// The name's prefix.
    pub prefix: String,
    /// The cores.
    pub cores: Vec<Member>,
}

/// Creates a Greengrass device definition (the group's client devices) named
/// `<prefix>-<step key>` with one version holding `devices`; adopted and undone as
/// [`CreateCoreDefinition`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateDeviceDefinition {
    /// The name's prefix.
    pub prefix: String,
    /// The client devices.
    pub devices: Vec<Member>,
}

#[derive(Clone, Copy)]
enum Kind {
    Cores,
    Devices,
}

impl Kind {
    fn what(self) -> &'static str {
        match self {
            Kind::Cores => "Greengrass core definition",
            Kind::Devices => "Greengrass device definition",
        }
    }

    async fn list(
        self,
        gg: &aws_sdk_greengrass::Client,
    ) -> Result<Vec<DefinitionInformation>, AwsFailure> {
        match self {
            Kind::Cores => {
                all_pages(|token| async move {
                    let page = gg
                        .list_core_definitions()
                        .set_next_token(token)
                        .send()
                        .await
                        .map_err(|e| AwsFailure::new("greengrass:ListCoreDefinitions", &e))?;
                    Ok((
                        page.definitions().to_vec(),
                        page.next_token().map(str::to_string),
                    ))
                })
                .await
            }
            Kind::Devices => {
                all_pages(|token| async move {
                    let page = gg
                        .list_device_definitions()
                        .set_next_token(token)
                        .send()
                        .await
                        .map_err(|e| AwsFailure::new("greengrass:ListDeviceDefinitions", &e))?;
                    Ok((
                        page.definitions().to_vec(),
                        page.next_token().map(str::to_string),
                    ))
                })
                .await
            }
        }
    }

    /// The members of a definition's version, sorted.
    async fn members(
        self,
        gg: &aws_sdk_greengrass::Client,
        id: &str,
        version: &str,
    ) -> Result<Vec<Member>, AwsFailure> {
        let mut members: Vec<Member> = match self {
            Kind::Cores => gg
                .get_core_definition_version()
                .core_definition_id(id)
                .core_definition_version_id(version)
                .send()
                .await
                .map_err(|e| {
                    lag_if_missing(AwsFailure::new("greengrass:GetCoreDefinitionVersion", &e))
                })?
                .definition()
                .map(|d| {
                    d.cores()
                        .iter()
                        .map(|c| {
                            member(c.id(), c.thing_arn(), c.certificate_arn(), c.sync_shadow())
                        })
                        .collect()
                })
                .unwrap_or_default(),
            Kind::Devices => gg
                .get_device_definition_version()
                .device_definition_id(id)
                .device_definition_version_id(version)
                .send()
                .await
                .map_err(|e| {
                    lag_if_missing(AwsFailure::new("greengrass:GetDeviceDefinitionVersion", &e))
                })?
                .definition()
                .map(|d| {
                    d.devices()
                        .iter()
                        .map(|c| {
                            member(c.id(), c.thing_arn(), c.certificate_arn(), c.sync_shadow())
                        })
                        .collect()
                })
                .unwrap_or_default(),
        };
        members.sort();
        Ok(members)
    }

    async fn create(
        self,
        gg: &aws_sdk_greengrass::Client,
        name: &str,
        key: &str,
        members: &[Member],
    ) -> Result<Definition, AwsFailure> {
        let fields = match self {
            Kind::Cores => create_cores(gg, name, key, members).await?,
            Kind::Devices => create_devices(gg, name, key, members).await?,
        };
        let [id, arn, version_id, version_arn] = fields;
        Ok(Definition {
            id,
            arn,
            name: name.to_string(),
            version_id,
            version_arn,
        })
    }

    /// Deletes definition `id`; one already gone is done once Greengrass's visibility lag
    /// is over (a read that flaps is lag).
    async fn delete(
        self,
        ctx: &StepContext,
        gg: &aws_sdk_greengrass::Client,
        id: &str,
    ) -> Result<(), StepError> {
        let result = match self {
            Kind::Cores => gg
                .delete_core_definition()
                .core_definition_id(id)
                .send()
                .await
                .map(drop)
                .map_err(|e| AwsFailure::new("greengrass:DeleteCoreDefinition", &e)),
            Kind::Devices => gg
                .delete_device_definition()
                .device_definition_id(id)
                .send()
                .await
                .map(drop)
                .map_err(|e| AwsFailure::new("greengrass:DeleteDeviceDefinition", &e)),
        };
        result.or_else(|f| {
            let missing = is_missing(&f);
            gone_after_lag(ctx, "greengrass", f, missing)
        })
    }

    /// The definitions named `name`, each with whether it holds `members` (sorted).
    async fn named(
        self,
        gg: &aws_sdk_greengrass::Client,
        name: &str,
        members: &[Member],
    ) -> Result<Vec<(Definition, bool)>, AwsFailure> {
        let mut found = Vec::new();
        for info in self.list(gg).await? {
            if info.name() != Some(name) {
                continue;
            }
            let definition = Definition {
                id: info.id().unwrap_or_default().to_string(),
                arn: info.arn().unwrap_or_default().to_string(),
                name: name.to_string(),
                version_id: info.latest_version().unwrap_or_default().to_string(),
                version_arn: info.latest_version_arn().unwrap_or_default().to_string(),
            };
            let same = self
                .members(gg, &definition.id, &definition.version_id)
                .await?
                == members;
            found.push((definition, same));
        }
        Ok(found)
    }

    async fn execute(
        self,
        ctx: &StepContext,
        prefix: &str,
        members: &[Member],
    ) -> Result<Definition, StepError> {
        let gg = &clients(ctx)?.greengrass;
        let key = ctx.key().to_string();
        let name = keyed_name(prefix, &ctx.key());
        let mut members = members.to_vec();
        members.sort();
        let found = self.named(gg, &name, &members).await?;
        if let Some((_, false)) = found.iter().find(|(_, same)| !same) {
            return Err(StepError::permanent(format!(
                "conflict: {} {name:?} already exists with other members; nothing was changed",
                self.what()
            )));
        }
        if let Some((definition, _)) = found.into_iter().next() {
            tracing::debug!(definition = %definition.id, "adopting the definition a lost attempt created");
            return Ok(definition);
        }
        Ok(self.create(gg, &name, &key, &members).await?)
    }

    async fn compensate(
        self,
        ctx: &StepContext,
        prefix: &str,
        members: &[Member],
    ) -> Result<Compensation, StepError> {
        let gg = &clients(ctx)?.greengrass;
        let name = keyed_name(prefix, &ctx.key());
        let mut members = members.to_vec();
        members.sort();
        let found = self.named(gg, &name, &members).await?;
        if found.is_empty() {
            confirm_absence(ctx, "greengrass", self.what())?;
            return Ok(Compensation::Done);
        }
        for (definition, same) in found {
            if same {
                self.delete(ctx, gg, &definition.id).await?;
            } else {
                tracing::warn!(definition = %definition.id, "the definition holds other members: not this step's; left alone");
            }
        }
        Ok(Compensation::Done)
    }
}

fn member(
    id: Option<&str>,
    thing: Option<&str>,
    certificate: Option<&str>,
    sync: Option<bool>,
) -> Member {
    Member {
        id: id.unwrap_or_default().to_string(),
        thing_arn: thing.unwrap_or_default().to_string(),
        certificate_arn: certificate.unwrap_or_default().to_string(),
        sync_shadow: sync.unwrap_or(false),
    }
}

fn owned(s: Option<&str>) -> String {
    s.unwrap_or_default().to_string()
}

impl Step for CreateCoreDefinition {
    const KIND: &'static str = "aws.greengrass.create-core-definition";
    type Output = Definition;
    const RETRY_POLICY: RetryPolicy = AWS_RETRY_POLICY;
    const RATE_LIMIT: Option<&'static str> = Some("greengrass");
    const COMPENSATION_RETRY_POLICY: RetryPolicy = AWS_COMPENSATION_RETRY_POLICY;

    async fn execute(&self, ctx: &StepContext) -> Result<Definition, StepError> {
        Kind::Cores.execute(ctx, &self.prefix, &self.cores).await
    }

    async fn compensate(
        &self,
        ctx: &StepContext,
        _output: Option<Definition>,
    ) -> Result<Compensation, StepError> {
        Kind::Cores.compensate(ctx, &self.prefix, &self.cores).await
    }
}

impl Step for CreateDeviceDefinition {
    const KIND: &'static str = "aws.greengrass.create-device-definition";
    type Output = Definition;
    const RETRY_POLICY: RetryPolicy = AWS_RETRY_POLICY;
    const RATE_LIMIT: Option<&'static str> = Some("greengrass");
    const COMPENSATION_RETRY_POLICY: RetryPolicy = AWS_COMPENSATION_RETRY_POLICY;

    async fn execute(&self, ctx: &StepContext) -> Result<Definition, StepError> {
        Kind::Devices
            .execute(ctx, &self.prefix, &self.devices)
            .await
    }

    async fn compensate(
        &self,
        ctx: &StepContext,
        _output: Option<Definition>,
    ) -> Result<Compensation, StepError> {
        Kind::Devices
            .compensate(ctx, &self.prefix, &self.devices)
            .await
    }
}

/// Creates a core definition under the client token `key` (tagged with it), its first
/// version holding `members`: its id, ARN, version id and version ARN.
async fn create_cores(
    gg: &aws_sdk_greengrass::Client,
    name: &str,
    key: &str,
    members: &[Member],
) -> Result<[String; 4], AwsFailure> {
    let cores = members.iter().map(|m| {
        Core::builder()
            .id(&m.id)
            .thing_arn(&m.thing_arn)
            .certificate_arn(&m.certificate_arn)
            .sync_shadow(m.sync_shadow)
            .build()
    });
    let out = gg
        .create_core_definition()
        .name(name)
        .amzn_client_token(key)
        .tags(KEY_TAG, key)
        .initial_version(
            CoreDefinitionVersion::builder()
                .set_cores(Some(cores.collect()))
                .build(),
        )
        .customize()
        .config_override(single_attempt())
        .send()
        .await
        .map_err(|e| AwsFailure::new("greengrass:CreateCoreDefinition", &e))?;
    Ok([
        out.id(),
        out.arn(),
        out.latest_version(),
        out.latest_version_arn(),
    ]
    .map(owned))
}

/// Creates a device definition the same way as [`create_cores`].
async fn create_devices(
    gg: &aws_sdk_greengrass::Client,
    name: &str,
    key: &str,
    members: &[Member],
) -> Result<[String; 4], AwsFailure> {
    let devices = members.iter().map(|m| {
        Device::builder()
            .id(&m.id)
            .thing_arn(&m.thing_arn)
            .certificate_arn(&m.certificate_arn)
            .sync_shadow(m.sync_shadow)
            .build()
    });
    let out = gg
        .create_device_definition()
        .name(name)
        .amzn_client_token(key)
        .tags(KEY_TAG, key)
        .initial_version(
            DeviceDefinitionVersion::builder()
                .set_devices(Some(devices.collect()))
                .build(),
        )
        .customize()
        .config_override(single_attempt())
        .send()
        .await
        .map_err(|e| AwsFailure::new("greengrass:CreateDeviceDefinition", &e))?;
    Ok([
        out.id(),
        out.arn(),
        out.latest_version(),
        out.latest_version_arn(),
    ]
    .map(owned))
}
