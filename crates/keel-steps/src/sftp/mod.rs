//! `sftp.upload`: a local file delivered to an SFTP server so that a consumer watching the
//! destination directory never sees a partial file under the final name.
//!
//! The upload writes a temporary name in the destination directory (`.NAME.<key>.partial`, a
//! dotfile, which consumers ignore), with many writes in flight; asks the server to sync it
//! (`fsync@openssh.com`, where the server offers it); reads it back and checks its size and
//! SHA-256 (OpenSSH offers no server-side hash, so the check costs one download); and only
//! then renames it to the final name. The rename is SFTP's own `RENAME`, which refuses an
//! existing target (OpenSSH does it as `link` + `unlink`: atomic, and never replaces a
//! file). `posix-rename@openssh.com` is not used, because it would replace a file someone
//! else put under the final name after the check.
//!
//! Idempotent by the step's key: a retry adopts a finished file (the final name holds the
//! expected size and digest), removes what an earlier attempt left under its temporary name
//! and starts over; a file of other content under the final name is a permanent conflict,
//! never overwritten. Compensation removes the final file only if it holds the uploaded
//! content, and the temporary file.
//!
//! The server's host key is checked against a known-hosts file (OpenSSH's format, plain or
//! hashed entries, `[host]:port` for other ports than 22): a missing file, an unknown host
//! and a changed key are permanent errors. The credential is a private key file or a
//! password file: the step's argument (journaled) holds its path, never the secret.

use std::path::PathBuf;
use std::time::Duration;

use keel_engine::{crash, Compensation, IdempotencyKey, Step, StepContext, StepError};
use serde::{Deserialize, Serialize};

use crate::files::{blocking, digest_of, PARTIAL_SUFFIX};

mod connection;
pub use connection::Connection;

/// Bytes per SFTP write or read request: every server must take 32 KiB.
pub const REQUEST_BYTES: usize = 32 * 1024;

/// Requests in flight at once while writing or reading back (1 MiB in all).
pub const IN_FLIGHT: usize = 32;

/// How long the connection and the login may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// How long one SFTP request may wait for its answer (seconds).
pub const REQUEST_TIMEOUT_S: u64 = 60;

/// Longest file name: the temporary name adds a dot, the step's key and `.partial`, and
/// must stay within the usual 255 bytes.
pub const NAME_LEN_MAX: usize = 200;

/// How long the server may take to sync the temporary file (seconds).
pub const SYNC_TIMEOUT_S: u64 = 600;

/// An SFTP server and how to log in to it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Server {
    /// Host name or address, as the known-hosts file names it.
    pub host: String,
    /// TCP port (22 unless given).
    #[serde(default = "default_port")]
    pub port: u16,
    /// The user to log in as.
    pub user: String,
    /// The known-hosts file the server's key must be in.
    pub known_hosts: PathBuf,
    /// How to log in.
    pub credential: Credential,
}

fn default_port() -> u16 {
    22
}

/// A credential, always read from a file when the step runs: its path is journaled, the
/// secret never is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Credential {
    /// An OpenSSH private key file without passphrase (ed25519, ECDSA or RSA).
    KeyFile {
        /// The key file.
        path: PathBuf,
    },
    /// A file holding the password (one trailing newline is ignored).
    PasswordFile {
        /// The password file.
        path: PathBuf,
    },
}

/// `sftp.upload`: delivers the local file `source` as `dir/name` on `server`, verified
/// against `size` and `sha256`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upload {
    /// Where to.
    pub server: Server,
    /// The local file to send.
    pub source: PathBuf,
    /// The remote directory (absolute; must exist).
    pub dir: String,
    /// The final file name (no `/`, not starting with `.`).
    pub name: String,
    /// The expected size in bytes.
    pub size: u64,
    /// The expected SHA-256, lowercase hex.
    pub sha256: String,
}

/// What an upload delivered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Uploaded {
    /// The remote path of the final file.
    pub path: String,
    /// Its size.
    pub size: u64,
    /// Its SHA-256, lowercase hex, as read back from the server.
    pub sha256: String,
}

/// The steps of this module, for `EngineBuilder::steps`.
pub const STEPS: &[keel_engine::StepType] = &[keel_engine::StepType::of::<Upload>()];

impl Step for Upload {
    const KIND: &'static str = "sftp.upload";
    type Output = Uploaded;

    async fn execute(&self, ctx: &StepContext) -> Result<Uploaded, StepError> {
        self.check()?;
        let remote = Connection::open(&self.server).await?;
        let result = self.upload(&remote, ctx.key()).await;
        remote.close().await;
        result
    }

    async fn compensate(
        &self,
        ctx: &StepContext,
        _: Option<Uploaded>,
    ) -> Result<Compensation, StepError> {
        self.check()?;
        let remote = Connection::open(&self.server).await?;
        let result = self.remove(&remote, ctx.key()).await;
        remote.close().await;
        result.map(|()| Compensation::Done)
    }
}

impl Upload {
    /// The argument's own checks: they fail before any connection.
    fn check(&self) -> Result<(), StepError> {
        let name = &self.name;
        if name.is_empty()
            || name.len() > NAME_LEN_MAX
            || name.starts_with('.')
            || name.contains('/')
            || name.contains('\0')
        {
            return Err(StepError::permanent(format!(
                "file name {name:?}: must be 1 to {NAME_LEN_MAX} bytes, without '/', and not \
                 start with '.'"
            )));
        }
        if !self.dir.starts_with('/') || self.dir.contains('\0') {
            return Err(StepError::permanent(format!(
                "remote directory {:?}: must be an absolute path",
                self.dir
            )));
        }
        let hex = self.sha256.len() == 64
            && self
                .sha256
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !hex {
            return Err(StepError::permanent(format!(
                "sha256 {:?} is not 64 lowercase hex digits",
                self.sha256
            )));
        }
        Ok(())
    }

