//! The SSH side of `sftp.upload`: the host key checked against a known-hosts file, the login,
//! the SFTP session, and the pipelined writes and read-backs the upload is made of.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{FuturesOrdered, StreamExt};
use keel_engine::{crash, StepError};
use russh::keys::{Algorithm, PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate};
use russh_sftp::client::error::Error as SftpError;
use russh_sftp::client::RawSftpSession;
use russh_sftp::protocol::{FileAttributes, OpenFlags, StatusCode};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

use super::{
    Credential, Server, CONNECT_TIMEOUT, IN_FLIGHT, REQUEST_BYTES, REQUEST_TIMEOUT_S,
    SYNC_TIMEOUT_S,
};
use crate::files::hex;

/// Why a connection failed before SFTP started.
#[derive(Debug, thiserror::Error)]
enum ConnectError {
    #[error(transparent)]
    Ssh(#[from] russh::Error),
    #[error(
        "its {algorithm} host key is not the one recorded at line {line} of {known_hosts}: refused"
    )]
    HostKeyChanged {
        algorithm: String,
        line: usize,
        known_hosts: String,
    },
    #[error("its host key ({algorithm}) is not in {known_hosts}: refused")]
    HostKeyUnknown {
        algorithm: String,
        known_hosts: String,
    },
}

/// Checks the server's key against the keys the known-hosts file records for it.
struct HostCheck {
    /// (line, key) of every entry for the server.
    recorded: Vec<(usize, PublicKey)>,
    known_hosts: PathBuf,
}

impl russh::client::Handler for HostCheck {
    type Error = ConnectError;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, ConnectError> {
        let key = key.public_key();
        // Any recorded key accepts the server (several keys of one type during a rotation);
        // a recorded key of its type that is not it means the key changed.
        if self
            .recorded
            .iter()
            .any(|(_, r)| r.key_data() == key.key_data())
        {
            return Ok(true);
        }
        let known_hosts = self.known_hosts.display().to_string();
        let algorithm = key.algorithm();
        match self
            .recorded
            .iter()
            .find(|(_, r)| same_key_type(&r.algorithm(), &algorithm))
        {
            Some((line, _)) => Err(ConnectError::HostKeyChanged {
                algorithm: algorithm.to_string(),
                line: *line,
                known_hosts,
            }),
            None => Err(ConnectError::HostKeyUnknown {
                algorithm: algorithm.to_string(),
                known_hosts,
            }),
        }
    }
}

