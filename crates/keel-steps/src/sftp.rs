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

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use keel_engine::{crash, Compensation, IdempotencyKey, Step, StepContext, StepError};
use russh::keys::{Algorithm, PrivateKeyWithHashAlg, PublicKeyOrCertificate};
use russh_sftp::client::error::Error as SftpError;
use russh_sftp::client::RawSftpSession;
use russh_sftp::protocol::{FileAttributes, OpenFlags, StatusCode};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

use crate::files::{blocking, digest_of, hex, PARTIAL_SUFFIX};

/// Bytes per SFTP write or read request: every server must take 32 KiB.
pub const REQUEST_BYTES: usize = 32 * 1024;

/// Requests in flight at once while writing or reading back (1 MiB in all).
pub const IN_FLIGHT: usize = 32;

/// How long the connection and the login may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// How long one SFTP request may wait for its answer (seconds).
pub const REQUEST_TIMEOUT_S: u64 = 60;

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
        if name.is_empty() || name.starts_with('.') || name.contains('/') || name.contains('\0') {
            return Err(StepError::permanent(format!(
                "file name {name:?}: must be non-empty, without '/', and not start with '.'"
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
        if self.holds_ours(remote, &target).await? {
            remote.remove_if_present(&partial).await?;
            tracing::debug!(path = %target, "found uploaded by an earlier attempt");
            return Ok(self.uploaded());
        }
        remote.remove_if_present(&partial).await?;
        remote.write(&partial, &self.source, &self.dir).await?;
        crash::point("sftp.after_sync");
        let (size, sha256) = remote.digest(&partial).await?;
        if size != self.size || sha256 != self.sha256 {
            remote.remove_if_present(&partial).await?;
            return Err(StepError::retryable(format!(
                "{partial} read back as {size} bytes with sha256 {sha256}; sent {} bytes with \
                 sha256 {}: removed, to be sent again",
                self.size, self.sha256
            )));
        }
        if let Err(e) = remote.sftp.rename(partial.as_str(), target.as_str()).await {
            // Refused because the target exists (or the server failed): what is there decides.
            let ours = self.holds_ours(remote, &target).await;
            remote.remove_if_present(&partial).await?;
            return match ours {
                Ok(true) => Ok(self.uploaded()),
                Ok(false) => Err(remote.failure("renaming into place", &target, e)),
                Err(conflict) => Err(conflict),
            };
        }
        crash::point("sftp.after_rename");
        tracing::info!(path = %target, size, host = %self.server.host, "uploaded");
        Ok(self.uploaded())
    }

    /// Whether `target` holds the expected content: `false` when it does not exist, a
    /// permanent conflict when it holds other content.
    async fn holds_ours(&self, remote: &Connection, target: &str) -> Result<bool, StepError> {
        let Some(size) = remote.size_of(target).await? else {
            return Ok(false);
        };
        let sha256 = if size == self.size {
            remote.digest(target).await?.1
        } else {
            String::new()
        };
        if size != self.size || sha256 != self.sha256 {
            return Err(StepError::permanent(format!(
                "{target} on {} exists with other content ({size} bytes{}); expected {} bytes, \
                 sha256 {}: not overwritten",
                self.server.host,
                if sha256.is_empty() {
                    String::new()
                } else {
                    format!(", sha256 {sha256}")
                },
                self.size,
                self.sha256
            )));
        }
        Ok(true)
    }

    async fn remove(&self, remote: &Connection, key: IdempotencyKey) -> Result<(), StepError> {
        let target = self.final_path();
        match self.holds_ours(remote, &target).await {
            Ok(true) => remote.remove_if_present(&target).await?,
            Ok(false) => {}
            Err(_) => tracing::warn!(
                path = %target,
                "left in place: it holds other content than this step uploaded"
            ),
        }
        remote.remove_if_present(&self.partial_path(key)).await
    }
}

/// Why a connection failed before SFTP started.
#[derive(Debug, thiserror::Error)]
enum ConnectError {
    #[error(transparent)]
    Ssh(#[from] russh::Error),
    #[error("its host key is not the one line {line} of {known_hosts} records: refused")]
    HostKeyChanged { line: usize, known_hosts: String },
    #[error("its host key ({algorithm}) is not in {known_hosts}: refused")]
    HostKeyUnknown {
        algorithm: String,
        known_hosts: String,
    },
    #[error("cannot read {known_hosts}: {reason}")]
    KnownHosts { known_hosts: String, reason: String },
}

/// Checks the server's key against the known-hosts file.
struct HostCheck {
    host: String,
    port: u16,
    known_hosts: PathBuf,
}

impl russh::client::Handler for HostCheck {
    type Error = ConnectError;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, ConnectError> {
        let key = key.public_key();
        let known_hosts = self.known_hosts.display().to_string();
        match russh::keys::check_known_hosts_path(&self.host, self.port, &key, &self.known_hosts) {
            Ok(true) => Ok(true),
            Ok(false) => Err(ConnectError::HostKeyUnknown {
                algorithm: key.algorithm().to_string(),
                known_hosts,
            }),
            Err(russh::keys::Error::KeyChanged { line }) => {
                Err(ConnectError::HostKeyChanged { line, known_hosts })
            }
            Err(e) => Err(ConnectError::KnownHosts {
                known_hosts,
                reason: e.to_string(),
            }),
        }
    }
}

/// A logged-in SFTP session to a [`Server`] whose host key was checked, for other SFTP work
/// than uploads (and the tests' own writers).
pub struct Connection {
    ssh: russh::client::Handle<HostCheck>,
    sftp: Arc<RawSftpSession>,
    extensions: HashMap<String, String>,
    label: String,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("server", &self.label)
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// Connects, checks the host key, logs in and starts SFTP. Errors are permanent when
    /// retrying cannot help (host key, credential, known-hosts file).
    pub async fn open(server: &Server) -> Result<Connection, StepError> {
        let label = format!("{}@{}:{}", server.user, server.host, server.port);
        tokio::time::timeout(CONNECT_TIMEOUT, Self::connect_within(server, &label))
            .await
            .map_err(|_| {
                StepError::retryable(format!(
                    "sftp {label}: no session within {CONNECT_TIMEOUT:?}"
                ))
            })?
    }

    async fn connect_within(server: &Server, label: &str) -> Result<Connection, StepError> {
        let known_hosts = &server.known_hosts;
        let recorded = known_host_algorithms(server)?;
        let mut config = russh::client::Config {
            nodelay: true,
            inactivity_timeout: Some(Duration::from_secs(REQUEST_TIMEOUT_S * 2)),
            ..Default::default()
        };
        // Offer only the host key types the file records, as OpenSSH does, so a server with
        // several keys shows one that can be checked.
        let preferred: Vec<Algorithm> = config
            .preferred
            .key
            .iter()
            .filter(|a| recorded.iter().any(|r| same_key_type(a, r)))
            .cloned()
            .collect();
        if !preferred.is_empty() {
            config.preferred.key = preferred.into();
        }
        let check = HostCheck {
            host: server.host.clone(),
            port: server.port,
            known_hosts: known_hosts.clone(),
        };
        let mut ssh =
            russh::client::connect(Arc::new(config), (server.host.as_str(), server.port), check)
                .await
                .map_err(|e| match e {
                    ConnectError::Ssh(e) => {
                        StepError::retryable(format!("sftp {label}: cannot connect: {e}"))
                    }
                    refused => StepError::permanent(format!("sftp {label}: {refused}")),
                })?;
        let ssh_failed = |e: russh::Error| StepError::retryable(format!("sftp {label}: {e}"));
        let accepted = match &server.credential {
            Credential::KeyFile { path } => {
                let key = russh::keys::load_secret_key(path, None).map_err(|e| {
                    StepError::permanent(format!(
                        "sftp {label}: cannot load the key file {}: {e}",
                        path.display()
                    ))
                })?;
                let hash = if matches!(key.algorithm(), Algorithm::Rsa { .. }) {
                    ssh.best_supported_rsa_hash()
                        .await
                        .map_err(ssh_failed)?
                        .flatten()
                } else {
                    None
                };
                let key = PrivateKeyWithHashAlg::new(Arc::new(key), hash);
                ssh.authenticate_publickey(&server.user, key)
                    .await
                    .map_err(ssh_failed)?
            }
            Credential::PasswordFile { path } => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    StepError::permanent(format!(
                        "sftp {label}: cannot read the password file {}: {e}",
                        path.display()
                    ))
                })?;
                let password = text.strip_suffix('\n').unwrap_or(&text);
                ssh.authenticate_password(&server.user, password)
                    .await
                    .map_err(ssh_failed)?
            }
        };
        if !accepted.success() {
            return Err(StepError::permanent(format!(
                "sftp {label}: the server refused the login ({})",
                match &server.credential {
                    Credential::KeyFile { path } => format!("key file {}", path.display()),
                    Credential::PasswordFile { path } =>
                        format!("password file {}", path.display()),
                }
            )));
        }
        let channel = ssh.channel_open_session().await.map_err(ssh_failed)?;
        channel
            .request_subsystem(true, "sftp")
            .await
            .map_err(ssh_failed)?;
        let sftp = RawSftpSession::new(channel.into_stream());
        sftp.set_timeout(REQUEST_TIMEOUT_S);
        let version = sftp.init().await.map_err(|e| {
            StepError::retryable(format!(
                "sftp {label}: the SFTP subsystem did not start: {e}"
            ))
        })?;
        Ok(Connection {
            ssh,
            sftp: Arc::new(sftp),
            extensions: version.extensions,
            label: label.into(),
        })
    }

    /// The SFTP session, for requests of its own.
    pub fn sftp(&self) -> &Arc<RawSftpSession> {
        &self.sftp
    }

    /// Ends the SFTP session and the connection.
    pub async fn close(self) {
        let _ = self.sftp.close_session();
        let _ = self
            .ssh
            .disconnect(russh::Disconnect::ByApplication, "", "en")
            .await;
    }

    /// A failure of an SFTP request: permanent when retrying cannot help.
    fn failure(&self, what: &str, path: &str, e: SftpError) -> StepError {
        let message = format!("sftp {}: {what} {path}: {e}", self.label);
        match &e {
            SftpError::Status(s)
                if matches!(
                    s.status_code,
                    StatusCode::NoSuchFile
                        | StatusCode::PermissionDenied
                        | StatusCode::OpUnsupported
                ) =>
            {
                StepError::permanent(message)
            }
            _ => StepError::retryable(message),
        }
    }

    /// The size of `path`, or `None` if it does not exist.
    async fn size_of(&self, path: &str) -> Result<Option<u64>, StepError> {
        match self.sftp.lstat(path).await {
            Ok(attrs) => Ok(Some(attrs.attrs.size.unwrap_or(0))),
            Err(SftpError::Status(s)) if s.status_code == StatusCode::NoSuchFile => Ok(None),
            Err(e) => Err(self.failure("reading the attributes of", path, e)),
        }
    }

    async fn remove_if_present(&self, path: &str) -> Result<(), StepError> {
        match self.sftp.remove(path).await {
            Ok(_) => Ok(()),
            Err(SftpError::Status(s)) if s.status_code == StatusCode::NoSuchFile => Ok(()),
            Err(e) => Err(self.failure("removing", path, e)),
        }
    }

    /// Creates `path` (which must not exist) and writes `source` into it with up to
    /// [`IN_FLIGHT`] requests at once, then syncs and closes it.
    async fn write(&self, path: &str, source: &Path, dir: &str) -> Result<(), StepError> {
        let flags = OpenFlags::CREATE | OpenFlags::EXCLUDE | OpenFlags::WRITE;
        let mut attrs = FileAttributes::empty();
        attrs.permissions = Some(0o644);
        let handle = match self.sftp.open(path, flags, attrs).await {
            Ok(handle) => handle.handle,
            Err(SftpError::Status(s)) if s.status_code == StatusCode::NoSuchFile => {
                return Err(StepError::permanent(format!(
                    "sftp {}: the remote directory {dir} does not exist",
                    self.label
                )))
            }
            Err(e) => return Err(self.failure("creating", path, e)),
        };
        let written = self.write_all(&handle, path, source).await;
        let synced = match written {
            Ok(()) if self.extensions.contains_key("fsync@openssh.com") => self
                .sftp
                .fsync(handle.as_str())
                .await
                .map(drop)
                .map_err(|e| self.failure("syncing", path, e)),
            other => other,
        };
        let closed = self
            .sftp
            .close(handle)
            .await
            .map_err(|e| self.failure("closing", path, e));
        synced.and(closed.map(drop))
    }

    async fn write_all(&self, handle: &str, path: &str, source: &Path) -> Result<(), StepError> {
        let mut file = tokio::fs::File::open(source).await.map_err(|e| {
            StepError::retryable(format!("cannot open the source {}: {e}", source.display()))
        })?;
        let mut in_flight = VecDeque::new();
        let mut offset = 0u64;
        loop {
            let mut chunk = vec![0u8; REQUEST_BYTES];
            let n = read_full(&mut file, &mut chunk).await.map_err(|e| {
                StepError::retryable(format!("reading the source {}: {e}", source.display()))
            })?;
            if n == 0 {
                break;
            }
            chunk.truncate(n);
            let (sftp, handle) = (Arc::clone(&self.sftp), handle.to_string());
            let at = offset;
            in_flight.push_back(tokio::spawn(
                async move { sftp.write(handle, at, chunk).await },
            ));
            if offset == 0 {
                crash::point("sftp.after_partial_write");
            }
            offset += n as u64;
            if in_flight.len() >= IN_FLIGHT {
                self.written(in_flight.pop_front(), path).await?;
            }
        }
        while let Some(task) = in_flight.pop_front() {
            self.written(Some(task), path).await?;
        }
        Ok(())
    }

    async fn written(
        &self,
        task: Option<tokio::task::JoinHandle<Result<russh_sftp::protocol::Status, SftpError>>>,
        path: &str,
    ) -> Result<(), StepError> {
        let Some(task) = task else { return Ok(()) };
        task.await
            .map_err(|e| StepError::retryable(format!("sftp write task ended: {e}")))?
            .map(drop)
            .map_err(|e| self.failure("writing", path, e))
    }

    /// The size and SHA-256 of `path` as the server returns it, read with up to
    /// [`IN_FLIGHT`] requests at once.
    async fn digest(&self, path: &str) -> Result<(u64, String), StepError> {
        let handle = self
            .sftp
            .open(path, OpenFlags::READ, FileAttributes::empty())
            .await
            .map_err(|e| self.failure("opening", path, e))?
            .handle;
        let read = self.digest_open(&handle, path).await;
        let closed = self.sftp.close(handle).await;
        let digest = read?;
        closed.map_err(|e| self.failure("closing", path, e))?;
        Ok(digest)
    }

    async fn digest_open(&self, handle: &str, path: &str) -> Result<(u64, String), StepError> {
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let mut next = 0u64;
        let mut in_flight = VecDeque::new();
        let mut ended = false;
        loop {
            while !ended && in_flight.len() < IN_FLIGHT {
                let (sftp, handle) = (Arc::clone(&self.sftp), handle.to_string());
                let at = next;
                in_flight.push_back(tokio::spawn(
                    async move { read_range(&sftp, &handle, at).await },
                ));
                next += REQUEST_BYTES as u64;
            }
            let Some(task) = in_flight.pop_front() else {
                break;
            };
            let bytes = task
                .await
                .map_err(|e| StepError::retryable(format!("sftp read task ended: {e}")))?
                .map_err(|e| self.failure("reading back", path, e))?;
            if ended {
                continue; // a range asked for past the end
            }
            hasher.update(&bytes);
            size += bytes.len() as u64;
            // A short range is the end; the ranges after it are drained, not hashed.
            ended = bytes.len() < REQUEST_BYTES;
        }
        Ok((size, hex(&hasher.finalize())))
    }
}