    /// The remote final path.
    pub fn final_path(&self) -> String {
        format!("{}/{}", self.dir.trim_end_matches('/'), self.name)
    }

    /// The remote temporary path of the attempt's key.
    pub fn partial_path(&self, key: IdempotencyKey) -> String {
        format!(
            "{}/.{}.{key}{PARTIAL_SUFFIX}",
            self.dir.trim_end_matches('/'),
            self.name
        )
    }

    fn uploaded(&self) -> Uploaded {
        Uploaded {
            path: self.final_path(),
            size: self.size,
            sha256: self.sha256.clone(),
        }
    }

    async fn upload(
        &self,
        remote: &Connection,
        key: IdempotencyKey,
    ) -> Result<Uploaded, StepError> {
        let (target, partial) = (self.final_path(), self.partial_path(key));
        match self.found(remote, &target).await? {
            Found::Ours => {
                remote.remove_if_present(&partial).await?;
                tracing::debug!(path = %target, "found uploaded by an earlier attempt");
                return Ok(self.uploaded());
            }
            Found::Other(conflict) => return Err(conflict),
            Found::Absent => {}
        }
        self.check_source().await?;
        remote.remove_if_present(&partial).await?;
        let sent = self.send(remote, &partial, &target).await;
        if sent.is_err() {
            // No attempt leaves its temporary file behind: a permanent failure is not undone
            // by a compensation, since the step never succeeded.
            if let Err(e) = remote.remove_if_present(&partial).await {
                tracing::warn!(path = %partial, error = %e, "temporary file left");
            }
        }
        sent
    }

    /// Writes, verifies and renames into place; the caller removes the temporary file if
    /// this fails.
    async fn send(
        &self,
        remote: &Connection,
        partial: &str,
        target: &str,
    ) -> Result<Uploaded, StepError> {
        remote.write(partial, &self.source, &self.dir).await?;
        crash::point("sftp.after_sync");
        let (size, sha256) = remote.digest(partial).await?;
        if size != self.size || sha256 != self.sha256 {
            return Err(StepError::retryable(format!(
                "{partial} read back as {size} bytes with sha256 {sha256}; sent {} bytes with \
                 sha256 {}: removed, to be sent again",
                self.size, self.sha256
            )));
        }
        if let Err(e) = remote.sftp.rename(partial, target).await {
            // Refused because the target exists, or failed: what is there decides.
            return match self.found(remote, target).await? {
                Found::Ours => Ok(self.uploaded()),
                Found::Other(conflict) => Err(conflict),
                Found::Absent => Err(StepError::retryable(format!(
                    "sftp {}: renaming {partial} to {target}: {e}",
                    remote.label
                ))),
            };
        }
        crash::point("sftp.after_rename");
        tracing::info!(path = %target, size, host = %self.server.host, "uploaded");
        Ok(self.uploaded())
    }

    /// The local source must be what the caller said: a mismatch is permanent.
    async fn check_source(&self) -> Result<(), StepError> {
        let source = self.source.clone();
        let (size, sha256) = blocking(move || {
            digest_of(&source).map_err(|e| {
                let message = format!("cannot read the source {}: {e}", source.display());
                if e.kind() == std::io::ErrorKind::NotFound {
                    StepError::permanent(message)
                } else {
                    StepError::retryable(message)
                }
            })
        })
        .await?;
        if size != self.size || sha256 != self.sha256 {
            return Err(StepError::permanent(format!(
                "the source {} is {size} bytes with sha256 {sha256}; expected {} bytes with \
                 sha256 {}: not uploaded",
                self.source.display(),
                self.size,
                self.sha256
            )));
        }
        Ok(())
    }

    /// What is under `target`: nothing, the expected content in a regular file, or something
    /// else (a permanent conflict, never overwritten). Failing to find out is an error.
    async fn found(&self, remote: &Connection, target: &str) -> Result<Found, StepError> {
        let Some(attrs) = remote.attributes(target).await? else {
            return Ok(Found::Absent);
        };
        let size = attrs.size.unwrap_or(0);
        let regular = attrs
            .permissions
            .is_some_and(|mode| mode & FILE_TYPE_MASK == REGULAR_FILE);
        let what = if !regular {
            "something that is not a regular file".to_string()
        } else if size != self.size {
            format!("other content ({size} bytes)")
        } else {
            let sha256 = remote.digest(target).await?.1;
            if sha256 == self.sha256 {
                return Ok(Found::Ours);
            }
            format!("other content ({size} bytes, sha256 {sha256})")
        };
        Ok(Found::Other(StepError::permanent(format!(
            "{target} on {} holds {what}; expected {} bytes, sha256 {}: not overwritten",
            self.server.host, self.size, self.sha256
        ))))
    }

    async fn remove(&self, remote: &Connection, key: IdempotencyKey) -> Result<(), StepError> {
        let target = self.final_path();
        match self.found(remote, &target).await? {
            Found::Ours => remote.remove_if_present(&target).await?,
            Found::Absent => {}
            Found::Other(_) => tracing::warn!(
                path = %target,
                "left in place: it holds other content than this step uploaded"
            ),
        }
        remote.remove_if_present(&self.partial_path(key)).await
    }
}

/// The file type bits of a mode, and a regular file's.
const FILE_TYPE_MASK: u32 = 0o170_000;
const REGULAR_FILE: u32 = 0o100_000;

/// What a final name holds.
enum Found {
    Absent,
    Ours,
    Other(StepError),
}