/// A logged-in SFTP session to a [`Server`] whose host key was checked, for other SFTP work
/// than uploads (and the tests' own writers).
pub struct Connection {
    ssh: russh::client::Handle<HostCheck>,
    pub(super) sftp: Arc<RawSftpSession>,
    extensions: HashMap<String, String>,
    pub(super) label: String,
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
        let recorded = recorded_keys(server)?;
        let mut config = russh::client::Config {
            nodelay: true,
            inactivity_timeout: Some(Duration::from_secs(REQUEST_TIMEOUT_S * 2)),
            ..Default::default()
        };
        // Ask first for the host key types the file records, as OpenSSH does, so a server with
        // several keys shows one that can be checked; the others stay, so a server with none
        // of them is refused as unknown rather than failing to negotiate.
        let (mut preferred, others): (Vec<Algorithm>, Vec<Algorithm>) =
            config.preferred.key.iter().cloned().partition(|a| {
                recorded
                    .iter()
                    .any(|(_, r)| same_key_type(a, &r.algorithm()))
            });
        preferred.extend(others);
        config.preferred.key = preferred.into();
        let check = HostCheck {
            recorded,
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

    /// The attributes of `path` (not following a link), or `None` if it does not exist.
    pub(super) async fn attributes(&self, path: &str) -> Result<Option<FileAttributes>, StepError> {
        match self.sftp.lstat(path).await {
            Ok(attrs) => Ok(Some(attrs.attrs)),
            Err(SftpError::Status(s)) if s.status_code == StatusCode::NoSuchFile => Ok(None),
            Err(e) => Err(self.failure("reading the attributes of", path, e)),
        }
    }

    pub(super) async fn remove_if_present(&self, path: &str) -> Result<(), StepError> {
        match self.sftp.remove(path).await {
            Ok(_) => Ok(()),
            Err(SftpError::Status(s)) if s.status_code == StatusCode::NoSuchFile => Ok(()),
            Err(e) => Err(self.failure("removing", path, e)),
        }
    }

    /// Creates `path` (which must not exist) and writes `source` into it with up to
    /// [`IN_FLIGHT`] requests at once, then syncs and closes it.
    pub(super) async fn write(
        &self,
        path: &str,
        source: &Path,
        dir: &str,
    ) -> Result<(), StepError> {
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
            Ok(()) if self.extensions.contains_key("fsync@openssh.com") => {
                // A large file on slow storage may take longer to sync than a request.
                self.sftp.set_timeout(SYNC_TIMEOUT_S);
                let synced = self.sftp.fsync(handle.as_str()).await;
                self.sftp.set_timeout(REQUEST_TIMEOUT_S);
                synced
                    .map(drop)
                    .map_err(|e| self.failure("syncing", path, e))
            }
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
        // Not spawned: the requests in flight end with the step, never after it.
        let mut in_flight = FuturesOrdered::new();
        let (mut offset, mut done) = (0u64, 0usize);
        loop {
            let mut chunk = vec![0u8; REQUEST_BYTES];
            let n = read_full(&mut file, &mut chunk).await.map_err(|e| {
                StepError::retryable(format!("reading the source {}: {e}", source.display()))
            })?;
            if n == 0 {
                break;
            }
            chunk.truncate(n);
            in_flight.push_back(self.sftp.write(handle, offset, chunk));
            offset += n as u64;
            if in_flight.len() >= IN_FLIGHT {
                self.written(in_flight.next().await, path, &mut done)
                    .await?;
            }
        }
        while !in_flight.is_empty() {
            self.written(in_flight.next().await, path, &mut done)
                .await?;
        }
        Ok(())
    }

    /// One write's answer; the first one written is a crash point (a temporary file on the
    /// server holds part of the content).
    async fn written(
        &self,
        answer: Option<Result<russh_sftp::protocol::Status, SftpError>>,
        path: &str,
        done: &mut usize,
    ) -> Result<(), StepError> {
        let Some(answer) = answer else { return Ok(()) };
        answer.map_err(|e| self.failure("writing", path, e))?;
        *done += 1;
        if *done == 1 {
            crash::point("sftp.after_partial_write");
        }
        Ok(())
    }

    /// The size and SHA-256 of `path` as the server returns it, read with up to
    /// [`IN_FLIGHT`] requests at once.
    pub(super) async fn digest(&self, path: &str) -> Result<(u64, String), StepError> {
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
        let (mut size, mut next) = (0u64, 0u64);
        let mut in_flight = FuturesOrdered::new();
        let mut ended = false;
        loop {
            while !ended && in_flight.len() < IN_FLIGHT {
                in_flight.push_back(read_range(&self.sftp, handle, next));
                next += REQUEST_BYTES as u64;
            }
            let Some(bytes) = in_flight.next().await else {
                break;
            };
            let bytes = bytes.map_err(|e| self.failure("reading back", path, e))?;
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

/// The keys the known-hosts file records for the server, with their lines: a missing file or
/// one without the server is refused before connecting, naming the file and the entry it
/// needs.
fn recorded_keys(server: &Server) -> Result<Vec<(usize, PublicKey)>, StepError> {
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
    Ok(recorded)
}

/// RSA keys sign with several hashes; every other type is itself.
fn same_key_type(offered: &Algorithm, recorded: &Algorithm) -> bool {
    offered == recorded
        || (matches!(offered, Algorithm::Rsa { .. }) && matches!(recorded, Algorithm::Rsa { .. }))
}