/// The bytes of `[offset, offset + REQUEST_BYTES)`, fewer only at the end of the file.
async fn read_range(
    sftp: &RawSftpSession,
    handle: &str,
    offset: u64,
) -> Result<Vec<u8>, SftpError> {
    let mut bytes = Vec::with_capacity(REQUEST_BYTES);
    while bytes.len() < REQUEST_BYTES {
        let want = (REQUEST_BYTES - bytes.len()) as u32;
        match sftp.read(handle, offset + bytes.len() as u64, want).await {
            Ok(data) if data.data.is_empty() => break,
            Ok(data) => bytes.extend_from_slice(&data.data),
            Err(SftpError::Status(s)) if s.status_code == StatusCode::Eof => break,
            Err(e) => return Err(e),
        }
    }
    Ok(bytes)
}

/// Fills `buffer` from `file` unless the file ends first; the count read.
async fn read_full(file: &mut tokio::fs::File, buffer: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buffer.len() {
        let n = file.read(&mut buffer[filled..]).await?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    Ok(filled)
}

/// The key types the known-hosts file records for the server: a missing file or one without
/// the server is refused before connecting, naming the file and the entry it needs.
fn known_host_algorithms(server: &Server) -> Result<Vec<Algorithm>, StepError> {
    let path = &server.known_hosts;
    let label = format!("{}@{}:{}", server.user, server.host, server.port);
    if !path.is_file() {
        return Err(StepError::permanent(format!(
            "sftp {label}: the known-hosts file {} does not exist",
            path.display()
        )));
    }
    let recorded = russh::keys::known_hosts::known_host_keys_path(&server.host, server.port, path)
        .map_err(|e| {
            StepError::permanent(format!(
                "sftp {label}: cannot read the known-hosts file {}: {e}",
                path.display()
            ))
        })?;
    if recorded.is_empty() {
        let entry = if server.port == 22 {
            server.host.clone()
        } else {
            format!("[{}]:{}", server.host, server.port)
        };
        return Err(StepError::permanent(format!(
            "sftp {label}: {} has no key for {entry}: add the server's host key (after checking \
             its fingerprint) to trust it",
            path.display()
        )));
    }
    Ok(recorded
        .into_iter()
        .map(|(_, key)| key.algorithm())
        .collect())
}

/// RSA keys sign with several hashes; every other type is itself.
fn same_key_type(offered: &Algorithm, recorded: &Algorithm) -> bool {
    offered == recorded
        || (matches!(offered, Algorithm::Rsa { .. }) && matches!(recorded, Algorithm::Rsa { .. }))
}
