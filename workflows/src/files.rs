//! `files.s3-to-sftp`: the field report's hand-off, done so that the consumer can trust the
//! final name. An S3 object is downloaded in parallel ranges into a local staging directory
//! and verified (`s3.download-to-file`: the caller's SHA-256, the object's own checksum, or
//! its single-part ETag), then delivered over SFTP (`sftp.upload`: a temporary name, read
//! back and checked, renamed into place). The run completes only once the remote file is
//! complete and verified; a run that cannot finish removes what it delivered and staged.
//! After a delivery the verified copy stays in the staging directory (the output names it):
//! remove it when it is no longer needed. Names are staged as they are delivered, so two
//! deliveries of different objects under one name need different staging directories.
//!
//! Not among [`crate::KeelWorkflows::provisioning_workflows`]: its input names local paths
//! (the staging directory, the known-hosts file, the credential file), so it belongs to
//! embedders who trust their callers, not to a worker that takes input from its API.
//! Register it with [`crate::KeelWorkflows::delivery_workflows`].

use std::path::PathBuf;

use keel_engine::{Ctx, InvalidInput, Workflow, WorkflowError};
use keel_steps::files::Published;
use keel_steps::s3::{DownloadToFile, PARTS_MAX};
use keel_steps::sftp::{Credential, Server, Upload, Uploaded};
use serde::{Deserialize, Serialize};

use crate::validate;

/// Ranges downloaded at once when `parts` is not given.
pub const PARTS_DEFAULT: u32 = 4;

/// Input of [`S3ToSftp`]. A field it does not know is refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveryInput {
    /// The bucket (3 to 63 of lowercase letters, digits, `.` and `-`).
    pub bucket: String,
    /// The object key (1 to 1,024 bytes).
    pub key: String,
    /// The object's expected SHA-256 (64 hex digits); needed for a multipart object
    /// uploaded without checksums.
    #[serde(default)]
    pub sha256: Option<String>,
    /// Local directory (absolute, existing) the verified copy is staged in, under `name`.
    pub staging_dir: PathBuf,
    /// The SFTP server and how to log in (paths of files: no secret in the input).
    pub server: Server,
    /// The remote directory (absolute, existing).
    pub remote_dir: String,
    /// The file's name, locally and remotely; the key's last segment when absent.
    #[serde(default)]
    pub name: Option<String>,
    /// Ranges downloaded at once (1 to 16, default [`PARTS_DEFAULT`]).
    #[serde(default)]
    pub parts: Option<u32>,
}

impl DeliveryInput {
    /// The file's name: `name`, or the key's last segment.
    pub fn file_name(&self) -> &str {
        self.name
            .as_deref()
            .unwrap_or_else(|| self.key.rsplit('/').next().unwrap_or(&self.key))
    }
}

/// What [`S3ToSftp`] delivered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    /// The verified local copy.
    pub staged: Published,
    /// The verified remote file.
    pub delivered: Uploaded,
}

/// `files.s3-to-sftp`.
#[derive(Debug)]
pub struct S3ToSftp;

impl Workflow for S3ToSftp {
    const NAME: &'static str = "files.s3-to-sftp";
    type Input = DeliveryInput;
    type Output = Delivery;

    fn validate(input: &DeliveryInput) -> Result<(), InvalidInput> {
        validate::bucket("bucket", &input.bucket)?;
        if input.key.is_empty() || input.key.len() > 1024 {
            return Err(InvalidInput::new(
                "key",
                format!("must be 1 to 1024 bytes, not {}", input.key.len()),
            ));
        }
        if let Some(sha256) = &input.sha256 {
            validate::sha256("sha256", sha256)?;
        }
        validate::absolute_path("staging_dir", &input.staging_dir)?;
        validate::file_name(
            if input.name.is_some() { "name" } else { "key" },
            input.file_name(),
        )?;
        let server = &input.server;
        if server.host.is_empty() || server.host.len() > 253 {
            return Err(InvalidInput::new("server.host", "must be 1 to 253 bytes"));
        }
        if server.port == 0 {
            return Err(InvalidInput::new("server.port", "must not be 0"));
        }
        if server.user.is_empty() || server.user.len() > 256 {
            return Err(InvalidInput::new("server.user", "must be 1 to 256 bytes"));
        }
        validate::absolute_path("server.known_hosts", &server.known_hosts)?;
        match &server.credential {
            Credential::KeyFile { path } | Credential::PasswordFile { path } => {
                validate::absolute_path("server.credential.path", path)?
            }
        }
        if !input.remote_dir.starts_with('/') {
            return Err(InvalidInput::new(
                "remote_dir",
                format!("{:?} must be an absolute path", input.remote_dir),
            ));
        }
        if let Some(parts) = input.parts {
            validate::count("parts", parts as usize, 1, PARTS_MAX as usize)?;
        }
        Ok(())
    }

    async fn run(ctx: &mut Ctx, input: DeliveryInput) -> Result<Delivery, WorkflowError> {
        let name = input.file_name().to_string();
        let staged = ctx
            .step(DownloadToFile {
                bucket: input.bucket.clone(),
                key: input.key.clone(),
                dir: input.staging_dir.clone(),
                name: name.clone(),
                parts: input.parts.unwrap_or(PARTS_DEFAULT),
                marker: false,
                sha256: input.sha256.as_ref().map(|s| s.to_ascii_lowercase()),
            })
            .await?;
        let delivered = ctx
            .step(Upload {
                server: input.server,
                source: staged.path.clone(),
                dir: input.remote_dir,
                name,
                size: staged.size,
                sha256: staged.sha256.clone(),
            })
            .await?;
        Ok(Delivery { staged, delivered })
    }
}
